//! Policy conditions: `when: "body.qty > 5"`, in CEL (the `cel` crate).
//!
//! A condition reads the same values the templates read (`body`, `params`,
//! `query`, `user`, `request`), and it reads them the way the API will:
//!
//! - `body` is the strictly parsed JSON body ([`super::body`]), sent as JSON;
//!   a body key spelled, up to letter case, like a name the condition uses but
//!   not exactly like it (`QTY` for `qty`) is refused, at every level: an API
//!   that binds keys case-insensitively would read the value the condition
//!   did not see;
//! - `query` holds every query parameter, each given once (up to letter case),
//!   with no `;`, and not spelled like a name the condition uses in another
//!   letter case;
//! - `params` the path parameters, `user` the approving person's claims,
//!   `request.method` and `request.path`.
//!
//! Conditions compile at load; anything that goes wrong while one is
//! evaluated (a missing value, a type mismatch, a result that is not a
//! boolean) refuses the call with `condition_failed`: a condition never lets
//! a call through by failing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr, LiteralValue};
use cel::objects::{Key, Map};
use cel::{Context, Env, IdedExpr, Program, Value as Cel};
use serde::{de, Deserialize, Deserializer};
use serde_json::Value;

use super::body::fold_case;

/// The sections a condition may read.
const SECTIONS: [&str; 6] = ["body", "params", "query", "user", "request", "agent"];

/// Functions the CEL standard library of this build provides (no regex,
/// time or string extensions), besides the conversions below; a call to any
/// other refuses the condition at load instead of failing every call at run
/// time.
const FUNCTIONS: [&str; 5] = ["size", "dyn", "contains", "startsWith", "endsWith"];

/// The conversions, which CEL names both as functions (`int(body.qty)`) and
/// as type values (`type(body.qty) == int`): available as either.
const CONVERSIONS: [&str; 7] = ["int", "uint", "double", "string", "bytes", "bool", "type"];

/// Type names besides the conversions, which CEL reads as values
/// (`type(body.tags) == list`).
const TYPE_NAMES: [&str; 3] = ["list", "map", "null_type"];

/// The longest condition accepted, in bytes.
pub const MAX_SOURCE: usize = 2048;

/// A compiled `when:` condition.
pub struct Condition {
    source: String,
    program: Program,
    /// Which sections it reads.
    pub(crate) reads: Reads,
    /// Every field name and string literal of the expression, folded, with
    /// the exact spellings it uses: a key of the call that folds to one of
    /// these must be spelled exactly so.
    names: HashMap<String, HashSet<String>>,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

/// Which sections of a call a condition reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reads {
    pub body: bool,
    pub params: bool,
    pub query: bool,
    pub user: bool,
    pub request: bool,
    pub agent: bool,
}

impl Reads {
    pub(crate) fn union(self, other: Self) -> Self {
        Self {
            body: self.body || other.body,
            params: self.params || other.params,
            query: self.query || other.query,
            user: self.user || other.user,
            request: self.request || other.request,
            agent: self.agent || other.agent,
        }
    }
}

/// Why a condition could not decide. The text is the end of a sentence
/// starting "The condition of policy 'P' could not be evaluated: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Cel(String),
    #[error("it gave {0}, not true or false")]
    NotBoolean(String),
}

/// The CEL environment every condition runs in: the standard library only.
fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib()))
}

