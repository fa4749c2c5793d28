//! The JSON Schemas of the configuration file and of policy files, for
//! editors (`# yaml-language-server: $schema=...`) and `countersign schema`.
//!
//! They are derived from the types that parse the YAML (`#[derive(JsonSchema)]`
//! beside `#[derive(Deserialize)]`), so a key added to a type is in the
//! schema with its doc comment as description. Types that parse themselves
//! (hand-written `Deserialize`) get their schema here, next to each other;
//! a new one needs an impl here too. What only loading can check (that a
//! template compiles, that an upstream a route names exists, that a policy's
//! token cannot be routed elsewhere) is beyond a schema: `countersign check`
//! stays the authority, and `tests/schema.rs` checks that the two agree on
//! the structure.

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use crate::config::{ApprovalsPath, HeaderIdentityConfig, StaticIdentityConfig, StoreConfig};
use crate::config::{
    ClientAuthConfig, GatewayConfig, IdentityConfig, JwtIdentityConfig, SecretText, Text,
    UpstreamRef, UpstreamUrl,
};
use crate::policy::condition::Condition;
use crate::policy::spec::{
    BodyFields, HostName, MethodName, Methods, PathTemplate, PolicyName, Scopes, ToolPattern,
};
use crate::policy::template::{DetailsTemplate, MessageTemplate};
use crate::policy::PolicyFile;
use crate::policy::WaitMode;
use crate::schema_shapes::inline_schema;
pub use crate::schema_shapes::{HumanDuration, ListenAddr};

/// Where the committed schemas live, relative to the repository.
pub const CONFIG_SCHEMA_FILE: &str = "schema/countersign.schema.json";
pub const POLICIES_SCHEMA_FILE: &str = "schema/policies.schema.json";

/// Draft 7: what editors' YAML support (yaml-language-server) reads best.
fn generator() -> SchemaGenerator {
    SchemaSettings::draft07().into_generator()
}

fn finish(mut schema: Schema, title: &str) -> String {
    schema.insert("title".into(), title.into());
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// The schema of the main configuration file (`countersign run --config`).
pub fn config_schema() -> String {
    finish(
        generator().into_root_schema_for::<GatewayConfig>(),
        "Countersign configuration",
    )
}

/// The schema of a policy file (`policies: [...]`).
pub fn policies_schema() -> String {
    finish(
        generator().into_root_schema_for::<PolicyFile>(),
        "Countersign policies",
    )
}

inline_schema!(Text, "Text", {
    "type": "string",
    "description": "Text; ${VAR} is read from the environment (unset or empty is an error), $$ is a literal $."
});

inline_schema!(SecretText, "SecretText", {
    "type": "string",
    "description": "A secret, best given as ${VAR} from the environment (unset or empty is an error)."
});

inline_schema!(UpstreamUrl, "UpstreamUrl", {
    "type": "string",
    "pattern": "^[hH][tT][tT][pP][sS]?://[^/?#]+/?$",
    "description": "An http or https URL with a host and no path, query or fragment."
});

inline_schema!(UpstreamRef, "UpstreamRef", {
    "type": "string",
    "description": "The name of an upstream declared under `upstreams`."
});

inline_schema!(PolicyName, "PolicyName", {
    "type": "string",
    "pattern": "^[A-Za-z0-9._-]{1,64}$",
    "description": "Also the `policy` label of metrics: 1-64 letters, digits, '-', '_' or '.'."
});

inline_schema!(MethodName, "MethodName", {
    "type": "string",
    "pattern": "^(\\*|[!#$%&'*+.^_`|~0-9A-Za-z-]+)$",
    "description": "An HTTP method (any letter case), or \"*\" for every method."
});

inline_schema!(HostName, "HostName", {
    "type": "string",
    "pattern": "^[^:/\\s]+$",
    "description": "A bare host name, without scheme, port or path."
});

inline_schema!(PathTemplate, "PathTemplate", {
    "type": "string",
    "pattern": "^/",
    "description": "A path template in canonical form: /shop, /orders/{id}, /files/{*rest}."
});

inline_schema!(ToolPattern, "ToolPattern", {
    "type": "string",
    "pattern": "^[A-Za-z0-9_./*-]{1,128}$",
    "description": "An MCP tool name (compared exactly; a name differing only in letter case is refused), or a glob with * for any run of characters."
});

inline_schema!(MessageTemplate, "MessageTemplate", {
    "type": "string",
    "description": "The binding message: literal text and plain {{values}}, at most 64 characters of letters, digits, space and + - _ . , : # (Auth0's rule)."
});

inline_schema!(Methods, "Methods", |generator| {
    "type": "array",
    "items": generator.subschema_for::<MethodName>(),
    "minItems": 1,
    "description": "The methods this policy covers, e.g. [POST], or [\"*\"]."
});

/// A non-empty list of strings matching `pattern`.
macro_rules! string_array_schema {
    ($type:ty, $name:literal, $pattern:literal, $min:literal, $description:literal) => {
        inline_schema!($type, $name, {
            "type": "array",
            "items": { "type": "string", "pattern": $pattern },
            "minItems": $min,
            "description": $description
        });
    };
}

string_array_schema!(
    Scopes,
    "Scopes",
    "^[^\\s\"\\\\]+$",
    1,
    "Scopes the token must carry; at least one."
);
string_array_schema!(
    BodyFields,
    "BodyFields",
    "^.+$",
    0,
    "Top-level body field names (letter case ignored, none twice)."
);

inline_schema!(DetailsTemplate, "DetailsTemplate", {
    "type": ["array", "object"],
    "description": "Rich Authorization Request details: any JSON, whose strings are templates; a string that is exactly one {{value}} keeps the value's JSON type."
});

inline_schema!(Condition, "Condition", {
    "type": "string",
    "minLength": 1,
    "maxLength": 2048,
    "description": "A CEL expression over body, params, query, user and request: the call needs this policy's approval only when it is true (docs/policies.md, \"Conditions\")."
});

inline_schema!(ApprovalsPath, "ApprovalsPath", {
    "type": "string",
    "pattern": "^/[^%;]+$",
    "description": "Prefix of each approval's status resource on the proxy listener (<prefix>/<id>); reserved. Default /.countersign/approvals."
});

impl JsonSchema for StoreConfig {
    fn schema_name() -> Cow<'static, str> {
        "StoreConfig".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let duration = generator.subschema_for::<HumanDuration>();
        let secret = generator.subschema_for::<SecretText>();
        json_schema!({
            "description": "Where approvals are kept: `memory` (tests and trials), { sqlite: PATH } (the default, countersign.db beside this file) or { postgres: URL } (several replicas); not both.",
            "oneOf": [
                { "const": "memory" },
                {
                    "type": "object",
                    "properties": {
                        "sqlite": { "type": "string", "description": "SQLite file, relative to this file." },
                        "postgres": secret,
                        "replay_window": duration,
                        "retention": duration,
                        "lease": duration,
                        "drain_timeout": duration
                    },
                    "additionalProperties": false
                }
            ]
        })
    }
}

