//! Binding messages and `authorization_details` rendered from the call.
//!
//! Templates use handlebars syntax and are parsed by handlebars while the
//! policy file is read, so a broken one is reported with its file, line and
//! key. Only literal text and plain `{{path}}` values are accepted (no
//! helpers, blocks or partials): each template compiles to literal and lookup
//! segments, so the gateway knows at load which parts of a call a policy
//! shows, and checks every value taken from the call before it is shown.
//!
//! A value in a binding message is shown as it is or the call is refused:
//! nothing is blanked or dropped, because the person approves what the message
//! says while the API acts on the value itself.

use std::fmt;

use handlebars::template::{Parameter, TemplateElement};
use handlebars::{Path, PathSeg, Template};
use serde::{de, Deserialize, Deserializer};
use serde_json::Value;
use thiserror::Error;
use unicode_normalization::char::{decompose_canonical, is_combining_mark};
use unicode_normalization::UnicodeNormalization;

/// Auth0's documented limit, also a sensible bound for a phone notification.
pub const BINDING_MESSAGE_MAX_CHARS: usize = 64;

/// Characters Auth0 accepts in a binding message: letters, digits, space and
/// `+ - _ . , : #`.
pub fn is_binding_message_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ' ' | '+' | '-' | '_' | '.' | ',' | ':' | '#')
}

/// The part of a call a template path reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The JSON body: `{{qty}}` or `{{body.qty}}`.
    Body,
    /// Path parameters: `{{params.orderId}}`.
    Params,
    /// Query parameters: `{{query.page}}`.
    Query,
    /// The approving person's claims: `{{user.sub}}`.
    User,
    /// The agent's client certificate, on a TLS listener with `client_ca`:
    /// `{{agent.subject}}`, `{{agent.dns}}`.
    Agent,
    /// `{{request.method}}`, `{{request.path}}`.
    Request,
    /// The arguments of an MCP tool call: `{{arguments.qty}}`.
    Arguments,
}

/// A plain `{{path}}` in a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    /// The path as it reads in messages, segments joined with `.`.
    text: String,
    segments: Vec<String>,
}

impl FieldPath {
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The section the path reads and the path within it. Top-level names
    /// other than the sections are body fields: `qty` reads the same value
    /// as `body.qty`.
    pub fn section(&self) -> (Section, &[String]) {
        let (first, rest) = self
            .segments
            .split_first()
            .expect("a field path has at least one segment");
        match first.as_str() {
            "body" => (Section::Body, rest),
            "params" => (Section::Params, rest),
            "query" => (Section::Query, rest),
            "user" => (Section::User, rest),
            "agent" => (Section::Agent, rest),
            "request" => (Section::Request, rest),
            "arguments" => (Section::Arguments, rest),
            _ => (Section::Body, &self.segments),
        }
    }
}

/// A compiled piece of a template.
#[derive(Debug, Clone)]
enum Segment {
    Text(String),
    Field(FieldPath),
}

/// A value found for a [`FieldPath`] in a call.
#[derive(Debug, Clone, Copy)]
pub enum Found<'v> {
    Json(&'v Value),
    Text(&'v str),
}

/// Why a template could not be rendered for a call.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("the call has no value for '{0}'")]
    MissingValue(String),
    #[error("the value of '{field}' is {what}, which cannot be shown")]
    NotShowable { field: String, what: &'static str },
    #[error("the value of '{field}' contains {}, which a binding message cannot show", describe(*character))]
    Character { field: String, character: char },
    #[error("the value of '{field}' is the number {number}, which APIs that read numbers as doubles round")]
    InexactNumber { field: String, number: String },
    #[error("the binding message would be {0} characters; at most {BINDING_MESSAGE_MAX_CHARS} are allowed")]
    MessageTooLong(usize),
    #[error("the binding message is empty")]
    EmptyMessage,
}

/// `U+0430 'а'`, or only `U+202E` for a character that would not print.
pub fn describe(c: char) -> String {
    if c.is_alphanumeric() || c.is_ascii_graphic() {
        format!("the character U+{:04X} '{c}'", c as u32)
    } else {
        format!("the character U+{:04X}", c as u32)
    }
}

/// A binding message template, validated at load.
#[derive(Clone)]
pub struct MessageTemplate {
    source: String,
    segments: Vec<Segment>,
}

impl fmt::Debug for MessageTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MessageTemplate")
            .field(&self.source)
            .finish()
    }
}

