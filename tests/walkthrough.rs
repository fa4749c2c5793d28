//! The book's "Try it against oidc-provider" (docs/try-oidc-provider.md), run
//! as a reader pastes it: the shell blocks of that chapter, in order, on the
//! ports it names.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const WALKTHROUGH: &str = include_str!("../docs/try-oidc-provider.md");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The ```sh blocks of the chapter, in order.
fn shell_blocks() -> Vec<String> {
    assert!(
        WALKTHROUGH.starts_with("# Try it against oidc-provider"),
        "the chapter's title"
    );
    WALKTHROUGH
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().to_owned())
        .collect()
}

fn sh(script: &str) -> Output {
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(REPO)
        // cargo test has built the binary and the example already.
        .env("TRY_NO_BUILD", "1")
        .output()
        .unwrap()
}

fn ok(script: &str) -> String {
    let output = sh(script);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script}\nfailed:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// Runs the held agent call in the background and returns its output once
/// the person has been asked, after `answer` ran.
fn held_call_answered_by(call: &str, answer: &str) -> String {
    let agent = std::thread::spawn({
        let call = call.to_owned();
        move || ok(&call)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while ok("examples/try-oidc-provider.sh pending")
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the person was never asked");
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(answer);
    agent.join().unwrap()
}

struct StopOnDrop;

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = sh("examples/try-oidc-provider.sh stop");
    }
}

#[test]
fn the_oidc_provider_walkthrough_works_as_pasted() {
    let blocks = shell_blocks();
    let [start, call, phone, stop, by_hand] = blocks.as_slice() else {
        panic!("expected 5 shell blocks, found {blocks:?}");
    };
    let _stop = StopOnDrop;
    let started = ok(start);
    assert!(started.contains("ready"), "{started}");

    let answer = held_call_answered_by(call, phone);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"status\":\"confirmed\""), "{answer}");

    // The chapter's deny: the same call for three phones, answered `deny`.
    let three = call.replace("\"qty\":2", "\"qty\":3");
    assert_ne!(&three, call, "the call block buys 2 phones");
    let denied = held_call_answered_by(&three, "examples/try-oidc-provider.sh deny");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(denied.contains("\"code\":\"access_denied\""), "{denied}");

    // By hand with jq: four phones this time.
    let four = call.replace("\"qty\":2", "\"qty\":4");
    let by_hand_answer = held_call_answered_by(&four, by_hand);
    assert!(
        by_hand_answer.starts_with("HTTP/1.1 200"),
        "{by_hand_answer}"
    );

    let stopped = ok(stop);
    assert!(stopped.contains("stopped"), "{stopped}");
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [4000, 3000, 8080, 9090] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "port {port} still served after stop"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
