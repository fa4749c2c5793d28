//! Agents: tasks that make policy calls through the gateways and follow the
//! retry contract (docs/agent.md, "The retry contract"), recording every attempt
//! and the final answer of each operation.
//!
//! Each operation is a distinct call (its own `qty`, so its own binding
//! message and approval); some carry an `Idempotency-Key`; some come in
//! bursts for one person (the per-person limit's case); one in five is
//! countersigned (four eyes: the person and two countersigners).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{now_ms, BOUND, EXPIRY, PEOPLE, USER_HEADER};

/// The async policy's path (202 at once) and the held one's (held 3 s,
/// then 202).
pub const ASYNC_PATH: &str = "/buy";
pub const HELD_PATH: &str = "/buy-held";
/// The countersigned policy's path (held 3 s, then 202).
pub const QUORUM_PATH: &str = "/buy-countersigned";
pub const PRODUCT: &str = "XYZ phone";

/// The binding message of the call with this `qty` (see the policies in
/// `world.rs`).
pub fn message(qty: u64) -> String {
    format!("Buy {qty} {PRODUCT}")
}

/// The countersigners' binding message of `person`'s countersigned call
/// with this `qty`.
pub fn countersign_message(person: &str, qty: u64) -> String {
    format!("Countersign: {person} buys {qty} {PRODUCT}")
}

/// One request of an operation and what came back.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at_ms: i64,
    pub replica: usize,
    /// `None`: no HTTP answer (connection refused or reset, timeout).
    pub status: Option<u16>,
    pub code: Option<String>,
    pub approval_id: Option<String>,
    pub error: Option<String>,
}

/// How an operation ended.
#[derive(Debug, Clone)]
pub enum Final {
    /// A final answer: a 2xx other than 202, or a problem the contract
    /// says not to retry.
    Answer {
        status: u16,
        code: Option<String>,
        approval_id: Option<String>,
        body: Value,
    },
    /// Still no final answer at the operation's deadline.
    GaveUp { last: Option<Attempt> },
}

#[derive(Debug, Clone)]
pub struct Op {
    pub id: u64,
    pub agent: usize,
    pub person: &'static str,
    pub qty: u64,
    pub path: &'static str,
    pub idempotency_key: Option<String>,
    pub started_ms: i64,
    pub ended_ms: i64,
    pub attempts: Vec<Attempt>,
    pub result: Final,
}

impl Op {
    /// Every approval id the gateways named for this operation.
    pub fn approval_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .attempts
            .iter()
            .filter_map(|a| a.approval_id.clone())
            .collect();
        ids.dedup();
        ids
    }
}

/// What the agents share: where the gateways listen, the log of finished
/// operations, when to stop starting new ones.
pub struct Agents {
    pub proxies: Vec<SocketAddr>,
    pub ops: Mutex<Vec<Op>>,
    pub next_qty: AtomicU64,
    pub stop_new_at: Instant,
    pub seed: u64,
}

/// What an answer means to an agent following the contract.
enum Next {
    /// Final: stop.
    Done,
    /// Send the same call again after this long.
    Retry(Duration),
}

fn classify(status: Option<u16>, code: Option<&str>, retry_after: Option<u64>) -> Next {
    // Retry-After honoured, bounded to keep the run moving.
    let later = Duration::from_secs(retry_after.unwrap_or(1).clamp(1, 5));
    match (status, code) {
        // The agent lost its connection or timed out: the same call again.
        (None, _) => Next::Retry(Duration::from_secs(1)),
        (Some(202), _) => Next::Retry(later),
        // Come back later: the gateway stops, the store is down, or the
        // person has too many requests pending. No approval was decided.
        (Some(503), Some("shutting_down" | "approval_store_unavailable"))
        | (Some(429 | 503), Some("too_many_pending_approvals")) => Next::Retry(later),
        // A 503 without a problem (a proxy in between): retry.
        (Some(502..=504), None) => Next::Retry(later),
        _ => Next::Done,
    }
}

