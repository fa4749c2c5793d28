-- Four eyes (README, "Four eyes"): a countersigned call is one approval row
-- for the person (the parent, countersign_min set) and one per countersigner
-- (parent_id set). Each member's approved access token is kept
-- (grant_token, grant_kind 'bearer' or 'dpop') until the call is forwarded
-- or refused: the member who answers last may be served by another process.
-- problem_detail: the sentence an agent is told with the problem code
-- ("denied by carol").
ALTER TABLE approvals ADD COLUMN parent_id TEXT;
ALTER TABLE approvals ADD COLUMN countersign_min BIGINT;
ALTER TABLE approvals ADD COLUMN grant_token TEXT;
ALTER TABLE approvals ADD COLUMN grant_kind TEXT;
ALTER TABLE approvals ADD COLUMN problem_detail TEXT;
CREATE INDEX approvals_parent ON approvals (parent_id);
