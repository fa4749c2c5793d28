//! The Grafana dashboard and the Prometheus alerting rules in `deploy/`
//! against reality (issue 23): `promtool check rules` and `promtool test
//! rules` on the alerts, every PromQL expression of the dashboard parsed by
//! promtool, and every metric either names exported in `/metrics` of a real
//! gateway that has held and forwarded a call. Needs `promtool` (Debian's
//! `prometheus` package): without it these tests fail, never skip.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use support::*;

const DASHBOARD: &str = "deploy/grafana/countersign.json";
const ALERTS: &str = "deploy/prometheus/countersign-alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/countersign-alerts.test.yml";

/// Runs promtool with `args` in `dir`; a missing promtool fails the test.
fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install Debian's prometheus package \
                 (apt-get install prometheus), which .ci/run does when it is missing"
            )
        })
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo_path(DASHBOARD)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

fn yaml(path: &str) -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo_path(path)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// Every panel of the dashboard, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        if let Some(inner) = panel["panels"].as_array() {
            all.extend(inner);
        }
    }
    all
}

/// Each PromQL expression of the dashboard, as Prometheus will receive it
/// (Grafana's variables replaced), with where it is.
fn dashboard_expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut values: BTreeMap<String, String> = [
        ("__rate_interval", "5m"),
        ("__interval", "1m"),
        ("__range", "6h"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut found = Vec::new();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        let name = variable["name"].as_str().expect("variable name").to_owned();
        match variable["type"].as_str() {
            Some("query") => {
                values.insert(name.clone(), ".+".into());
                let query = variable["query"]["query"]
                    .as_str()
                    .or(variable["query"].as_str())
                    .expect("a query variable's query");
                // label_values(SELECTOR, label) is Grafana's: Prometheus sees SELECTOR.
                let selector = query
                    .strip_prefix("label_values(")
                    .and_then(|rest| rest.rsplit_once(','))
                    .map(|(selector, _)| selector.trim())
                    .unwrap_or_else(|| panic!("variable {name}: unexpected query {query}"));
                found.push((format!("variable {name}"), selector.to_owned()));
            }
            Some("textbox" | "constant") => {
                let value = variable["query"].as_str().expect("a textbox's value");
                values.insert(name, value.to_owned());
            }
            Some("datasource") => {}
            other => panic!("variable {name}: unexpected type {other:?}"),
        }
    }
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("untitled");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            found.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    found
        .into_iter()
        .map(|(place, expr)| {
            let expanded = expand(&expr, &values)
                .unwrap_or_else(|name| panic!("{place}: unknown variable ${name} in {expr}"));
            (place, expanded)
        })
        .collect()
}

/// `expr` with `$name` and `${name}` replaced; the unknown name otherwise.
fn expand(expr: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| after.to_owned())?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        out.push_str(values.get(name).ok_or_else(|| name.to_owned())?);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// Each alerting rule's name and expression.
fn alert_expressions() -> Vec<(String, String)> {
    let rules = yaml(ALERTS);
    let mut found = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alerting rules only");
            let expr = rule["expr"].as_str().expect("expr");
            found.push((format!("alert {name}"), expr.to_owned()));
        }
    }
    found
}

