-- A lease per gateway process instead of a write per poll: an approval's
-- lease holder is alive while its own lease_until or its heartbeat here has
-- not run out. Times are unix milliseconds.
CREATE TABLE gateway_heartbeats (
    owner       TEXT   PRIMARY KEY,
    alive_until BIGINT NOT NULL
);

-- The per-person limit counts one person's pending approvals on every policy
-- call: by (subject, state), not by scanning all of that person's history.
CREATE INDEX approvals_subject_state ON approvals (subject, state);
