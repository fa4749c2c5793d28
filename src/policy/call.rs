//! One call as its approval reads it: what you see is what you sign.
//!
//! A policy's templates say, at load, which parts of a call the person is
//! shown ([`CallShape`]). Before a message is rendered, those parts are read
//! the one way every permissive API reads them too, or the call is refused:
//! a body the templates read must be declared JSON and parse strictly
//! ([`super::body`]); a query parameter they read must appear once; every
//! value shown must be shown faithfully ([`super::template`]). With
//! `body: { only: [...] }`, a body may not carry fields the person is not
//! shown.

use std::collections::HashSet;

use http::header::CONTENT_TYPE;
use http::HeaderMap;
use percent_encoding::percent_decode;
use serde_json::Value;
use thiserror::Error;

use super::body::{self, fold_case, BodyError};
use super::countersign::{Countersign, Countersigners};
use super::shadow::{merge_key, CallParts, Part};
use super::spec::{BodySpec, McpSpec};
use super::template::{
    DetailsTemplate, FieldPath, Found, MessageTemplate, RenderError, Section,
    BINDING_MESSAGE_MAX_CHARS,
};
use super::RenderedRequest;
use crate::problem::{Problem, ProblemCode};

/// What the gateway knows of one call when it renders its approval.
#[derive(Debug, Clone, Copy)]
pub struct CallInput<'a> {
    /// The request headers: `Content-Type` and `Content-Encoding` are read.
    pub headers: &'a HeaderMap,
    /// The whole body, if any.
    pub body: Option<&'a [u8]>,
    /// Path parameters, percent-decoded.
    pub params: &'a [(String, String)],
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The approving person's claims.
    pub user: &'a Value,
    /// The agent's client certificate (`null` without one).
    pub agent: &'a Value,
    pub method: &'a str,
    /// The normalised path the upstream receives.
    pub path: &'a str,
    /// The `arguments` of an MCP tool call (from its strictly parsed body).
    pub arguments: Option<&'a Value>,
}

