//! Verifies that a call forwarded by Countersign carries a token approved
//! for exactly that call (docs/call-binding.md).
#![forbid(unsafe_code)]
