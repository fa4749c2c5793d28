-- A lease per gateway process instead of a write per poll: an approval's
-- lease holder is alive while its own lease_until or its heartbeat here has
-- not run out. Times are unix milliseconds.
CREATE TABLE gateway_heartbeats (
    owner       TEXT   PRIMARY KEY,
    alive_until BIGINT NOT NULL
);
