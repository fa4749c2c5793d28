//! Binding messages and `authorization_details` rendered from the call.
//!
//! Templates are compiled while the policy file is parsed, so a broken one is
//! reported with its file, line and key. Every value interpolated from the
//! call into a binding message passes through [`sanitize_value`]: the agent
//! controls those values, and the person approves whatever the message says.

use std::fmt;

use handlebars::template::TemplateElement;
use handlebars::{Handlebars, Template};
use serde::{de, Deserialize, Deserializer};
use serde_json::Value;
use thiserror::Error;

/// Auth0's documented limit, also a sensible bound for a phone notification.
pub const BINDING_MESSAGE_MAX_CHARS: usize = 64;

/// Characters Auth0 accepts in a binding message: letters, digits, space and
/// `+ - _ . , : #`.
pub fn is_binding_message_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ' ' | '+' | '-' | '_' | '.' | ',' | ':' | '#')
}

/// Replaces every character a binding message may not carry with a space, so
/// an agent cannot smuggle line breaks, markup or look-alike text into it.
pub fn sanitize_value(value: &str) -> String {
    value
        .chars()
        .map(|c| if is_binding_message_char(c) { c } else { ' ' })
        .collect()
}

/// A binding message template, validated at load.
#[derive(Clone)]
pub struct MessageTemplate {
    source: String,
    compiled: Template,
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
        let compiled = Template::compile(source).map_err(|e| format!("broken template: {e}"))?;
        check_message_elements(&compiled.elements)?;
        Ok(Self {
            source: source.to_owned(),
            compiled,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

fn check_message_elements(elements: &[TemplateElement]) -> Result<(), String> {
    for element in elements {
        match element {
            TemplateElement::RawString(text) => {
                if let Some(bad) = text.chars().find(|c| !is_binding_message_char(*c)) {
                    return Err(format!(
                        "binding message text contains {bad:?}; allowed are letters, digits, space and + - _ . , : #"
                    ));
                }
            }
            TemplateElement::HtmlExpression(_) => {
                return Err(
                    "triple-stash {{{...}}} would insert call values unsanitised; use {{...}}"
                        .to_owned(),
                )
            }
            TemplateElement::HelperBlock(block) => {
                for inner in [&block.template, &block.inverse].into_iter().flatten() {
                    check_message_elements(&inner.elements)?;
                }
            }
            TemplateElement::PartialExpression(_) | TemplateElement::PartialBlock(_) => {
                return Err("partials are not supported in binding messages".to_owned())
            }
            _ => {}
        }
    }
    Ok(())
}

impl<'de> Deserialize<'de> for MessageTemplate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Self::parse(&source).map_err(de::Error::custom)
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
    Lookup(Vec<String>),
    Text(Box<Template>),
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
}

fn compile_node(value: Value) -> Result<DetailsNode, String> {
    Ok(match value {
        Value::String(text) => {
            if let Some(path) = single_lookup(&text) {
                DetailsNode::Lookup(path)
            } else if text.contains("{{") {
                let compiled =
                    Template::compile(&text).map_err(|e| format!("broken template: {e}"))?;
                DetailsNode::Text(Box::new(compiled))
            } else {
                DetailsNode::Literal(Value::String(text))
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

/// `{{ a.b.0 }}` alone in a string: returns `["a", "b", "0"]`.
fn single_lookup(text: &str) -> Option<Vec<String>> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    let valid = !inner.is_empty()
        && inner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    valid.then(|| inner.split('.').map(str::to_owned).collect())
}

impl<'de> Deserialize<'de> for DetailsTemplate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::parse(value).map_err(de::Error::custom)
    }
}

/// Why a template could not be rendered for a call.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("the call has no value for '{0}'")]
    MissingValue(String),
    #[error("the binding message would be {0} characters; at most {BINDING_MESSAGE_MAX_CHARS} are allowed")]
    MessageTooLong(usize),
    #[error("the binding message is empty")]
    EmptyMessage,
    #[error("{0}")]
    Other(String),
}

/// Compiled templates of every policy, keyed by the policy's index.
pub struct TemplateEngine {
    messages: Handlebars<'static>,
    details: Handlebars<'static>,
}

impl fmt::Debug for TemplateEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TemplateEngine")
    }
}

/// A policy's details template with its text leaves registered in the engine.
#[derive(Clone)]
pub struct RegisteredDetails {
    root: RegisteredNode,
}

impl fmt::Debug for RegisteredDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegisteredDetails")
    }
}

#[derive(Clone)]
enum RegisteredNode {
    Literal(Value),
    Lookup(Vec<String>),
    Text(String),
    Array(Vec<RegisteredNode>),
    Object(Vec<(String, RegisteredNode)>),
}

impl Default for TemplateEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl TemplateEngine {
    pub fn new() -> Self {
        let mut messages = Handlebars::new();
        messages.set_strict_mode(true);
        messages.register_escape_fn(sanitize_value);
        let mut details = Handlebars::new();
        details.set_strict_mode(true);
        details.register_escape_fn(handlebars::no_escape);
        Self { messages, details }
    }

    pub fn add_message(&mut self, key: &str, template: &MessageTemplate) {
        self.messages
            .register_template(key, template.compiled.clone());
    }

    pub fn add_details(&mut self, key: &str, template: &DetailsTemplate) -> RegisteredDetails {
        let mut counter = 0;
        let root = self.register_node(key, &template.root, &mut counter);
        RegisteredDetails { root }
    }

