//! One builder for the world most integration tests share: the CIBA peer,
//! the shop upstream and the in-process gateway with the test's policies
//! and options; and the steps every test of a held call repeats (the person
//! answering, the problem the agent gets, nothing asked or forwarded).

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{start_shop, GatewayOptions, Peer, TestGateway, World, USER_HEADER};

/// The gateway's problem+json answer of `status` with `code` (asserted),
/// as `problem` for the tests that use this world.
pub use super::flows::problem_json as problem;

/// Builds a [`World`]: `World::builder().policies(P).limits(L).start()`.
#[derive(Default)]
pub struct WorldBuilder {
    peer_env: Vec<(&'static str, &'static str)>,
    options: GatewayOptions,
}

impl World {
    pub fn builder() -> WorldBuilder {
        WorldBuilder::default()
    }

    /// A world whose gateway loads `policies` (the `policies:` entries of
    /// a file) besides the repository's `policies/`.
    pub async fn with_policies(policies: &'static str) -> Self {
        Self::builder().policies(policies).start().await
    }

    /// A world whose gateway has these `limits` (a YAML flow mapping).
    pub async fn with_limits(limits: &'static str) -> Self {
        Self::builder().limits(limits).start().await
    }

    /// Sends `request` (a call that is held), approves the request of
    /// `user` once the person is asked, and returns the agent's answer.
    pub async fn approved(
        &self,
        user: &str,
        request: reqwest::RequestBuilder,
    ) -> reqwest::Response {
        let call = tokio::spawn(request.send());
        self.peer.approve_next(user).await;
        call.await.unwrap().unwrap()
    }

    /// As [`World::approved`], the person denying it.
    pub async fn denied(&self, user: &str, request: reqwest::RequestBuilder) -> reqwest::Response {
        let call = tokio::spawn(request.send());
        self.peer.deny_next(user).await;
        call.await.unwrap().unwrap()
    }

    /// Sends `request` (a call that is held) and denies it once `user` is
    /// asked: asserts the agent's `403` `access_denied` and returns the
    /// request the person was asked (its `binding_message`,
    /// `authorization_details`).
    pub async fn asked_and_denied(&self, user: &str, request: reqwest::RequestBuilder) -> Value {
        self.peer.asked_and_denied(user, request).await
    }

    /// GET `path` through the gateway as an agent acting for `user`.
    pub fn get_as(&self, user: &str, path: &str) -> reqwest::RequestBuilder {
        self.agent
            .get(self.gateway.url(path))
            .header(USER_HEADER, user)
    }

    /// POST `path` through the gateway as an agent acting for `user`.
    pub fn post_as(&self, user: &str, path: &str) -> reqwest::RequestBuilder {
        self.agent
            .post(self.gateway.url(path))
            .header(USER_HEADER, user)
    }

    /// POST `path` through the gateway as an agent acting for `user`, with
    /// these JSON body bytes (sent as they are).
    pub fn post_json(&self, user: &str, path: &str, body: &str) -> reqwest::RequestBuilder {
        self.post_as(user, path)
            .header("content-type", "application/json")
            .body(body.to_owned())
    }