impl Agents {
    /// Runs agent `index` until `stop_new_at`, then until its operations
    /// in flight end.
    pub async fn run(self: Arc<Self>, index: usize) {
        let mut rng = StdRng::seed_from_u64(super::schedule::sub_seed(
            self.seed,
            &format!("agent-{index}"),
        ));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        while Instant::now() < self.stop_new_at {
            let person = PEOPLE[rng.random_range(0..PEOPLE.len())];
            // One in ten: a burst of calls for one person at once.
            let burst = if rng.random_bool(0.1) {
                rng.random_range(4..8)
            } else {
                1
            };
            let mut tasks = Vec::new();
            for _ in 0..burst {
                let qty = self.next_qty.fetch_add(1, Ordering::SeqCst);
                // One in five countersigned; the others async or held,
                // 70:30.
                let path = match rng.random_range(0..100) {
                    0..20 => QUORUM_PATH,
                    20..76 => ASYNC_PATH,
                    _ => HELD_PATH,
                };
                let idempotency_key = rng
                    .random_bool(0.3)
                    .then(|| format!("faults-{}-{qty}", self.seed));
                let op_seed = rng.random();
                let agents = self.clone();
                let http = http.clone();
                tasks.push(tokio::spawn(async move {
                    let op = agents
                        .operation(&http, index, person, qty, path, idempotency_key, op_seed)
                        .await;
                    agents.ops.lock().unwrap().push(op);
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            let pause = rng.random_range(0..1000);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn operation(
        &self,
        http: &reqwest::Client,
        agent: usize,
        person: &'static str,
        qty: u64,
        path: &'static str,
        idempotency_key: Option<String>,
        seed: u64,
    ) -> Op {
        let mut rng = StdRng::seed_from_u64(seed);
        let body =
            serde_json::to_vec(&json!({ "product": PRODUCT, "qty": qty, "priceLimit": 900 }))
                .unwrap();
        let started_ms = now_ms();
        let started = Instant::now();
        // Without an approval the agent keeps trying for this long (the
        // store or the limit may refuse it for a while)...
        let mut deadline = started + EXPIRY + BOUND;
        let mut has_approval = false;
        let mut attempts = Vec::new();
        let mut replica = rng.random_range(0..self.proxies.len());
        // The operation as recorded once it ends, however it ends.
        let ended = |attempts, result| Op {
            id: qty,
            agent,
            person,
            qty,
            path,
            idempotency_key: idempotency_key.clone(),
            started_ms,
            ended_ms: now_ms(),
            attempts,
            result,
        };
        loop {
            let mut request = http
                .post(format!("http://{}{path}", self.proxies[replica]))
                .header(USER_HEADER, person)
                .header("content-type", "application/json")
                .body(body.clone());
            if let Some(key) = &idempotency_key {
                request = request.header("idempotency-key", key);
            }
            let at_ms = now_ms();
            let (attempt, answer) = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let headers = response.headers().clone();
                    let text = response.text().await.unwrap_or_default();
                    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let code = body["code"].as_str().map(str::to_owned);
                    let approval_id = headers
                        .get("x-countersign-approval-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                        .or_else(|| body["approval_id"].as_str().map(str::to_owned));
                    let retry_after = headers
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    (
                        Attempt {
                            at_ms,
                            replica,
                            status: Some(status),
                            code,
                            approval_id,
                            error: None,
                        },
                        Some((body, retry_after)),
                    )
                }
                Err(error) => (
                    Attempt {
                        at_ms,
                        replica,
                        status: None,
                        code: None,
                        approval_id: None,
                        error: Some(error.to_string()),
                    },
                    None,
                ),
            };
            if attempt.approval_id.is_some() && !has_approval {
                // ...and once there is an approval, until its expiry plus
                // the bound by which it must have ended.
                has_approval = true;
                deadline = Instant::now() + EXPIRY + BOUND;
            }
            let retry_after = answer.as_ref().and_then(|(_, r)| *r);
            let next = classify(attempt.status, attempt.code.as_deref(), retry_after);
            attempts.push(attempt.clone());
            match next {
                Next::Done => {
                    let (body, _) = answer.expect("a final answer is an HTTP answer");
                    let result = Final::Answer {
                        status: attempt.status.unwrap_or_default(),
                        code: attempt.code,
                        approval_id: attempt.approval_id,
                        body,
                    };
                    return ended(attempts, result);
                }
                Next::Retry(after) => {
                    if Instant::now() + after > deadline {
                        let result = Final::GaveUp {
                            last: Some(attempt),
                        };
                        return ended(attempts, result);
                    }
                    tokio::time::sleep(after).await;
                    // Any replica may take the retry.
                    replica = rng.random_range(0..self.proxies.len());
                }
            }
        }
    }
}