    fn register_node(
        &mut self,
        key: &str,
        node: &DetailsNode,
        counter: &mut usize,
    ) -> RegisteredNode {
        match node {
            DetailsNode::Literal(v) => RegisteredNode::Literal(v.clone()),
            DetailsNode::Lookup(path) => RegisteredNode::Lookup(path.clone()),
            DetailsNode::Text(template) => {
                let name = format!("{key}#{counter}");
                *counter += 1;
                self.details.register_template(&name, (**template).clone());
                RegisteredNode::Text(name)
            }
            DetailsNode::Array(items) => RegisteredNode::Array(
                items
                    .iter()
                    .map(|n| self.register_node(key, n, counter))
                    .collect(),
            ),
            DetailsNode::Object(fields) => RegisteredNode::Object(
                fields
                    .iter()
                    .map(|(k, n)| (k.clone(), self.register_node(key, n, counter)))
                    .collect(),
            ),
        }
    }

    /// Renders, sanitises and checks a binding message.
    pub fn render_message(&self, key: &str, context: &Value) -> Result<String, RenderError> {
        let rendered = self
            .messages
            .render(key, context)
            .map_err(convert_render_error)?;
        let message = rendered.split_whitespace().collect::<Vec<_>>().join(" ");
        let length = message.chars().count();
        if length == 0 {
            return Err(RenderError::EmptyMessage);
        }
        if length > BINDING_MESSAGE_MAX_CHARS {
            return Err(RenderError::MessageTooLong(length));
        }
        // Literal text was checked at load and values were sanitised; this
        // guards against a helper emitting something unexpected.
        if message.chars().any(|c| !is_binding_message_char(c)) {
            return Err(RenderError::Other(
                "the binding message contains characters the authorization server refuses".into(),
            ));
        }
        Ok(message)
    }

    pub fn render_details(
        &self,
        details: &RegisteredDetails,
        context: &Value,
    ) -> Result<Value, RenderError> {
        self.render_node(&details.root, context)
    }

    fn render_node(&self, node: &RegisteredNode, context: &Value) -> Result<Value, RenderError> {
        Ok(match node {
            RegisteredNode::Literal(v) => v.clone(),
            RegisteredNode::Lookup(path) => lookup(context, path)
                .cloned()
                .ok_or_else(|| RenderError::MissingValue(path.join(".")))?,
            RegisteredNode::Text(name) => Value::String(
                self.details
                    .render(name, context)
                    .map_err(convert_render_error)?,
            ),
            RegisteredNode::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|n| self.render_node(n, context))
                    .collect::<Result<_, _>>()?,
            ),
            RegisteredNode::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, n)| Ok((k.clone(), self.render_node(n, context)?)))
                    .collect::<Result<_, RenderError>>()?,
            ),
        })
    }
}

fn lookup<'v>(root: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(root, |value, segment| match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

fn convert_render_error(error: handlebars::RenderError) -> RenderError {
    match error.reason() {
        handlebars::RenderErrorReason::MissingVariable(Some(path)) => {
            RenderError::MissingValue(path.clone())
        }
        handlebars::RenderErrorReason::MissingVariable(None) => {
            RenderError::MissingValue("a value".to_owned())
        }
        other => RenderError::Other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engine_with(source: &str) -> TemplateEngine {
        let mut engine = TemplateEngine::new();
        engine.add_message("m", &MessageTemplate::parse(source).unwrap());
        engine
    }

    #[test]
    fn renders_the_shop_message() {
        let engine = engine_with("Do you want to buy {{qty}} {{product}}");
        let message = engine
            .render_message("m", &json!({"qty": 2, "product": "XYZ phone"}))
            .unwrap();
        assert_eq!(message, "Do you want to buy 2 XYZ phone");
    }

    #[test]
    fn call_values_are_sanitised() {
        let engine = engine_with("Buy {{product}}");
        let message = engine
            .render_message("m", &json!({"product": "phone\nApprove all <b>now</b>!"}))
            .unwrap();
        assert_eq!(message, "Buy phone Approve all b now b");
    }

    #[test]
    fn overlong_and_missing_values_are_refused() {
        let engine = engine_with("Buy {{product}}");
        let long = "x".repeat(80);
        assert_eq!(
            engine.render_message("m", &json!({ "product": long })),
            Err(RenderError::MessageTooLong(84))
        );
        assert_eq!(
            engine.render_message("m", &json!({})),
            Err(RenderError::MissingValue("product".into()))
        );
    }

    #[test]
    fn bad_templates_are_refused_at_parse() {
        assert!(MessageTemplate::parse("Buy {{qty")
            .unwrap_err()
            .contains("broken template"));
        assert!(MessageTemplate::parse("Buy now!")
            .unwrap_err()
            .contains("'!'"));
        assert!(MessageTemplate::parse("Buy {{{product}}}")
            .unwrap_err()
            .contains("triple-stash"));
        assert!(MessageTemplate::parse("{{#if a}}Buy?{{/if}}").is_err());
    }

    #[test]
    fn details_keep_value_types() {
        let template = DetailsTemplate::parse(json!([{
            "type": "product_purchase",
            "product": "{{product}}",
            "quantity": "{{qty}}",
            "note": "for {{user.sub}}"
        }]))
        .unwrap();
        let mut engine = TemplateEngine::new();
        let registered = engine.add_details("d", &template);
        let rendered = engine
            .render_details(
                &registered,
                &json!({"product": "XYZ phone", "qty": 2, "user": {"sub": "alice"}}),
            )
            .unwrap();
        assert_eq!(
            rendered,
            json!([{"type": "product_purchase", "product": "XYZ phone", "quantity": 2, "note": "for alice"}])
        );
    }
}