/// Why a call's approval cannot be rendered. The `Display` text is a
/// sentence an agent (or its LLM) can relay as it is; [`CallError::code`] is
/// the stable problem code.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CallError {
    /// Too few countersigners besides the person (the sentence says how many).
    #[error("{0}")]
    Countersigners(String),
    #[error("This call's approval message is read from its JSON body, so the body must be sent with Content-Type: application/json (or another +json type, in UTF-8); it was sent {0}.")]
    NotJson(String),
    #[error("This call's body must be sent without Content-Encoding (it was sent with '{0}'), so that the approval message can read it.")]
    Encoded(String),
    #[error("This call needs a JSON body: its approval message is read from it.")]
    MissingBody,
    #[error("The JSON body was refused: {0}.")]
    Body(#[from] BodyError),
    #[error("This call's body must be a JSON object with no fields but {0}.")]
    NotAnObject(String),
    #[error("The body field '{field}' is not shown to the person who approves this call, so it is refused; send only {allowed}.")]
    UnshownField { field: String, allowed: String },
    #[error("The argument '{name}' is not shown to the person who approves this tool call, so it is refused; send only {allowed}.")]
    UnshownArgument { name: String, allowed: String },
    #[error("This {0} call carries a body, which the person who approves it is not shown (the approval shows no body field) but which APIs such as Laravel and Rails read; send it without a body.")]
    UnshownBody(String),
    #[error("The query parameter '{0}' is given more than once (or in another spelling: letter case, a [] suffix); APIs disagree on which one counts, so send it once.")]
    RepeatedQuery(String),
    #[error("The query contains ';', which some APIs read as a separator between parameters; send parameters separated by '&' only.")]
    QuerySemicolon,
    #[error("The query parameter '{0}' is not valid UTF-8 once percent-decoded.")]
    QueryNotUtf8(String),
    #[error("'{name}' is shown to the person from {} but also given in {}; APIs that merge a call's parts into one set of parameters disagree on which one counts, so give it once.", .shown.describe(), .other.describe())]
    GivenTwice {
        name: String,
        shown: Part,
        other: Part,
    },
    #[error("'{name}' is what this policy's condition tests in {} but it is also given in {}; APIs that merge a call's parts into one set of parameters disagree on which one counts, so give it once.", .tested.describe(), .other.describe())]
    TestedTwice {
        name: String,
        tested: Part,
        other: Part,
    },
    #[error("The path parameter '{name}' ends the path and contains '.' ('{value}'): APIs that route format suffixes (Rails, Spring, Django REST framework) read what follows the '.' as a format and act on a shorter value than the person would be shown. Send it without '.', or, if this API reads no format suffix, turn off the policy's match.format_suffix.", value = truncated(.value))]
    FormatSuffixParam { name: String, value: String },
    #[error("The path carries ';' parameters, which Tomcat, Spring and Jetty drop from the path parameter '{name}' (the person would be shown '{value}') while Express, Rails and Go keep them in it and act on another value. Send the path without ';'.", value = truncated(.value))]
    MatrixParam { name: String, value: String },
    #[error("{}", render_detail(.0))]
    Render(#[from] RenderError),
    #[error("The {section} key '{key}' is spelled like a name the policy's condition reads, but in another letter case; some APIs read it as that name, so spell it exactly as the condition does.")]
    Misspelled { section: &'static str, key: String },
    #[error("The condition of policy '{policy}' could not be evaluated for this call ({reason}); the call was refused, not passed.")]
    Condition { policy: String, reason: String },
}

fn render_detail(error: &RenderError) -> String {
    match error {
        RenderError::MissingValue(field) => match field.strip_prefix("query.") {
            Some(name) => format!(
                "The query has no parameter '{name}' (spelled exactly so), which the approval message needs."
            ),
            None => format!(
                "The request has no value for '{field}', which the approval message needs."
            ),
        },
        RenderError::NotShowable { field, what } => format!(
            "The value of '{field}' is {what}; the approval needs text, a number or true/false there."
        ),
        RenderError::Character { field, character } => format!(
            "The value of '{field}' contains {}, which the approval message cannot show; \
             use ASCII letters, digits, space and + - _ . , : # (accented letters are shown without their accents).",
            super::template::describe(*character)
        ),
        RenderError::MessageTooLong(length) => format!(
            "The approval message for this call would be {length} characters; at most {BINDING_MESSAGE_MAX_CHARS} are allowed."
        ),
        RenderError::EmptyMessage => "The approval message for this call would be empty.".to_owned(),
        RenderError::InexactNumber { field, number } => format!(
            "The value of '{field}' is the number {number}, which APIs that read numbers as doubles (JavaScript's Number(), PHP) round to another: it cannot be shown exactly; send an integer of at most 2^53, or a decimal of at most 15 significant digits."
        ),
    }
}

impl CallError {
    pub fn code(&self) -> ProblemCode {
        match self {
            Self::NotJson(_)
            | Self::Encoded(_)
            | Self::MissingBody
            | Self::Body(_)
            | Self::NotAnObject(_)
            | Self::UnshownField { .. }
            | Self::UnshownArgument { .. }
            | Self::UnshownBody(_) => ProblemCode::InvalidBody,
            Self::Countersigners(_) => ProblemCode::CountersignersUnavailable,
            Self::RepeatedQuery(_) | Self::QuerySemicolon | Self::QueryNotUtf8(_) => {
                ProblemCode::InvalidQuery
            }
            Self::GivenTwice { .. }
            | Self::TestedTwice { .. }
            | Self::FormatSuffixParam { .. }
            | Self::MatrixParam { .. } => ProblemCode::AmbiguousParameter,
            Self::Render(RenderError::MissingValue(field)) if field.starts_with("query.") => {
                ProblemCode::InvalidQuery
            }
            Self::Render(RenderError::InexactNumber { field, .. }) => match field.split('.').next()
            {
                Some("query") => ProblemCode::InvalidQuery,
                Some("params") => ProblemCode::InvalidPath,
                _ => ProblemCode::InvalidBindingMessage,
            },
            Self::Render(RenderError::MissingValue(_) | RenderError::NotShowable { .. }) => {
                ProblemCode::InvalidBody
            }
            Self::Render(_) => ProblemCode::InvalidBindingMessage,
            Self::Misspelled {
                section: "query", ..
            } => ProblemCode::InvalidQuery,
            Self::Misspelled { .. } => ProblemCode::InvalidBody,
            Self::Condition { .. } => ProblemCode::ConditionFailed,
        }
    }
}

impl From<CallError> for Problem {
    fn from(error: CallError) -> Self {
        Problem::new(error.code()).with_detail(error.to_string())
    }
}

/// Which parts of a call a policy shows, worked out at load.
#[derive(Debug)]
pub(crate) struct CallShape {
    /// The templates read the body, or `body.only` constrains it: the body
    /// must then be declared JSON and parse strictly.
    reads_body: bool,
    /// `body.only`, case-folded, and as a list for messages.
    only: Option<(HashSet<String>, String)>,
    /// `mcp.arguments.only`, likewise, for an MCP tool's arguments.
    arguments_only: Option<(HashSet<String>, String)>,
    /// Query parameters the templates read.
    query: Vec<String>,
    /// Every named value the templates show, with the part it is read
    /// from; none may be given in another part too ([`super::shadow`]).
    shown: Vec<(String, Part)>,
}

/// An `only` list, case-folded, and as text for messages; every field the
/// approval shows must be in it.
fn only_list(
    spec: &BodySpec,
    shown: &[&str],
    key: &str,
) -> Result<(HashSet<String>, String), String> {
    let allowed: HashSet<String> = spec.only.0.iter().map(|f| fold_case(f)).collect();
    if let Some(missing) = shown.iter().find(|f| !allowed.contains(&fold_case(f))) {
        return Err(format!(
            "{key} does not list '{missing}', which the approval shows"
        ));
    }
    let listed = match spec.only.0.as_slice() {
        [] => "none".to_owned(),
        names => names
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    Ok((allowed, listed))
}

impl CallShape {
    pub(crate) fn new(
        message: &MessageTemplate,
        countersign_message: Option<&MessageTemplate>,
        details: Option<&DetailsTemplate>,
        body: Option<&BodySpec>,
        path_params: &[String],
        mcp: Option<&McpSpec>,
    ) -> Result<Self, String> {
        let mut reads_body = body.is_some();
        let mut body_fields: Vec<&str> = Vec::new();
        let mut argument_fields: Vec<&str> = Vec::new();
        let mut query: Vec<String> = Vec::new();
        let mut shown: Vec<(String, Part)> = Vec::new();
        let fields = message
            .fields()
            .chain(
                countersign_message
                    .into_iter()
                    .flat_map(MessageTemplate::fields),
            )
            .chain(details.into_iter().flat_map(DetailsTemplate::fields));
        for field in fields {
            let named = match field.section() {
                (Section::Body, [name, ..]) => Some((name, Part::Body)),
                (Section::Query, [name, ..]) => Some((name, Part::Query)),
                (Section::Params, [name, ..]) => Some((name, Part::Path)),
                _ => None,
            };
            if let Some((name, part)) = named {
                if part != Part::Path && path_params.iter().any(|p| merge_key(p) == merge_key(name))
                {
                    return Err(format!(
                        "'{}' is shown from {}, but the path also has a parameter '{name}', which frameworks such as Rails let win; show params.{name} instead",
                        field.text(),
                        part.describe()
                    ));
                }
                if !shown.iter().any(|(n, p)| n == name && *p == part) {
                    shown.push((name.clone(), part));
                }
            }
            match field.section() {
                (Section::Body, rest) => {
                    reads_body = true;
                    body_fields.extend(rest.first().map(String::as_str));
                }
                (Section::Query, [name, ..]) if !query.contains(name) => {
                    query.push(name.clone());
                }
                (Section::Arguments, _) if mcp.is_none() => {
                    return Err(format!(
                        "{{{{{}}}}} reads an MCP tool's arguments; only a policy with match.mcp has them",
                        field.text()
                    ))
                }
                (Section::Arguments, [name, ..]) => argument_fields.push(name),
                (
                    Section::Query
                    | Section::Params
                    | Section::Request
                    | Section::Arguments
                    | Section::Agent,
                    [],
                ) => {
                    return Err(format!(
                        "{{{{{0}}}}} is a whole section; name one value, such as {{{{{0}.name}}}}",
                        field.text()
                    ))
                }
                _ => {}
            }
        }
        let only = body
            .map(|spec| only_list(spec, &body_fields, "body.only"))
            .transpose()?;
        let arguments_only = mcp
            .and_then(|m| m.arguments.as_ref())
            .map(|spec| only_list(spec, &argument_fields, "mcp.arguments.only"))
            .transpose()?;
        Ok(Self {
            reads_body,
            only,
            arguments_only,
            query,
            shown,
        })
    }

    pub(crate) fn render(
        &self,
        message: &MessageTemplate,
        details: Option<&DetailsTemplate>,
        countersign: Option<&Countersign>,
        input: &CallInput<'_>,
    ) -> Result<RenderedRequest, CallError> {
        let body = if self.reads_body {
            Some(self.read_body(input)?)
        } else {
            None
        };
        if let (Some((allowed, listed)), Some(Value::Object(arguments))) =
            (&self.arguments_only, input.arguments)
        {
            if let Some(name) = arguments.keys().find(|k| !allowed.contains(&fold_case(k))) {
                return Err(CallError::UnshownArgument {
                    name: name.clone(),
                    allowed: listed.clone(),
                });
            }
        }
        let query = if self.query.is_empty() {
            Vec::new()
        } else {
            self.read_query(input.query.unwrap_or(""))?
        };
        let parts = CallParts::new(input.headers, input.query, input.body, input.params);
        if !self.shown.is_empty() {
            // Its names cannot be read, but an API that inflates it reads them.
            if let Some(encoding) = parts.encoding() {
                return Err(CallError::Encoded(truncated(&encoding)));
            }
        }
        for (name, part) in &self.shown {
            if let Some(other) = parts.also_given(name, *part) {
                return Err(CallError::GivenTwice {
                    name: name.clone(),
                    shown: *part,
                    other,
                });
            }
        }
        // RFC 9110 gives a body of GET, HEAD or DELETE no meaning, yet
        // Laravel and Rails read one: where the approval shows none of it,
        // it is refused rather than sent unseen. (`{}` carries nothing; an
        // MCP message's body is the tool call whose arguments are shown.)
        if !self.reads_body
            && input.arguments.is_none()
            && ["GET", "HEAD", "DELETE"].contains(&input.method)
            && input.body.is_some_and(carries_something)
        {
            return Err(CallError::UnshownBody(input.method.to_owned()));
        }
        let values = CallValues {
            body: body.as_ref(),
            params: input.params,
            query: &query,
            user: input.user,
            agent: input.agent,
            method: input.method,
            path: input.path,
            arguments: input.arguments,
        };
        let binding_message = message.render(|field| values.lookup(field))?;
        let authorization_details = details
            .map(|d| d.render(|field| values.lookup(field)))
            .transpose()?;
        let countersigners = match countersign {
            None => None,
            Some(countersign) => Some(Countersigners {
                subjects: countersign
                    .resolve(input.user)
                    .map_err(CallError::Countersigners)?,
                min: countersign.min,
                binding_message: countersign.message.render(|field| values.lookup(field))?,
            }),
        };
        Ok(RenderedRequest {
            binding_message,
            authorization_details,
            countersigners,
        })
    }

    /// Whether the templates show `name` from `part`.
    pub(crate) fn shows(&self, name: &str, part: Part) -> bool {
        self.shown.iter().any(|(n, p)| n == name && *p == part)
    }

    fn read_body(&self, input: &CallInput<'_>) -> Result<Value, CallError> {
        let value = read_json_body(input)?;
        if let Some((allowed, listed)) = &self.only {
            let Value::Object(fields) = &value else {
                return Err(CallError::NotAnObject(listed.clone()));
            };
            if let Some(field) = fields.keys().find(|k| !allowed.contains(&fold_case(k))) {
                return Err(CallError::UnshownField {
                    field: field.clone(),
                    allowed: listed.clone(),
                });
            }
        }
        Ok(value)
    }

    /// The query parameters the templates read, each given exactly once
    /// (up to letter case) and spelled as in the template.
    fn read_query(&self, query: &str) -> Result<Vec<(String, String)>, CallError> {
        let pairs = query_pairs(query)?;
        let mut found = Vec::new();
        for name in &self.query {
            let folded = merge_key(name);
            let matches: Vec<_> = pairs
                .iter()
                .filter(|(key, _)| merge_key(key) == folded)
                .collect();
            match matches.as_slice() {
                // Absent, or only in another spelling: the lookup misses.
                [] => {}
                [(key, _)] if key != name => {}
                [(_, value)] => {
                    let value = String::from_utf8(form_decode(value))
                        .map_err(|_| CallError::QueryNotUtf8(name.clone()))?;
                    found.push((name.clone(), value));
                }
                _ => return Err(CallError::RepeatedQuery(name.clone())),
            }
        }
        Ok(found)
    }
}

/// Whether a body gives anything at all: not blank, not an empty JSON
/// object.
fn carries_something(body: &[u8]) -> bool {
    body.iter().any(|b| !b.is_ascii_whitespace())
        && !matches!(serde_json::from_slice::<Value>(body), Ok(Value::Object(fields)) if fields.is_empty())
}

/// The body as JSON, read the one way every API reads it: no
/// `Content-Encoding`, a JSON `Content-Type`, parsed strictly.
pub(crate) fn read_json_body(input: &CallInput<'_>) -> Result<Value, CallError> {
    let bytes = input
        .body
        .filter(|b| !b.is_empty())
        .ok_or(CallError::MissingBody)?;
    if let Some(encoding) = body::content_encoding(input.headers) {
        return Err(CallError::Encoded(truncated(&encoding)));
    }
    check_json_content_type(input.headers)?;
    Ok(body::parse(bytes)?)
}

/// The query's `name=value` pairs, names decoded, values as sent; a `;`
/// (a separator to some APIs) is refused.
fn query_pairs(query: &str) -> Result<Vec<(String, &str)>, CallError> {
    if query.contains(';') {
        return Err(CallError::QuerySemicolon);
    }
    Ok(query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = String::from_utf8_lossy(&form_decode(key)).into_owned();
            (key, value)
        })
        .collect())
}

/// Every query parameter, decoded, for a condition: each given once (up to
/// letter case) and UTF-8, so the condition and the API read the same value.
pub(crate) fn read_whole_query(query: &str) -> Result<Vec<(String, String)>, CallError> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for (key, value) in query_pairs(query)? {
        // `amount` and `amount[]` are one name to PHP, Rails and qs.
        if !seen.insert(merge_key(&key)) {
            return Err(CallError::RepeatedQuery(key));
        }
        let value = String::from_utf8(form_decode(value))
            .map_err(|_| CallError::QueryNotUtf8(key.clone()))?;
        found.push((key, value));
    }
    Ok(found)
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space.
fn form_decode(text: &str) -> Vec<u8> {
    let spaced = text.replace('+', " ");
    percent_decode(spaced.as_bytes()).collect()
}

fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

/// `application/json` or `application/<x>+json`; a `charset`, if given,
/// must be UTF-8.
fn check_json_content_type(headers: &HeaderMap) -> Result<(), CallError> {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(CallError::NotJson("without a Content-Type".to_owned())),
        (Some(_), Some(_)) => {
            return Err(CallError::NotJson(
                "with more than one Content-Type header".to_owned(),
            ))
        }
        (Some(value), None) => value,
    };
    let text = value.to_str().map_err(|_| {
        CallError::NotJson("with a Content-Type that is not plain ASCII".to_owned())
    })?;
    let mut parts = text.split(';');
    let media = parts.next().unwrap_or("").trim_matches([' ', '\t']);
    let is_json = media.split_once('/').is_some_and(|(kind, subtype)| {
        let token = !subtype.is_empty()
            && subtype
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
        let lower = subtype.to_ascii_lowercase();
        kind.eq_ignore_ascii_case("application")
            && token
            && (lower == "json" || (lower.len() > 5 && lower.ends_with("+json")))
    });
    if !is_json {
        return Err(CallError::NotJson(format!("as '{}'", truncated(media))));
    }
    for parameter in parts.map(|p| p.trim_matches([' ', '\t'])) {
        if parameter.is_empty() {
            continue;
        }
        let Some((name, value)) = parameter.split_once('=') else {
            return Err(CallError::NotJson(format!(
                "with a malformed parameter '{}'",
                truncated(parameter)
            )));
        };
        if name.trim().eq_ignore_ascii_case("charset") {
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            if !value.eq_ignore_ascii_case("utf-8") {
                return Err(CallError::NotJson(format!(
                    "with charset '{}'",
                    truncated(value)
                )));
            }
        }
    }
    Ok(())
}