impl Condition {
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.trim().is_empty() {
            return Err("the condition is empty".to_owned());
        }
        if source.len() > MAX_SOURCE {
            return Err(format!(
                "the condition is longer than {MAX_SOURCE} characters"
            ));
        }
        let program = env().compile(source).map_err(|e| {
            format!(
                "condition {source:?} is not valid CEL: {}",
                one_line(&e.to_string())
            )
        })?;
        let mut walk = Walk::default();
        walk.expr(program.expression(), &mut Vec::new());
        if let Some(unknown) = walk.unknown.first() {
            return Err(format!(
                "condition {source:?} reads '{unknown}'; a condition reads only {}",
                SECTIONS.join(", ")
            ));
        }
        if let Some(function) = walk.functions.first() {
            return Err(format!(
                "condition {source:?} calls '{function}', which is not available; functions: {}, and the macros has, all, exists, exists_one, map, filter",
                [FUNCTIONS.as_slice(), &CONVERSIONS].concat().join(", ")
            ));
        }
        let mut names: HashMap<String, HashSet<String>> = HashMap::new();
        for name in walk.names {
            names.entry(fold_case(&name)).or_default().insert(name);
        }
        Ok(Self {
            source: source.to_owned(),
            program,
            reads: walk.reads,
            names,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every field name and string literal the expression uses, as spelled.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.names.values().flatten().map(String::as_str)
    }

    /// The key of the call, among `keys`, spelled like a name this condition
    /// uses up to letter case but not exactly so.
    pub(crate) fn misspelled<'k>(
        &self,
        mut keys: impl Iterator<Item = &'k str>,
    ) -> Option<&'k str> {
        keys.find(|key| {
            self.names
                .get(&fold_case(key))
                .is_some_and(|exact| !exact.contains(*key))
        })
    }

    /// The first key anywhere in `value` (objects at every level) that
    /// [`Self::misspelled`] refuses.
    pub(crate) fn misspelled_in<'v>(&self, value: &'v Value) -> Option<&'v str> {
        match value {
            Value::Object(map) => self
                .misspelled(map.keys().map(String::as_str))
                .or_else(|| map.values().find_map(|v| self.misspelled_in(v))),
            Value::Array(items) => items.iter().find_map(|v| self.misspelled_in(v)),
            _ => None,
        }
    }

    /// Evaluates the condition over `values` (which hold at least the
    /// sections it reads).
    pub(crate) fn holds(&self, values: &CelValues) -> Result<bool, EvalError> {
        let mut context = Context::with_env(env().clone());
        for (name, value) in [
            ("body", &values.body),
            ("params", &values.params),
            ("query", &values.query),
            ("user", &values.user),
            ("request", &values.request),
            ("agent", &values.agent),
        ] {
            if let Some(value) = value {
                context.add_variable_from_value(name, value.clone());
            }
        }
        match self.program.execute(&context) {
            Ok(Cel::Bool(b)) => Ok(b),
            Ok(other) => Err(EvalError::NotBoolean(describe(&other))),
            Err(error) => Err(EvalError::Cel(describe_error(&error))),
        }
    }
}

fn one_line(text: &str) -> String {
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    text.chars().take(300).collect()
}

/// An evaluation error as the agent is told it: names and types, never a
/// value (values of `user` are the person's, and nothing of a call is logged).
fn describe_error(error: &cel::ExecutionError) -> String {
    use cel::ExecutionError as E;
    match error {
        E::NoSuchKey(key) => format!("it reads '{key}', which the call does not have"),
        E::UndeclaredReference(name) => format!("it reads '{name}', which the call does not have"),
        E::NoSuchOverload(overload) => one_line(&overload.to_string()),
        E::ValuesNotComparable(a, b) => {
            format!(
                "a {} cannot be compared with a {}",
                a.type_of(),
                b.type_of()
            )
        }
        E::UnsupportedBinaryOperator(op, a, b) => {
            format!(
                "'{op}' does not apply to a {} and a {}",
                a.type_of(),
                b.type_of()
            )
        }
        E::UnexpectedType { got, want } => format!("it found a {got} where it needs a {want}"),
        E::DivisionByZero(_) | E::RemainderByZero(_) => "it divides by zero".to_owned(),
        E::Overflow(op, _, _) => format!("'{op}' overflows"),
        E::IndexOutOfBounds(_) => "it reads past the end of a list".to_owned(),
        E::FunctionError { function, .. } => format!("the function '{function}' failed"),
        _ => "it failed".to_owned(),
    }
}

/// A value's type, for messages (never the value: it may be secret).
fn describe(value: &Cel) -> String {
    format!("a value of type {}", value.type_of())
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = String::deserialize(d)?;
        Self::parse(&source).map_err(de::Error::custom)
    }
}

/// What a walk over the expression found.
#[derive(Default)]
struct Walk {
    reads: Reads,
    /// Free identifiers that are not a section.
    unknown: Vec<String>,
    /// Field names and string literals.
    names: Vec<String>,
    /// Called functions that are not available.
    functions: Vec<String>,
}

