-- The W3C trace context of the call that made the approval (its span in
-- the gateway), so that polls and the forward, made later or by another
-- replica, join the agent's trace. NULL when traces are off.
ALTER TABLE approvals ADD COLUMN trace_parent TEXT;
