//! The JSON Schemas (`countersign schema`): committed as printed, named by
//! every example and policy file, and in agreement with `countersign check`.
//!
//! Agreement is tested by an independent validator (Ajv, in Node, pinned in
//! `tests/schema/package-lock.json`) on the example and policy files, on
//! mutations of them generated here (each key removed, an unknown key added
//! to each mapping, each value given the wrong shape) and on a few written
//! cases. Nothing here lists the keys: a key added to a config type with
//! `#[derive(JsonSchema)]` is covered once it appears in an example.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use serde_yaml::{Mapping, Value as Yaml};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_countersign");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Config,
    Policies,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Policies => "policies",
        }
    }

    fn schema_file(self) -> &'static str {
        match self {
            Kind::Config => countersign::schema::CONFIG_SCHEMA_FILE,
            Kind::Policies => countersign::schema::POLICIES_SCHEMA_FILE,
        }
    }
}

fn repo(relative: &str) -> PathBuf {
    Path::new(REPO).join(relative)
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        // Policy test files (`countersign test`) are not policy files.
        .filter(|p| !countersign::config::is_policy_test_file(p))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {dir}/");
    files
}

#[test]
fn the_committed_schemas_are_what_the_binary_prints() {
    for kind in [Kind::Config, Kind::Policies] {
        let output = Command::new(BIN)
            .args(["schema", kind.arg()])
            .output()
            .unwrap();
        assert!(output.status.success());
        let printed = String::from_utf8(output.stdout).unwrap();
        let file = repo(kind.schema_file());
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::write(&file, &printed).unwrap();
        }
        let committed = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            committed == printed,
            "{} is not what `countersign schema {}` prints: regenerate it with \
             `UPDATE_SCHEMA=1 cargo test --test schema` and commit it",
            kind.schema_file(),
            kind.arg()
        );
        let parsed: Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(parsed["$schema"], "http://json-schema.org/draft-07/schema#");
    }
}

#[test]
fn every_example_and_policy_file_names_its_schema() {
    for (dir, kind) in [("examples", Kind::Config), ("policies", Kind::Policies)] {
        for file in yaml_files(dir) {
            let text = std::fs::read_to_string(&file).unwrap();
            let schema = text
                .lines()
                .find_map(|l| l.strip_prefix("# yaml-language-server: $schema="))
                .unwrap_or_else(|| panic!("{} names no schema", file.display()));
            let target = file.parent().unwrap().join(schema.trim());
            assert_eq!(
                target.canonicalize().ok(),
                repo(kind.schema_file()).canonicalize().ok(),
                "{}: $schema={schema}",
                file.display()
            );
        }
    }
}

/// A YAML document and its verdicts.
struct Doc {
    name: String,
    kind: Kind,
    text: String,
    /// The file policy paths are resolved against (configs).
    file: PathBuf,
}

/// What `countersign check` says, through the same loader.
fn check(doc: &Doc) -> Result<(), String> {
    // The examples read secrets from the environment; give them values
    // without touching this process's environment.
    let text = ["CIBA_ISSUER", "CIBA_CLIENT_ID", "CIBA_CLIENT_SECRET"]
        .iter()
        .fold(doc.text.clone(), |text, name| {
            let value = if name.ends_with("ISSUER") {
                "https://tenant.example/"
            } else {
                "value"
            };
            text.replace(&format!("${{{name}}}"), value)
        });
    let loaded = match doc.kind {
        Kind::Config => countersign::config::load_str(&doc.file, &text),
        Kind::Policies => countersign::config::load_embedded(
            Path::new("gateway.yaml"),
            CONFIG,
            &[(Path::new(&doc.name), &text)],
        ),
    };
    loaded.map(drop).map_err(|e| e.to_string())
}

/// The gateway a policy file is checked in (one upstream, named as the
/// example policies' upstream), and the configuration the written cases vary.
const CONFIG: &str = r#"
listen: { proxy: "127.0.0.1:8080", admin: "[::1]:9090" }
upstreams: { shop: { url: "http://127.0.0.1:3000", connect_timeout: 2s, timeout: 1m 30s } }
authorization_server:
  issuer: https://tenant.example/
  client_id: countersign
  client_auth: { method: client_secret_post, client_secret: s3cr3t }