impl Walk {
    /// `bound`: comprehension variables in scope.
    fn expr(&mut self, node: &IdedExpr, bound: &mut Vec<String>) {
        match &node.expr {
            Expr::Unspecified => {}
            Expr::Ident(name) => {
                if name.starts_with('@') || bound.iter().any(|b| b == name) {
                    return;
                }
                match name.as_str() {
                    "body" => self.reads.body = true,
                    "params" => self.reads.params = true,
                    "query" => self.reads.query = true,
                    "user" => self.reads.user = true,
                    "request" => self.reads.request = true,
                    "agent" => self.reads.agent = true,
                    _ if TYPE_NAMES.contains(&name.as_str())
                        || CONVERSIONS.contains(&name.as_str()) => {}
                    _ => self.unknown.push(name.clone()),
                }
            }
            Expr::Select(select) => {
                self.names.push(select.field.clone());
                self.expr(&select.operand, bound);
            }
            Expr::Call(call) => {
                // Operators are spelled `_+_`, `!_`, `@in`, ...
                let operator = call.func_name.starts_with(['_', '!', '-', '@']);
                let known = FUNCTIONS.contains(&call.func_name.as_str())
                    || CONVERSIONS.contains(&call.func_name.as_str());
                if !operator && !known {
                    self.functions.push(call.func_name.clone());
                }
                if let Some(target) = &call.target {
                    self.expr(target, bound);
                }
                for arg in &call.args {
                    self.expr(arg, bound);
                }
            }
            Expr::Comprehension(comp) => {
                self.expr(&comp.iter_range, bound);
                let depth = bound.len();
                bound.push(comp.iter_var.clone());
                bound.extend(comp.iter_var2.clone());
                bound.push(comp.accu_var.clone());
                self.expr(&comp.accu_init, bound);
                self.expr(&comp.loop_cond, bound);
                self.expr(&comp.loop_step, bound);
                self.expr(&comp.result, bound);
                bound.truncate(depth);
            }
            Expr::List(list) => {
                for element in &list.elements {
                    self.expr(element, bound);
                }
            }
            Expr::Literal(LiteralValue::String(s)) => self.names.push(s.inner().to_owned()),
            Expr::Literal(_) => {}
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        self.expr(&entry.key, bound);
                        self.expr(&entry.value, bound);
                    }
                }
            }
            Expr::Struct(structure) => {
                for entry in &structure.entries {
                    if let EntryExpr::StructField(field) = &entry.expr {
                        self.expr(&field.value, bound);
                    }
                }
            }
        }
    }
}

/// The sections of one call as CEL values; `None` for a section no
/// condition at hand reads.
#[derive(Debug, Default)]
pub(crate) struct CelValues {
    pub body: Option<Cel>,
    pub params: Option<Cel>,
    pub query: Option<Cel>,
    pub user: Option<Cel>,
    pub request: Option<Cel>,
    pub agent: Option<Cel>,
}

/// A JSON value as CEL reads it: integers stay integers (the strict body
/// parser has refused any it cannot hold exactly), other numbers are doubles.
pub(crate) fn from_json(value: &Value) -> Cel {
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Cel::Int(i),
            (None, Some(u)) => Cel::UInt(u),
            _ => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(from_json).collect())),
        Value::Object(map) => Cel::Map(Map {
            map: Arc::new(
                map.iter()
                    .map(|(k, v)| (Key::from(k.clone()), from_json(v)))
                    .collect(),
            ),
        }),
    }
}