impl MessageTemplate {
    pub fn parse(source: &str) -> Result<Self, String> {
        let segments = compile(source, Kind::Message)?;
        for segment in &segments {
            match segment {
                Segment::Text(text) => {
                    if let Some(bad) = text.chars().find(|c| !is_binding_message_char(*c)) {
                        return Err(format!(
                            "binding message text contains {bad:?}; allowed are letters, digits, space and + - _ . , : #"
                        ));
                    }
                }
                Segment::Field(field) => match field.section() {
                    (Section::Request, [name]) if name == "path" => return Err(
                        "{{request.path}} always contains '/', which a binding message cannot show"
                            .to_owned(),
                    ),
                    (Section::Body, []) => {}
                    (_, []) => {
                        return Err(format!(
                        "{{{{{0}}}}} is a whole section; name one value, such as {{{{{0}.name}}}}",
                        field.text
                    ))
                    }
                    _ => {}
                },
            }
        }
        if segments.is_empty() {
            return Err("the binding message is empty".to_owned());
        }
        Ok(Self {
            source: source.to_owned(),
            segments,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `{{path}}`s the message shows.
    pub fn fields(&self) -> impl Iterator<Item = &FieldPath> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Field(f) => Some(f),
            Segment::Text(_) => None,
        })
    }

    /// Renders the message, refusing any value it could not show faithfully
    /// (see [`append_message_value`]). Runs of spaces become one space.
    pub fn render<'v>(
        &self,
        lookup: impl Fn(&FieldPath) -> Option<Found<'v>>,
    ) -> Result<String, RenderError> {
        let mut raw = String::with_capacity(BINDING_MESSAGE_MAX_CHARS);
        for segment in &self.segments {
            match segment {
                Segment::Text(text) => raw.push_str(text),
                Segment::Field(field) => {
                    let found = lookup(field)
                        .ok_or_else(|| RenderError::MissingValue(field.text.clone()))?;
                    append_message_value(&mut raw, &field.text, found)?;
                }
            }
        }
        // Only ASCII remains: literal text was checked at load, values here.
        let mut message = String::with_capacity(raw.len());
        for word in raw.split(' ').filter(|w| !w.is_empty()) {
            if !message.is_empty() {
                message.push(' ');
            }
            message.push_str(word);
        }
        if message.is_empty() {
            return Err(RenderError::EmptyMessage);
        }
        if message.len() > BINDING_MESSAGE_MAX_CHARS {
            return Err(RenderError::MessageTooLong(message.len()));
        }
        Ok(message)
    }
}

impl<'de> Deserialize<'de> for MessageTemplate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Self::parse(&source).map_err(de::Error::custom)
    }
}

/// Appends one call value to a binding message, or says why it cannot be
/// shown. Strings, numbers and booleans are shown; `null`, lists, objects and
/// blank strings are refused (they would render as nothing). Characters
/// outside Auth0's alphabet are refused, except letters that are an ASCII
/// letter with accents (canonical decomposition without its marks: `é` ->
/// `e`). Compatibility forms are refused, not transliterated: fullwidth `Ｘ`,
/// mathematical `𝐗`, circled `Ⓧ`, ligatures `ﬀ`, the long `ſ` would be
/// shown as the ASCII letters of another string, which the API reads as
/// itself (another product). Digits of other scripts, look-alike letters of
/// other alphabets, control and format characters and punctuation are
/// refused.
pub fn append_message_value(
    out: &mut String,
    field: &str,
    found: Found<'_>,
) -> Result<(), RenderError> {
    let number;
    let text: &str = match found {
        Found::Text(text) => {
            // A query or path value is text here, but a number to an API
            // that converts it: it must be one no double rounds.
            if !super::body::text_number_is_exact(text.trim()) {
                return Err(RenderError::InexactNumber {
                    field: field.to_owned(),
                    number: text.chars().take(64).collect(),
                });
            }
            text
        }
        Found::Json(Value::String(text)) => text,
        Found::Json(Value::Number(n)) => {
            number = n.to_string();
            number.as_str()
        }
        Found::Json(Value::Bool(b)) => {
            if *b {
                "true"
            } else {
                "false"
            }
        }
        Found::Json(other) => {
            let what = match other {
                Value::Null => "null",
                Value::Array(_) => "a list",
                _ => "an object",
            };
            return Err(RenderError::NotShowable {
                field: field.to_owned(),
                what,
            });
        }
    };
    if text.chars().all(char::is_whitespace) {
        return Err(RenderError::NotShowable {
            field: field.to_owned(),
            what: "empty",
        });
    }
    if text.chars().all(is_binding_message_char) {
        out.push_str(text);
        return Ok(());
    }
    // Compose first, so that `e` + combining acute is treated as `é`; a
    // combining mark left on its own is refused like any other character.
    for c in text.nfc() {
        if is_binding_message_char(c) {
            out.push(c);
        } else if !transliterate(c, out) {
            return Err(RenderError::Character {
                field: field.to_owned(),
                character: c,
            });
        }
    }
    Ok(())
}

