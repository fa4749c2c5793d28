-- When the recorded answer of a done approval was first written in full to
-- an agent (unix milliseconds). Without an Idempotency-Key such an approval
-- answers no further call: its attach key is cleared in the same statement.
ALTER TABLE approvals ADD COLUMN delivered_at BIGINT;