identity: { header: { name: x-countersign-user } }
policies: []
default_action: pass
"#;

/// What Ajv says about each document.
fn validate(docs: &[Doc]) -> Vec<Result<(), String>> {
    let validator = repo("tests/schema/validate.mjs");
    assert!(
        repo("tests/schema/node_modules/ajv").exists(),
        "the schema validator is not installed: run `npm ci --prefix tests/schema` first"
    );
    let input = json!({
        "schemas": {
            "config": repo(Kind::Config.schema_file()),
            "policies": repo(Kind::Policies.schema_file()),
        },
        "documents": docs.iter().map(|d| json!({
            "name": d.name, "kind": d.kind.arg(), "text": d.text,
        })).collect::<Vec<_>>(),
    });
    let mut child = Command::new("node")
        .arg(validator)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node must be installed to validate against the schema");
    let mut stdin = child.stdin.take().unwrap();
    let payload = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(payload.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        output.status.success(),
        "validator: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(results.len(), docs.len());
    results
        .iter()
        .map(|r| match r["valid"].as_bool() {
            Some(true) => Ok(()),
            _ => Err(r["errors"].to_string()),
        })
        .collect()
}

/// Errors of shape, which a schema states: anything the schema accepts must
/// not fail `check` with one of these. Other refusals (a template that does
/// not compile, an unknown upstream, an unset variable) need loading.
fn is_structural(check_error: &str) -> bool {
    [
        "unknown field",
        "missing field",
        "invalid type",
        "unknown variant",
        "invalid length",
        "duplicate field",
    ]
    .iter()
    .any(|s| check_error.contains(s))
}

/// Each key removed, an unknown key added to each mapping, each value given
/// another shape (a scalar becomes a mapping, a sequence or mapping a string).
fn mutations(doc: &Doc) -> Vec<Doc> {
    let root: Yaml = serde_yaml::from_str(&doc.text).unwrap();
    let mut out = Vec::new();
    let mut emit = |what: String, value: Yaml| {
        out.push(Doc {
            name: format!("{} [{what}]", doc.name),
            kind: doc.kind,
            text: serde_yaml::to_string(&value).unwrap(),
            file: doc.file.clone(),
        });
    };
    let mut paths = Vec::new();
    collect_paths(&root, &mut Vec::new(), &mut paths);
    for path in paths {
        let shown = path
            .iter()
            .map(|s| match s {
                Step::Key(k) => format!(".{k}"),
                Step::Index(i) => format!("[{i}]"),
            })
            .collect::<String>();
        let node = at(&root, &path);
        if node.is_mapping() {
            let mut copy = root.clone();
            at_mut(&mut copy, &path)
                .as_mapping_mut()
                .unwrap()
                .insert("zz_unknown".into(), "x".into());
            emit(format!("{shown} + zz_unknown"), copy);
        }
        if let Some((Step::Key(key), parent)) = path.split_last() {
            let mut copy = root.clone();
            at_mut(&mut copy, parent)
                .as_mapping_mut()
                .unwrap()
                .remove(key.as_str());
            emit(format!("{shown} removed"), copy);
        }
        if !path.is_empty() {
            let mut copy = root.clone();
            *at_mut(&mut copy, &path) = match node {
                Yaml::Mapping(_) | Yaml::Sequence(_) => "x".into(),
                _ => {
                    let mut mapping = Mapping::new();
                    mapping.insert("zz".into(), 1.into());
                    Yaml::Mapping(mapping)
                }
            };
            emit(format!("{shown} reshaped"), copy);
        }
    }
    out
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn collect_paths(node: &Yaml, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(path.clone());
    match node {
        Yaml::Mapping(mapping) => {
            for (key, value) in mapping {
                if let Some(key) = key.as_str() {
                    path.push(Step::Key(key.to_owned()));
                    collect_paths(value, path, out);
                    path.pop();
                }
            }
        }
        Yaml::Sequence(items) => {
            for (i, value) in items.iter().enumerate() {
                path.push(Step::Index(i));
                collect_paths(value, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'y>(node: &'y Yaml, path: &[Step]) -> &'y Yaml {
    path.iter().fold(node, |node, step| match step {
        Step::Key(k) => &node[k.as_str()],
        Step::Index(i) => &node[*i],
    })
}

fn at_mut<'y>(node: &'y mut Yaml, path: &[Step]) -> &'y mut Yaml {
    path.iter().fold(node, |node, step| match step {
        Step::Key(k) => node.get_mut(k.as_str()).unwrap(),
        Step::Index(i) => node.get_mut(*i).unwrap(),
    })
}

fn repo_docs() -> Vec<Doc> {
    let mut docs = Vec::new();
    for (dir, kind) in [("examples", Kind::Config), ("policies", Kind::Policies)] {
        for file in yaml_files(dir) {
            docs.push(Doc {
                name: format!("{dir}/{}", file.file_name().unwrap().to_string_lossy()),
                kind,
                text: std::fs::read_to_string(&file).unwrap(),
                file,
            });
        }
    }
    docs
}

#[test]
fn every_example_and_policy_file_is_valid_for_the_schema_and_for_check() {
    let docs = repo_docs();
    for (doc, verdict) in docs.iter().zip(validate(&docs)) {
        assert_eq!(verdict, Ok(()), "{}: the schema refuses it", doc.name);
        assert_eq!(check(doc), Ok(()), "{}: check refuses it", doc.name);
    }
}

#[test]
fn the_schema_and_check_agree_on_every_mutation_of_the_examples() {
    let docs: Vec<Doc> = repo_docs().iter().flat_map(mutations).collect();
    assert!(docs.len() > 100, "only {} mutations", docs.len());
    let mut disagreements = Vec::new();
    for (doc, schema) in docs.iter().zip(validate(&docs)) {
        match (schema, check(doc)) {
            (Err(schema), Ok(())) => disagreements.push(format!(
                "{}: check accepts it, the schema refuses it: {schema}",
                doc.name
            )),
            (Ok(()), Err(check)) if is_structural(&check) => disagreements.push(format!(
                "{}: the schema accepts it, check refuses its structure: {check}",
                doc.name
            )),
            _ => {}
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} documents:\n{}",
        disagreements.len(),
        docs.len(),
        disagreements.join("\n")
    );
}

/// Hand-written cases, each with what check and the schema say. Where they
/// differ, only loading can tell (the schema cannot compile a template).
#[test]
fn written_cases_get_the_expected_verdicts() {
    const POLICY: &str = r#"
policies:
  - name: buy
    match: { methods: [post], path: /shop }
    require: { scopes: [product:buy] }
    binding_message: "Buy {{qty}} {{product}}"
    requested_expiry: 2 minutes
"#;
    let config = |from: &str, to: &str| {
        assert!(CONFIG.contains(from), "{from}");
        CONFIG.replacen(from, to, 1)
    };
    let policy = |from: &str, to: &str| {
        assert!(POLICY.contains(from), "{from}");
        POLICY.replacen(from, to, 1)
    };
    // (name, kind, text, check accepts, schema accepts)
    let cases: Vec<(&str, Kind, String, bool, bool)> = vec![
        ("config", Kind::Config, CONFIG.into(), true, true),
        ("policy", Kind::Policies, POLICY.into(), true, true),
        (
            "two identities",
            Kind::Config,
            config(
                "{ header: { name: x-countersign-user } }",
                "{ header: { name: x-user }, static: { subject: alice } }",
            ),
            false,
            false,
        ),
        (
            "no identity source",
            Kind::Config,
            config("{ header: { name: x-countersign-user } }", "{}"),
            false,
            false,
        ),
        (
            "private_key_jwt",
            Kind::Config,
            config(
                "{ method: client_secret_post, client_secret: s3cr3t }",
                "{ method: private_key_jwt, private_key: '${KEY}', algorithm: ES256 }",
            ),
            false, // ${KEY} is unset: only loading knows
            true,
        ),
        (
            "a secret method with a private key",
            Kind::Config,
            config(
                "client_secret: s3cr3t }",
                "client_secret: s3cr3t, private_key: k }",
            ),
            false,
            false,
        ),
        (
            "private_key_jwt with a client secret",
            Kind::Config,
            config(
                "{ method: client_secret_post, client_secret: s3cr3t }",
                "{ method: private_key_jwt, client_secret: s3cr3t }",
            ),
            false,
            false,
        ),
        (
            "an HMAC assertion",
            Kind::Config,
            config(
                "{ method: client_secret_post, client_secret: s3cr3t }",
                "{ method: private_key_jwt, private_key: k, algorithm: HS256 }",
            ),
            false,
            false,
        ),
        (
            "an unknown client auth method",
            Kind::Config,
            config("method: client_secret_post", "method: tls_client_auth"),
            false,
            false,
        ),
        (
            "a host name to listen on",
            Kind::Config,
            config("127.0.0.1:8080", "localhost:8080"),
            false,
            false,
        ),
        (
            "a port alone",
            Kind::Config,
            config("\"127.0.0.1:8080\"", "8080"),
            false,
            false,
        ),
        (
            "an upstream with a path",
            Kind::Config,
            config("http://127.0.0.1:3000", "http://127.0.0.1:3000/api"),
            false,
            false,
        ),
        (
            "an ftp upstream",
            Kind::Config,
            config("http://127.0.0.1:3000", "ftp://127.0.0.1:3000"),
            false,
            false,
        ),
        (
            "a duration without unit",
            Kind::Config,
            config("connect_timeout: 2s", "connect_timeout: 2"),
            false,
            false,
        ),
        (
            "a body limit past 64 KiB",
            Kind::Config,
            config(
                "policies: []",
                "policies: []\nlimits: { max_body_bytes: 65537 }",
            ),
            false,
            false,
        ),
        (
            "an unknown default action",
            Kind::Config,
            config("default_action: pass", "default_action: allow"),
            false,
            false,
        ),
        (
            "a route to an undeclared upstream",
            Kind::Config,
            config(
                "policies: []",
                "policies: []\nroutes: [{ upstream: shoop }]",
            ),
            false,
            true,
        ),
        (
            "no methods",
            Kind::Policies,
            policy("[post]", "[]"),
            false,
            false,
        ),
        (
            "a method that is no token",
            Kind::Policies,
            policy("[post]", "[\"PO ST\"]"),
            false,
            false,
        ),
        (
            "a policy name with a space",
            Kind::Policies,
            policy("name: buy", "name: buy it"),
            false,
            false,
        ),
        (
            "no scopes",
            Kind::Policies,
            policy("[product:buy]", "[]"),
            false,
            false,
        ),
        (
            "a scope with a space",
            Kind::Policies,
            policy("[product:buy]", "[\"product buy\"]"),
            false,
            false,
        ),
        (
            "a relative path",
            Kind::Policies,
            policy("path: /shop", "path: shop"),
            false,
            false,
        ),
        (
            "a host with a port",
            Kind::Policies,
            policy("path: /shop", "path: /shop, host: \"shop.example:443\""),
            false,
            false,
        ),
        (
            "format_suffix as text",
            Kind::Policies,
            policy("path: /shop", "path: /shop, format_suffix: \"no\""),
            false,
            false,
        ),
        (
            "a body list without the fields shown",
            Kind::Policies,
            policy(
                "requested_expiry",
                "body: { only: [] }\n    requested_expiry",
            ),
            false,
            true,
        ),
        (
            "a body list with the fields shown",
            Kind::Policies,
            policy(
                "requested_expiry",
                "body: { only: [qty, product] }\n    requested_expiry",
            ),
            true,
            true,
        ),
        (
            "details that are text",
            Kind::Policies,
            policy(
                "requested_expiry",
                "authorization_details: \"{{qty}}\"\n    requested_expiry",
            ),
            false,
            false,
        ),
        (
            "a broken template",
            Kind::Policies,
            policy("Buy {{qty}} {{product}}", "Buy {{qty"),
            false,
            true,
        ),
    ];
    let docs: Vec<Doc> = cases
        .iter()
        .map(|(name, kind, text, _, _)| Doc {
            name: (*name).to_owned(),
            kind: *kind,
            text: text.clone(),
            file: PathBuf::from("gateway.yaml"),
        })
        .collect();
    for ((doc, verdict), (_, _, _, check_ok, schema_ok)) in
        docs.iter().zip(validate(&docs)).zip(&cases)
    {
        let checked = check(doc);
        assert_eq!(
            checked.is_ok(),
            *check_ok,
            "{}: check says {checked:?}",
            doc.name
        );
        assert_eq!(
            verdict.is_ok(),
            *schema_ok,
            "{}: the schema says {verdict:?}",
            doc.name
        );
    }
}