/// Appends the ASCII letter `c` stands for, if it is a letter whose
/// canonical decomposition is an ASCII letter and combining marks.
fn transliterate(c: char, out: &mut String) -> bool {
    let start = out.len();
    let mut faithful = true;
    decompose_canonical(c, |d| {
        if d.is_ascii_alphabetic() {
            out.push(d);
        } else if !is_combining_mark(d) {
            faithful = false;
        }
    });
    if faithful && out.len() > start {
        true
    } else {
        out.truncate(start);
        false
    }
}

/// A templated `authorization_details` (RFC 9396) structure. A string that is
/// exactly one `{{path}}` keeps the JSON type of the value it names, so
/// `quantity: "{{qty}}"` stays a number.
#[derive(Clone)]
pub struct DetailsTemplate {
    root: DetailsNode,
}

impl fmt::Debug for DetailsTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DetailsTemplate")
    }
}

#[derive(Clone)]
enum DetailsNode {
    Literal(Value),
    Lookup(FieldPath),
    Text(Vec<Segment>),
    Array(Vec<DetailsNode>),
    Object(Vec<(String, DetailsNode)>),
}

impl DetailsTemplate {
    pub fn parse(value: Value) -> Result<Self, String> {
        if !value.is_array() && !value.is_object() {
            return Err("authorization_details must be a list or a map".to_owned());
        }
        Ok(Self {
            root: compile_node(value)?,
        })
    }

