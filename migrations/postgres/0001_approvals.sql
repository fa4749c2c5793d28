-- Durable approvals (src/store/). Times are unix milliseconds.
CREATE TABLE approvals (
    id                     TEXT   PRIMARY KEY,
    policy                 TEXT   NOT NULL,
    subject                TEXT   NOT NULL,
    upstream               TEXT   NOT NULL,
    -- hex SHA-256 of the call
    fingerprint            TEXT   NOT NULL,
    idempotency_key        TEXT,
    -- "key:{subject}:{idempotency_key}" or "fp:{subject}:{fingerprint}" while
    -- retries may attach; NULL once the replay window has passed
    attach_key             TEXT   UNIQUE,
    binding_message        TEXT   NOT NULL,
    -- JSON text
    authorization_details  TEXT,
    state                  TEXT   NOT NULL CHECK (state IN ('pending', 'approved', 'denied',
                               'expired', 'failed', 'forwarding', 'done', 'outcome_unknown')),
    request_method         TEXT   NOT NULL,
    request_path_and_query TEXT   NOT NULL,
    -- JSON: [[name, value], ...]
    request_headers        BYTEA  NOT NULL,
    -- NULL once it can no longer be forwarded
    request_body           BYTEA,
    -- the CIBA request; auth_req_id is a secret
    ciba_auth_req_id       TEXT,
    ciba_interval_ms       BIGINT,
    ciba_next_poll_at      BIGINT,
    ciba_deadline          BIGINT,
    -- the upstream's answer; a NULL body with a status: too large to replay
    response_status        BIGINT,
    response_headers       BYTEA,
    response_body          BYTEA,
    problem_code           TEXT,
    created_at             BIGINT NOT NULL,
    expires_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL,
    decided_at             BIGINT,
    lease_owner            TEXT,
    lease_until            BIGINT
);

CREATE INDEX approvals_state_created ON approvals (state, created_at);
CREATE INDEX approvals_created ON approvals (created_at);
CREATE INDEX approvals_updated ON approvals (updated_at);
CREATE INDEX approvals_subject_created ON approvals (subject, created_at);
