//! The schema shapes of strings the config and policy types parse
//! themselves, below both of them: the config and policy types name these
//! in `#[schemars(with = ...)]`, and `schema.rs` (which imports those types)
//! adds the rest.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

/// A schema inlined where it is used (most are strings), named `$name`;
/// `|generator| { ... }` where it refers to other types' schemas.
macro_rules! inline_schema {
    ($type:ty, $name:literal, |$generator:ident| $schema:tt) => {
        impl JsonSchema for $type {
            fn inline_schema() -> bool {
                true
            }

            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }

            fn json_schema($generator: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
    ($type:ty, $name:literal, $schema:tt) => {
        inline_schema!($type, $name, |_generator| $schema);
    };
}
pub(crate) use inline_schema;

/// A duration as `humantime` reads it: `5s`, `2m`, `1h 30m`, `500ms`.
#[derive(Debug)]
pub struct HumanDuration;

inline_schema!(HumanDuration, "Duration", {
    "type": "string",
    "pattern": "^\\s*([0-9]+\\s*[a-zA-Zµ]+\\s*)+$",
    "description": "A duration: a number and a unit, e.g. 5s, 2m, 1h 30m, 500ms."
});

/// A socket address to listen on: `127.0.0.1:8080`, `[::1]:8080`.
#[derive(Debug)]
pub struct ListenAddr;

inline_schema!(ListenAddr, "ListenAddr", {
    "type": "string",
    "pattern": "^([0-9]{1,3}(\\.[0-9]{1,3}){3}|\\[[0-9A-Fa-f:.]+(%[^\\]]+)?\\]):[0-9]{1,5}$",
    "description": "An IP address and port, e.g. 127.0.0.1:8080 or [::1]:8080 (no host names)."
});