    /// The `{{path}}`s the details show.
    pub fn fields(&self) -> Vec<&FieldPath> {
        fn walk<'t>(node: &'t DetailsNode, out: &mut Vec<&'t FieldPath>) {
            match node {
                DetailsNode::Literal(_) => {}
                DetailsNode::Lookup(f) => out.push(f),
                DetailsNode::Text(segments) => {
                    out.extend(segments.iter().filter_map(|s| match s {
                        Segment::Field(f) => Some(f),
                        Segment::Text(_) => None,
                    }))
                }
                DetailsNode::Array(items) => items.iter().for_each(|n| walk(n, out)),
                DetailsNode::Object(fields) => fields.iter().for_each(|(_, n)| walk(n, out)),
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// Renders the details. A lone `{{path}}` copies the value with its JSON
    /// type; in longer text only strings, numbers and booleans are accepted.
    pub fn render<'v>(
        &self,
        lookup: impl Fn(&FieldPath) -> Option<Found<'v>>,
    ) -> Result<Value, RenderError> {
        render_node(&self.root, &lookup)
    }
}

fn compile_node(value: Value) -> Result<DetailsNode, String> {
    Ok(match value {
        Value::String(text) if text.contains("{{") => {
            let segments = compile(&text, Kind::Details)?;
            let mut fields = segments.iter().filter_map(|s| match s {
                Segment::Field(f) => Some(f),
                Segment::Text(_) => None,
            });
            let blank_text = segments.iter().all(|s| match s {
                Segment::Text(t) => t.trim().is_empty(),
                Segment::Field(_) => true,
            });
            match (fields.next(), fields.next()) {
                (Some(field), None) if blank_text => DetailsNode::Lookup(field.clone()),
                (None, _) => DetailsNode::Literal(Value::String(
                    segments
                        .into_iter()
                        .map(|s| match s {
                            Segment::Text(t) => t,
                            Segment::Field(_) => String::new(),
                        })
                        .collect(),
                )),
                _ => DetailsNode::Text(segments),
            }
        }
        Value::Array(items) => DetailsNode::Array(
            items
                .into_iter()
                .map(compile_node)
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => DetailsNode::Object(
            map.into_iter()
                .map(|(k, v)| Ok((k, compile_node(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => DetailsNode::Literal(other),
    })
}

fn render_node<'v>(
    node: &DetailsNode,
    lookup: &impl Fn(&FieldPath) -> Option<Found<'v>>,
) -> Result<Value, RenderError> {
    let find = |field: &FieldPath| {
        lookup(field).ok_or_else(|| RenderError::MissingValue(field.text.clone()))
    };
    Ok(match node {
        DetailsNode::Literal(v) => v.clone(),
        DetailsNode::Lookup(field) => match find(field)? {
            Found::Json(value) => value.clone(),
            Found::Text(text) => Value::String(text.to_owned()),
        },
        DetailsNode::Text(segments) => {
            let mut text = String::new();
            for segment in segments {
                match segment {
                    Segment::Text(t) => text.push_str(t),
                    Segment::Field(field) => match find(field)? {
                        Found::Text(t) => text.push_str(t),
                        Found::Json(Value::String(t)) => text.push_str(t),
                        Found::Json(Value::Number(n)) => text.push_str(&n.to_string()),
                        Found::Json(Value::Bool(b)) => {
                            text.push_str(if *b { "true" } else { "false" })
                        }
                        Found::Json(other) => {
                            return Err(RenderError::NotShowable {
                                field: field.text.clone(),
                                what: if other.is_null() {
                                    "null"
                                } else if other.is_array() {
                                    "a list"
                                } else {
                                    "an object"
                                },
                            })
                        }
                    },
                }
            }
            Value::String(text)
        }
        DetailsNode::Array(items) => Value::Array(
            items
                .iter()
                .map(|n| render_node(n, lookup))
                .collect::<Result<_, _>>()?,
        ),
        DetailsNode::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, n)| Ok((k.clone(), render_node(n, lookup)?)))
                .collect::<Result<_, RenderError>>()?,
        ),
    })
}

impl<'de> Deserialize<'de> for DetailsTemplate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::parse(value).map_err(de::Error::custom)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    Details,
}

/// Parses `source` with handlebars and keeps literal text and plain paths.
fn compile(source: &str, kind: Kind) -> Result<Vec<Segment>, String> {
    let template = Template::compile(source).map_err(|e| format!("broken template: {e}"))?;
    let only = match kind {
        Kind::Message => "a binding message takes only text and plain values such as {{qty}} or {{params.id}}",
        Kind::Details => "authorization_details strings take only text and plain values such as {{qty}} or {{params.id}}",
    };
    let mut segments: Vec<Segment> = Vec::new();
    for element in &template.elements {
        let helper = match element {
            TemplateElement::RawString(text) => {
                match segments.last_mut() {
                    Some(Segment::Text(last)) => last.push_str(text),
                    _ => segments.push(Segment::Text(text.clone())),
                }
                continue;
            }
            TemplateElement::Comment(_) => continue,
            TemplateElement::Expression(helper) => helper,
            TemplateElement::HtmlExpression(helper) if kind == Kind::Details => helper,
            TemplateElement::HtmlExpression(_) => {
                return Err(
                    "triple-stash {{{...}}} is not supported in binding messages; use {{...}}"
                        .to_owned(),
                )
            }
            TemplateElement::HelperBlock(_) => {
                return Err(format!(
                    "blocks such as {{{{#if}}}} are not supported: {only}"
                ))
            }
            TemplateElement::PartialExpression(_) | TemplateElement::PartialBlock(_) => {
                return Err(format!("partials are not supported: {only}"))
            }
            _ => return Err(format!("decorators are not supported: {only}")),
        };
        let called = match &helper.name {
            Parameter::Name(name) => name.clone(),
            Parameter::Path(path) => raw_path(path),
            _ => "(...)".to_owned(),
        };
        if helper.block || !helper.params.is_empty() || !helper.hash.is_empty() {
            return Err(format!("{{{{{called} ...}}}} calls a helper: {only}"));
        }
        let segments_of_path = match &helper.name {
            Parameter::Path(Path::Relative((segs, _))) if !segs.is_empty() => segs
                .iter()
                .map(|s| match s {
                    PathSeg::Named(name) => Some(name.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>(),
            _ => None,
        };
        let Some(path) = segments_of_path else {
            return Err(format!(
                "{{{{{called}}}}} is not a plain path (no this, ../, @root or @index): {only}"
            ));
        };
        segments.push(Segment::Field(FieldPath {
            text: path.join("."),
            segments: path,
        }));
    }
    Ok(segments)
}

fn raw_path(path: &Path) -> String {
    match path {
        Path::Relative((_, raw)) | Path::Local((_, _, raw)) => raw.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(source: &str, values: &Value) -> Result<String, RenderError> {
        let template = MessageTemplate::parse(source).unwrap();
        template.render(|field| lookup(values, field))
    }

    fn lookup<'v>(values: &'v Value, field: &FieldPath) -> Option<Found<'v>> {
        field
            .segments
            .iter()
            .try_fold(values, |v, s| v.get(s))
            .map(Found::Json)
    }

    #[test]
    fn renders_the_shop_message() {
        let values = json!({"qty": 2, "product": "XYZ phone"});
        assert_eq!(
            message("Do you want to buy {{qty}} {{product}}", &values).unwrap(),
            "Do you want to buy 2 XYZ phone"
        );
        let values = json!({"qty": 2.5, "product": "  XYZ   phone ", "gift": true});
        assert_eq!(
            message("Buy {{qty}} {{product}} gift: {{gift}}", &values).unwrap(),
            "Buy 2.5 XYZ phone gift: true"
        );
    }

    #[test]
    fn values_the_message_cannot_show_are_refused_not_blanked() {
        let character = |value: &str| match message("Buy {{product}}", &json!({"product": value})) {
            Err(RenderError::Character { field, character }) => {
                assert_eq!(field, "product");
                character
            }
            other => panic!("{value:?}: {other:?}"),
        };
        assert_eq!(character("phone\nApprove all <b>now</b>!"), '\n');
        assert_eq!(character("\u{0661}\u{0660}\u{0660}"), '\u{0661}'); // Arabic-Indic 100
        assert_eq!(character("\u{0430}pple"), '\u{0430}'); // Cyrillic a
        assert_eq!(character("\u{03B1}"), '\u{03B1}');
        assert_eq!(character("\u{624B}\u{673A}"), '\u{624B}');
        assert_eq!(character("\u{FF11}"), '\u{FF11}'); // fullwidth digit one
        assert_eq!(character("x\u{00B2}"), '\u{00B2}');
        assert_eq!(character("phone\u{202E}"), '\u{202E}');
        assert_eq!(character("ph\u{200B}one"), '\u{200B}');
        assert_eq!(character("XYZ\u{00A0}phone"), '\u{00A0}');
        assert_eq!(character("1\u{0336}"), '\u{0336}'); // a stroke through a digit
        for punctuation in ["!", "?", "'", "/", "$", "\t"] {
            assert_eq!(
                character(&format!("a{punctuation}")).to_string(),
                punctuation
            );
        }
        let error = message("Buy {{product}}", &json!({"product": "\u{0430}"})).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the value of 'product' contains the character U+0430 '\u{0430}', which a binding message cannot show"
        );
        let error = message("Buy {{product}}", &json!({"product": "a\u{202E}"})).unwrap_err();
        assert!(error.to_string().contains("U+202E,"), "{error}");
    }

    #[test]
    fn letters_with_a_faithful_ascii_form_are_transliterated() {
        let shown = |value: &str| message("Buy {{product}}", &json!({ "product": value })).unwrap();
        assert_eq!(shown("Caf\u{00E9} cr\u{00E8}me"), "Buy Cafe creme");
        assert_eq!(shown("Cafe\u{0301}"), "Buy Cafe"); // decomposed e + acute
                                                       // The Kelvin sign is K canonically.
        assert_eq!(shown("\u{212A}elvin"), "Buy Kelvin");
        // Compatibility forms are look-alikes of another string.
        let refused = |value: &str| message("Buy {{product}}", &json!({ "product": value }));
        for value in [
            "\u{FB01}ne",
            "\u{FF38}YZ",
            "\u{017F}ize",
            "\u{1D417}",
            "\u{24CD}",
        ] {
            assert!(
                matches!(refused(value), Err(RenderError::Character { .. })),
                "{value}"
            );
        }
    }

    #[test]
    fn null_empty_and_structured_values_are_refused() {
        for (value, what) in [
            (json!(null), "null"),
            (json!(""), "empty"),
            (json!("   "), "empty"),
            (json!([1]), "a list"),
            (json!({"n": 1}), "an object"),
        ] {
            assert_eq!(
                message("Buy {{qty}} phones", &json!({ "qty": value })),
                Err(RenderError::NotShowable {
                    field: "qty".into(),
                    what
                }),
            );
        }
    }

    #[test]
    fn overlong_and_missing_values_are_refused() {
        let long = "x".repeat(80);
        assert_eq!(
            message("Buy {{product}}", &json!({ "product": long })),
            Err(RenderError::MessageTooLong(84))
        );
        assert_eq!(
            message("Buy {{product}}", &json!({})),
            Err(RenderError::MissingValue("product".into()))
        );
    }

    #[test]
    fn bad_templates_are_refused_at_parse() {
        let refused = |source: &str| MessageTemplate::parse(source).unwrap_err();
        assert!(refused("Buy {{qty").contains("broken template"));
        assert!(refused("Buy now!").contains("'!'"));
        assert!(refused("Buy {{{product}}}").contains("triple-stash"));
        assert!(refused("{{#if a}}Buy{{/if}}").contains("blocks"));
        assert!(refused("Buy {{lookup body 'qty'}}").contains("calls a helper"));
        assert!(refused("Buy {{upper product}}").contains("calls a helper"));
        assert!(refused("Buy {{../qty}}").contains("not a plain path"));
        assert!(refused("Buy {{@root.qty}}").contains("not a plain path"));
        assert!(refused("Buy {{this}}").contains("not a plain path"));
        assert!(refused("Buy {{> other}}").contains("partials"));
        assert!(refused("At {{request.path}}").contains("'/'"));
        assert!(refused("For {{user}}").contains("whole section"));
        assert!(refused("").contains("empty"));
    }

    #[test]
    fn templates_say_which_parts_of_the_call_they_read() {
        let template =
            MessageTemplate::parse("Buy {{qty}} {{body.product}} for {{user.sub}} {{! note }}")
                .unwrap();
        let sections: Vec<_> = template.fields().map(|f| f.section()).collect();
        let qty = ["qty".to_owned()];
        let product = ["product".to_owned()];
        let sub = ["sub".to_owned()];
        assert_eq!(
            sections,
            vec![
                (Section::Body, &qty[..]),
                (Section::Body, &product[..]),
                (Section::User, &sub[..]),
            ]
        );
        let details =
            DetailsTemplate::parse(json!({"q": "{{query.page}}", "t": "at {{params.id}}"}))
                .unwrap();
        let texts: Vec<_> = details
            .fields()
            .iter()
            .map(|f| f.text().to_owned())
            .collect();
        assert_eq!(texts, ["query.page", "params.id"]);
    }

    #[test]
    fn details_keep_value_types() {
        let template = DetailsTemplate::parse(json!([{
            "type": "product_purchase",
            "product": "{{product}}",
            "quantity": " {{qty}} ",
            "note": "for {{user.sub}}",
            "literal": "\\{{not a value}}"
        }]))
        .unwrap();
        let values = json!({"product": "XYZ phone", "qty": 2, "user": {"sub": "alice"}});
        let rendered = template.render(|f| lookup(&values, f)).unwrap();
        assert_eq!(
            rendered,
            json!([{"type": "product_purchase", "product": "XYZ phone", "quantity": 2,
                    "note": "for alice", "literal": "{{not a value}}"}])
        );
        let values = json!({"product": null, "qty": 2, "user": {"sub": null}});
        assert_eq!(
            template.render(|f| lookup(&values, f)),
            Err(RenderError::NotShowable {
                field: "user.sub".into(),
                what: "null"
            })
        );
        assert!(DetailsTemplate::parse(json!({"a": "{{#each x}}{{/each}}"})).is_err());
    }
}
