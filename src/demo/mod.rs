//! Demonstration parts: the example shop API (also as an MCP server). Used by the tests, the
//! examples and `countersign dev`; never by the gateway itself.

mod ledger;
pub mod mcp;
pub mod shop;
