//! Demonstration parts: the example shop API. Used by the tests, the
//! examples and `countersign dev`; never by the gateway itself.

pub mod shop;