/// The metric names a PromQL expression selects: identifiers that are not
/// functions, aggregations, keywords, label names (in `{…}` and in
/// `by`/`without`/`on`/`ignoring`/`group_*` lists), strings or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let next_non_space = |from: usize| chars[from..].iter().find(|c| !c.is_whitespace());
    let next_word = |from: usize| -> String {
        chars[from..]
            .iter()
            .skip_while(|c| c.is_whitespace())
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
            .collect()
    };
    let skip_string = |from: usize| {
        let quote = chars[from];
        let mut i = from + 1;
        while i < chars.len() && chars[i] != quote {
            i += if chars[i] == '\\' { 2 } else { 1 };
        }
        i + 1
    };
    let mut names = BTreeSet::new();
    let mut list_follows = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if list_follows && !c.is_whitespace() && c != '(' {
            list_follows = false; // group_left without labels
        }
        match c {
            '"' | '\'' | '`' => i = skip_string(i),
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' | '[' | '(' if c != '(' || list_follows => {
                let close = match c {
                    '{' => '}',
                    '[' => ']',
                    _ => ')',
                };
                i += 1;
                while i < chars.len() && chars[i] != close {
                    i = if matches!(chars[i], '"' | '\'' | '`') {
                        skip_string(i)
                    } else {
                        i + 1
                    };
                }
                i += 1;
                list_follows = false;
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (5m, 1e3, 0x1f): letters ride along.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let ident: String = chars[start..i].iter().collect();
                if LISTS.contains(&ident.as_str()) {
                    list_follows = true;
                } else if KEYWORDS.contains(&ident.as_str())
                    || next_non_space(i) == Some(&'(')
                    || ["by", "without"].contains(&next_word(i).as_str())
                {
                    // an operator, a function, or an aggregation
                    // (`sum by (job) (…)` too)
                } else {
                    names.insert(ident);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The metric names a `/metrics` text exports: its samples' names, and
/// for each declared histogram or summary family the series it has.
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["_sum", "_count"],
                _ => &[],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = |expr: &str| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.9, sum by (job, le) (rate(a_bucket{job=~"x|y",le!="1"}[5m] offset 1h)))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum without (instance) (rate(b[1m])) / on (job) group_left c > bool 0.5 and d"),
        ["b", "c", "d"]
    );
    assert_eq!(
        names(r#"label_replace(time() - e, "dst", "$1", "src", "(.*)") or vector(1e3)"#),
        ["e"]
    );
    assert_eq!(
        names("f * on (job) group_left g\n# h is a comment\n"),
        ["f", "g"]
    );
    let exported = exported(
        "# HELP x_seconds x\n# TYPE x_seconds histogram\nx_seconds_bucket{le=\"1\"} 0\n# TYPE y counter\ny_total 1\n",
    );
    for name in [
        "x_seconds_bucket",
        "x_seconds_sum",
        "x_seconds_count",
        "y_total",
    ] {
        assert!(exported.contains(name), "{name} in {exported:?}");
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo_path("deploy/prometheus");
    assert_success(
        "promtool check rules",
        &promtool(&dir, &["check", "rules", "countersign-alerts.yml"]),
    );
    assert_success(
        "promtool test rules",
        &promtool(&dir, &["test", "rules", "countersign-alerts.test.yml"]),
    );

    // Every alert is one an operator can act on, and its unit tests show
    // it both firing and not firing.
    let rules = yaml(ALERTS);
    let tests = yaml(ALERT_TESTS);
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_owned();
            let severity = rule["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("warning" | "critical")),
                "{name}: severity {severity:?}"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|text| text.len() > 20),
                    "{name}: no {annotation}"
                );
            }
            alerts.push(name);
        }
    }
    for alert in &alerts {
        let (mut fires, mut quiet) = (false, false);
        for test in tests["tests"].as_sequence().unwrap() {
            let checks: Vec<_> = test["alert_rule_test"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter(|check| check["alertname"].as_str() == Some(alert))
                .collect();
            if checks.is_empty() {
                continue;
            }
            let instances = |values: Vec<&serde_yaml::Value>| -> BTreeSet<String> {
                values
                    .into_iter()
                    .filter_map(|v| v.as_str())
                    .map(|s| s.to_owned())
                    .collect()
            };
            let fired = instances(
                checks
                    .iter()
                    .flat_map(|c| c["exp_alerts"].as_sequence().into_iter().flatten())
                    .map(|a| &a["exp_labels"]["instance"])
                    .collect(),
            );
            let series: BTreeSet<String> = test["input_series"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|s| s["series"].as_str())
                .filter_map(|s| s.split("instance=\"").nth(1))
                .filter_map(|s| s.split('"').next())
                .map(|s| s.to_owned())
                .collect();
            fires |= !fired.is_empty();
            quiet |= series.difference(&fired).next().is_some()
                || checks
                    .iter()
                    .any(|c| c["exp_alerts"].as_sequence().is_some_and(|a| a.is_empty()));
        }
        assert!(fires, "{ALERT_TESTS}: no test makes {alert} fire");
        assert!(quiet, "{ALERT_TESTS}: no test shows {alert} not firing");
    }
}

#[test]
fn dashboard_expressions_are_promql_that_promtool_parses() {
    let dashboard = dashboard();
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("untitled");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "panel {title:?}: id repeated"
        );
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "panel {title:?} queries the chosen data source"
            );
            assert!(
                panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {title:?} has no query"
            );
        }
    }
    let expressions = dashboard_expressions(&dashboard);
    assert!(expressions.len() > 20, "{expressions:?}");

    // promtool parses recording rules' expressions: one per expression.
    let rules: Vec<Value> = expressions
        .iter()
        .enumerate()
        .map(|(n, (_, expr))| serde_json::json!({ "record": format!("dashboard:expr_{n}"), "expr": expr }))
        .collect();
    let file = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dashboard.yml"),
        serde_yaml::to_string(&file).unwrap(),
    )
    .unwrap();
    let output = promtool(dir.path(), &["check", "rules", "dashboard.yml"]);
    let listed: String = expressions
        .iter()
        .enumerate()
        .map(|(n, (place, expr))| format!("dashboard:expr_{n} ({place}): {expr}\n"))
        .collect();
    assert_success(
        &format!("promtool check rules on the dashboard's expressions\n{listed}"),
        &output,
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_name_is_exported_by_a_real_gateway() {
    let world = World::start(GatewayOptions::default()).await;
    // One call held and approved, so that the approval series exist too.
    let response = world.approved("alice", world.buy("alice", phones())).await;
    assert_eq!(response.status(), 200);
    let metrics = world.gateway.metrics().await;
    let exported = exported(&metrics);

    let mut named: Vec<(String, String)> = Vec::new();
    for (place, expr) in dashboard_expressions(&dashboard())
        .into_iter()
        .chain(alert_expressions())
    {
        let names = metric_names(&expr);
        assert!(
            !names.is_empty() || expr.starts_with("vector("),
            "{place}: no metric in {expr}"
        );
        named.extend(names.into_iter().map(|name| (place.clone(), name)));
    }
    let distinct: BTreeSet<&str> = named.iter().map(|(_, name)| name.as_str()).collect();
    assert!(distinct.len() >= 15, "too few metrics named: {distinct:?}");
    let missing: Vec<String> = named
        .iter()
        .filter(|(_, name)| !exported.contains(name))
        .map(|(place, name)| format!("{place}: {name}"))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics named but not in /metrics:\n{}\n\n/metrics:\n{metrics}",
        missing.join("\n")
    );
    // Not only the dashboard's: each gateway metric docs/observability.md documents
    // is watched somewhere, except the ping-mode and retry counters.
    for documented in [
        "countersign_calls_total",
        "countersign_approvals_total",
        "countersign_approvals_pending",
        "countersign_calls_held",
        "countersign_lease_takeovers_total",
        "countersign_approval_wait_seconds_bucket",
        "countersign_ciba_requests_total",
        "countersign_upstream_request_duration_seconds_bucket",
        "countersign_store_operation_duration_seconds_bucket",
        "countersign_store_errors_total",
        "countersign_config_reload_total",
        "countersign_config_last_reload_success_timestamp_seconds",
        "countersign_build_info",
        "countersign_heartbeat_lapses_total",
        "countersign_outcome_unknown_total",
    ] {
        assert!(distinct.contains(documented), "nothing shows {documented}");
    }
}