/// The values of one call, as templates name them.
struct CallValues<'a> {
    body: Option<&'a Value>,
    params: &'a [(String, String)],
    query: &'a [(String, String)],
    user: &'a Value,
    agent: &'a Value,
    method: &'a str,
    path: &'a str,
    arguments: Option<&'a Value>,
}

impl<'a> CallValues<'a> {
    fn lookup(&self, field: &FieldPath) -> Option<Found<'a>> {
        let named = |pairs: &'a [(String, String)], name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| Found::Text(v.as_str()))
        };
        match field.section() {
            (Section::Body, rest) => json_path(self.body?, rest).map(Found::Json),
            (Section::User, rest) => json_path(self.user, rest).map(Found::Json),
            (Section::Agent, rest) => json_path(self.agent, rest).map(Found::Json),
            (Section::Arguments, rest) => json_path(self.arguments?, rest).map(Found::Json),
            (Section::Params, [name]) => named(self.params, name),
            (Section::Query, [name]) => named(self.query, name),
            (Section::Request, [name]) => match name.as_str() {
                "method" => Some(Found::Text(self.method)),
                "path" => Some(Found::Text(self.path)),
                _ => None,
            },
            _ => None,
        }
    }
}

fn json_path<'v>(root: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(root, |value, segment| match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}