    /// GET `path` through the gateway, as an agent without an identity.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.agent.get(self.gateway.url(path)).send().await.unwrap()
    }

    /// `countersign approvals <args> --config <this gateway's file>`.
    pub fn approvals_command(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_countersign"))
            .arg("approvals")
            .args(args)
            .arg("--config")
            .arg(self.gateway.dir().join("countersign.yaml"))
            .output()
            .unwrap()
    }

    /// What `countersign approvals <args>` prints, once it has succeeded.
    pub fn approvals_stdout(&self, args: &[&str]) -> String {
        let output = self.approvals_command(args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Nobody was asked and nothing reached the shop.
    pub async fn untouched(&self) {
        assert!(self.shop.received().is_empty(), "nothing is forwarded");
        assert!(self.peer.requests().await.is_empty(), "nobody is asked");
    }
}

impl WorldBuilder {
    /// `policies:` entries the gateway loads besides the repository's.
    pub fn policies(mut self, policies: &'static str) -> Self {
        self.options.extra_policies = policies;
        self
    }

    /// The gateway's `limits` (a YAML flow mapping).
    pub fn limits(mut self, limits: &'static str) -> Self {
        self.options.limits = limits;
        self
    }

    /// Top-level YAML appended to the gateway's file.
    pub fn config(mut self, config: String) -> Self {
        self.options.extra_config = config;
        self
    }

    /// The gateway's `identity` (the inside of its flow mapping).
    pub fn identity(mut self, identity: String) -> Self {
        self.options.identity = identity;
        self
    }

    /// The upstream's address instead of the shop's.
    pub fn upstream(mut self, address: &str) -> Self {
        self.options.upstream = Some(address.to_owned());
        self
    }

    /// `listen.tls` of the gateway (a YAML flow mapping), if any.
    pub fn listen_tls(mut self, tls: Option<String>) -> Self {
        self.options.listen_tls = tls;
        self
    }

    /// Any other gateway options.
    pub fn options(mut self, options: GatewayOptions) -> Self {
        self.options = options;
        self
    }

    /// The peer grants the read and transfer scopes as well as buying.
    pub fn all_scopes(mut self) -> Self {
        self.peer_env.push((
            "PEER_API_SCOPES",
            "product:buy product:read payments:transfer",
        ));
        self
    }

    pub async fn start(self) -> World {
        let peer = Peer::start_with(&self.peer_env);
        let shop = start_shop(&peer).await;
        let gateway = TestGateway::start(&peer, &shop, self.options).await;
        World {
            peer,
            shop,
            gateway,
            agent: reqwest::Client::new(),
        }
    }
}

impl Peer {
    /// Waits until `user` is asked (one pending request), approves it and
    /// returns the request as the peer saw it.
    pub async fn approve_next(&self, user: &str) -> Value {
        let request = self.next(user).await;
        self.approve_request(&request).await;
        request
    }

    /// As [`Peer::approve_next`], the person denying it.
    pub async fn deny_next(&self, user: &str) -> Value {
        let request = self.next(user).await;
        self.deny_request(&request).await;
        request
    }

    /// Approves `request` (as [`Peer::requests`] lists it).
    pub async fn approve_request(&self, request: &Value) {
        self.approve(request["auth_req_id"].as_str().unwrap()).await;
    }

    /// Denies `request` (as [`Peer::requests`] lists it).
    pub async fn deny_request(&self, request: &Value) {
        self.deny(request["auth_req_id"].as_str().unwrap()).await;
    }

    /// Makes the token endpoint fail: `answer` names how many polls
    /// (`count`), their `status` and `retry_after` (seconds, or
    /// `retry_after_date_in` for an HTTP date).
    pub async fn token_unavailable(&self, answer: Value) {
        let status = self.control("token-unavailable", answer).await;
        assert!(status.is_success(), "token-unavailable: {status}");
    }

    /// Sends `request` (a call that is held) and denies it once `user` is
    /// asked: asserts the agent's `403` `access_denied` and returns the
    /// request the person was asked.
    pub async fn asked_and_denied(&self, user: &str, request: reqwest::RequestBuilder) -> Value {
        let call = tokio::spawn(request.send());
        let asked = self.deny_next(user).await;
        problem(call.await.unwrap().unwrap(), 403, "access_denied").await;
        asked
    }

    /// The `auth_req_id` of the first pending request of `user`, once there
    /// is one.
    pub async fn next_id(&self, user: &str) -> String {
        let request = self.next(user).await;
        request["auth_req_id"].as_str().unwrap().to_owned()
    }

    /// The first pending request of `user`, once there is one.
    pub async fn next(&self, user: &str) -> Value {
        let mut pending = self.wait_pending(Some(user), 1).await;
        pending.remove(0)
    }
}

/// When the gateway polled for `request` (as the peer lists it), in ms.
pub fn poll_times(request: &Value) -> Vec<i64> {
    request["poll_times_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

/// The `X-Countersign-Approval-Id` of an answer.
pub fn approval_id(response: &reqwest::Response) -> String {
    response.headers()["x-countersign-approval-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Polls `pending` every 100 ms until it lists `count` or more (`what`, in
/// the failure), for 20 s at most; returns that list.
pub async fn wait_count<T, F, Fut>(count: usize, what: &str, pending: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Vec<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pending = pending().await;
        if pending.len() >= count {
            return pending;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} {what}, have {}",
            pending.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `metrics()` (a `/metrics` text) has the line `line`, for
/// 15 s at most: calls are counted when their answer has been sent, a
/// moment after the agent has it. Returns that text.
pub async fn wait_metric<F, Fut>(metrics: F, line: &str) -> String
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = metrics().await;
        if text.lines().any(|l| l == line) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {line:?} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends the raw HTTP/1.1 `request` to `addr` (off the runtime, the
/// client blocks) and returns the answer's status and text.
pub async fn send_raw(addr: std::net::SocketAddr, request: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || super::raw_request(addr, &request))
        .await
        .unwrap()
}