/// Name/value pairs (path or query parameters) as a CEL map of strings.
pub(crate) fn from_pairs(pairs: &[(String, String)]) -> Cel {
    Cel::Map(Map {
        map: Arc::new(
            pairs
                .iter()
                .map(|(k, v)| (Key::from(k.clone()), Cel::String(Arc::new(v.clone()))))
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(source: &str, body: Value) -> Result<bool, EvalError> {
        let condition = Condition::parse(source).unwrap();
        let values = CelValues {
            body: Some(from_json(&body)),
            params: Some(from_pairs(&[("orderId".into(), "7".into())])),
            query: Some(from_pairs(&[("page".into(), "2".into())])),
            user: Some(from_json(&json!({"sub": "alice", "groups": ["ops"]}))),
            request: Some(from_pairs(&[
                ("method".into(), "POST".into()),
                ("path".into(), "/shop".into()),
            ])),
            agent: Some(from_json(
                &json!({"subject": "billing-agent", "dns": ["billing.agents.internal"]}),
            )),
        };
        condition.holds(&values)
    }

    #[test]
    fn conditions_read_the_call() {
        assert_eq!(eval("body.qty > 5", json!({"qty": 6})), Ok(true));
        assert_eq!(eval("body.qty > 5", json!({"qty": 5})), Ok(false));
        // Integers and doubles compare as numbers.
        assert_eq!(eval("body.qty > 5", json!({"qty": 5.5})), Ok(true));
        // CEL has no mixed arithmetic: an int times a double is an error
        // (the call is refused), `double()` converts.
        assert!(eval(
            "body.price * body.qty >= 1000.0",
            json!({"price": 500, "qty": 2.0})
        )
        .is_err());
        assert_eq!(
            eval(
                "double(body.price) * double(body.qty) >= 1000.0",
                json!({"price": 500, "qty": 2.0})
            ),
            Ok(true)
        );
        assert!(eval("body.qty > 5", json!({"qty": null})).is_err());
        assert_eq!(
            eval(
                r#"body.product in ["gift-card", "crypto"]"#,
                json!({"product": "crypto"})
            ),
            Ok(true)
        );
        assert_eq!(
            eval("params.orderId == '7' && query.page == '2'", json!({})),
            Ok(true)
        );
        assert_eq!(
            eval(
                "'ops' in user.groups && request.method == 'POST'",
                json!({})
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                "body.items.exists(i, i.price > 100)",
                json!({"items": [{"price": 1}, {"price": 101}]})
            ),
            Ok(true)
        );
        assert_eq!(eval("has(body.coupon)", json!({"qty": 1})), Ok(false));
    }

    #[test]
    fn evaluation_errors_are_errors_not_false() {
        let missing = eval("body.qty > 5", json!({"count": 6})).unwrap_err();
        assert!(matches!(missing, EvalError::Cel(_)), "{missing}");
        let mistyped = eval("body.qty > 5", json!({"qty": "100"})).unwrap_err();
        assert!(matches!(mistyped, EvalError::Cel(_)), "{mistyped}");
        let not_bool = eval("body.qty", json!({"qty": 6})).unwrap_err();
        assert_eq!(
            not_bool,
            EvalError::NotBoolean("a value of type int".into())
        );
        // Neither side of `||` may hide an error that decides: CEL's
        // commutative logic gives true only when one side is true.
        assert_eq!(
            eval("body.missing > 1 || body.qty > 5", json!({"qty": 6})),
            Ok(true)
        );
        assert!(eval("body.missing > 1 || body.qty > 5", json!({"qty": 1})).is_err());
    }

    #[test]
    fn conditions_are_checked_at_load() {
        assert!(Condition::parse("body.qty >")
            .unwrap_err()
            .contains("not valid CEL"));
        let unknown = Condition::parse("qty > 5").unwrap_err();
        assert!(unknown.contains("reads 'qty'"), "{unknown}");
        assert!(Condition::parse("  ").is_err());
        let missing = Condition::parse("body.name.matches('^a')").unwrap_err();
        assert!(missing.contains("calls 'matches'"), "{missing}");
        assert!(Condition::parse("type(body.qty) == int && size(body.items) < 3").is_ok());
        assert!(Condition::parse("body.sku.startsWith('gift-') || 'x' in body.tags").is_ok());
        // Comprehension variables are not sections.
        let c = Condition::parse("body.items.all(item, item.qty < 10)").unwrap();
        assert_eq!(
            c.reads,
            Reads {
                body: true,
                ..Reads::default()
            }
        );
    }

    #[test]
    fn keys_spelled_unlike_the_condition_are_found() {
        let c = Condition::parse(r#"body.qty > 5 || body["Product"] == "x""#).unwrap();
        assert_eq!(c.misspelled_in(&json!({"qty": 1, "Product": "y"})), None);
        assert_eq!(c.misspelled_in(&json!({"QTY": 100})), Some("QTY"));
        assert_eq!(c.misspelled_in(&json!({"product": "x"})), Some("product"));
        assert_eq!(c.misspelled_in(&json!({"a": [{"Qty": 1}]})), Some("Qty"));
        // The Kelvin sign folds to k.
        let k = Condition::parse("body.kind == 'x'").unwrap();
        assert_eq!(
            k.misspelled_in(&json!({"\u{212A}ind": "x"})),
            Some("\u{212A}ind")
        );
    }
}