impl JsonSchema for WaitMode {
    fn schema_name() -> Cow<'static, str> {
        "WaitMode".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let duration = generator.subschema_for::<HumanDuration>();
        json_schema!({
            "description": "How the agent waits: hold (default: the call stays open until the person answers), async (202 Accepted at once; call again), or { hold: 25s } (held that long, then 202).",
            "oneOf": [
                { "enum": ["hold", "async"] },
                {
                    "type": "object",
                    "properties": { "hold": duration },
                    "required": ["hold"],
                    "additionalProperties": false
                }
            ]
        })
    }
}

impl JsonSchema for ClientAuthConfig {
    fn schema_name() -> Cow<'static, str> {
        "ClientAuthConfig".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let secret = generator.subschema_for::<SecretText>();
        json_schema!({
            "description": "How Countersign authenticates to the authorization server.",
            "oneOf": [
                {
                    "type": "object",
                    "properties": {
                        "method": { "enum": ["client_secret_post", "client_secret_basic"] },
                        "client_secret": secret
                    },
                    "required": ["method", "client_secret"],
                    "additionalProperties": false
                },
                {
                    "type": "object",
                    "properties": {
                        "method": { "const": "private_key_jwt" },
                        "private_key": {
                            "type": "string",
                            "description": "PEM-encoded RSA or EC private key, best given as ${VAR}."
                        },
                        "key_id": { "type": "string" },
                        "algorithm": {
                            "enum": ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"],
                            "default": "RS256"
                        },
                        "audience": {
                            "type": "string",
                            "description": "The assertion's `aud`; defaults to the issuer."
                        }
                    },
                    "required": ["method", "private_key"],
                    "additionalProperties": false
                }
            ]
        })
    }
}

impl JsonSchema for IdentityConfig {
    fn schema_name() -> Cow<'static, str> {
        "IdentityConfig".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let one = |key: &str, schema: Schema| {
            json_schema!({
                "type": "object",
                "properties": { key: schema },
                "required": [key],
                "additionalProperties": false
            })
        };
        let jwt = one("jwt", generator.subschema_for::<JwtIdentityConfig>());
        let header = one("header", generator.subschema_for::<HeaderIdentityConfig>());
        let fixed = one("static", generator.subschema_for::<StaticIdentityConfig>());
        json_schema!({
            "description": "Who must approve a call: exactly one of `jwt`, `header` or `static`.",
            "oneOf": [jwt, header, fixed]
        })
    }
}
