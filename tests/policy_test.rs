//! `countersign test` and `countersign explain` through the real binary:
//! the shipped policies pass their test files, a mutated policy fails with
//! a readable diff, JUnit XML and coverage, and explain's steps for a held,
//! a passed and a refused call. Offline: no authorization server, upstream
//! or store is started.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_countersign");

const EXAMPLE_ENV: [(&str, &str); 3] = [
    ("CIBA_ISSUER", "https://tenant.example/"),
    ("CIBA_CLIENT_ID", "countersign"),
    ("CIBA_CLIENT_SECRET", "s3cr3t"),
];

fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn countersign(args: &[&str]) -> (Output, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .envs(EXAMPLE_ENV)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

/// A copy of the example shop configuration and its policies (test files
/// included) in a directory of its own, for mutating.
fn copied_config() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    for entry in std::fs::read_dir(repo_path("policies")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
    }
    let config = dir.path().join("countersign.yaml");
    let text = std::fs::read_to_string(repo_path("examples/shop.yaml"))
        .unwrap()
        .replace("  - ../policies", "  - policies");
    std::fs::write(&config, text).unwrap();
    (dir, config)
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn the_shipped_policies_pass_their_tests_with_junit_and_full_coverage() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let config = repo_path("examples/shop.yaml");
    let (output, stdout, stderr) = countersign(&[
        "test",
        "--config",
        config.to_str().unwrap(),
        "--coverage",
        "--junit",
        junit.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{stdout}{stderr}");
    let ok = stdout.lines().filter(|l| l.starts_with("  ok   ")).count();
    assert!(ok >= 25, "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(
        stdout.contains(&format!("{ok} cases: {ok} passed, 0 failed")),
        "{stdout}"
    );
    for file in ["shop.test.yaml", "conditions.test.yaml", "mcp.test.yaml"] {
        assert!(stdout.contains(file), "{file} did not run: {stdout}");
    }
    assert!(
        stdout.contains("coverage: 8 of 8 policies exercised, 8 of 8 condition branches"),
        "{stdout}"
    );
    assert!(!stdout.contains("not exercised"), "{stdout}");

    let xml = std::fs::read_to_string(&junit).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    assert_eq!(root.attribute("tests"), Some(ok.to_string().as_str()));
    assert_eq!(root.attribute("failures"), Some("0"));
    let suites: Vec<_> = root
        .children()
        .filter(|n| n.has_tag_name("testsuite"))
        .collect();
    assert_eq!(suites.len(), 3);
    let cases = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .count();
    assert_eq!(cases, ok);
    assert!(doc.descendants().all(|n| !n.has_tag_name("failure")));
}

#[test]
fn a_mutated_policy_fails_with_a_readable_diff() {
    let (dir, config) = copied_config();
    edit(
        &dir.path().join("policies/shop.yaml"),
        "binding_message: \"Do you want to buy {{qty}} {{product}}\"",
        "binding_message: \"Do you wish to buy {{qty}} {{product}}\"",
    );
    let junit = dir.path().join("junit.xml");
    let (output, stdout, stderr) = countersign(&[
        "test",
        "--config",
        config.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
    ]);
    assert!(!output.status.success(), "{stdout}");
    let expected = concat!(
        "  FAIL buying two phones asks the person, with the purchase as details\n",
        "       --- expected\n",
        "       +++ got\n",
        "         hold\n",
        "           policy: buy-product\n",
        "       -   binding_message: \"Do you want to buy 2 XYZ phone\"\n",
        "       +   binding_message: \"Do you wish to buy 2 XYZ phone\"\n",
        "           authorization_details:\n",
    );
    assert!(stdout.contains(expected), "{stdout}");
    // The steps that led there follow the diff.
    assert!(
        stdout.contains("         policy buy-product applies\n"),
        "{stdout}"
    );
    // Only the cases that show that message fail.
    assert_eq!(stdout.matches("  FAIL ").count(), 3, "{stdout}");
    assert!(
        stdout.contains("  ok   cancelling an order shows the order id"),
        "{stdout}"
    );
    assert!(stderr.contains("error: 3 of "), "{stderr}");

    let xml = std::fs::read_to_string(&junit).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    assert_eq!(doc.root_element().attribute("failures"), Some("3"));
    let failure = doc
        .descendants()
        .find(|n| n.has_tag_name("failure"))
        .expect("a failure element");
    let case = failure.parent().unwrap();
    assert_eq!(
        case.attribute("name"),
        Some("buying two phones asks the person, with the purchase as details")
    );
    let text = failure.text().unwrap();
    assert!(
        text.contains("-   binding_message: \"Do you want to buy 2 XYZ phone\"\n+   binding_message: \"Do you wish to buy 2 XYZ phone\""),
        "{text}"
    );
}

#[test]
fn a_condition_changed_under_its_tests_shows_the_outcome_and_the_missed_branch() {
    let (dir, config) = copied_config();
    edit(
        &dir.path().join("policies/conditions.yaml"),
        "when: \"body.amount > 50\"",
        "when: \"body.amount > 100\"",
    );
    let (output, stdout, _) =
        countersign(&["test", "--config", config.to_str().unwrap(), "--coverage"]);
    assert!(!output.status.success());
    let expected = concat!(
        "  FAIL credit above 50 needs approval\n",
        "       --- expected\n",
        "       +++ got\n",
        "       - hold\n",
        "       -   policy: buy-credit\n",
        "       -   binding_message: \"Buy store credit worth 80\"\n",
        "       -   authorization_details: none\n",
        "       -   bound: true\n",
        "       + pass\n",
        "       +   policy: buy-credit (no condition of its route took the call)\n",
        "       steps:\n",
    );
    assert!(stdout.contains(expected), "{stdout}");
    assert!(
        stdout.contains("         policy buy-credit: when body.amount > 100 -> false\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("coverage: 8 of 8 policies exercised, 7 of 8 condition branches\n  not exercised: policy buy-credit ("),
        "{stdout}"
    );
    assert!(
        stdout.contains("): when \"body.amount > 100\" is never true"),
        "{stdout}"
    );
}

#[test]
fn coverage_names_a_policy_no_case_reaches() {
    let (dir, config) = copied_config();
    let shop = dir.path().join("policies/shop.yaml");
    let mut text = std::fs::read_to_string(&shop).unwrap();
    text.push_str(
        "\n  - name: return-order\n    match: { methods: [POST], path: /returns }\n    require: { scopes: [product:buy] }\n    binding_message: Return an order\n",
    );
    std::fs::write(&shop, text).unwrap();
    let (output, stdout, _) =
        countersign(&["test", "--config", config.to_str().unwrap(), "--coverage"]);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("coverage: 8 of 9 policies exercised"),
        "{stdout}"
    );
    assert!(
        stdout.contains("not exercised: policy return-order ("),
        "{stdout}"
    );
    assert!(
        stdout.contains("shop.yaml): no case reaches it"),
        "{stdout}"
    );
}

#[test]
fn a_test_file_is_strict_with_file_line_and_key() {
    let (dir, config) = copied_config();
    let file = dir.path().join("extra.test.yaml");
    std::fs::write(
        &file,
        "cases:\n  - name: a\n    call: { target: /shop }\n    expect:\n      hold:\n        message: Buy\n",
    )
    .unwrap();
    let (output, _, stderr) = countersign(&[
        "test",
        "--config",
        config.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!(
            "{}:6:9: cases[0].expect.hold.message: unknown field `message`",
            file.display()
        )),
        "{stderr}"
    );
}

fn explain(args: &[&str]) -> String {
    let config = repo_path("examples/shop.yaml");
    let mut all = vec!["explain", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let (output, stdout, stderr) = countersign(&all);
    assert!(output.status.success(), "{stdout}{stderr}");
    stdout
}

#[test]
fn explain_prints_each_step_of_a_held_call() {
    let out = explain(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-H",
        "x-countersign-user: alice",
        "-d",
        r#"{"product":"XYZ phone","qty":2,"priceLimit":900}"#,
        "http://127.0.0.1:8080/x/../shop",
    ]);
    let expected = concat!(
        "call: POST /x/../shop (Host: 127.0.0.1:8080)\n",
        "1. canonical request: POST /shop, host 127.0.0.1 (the target is rewritten to this before it is forwarded)\n",
        "2. route: upstream shop (http://127.0.0.1:3000)\n",
        "3. policy route: POST /shop, policies in order: buy-product\n",
        "4. identity: alice\n",
        "5. policy buy-product applies\n",
        "6. binding message: \"Do you want to buy 2 XYZ phone\"\n",
        "   authorization_details: [{\"price_limit\":900,\"product\":\"XYZ phone\",\"quantity\":2,\"type\":\"product_purchase\"}]\n",
        "   bind: call: a countersign_call entry (approval id, method, target, host, body_sha256) is added to authorization_details when the call is held\n",
        "result: HOLD: policy buy-product asks alice to approve (scopes product:buy, audience https://shop.example/api), then forwards POST /shop to upstream shop with the token issued for it\n",
    );
    assert_eq!(out, expected);
}

#[test]
fn explain_prints_the_condition_that_let_a_call_pass() {
    let out = explain(&[
        "-H",
        "x-countersign-user: alice",
        "--json",
        r#"{"amount":20}"#,
        "http://127.0.0.1:8080/transfers",
    ]);
    let expected = concat!(
        "call: POST /transfers (Host: 127.0.0.1:8080)\n",
        "1. canonical request: POST /transfers, host 127.0.0.1\n",
        "2. route: upstream shop (http://127.0.0.1:3000)\n",
        "3. policy route: POST /transfers, policies in order: transfer-large, transfer\n",
        "4. identity: alice\n",
        "5. policy transfer-large: when body.amount >= 10000 -> false\n",
        "6. policy transfer: when body.amount > 500 -> false\n",
        "7. no condition took the call: the last policy transfer says otherwise: pass\n",
        "result: PASS: forwarded as POST /transfers, without approval (policy transfer lets it pass)\n",
    );
    assert_eq!(out, expected);
}

#[test]
fn explain_prints_who_countersigns_a_large_transfer() {
    let out = explain(&[
        "-H",
        "x-countersign-user: alice",
        "--json",
        r#"{"amount":20000,"to":"bob"}"#,
        "http://127.0.0.1:8080/transfers",
    ]);
    assert!(
        out.contains("   countersign: 1 of finance-lead must approve too (never the person), each asked \"Countersign: alice sends 20000 to bob\"\n"),
        "{out}"
    );
    assert!(
        out.contains("result: HOLD: policy transfer-large asks alice"),
        "{out}"
    );
}

#[test]
fn explain_prints_why_a_call_is_refused() {
    // curl's -d sends a form unless told otherwise: the policy shows body
    // fields, so the body must be JSON sent as JSON.
    let out = explain(&[
        "-H",
        "x-countersign-user: alice",
        "-d",
        r#"{"product":"XYZ phone","qty":2,"priceLimit":900}"#,
        "http://127.0.0.1:8080/shop",
    ]);
    assert!(
        out.contains("3. policy route: POST /shop, policies in order: buy-product\n"),
        "{out}"
    );
    assert!(out.contains("result: REFUSED: 400 invalid_body"), "{out}");
    assert!(
        out.contains("   why: ") && out.contains("application/json"),
        "{out}"
    );
    assert!(out.contains("   policy: buy-product\n"), "{out}");

    // A denied product, from a raw request on stdin.
    let config = repo_path("examples/shop.yaml");
    let mut child = Command::new(BIN)
        .args([
            "explain",
            "--config",
            config.to_str().unwrap(),
            "--raw",
            "-",
        ])
        .envs(EXAMPLE_ENV)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"POST /subscriptions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\nx-countersign-user: alice\r\n\r\n{\"product\":\"crypto-mining\"}")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let out = String::from_utf8(output.stdout).unwrap();
    let expected = concat!(
        "5. policy subscribe: when body.product != \"crypto-mining\" -> false\n",
        "6. no condition took the call: the last policy subscribe says otherwise: deny\n",
        "result: REFUSED: 403 policy_denied (Refused by policy)\n",
        "   why: Policy 'subscribe' refuses this call: its condition does not allow it, and no approval can.\n",
        "   policy: subscribe\n",
    );
    assert!(out.ends_with(expected), "{out}");

    // A path spelling refused before any policy is looked at.
    let out = explain(&["http://127.0.0.1:8080/shop%2Fx"]);
    assert!(
        out.contains(
            "result: REFUSED: 400 invalid_path (Invalid path)\n   why: The request was refused:"
        ),
        "{out}"
    );
}
