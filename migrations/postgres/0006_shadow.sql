-- Shadow mode (README, "Changing policies safely"): what a policy in
-- `mode: shadow` would have done with a call that went on as the enforced
-- policies said. No body, no header, no token: the policy, the person, the
-- outcome, the message they would have been shown.
CREATE TABLE shadow_decisions (
    id              TEXT    PRIMARY KEY NOT NULL,
    policy          TEXT    NOT NULL,
    -- NULL: the call named nobody the identity source accepts
    subject         TEXT,
    -- 'hold', 'pass' or 'refuse'
    decision        TEXT    NOT NULL,
    problem_code    TEXT,
    binding_message TEXT,
    -- JSON array of the countersigners it would have asked, or NULL
    countersigners  TEXT,
    request_method  TEXT    NOT NULL,
    request_path    TEXT    NOT NULL,
    created_at      BIGINT NOT NULL
);

CREATE INDEX shadow_decisions_created ON shadow_decisions (created_at);
