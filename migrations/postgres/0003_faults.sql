-- Asked at most once: set just before bc-authorize is sent. A pending
-- approval with this set and no ciba_auth_req_id may have reached the
-- person's phone (the process died in between): it is never asked again.
ALTER TABLE approvals ADD COLUMN ciba_asked_at BIGINT;

-- What the sweep still has to clear or drop, so that it never scans every
-- final row (unix milliseconds).
CREATE INDEX approvals_sweepable ON approvals (updated_at)
    WHERE attach_key IS NOT NULL OR response_body IS NOT NULL
       OR ciba_auth_req_id IS NOT NULL OR request_body IS NOT NULL;
