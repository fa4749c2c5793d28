//! MCP endpoints (the decision on a POST there is `crate::decision`'s):
//! cancelling held calls the client gives up on, keeping a held call's SSE
//! stream alive with progress, and answering in JSON-RPC (via
//! [`crate::mcp::jsonrpc`]) instead of problem+json.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::Value;
use tokio::time::Instant;

use super::answer::{own_header, write_to_agent};
use super::hold::Waited;
use super::{hold, CallCtx, CallOutcome, Countersign, Reply, APPROVAL_ID_HEADER};
use crate::mcp::{self, jsonrpc, McpRefusal};
use crate::problem::{Problem, ProblemCode};
use crate::store::{Approval, ApprovalState, ListFilter, StoredResponse};

/// How often a held call with a progress token hears from the gateway.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The held `tools/call` a reply goes to.
#[derive(Debug)]
pub(super) struct McpCall {
    pub id: Value,
    pub progress_token: Option<Value>,
    pub accepts_stream: bool,
    /// The SSE answer has begun: the rest goes into it as events.
    pub streaming: bool,
}

/// Who waits for which approval: `(subject, Mcp-Session-Id, request id)`.
type WaitKey = (String, Option<Vec<u8>>, String);

/// The held MCP calls waiting in this process, by [`WaitKey`].
#[derive(Debug, Default, Clone)]
pub(super) struct Waiting(Arc<Mutex<HashMap<WaitKey, String>>>);

/// Removes a waiting call however its wait ends.
pub(super) struct WaitingGuard {
    waiting: Waiting,
    key: WaitKey,
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.waiting
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

fn mcp_session(session: &Session) -> Option<Vec<u8>> {
    session
        .req_header()
        .headers
        .get(mcp::SESSION_HEADER)
        .map(|v| v.as_bytes().to_vec())
}

/// A JSON-RPC answer the gateway gives itself (an error for a message it
/// refused as a whole).
pub(super) struct McpReply {
    pub status: u16,
    pub body: Value,
    pub code: ProblemCode,
}

/// The answer to a POST on an MCP endpoint refused as MCP answers it: a
/// tool error for a `tools/call` with an id, else a JSON-RPC error.
pub(super) fn refuse_mcp(ctx: &mut CallCtx, refusal: McpRefusal) -> Reply {
    let problem = Problem::new(refusal.code()).with_detail(refusal.to_string());
    match (refusal.is_tool_error(), refusal.id()) {
        (true, Some(id)) => {
            ctx.mcp = Some(McpCall {
                id: id.clone(),
                progress_token: None,
                accepts_stream: false,
                streaming: false,
            });
            problem.into()
        }
        (_, id) => Reply::Mcp(Box::new(McpReply {
            // No request to answer: as MCP servers answer unreadable
            // messages.
            status: if id.is_some() { 200 } else { 400 },
            body: jsonrpc::rpc_error(id, refusal.rpc_code(), &problem),
            code: refusal.code(),
        })),
    }
}

impl Countersign {
    /// `notifications/cancelled`: the held calls of the same person and
    /// session with these request ids stop waiting and are never forwarded.
    /// The notification itself still goes to the server.
    pub(super) async fn cancel_held(&self, session: &Session, ids: &[Value]) {
        let Ok(identity) = self.identity.identify(session.req_header()).await else {
            return;
        };
        let mcp_session = mcp_session(session);
        // Requests that attached to an approval (retries) wait here.
        let mut cancel: Vec<String> = {
            let waiting = self.mcp_waiting.0.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter()
                .filter_map(|id| {
                    let key = (
                        identity.subject.clone(),
                        mcp_session.clone(),
                        id.to_string(),
                    );
                    waiting.get(&key).cloned()
                })
                .collect()
        };
        let pending = match self
            .engine
            .store()
            .list(&ListFilter {
                state: Some(ApprovalState::Pending),
                subject: Some(identity.subject),
                limit: Some(self.limits.max_pending_per_user.max(1) * 4),
                ..ListFilter::default()
            })
            .await
        {
            Ok(pending) => pending,
            Err(error) => {
                tracing::warn!(%error, "cannot look up the held call a client cancels");
                return;
            }
        };
        cancel.extend(
            pending
                .iter()
                .filter(|a| is_cancelled(a, ids, &mcp_session))
                .map(|a| a.id.clone()),
        );
        cancel.sort();
        cancel.dedup();
        for approval_id in cancel {
            match self.engine.cancel(&approval_id).await {
                Ok(true) => {
                    tracing::info!(%approval_id, "held MCP call cancelled by the client; it will not be forwarded")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%approval_id, %error, "could not cancel the held call")
                }
            }
        }
    }

    /// Notes that this held MCP call waits for `approval_id`, until the
    /// guard drops.
    pub(super) fn note_waiting(
        &self,
        session: &Session,
        ctx: &CallCtx,
        subject: &str,
        approval_id: &str,
    ) -> Option<WaitingGuard> {
        let call = ctx.mcp.as_ref()?;
        let key = (
            subject.to_owned(),
            mcp_session(session),
            call.id.to_string(),
        );
        self.mcp_waiting
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), approval_id.to_owned());
        Some(WaitingGuard {
            waiting: self.mcp_waiting.clone(),
            key,
        })
    }

    /// Waits for `id` as [`hold`] does, writing `notifications/progress`
    /// into an SSE answer meanwhile, when the call asked for progress and
    /// accepts SSE. `None`: it did not.
    pub(super) async fn wait_streaming(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        id: &str,
        until: Instant,
        waiting: &str,
    ) -> Option<Waited> {
        let mcp = ctx.mcp.as_mut().filter(|m| m.accepts_stream)?;
        let token = mcp.progress_token.clone()?;
        if self.start_stream(session, id).await.is_err() {
            return Some(Waited::Gone);
        }
        mcp.streaming = true;
        let mut count = 0;
        loop {
            count += 1;
            let event = jsonrpc::sse_event(&jsonrpc::progress(&token, count, waiting));
            if session
                .write_response_body(Some(event), false)
                .await
                .is_err()
            {
                return Some(Waited::Gone);
            }
            let tick = (Instant::now() + PROGRESS_EVERY).min(until);
            let waited = tokio::select! {
                approval = self.engine.wait(id, tick) => approval,
                () = hold::client_gone(session) => return Some(Waited::Gone),
                () = self.draining.started() => return Some(Waited::Draining),
            };
            match waited {
                Ok(approval) if !approval.state.is_final() && Instant::now() < until => {}
                done => return Some(Waited::Answered(Box::new(done))),
            }
        }
    }

    async fn start_stream(&self, session: &mut Session, approval_id: &str) -> Result<()> {
        let mut header = ResponseHeader::build(200, Some(5))?;
        header.insert_header(http::header::CONTENT_TYPE, "text/event-stream")?;
        header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        header.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        header.insert_header(APPROVAL_ID_HEADER, approval_id)?;
        session.write_response_header(Box::new(header), false).await
    }

    /// Answers a held (or refused) `tools/call`: every refusal as a tool
    /// error for its request id, the recorded answer re-addressed to it.
    pub(super) async fn answer_mcp(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        reply: Reply,
    ) -> Result<()> {
        let Some(call) = ctx.mcp.as_ref() else {
            return Ok(());
        };
        let id = call.id.clone();
        let streaming = call.streaming;
        let accepts_stream = call.accepts_stream;
        let messages = match reply {
            Reply::Problem(problem) => {
                ctx.outcome = CallOutcome::Refused(problem.kind);
                vec![self.tool_error(ctx, &id, *problem)]
            }
            Reply::Json(pending) => {
                ctx.outcome = CallOutcome::Accepted;
                let text = pending.body["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let meta = serde_json::json!({
                    "code": "approval_pending",
                    "approval_id": pending.body["approval_id"],
                    "retry_after": pending.retry_after,
                });
                vec![jsonrpc::tool_error_text(&id, &text, meta)]
            }
            Reply::Replay(response) => match readdress(&response, &id) {
                Some(messages) => messages,
                None if !streaming => return self.answer_replay(session, ctx, *response).await,
                None => {
                    let problem = Problem::new(ProblemCode::UpstreamUnavailable).with_detail(format!(
                        "The approved call was made, but the MCP server answered HTTP {} without a JSON-RPC response.",
                        response.status
                    ));
                    ctx.outcome = CallOutcome::Refused(problem.kind);
                    vec![self.tool_error(ctx, &id, problem)]
                }
            },
            Reply::Mcp(reply) => return self.answer_rpc(session, ctx, *reply).await,
            Reply::Disconnected => return Ok(()),
            // Not asked for by MCP holds (an answer must be re-addressed).
            Reply::Stream(_) => {
                let problem = Problem::new(ProblemCode::ResponseNotRecorded);
                ctx.outcome = CallOutcome::Refused(problem.kind);
                vec![self.tool_error(ctx, &id, problem)]
            }
        };
        self.write_messages(session, ctx, &messages, streaming, accepts_stream)
            .await
    }

    /// JSON-RPC messages for the held call: events into its stream once it
    /// has begun, else one answer.
    async fn write_messages(
        &self,
        session: &mut Session,
        ctx: &CallCtx,
        messages: &[Value],
        streaming: bool,
        accepts_stream: bool,
    ) -> Result<()> {
        if streaming {
            let mut events = messages.iter().map(jsonrpc::sse_event).peekable();
            while let Some(event) = events.next() {
                let last = events.peek().is_none();
                session.write_response_body(Some(event), last).await?;
            }
            return Ok(());
        }
        // Several messages (the server's notifications, then its response)
        // as the SSE they came in, if the client takes SSE; else only the
        // response, as one JSON answer to one request.
        if messages.len() > 1 && accepts_stream {
            let body: Vec<u8> = messages.iter().flat_map(jsonrpc::sse_event).collect();
            return self
                .write_answer(session, ctx, 200, "text/event-stream", Bytes::from(body))
                .await;
        }
        let response = messages
            .iter()
            .rev()
            .find(|m| m.get("result").is_some() || m.get("error").is_some())
            .or(messages.first());
        let body = serde_json::to_vec(&response).unwrap_or_default();
        self.write_json(session, ctx, 200, Bytes::from(body)).await
    }

    fn tool_error(&self, ctx: &CallCtx, id: &Value, problem: Problem) -> Value {
        let problem = match &ctx.approval_id {
            Some(approval) => problem.with_approval_id(approval.clone()),
            None => problem,
        };
        jsonrpc::tool_error(id, &problem)
    }

    /// A JSON-RPC error for a message refused as a whole.
    pub(super) async fn answer_rpc(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        reply: McpReply,
    ) -> Result<()> {
        ctx.outcome = CallOutcome::Refused(reply.code);
        let body = Bytes::from(serde_json::to_vec(&reply.body).unwrap_or_default());
        self.write_json(session, ctx, reply.status, body).await
    }

    async fn write_json(
        &self,
        session: &mut Session,
        ctx: &CallCtx,
        status: u16,
        body: Bytes,
    ) -> Result<()> {
        self.write_answer(session, ctx, status, "application/json", body)
            .await
    }

    async fn write_answer(
        &self,
        session: &mut Session,
        ctx: &CallCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
    ) -> Result<()> {
        let header = own_header(ctx, status, content_type, &body)?;
        write_to_agent(session, header, body).await
    }
}

/// The JSON-RPC messages of a recorded 2xx answer, its response addressed
/// to `id`; `None` when it holds no JSON-RPC response.
fn readdress(response: &StoredResponse, id: &Value) -> Option<Vec<Value>> {
    if !(200..300).contains(&response.status) {
        return None;
    }
    let body = response.body.as_deref()?;
    let content_type = response
        .headers
        .iter()
        .find(|(name, _)| name == "content-type")
        .map(|(_, value)| value.as_slice());
    let messages = if jsonrpc::is_event_stream(content_type) {
        jsonrpc::readdress_events(body, id)
    } else {
        let readdressed = jsonrpc::readdress_json(body, id)?;
        vec![serde_json::from_slice(&readdressed).ok()?]
    };
    let answered = messages
        .iter()
        .any(|m| m.get("result").is_some() || m.get("error").is_some());
    answered.then_some(messages)
}

/// Whether `approval` is a held MCP call named by a cancellation from the
/// same MCP session.
fn is_cancelled(approval: &Approval, ids: &[Value], mcp_session: &Option<Vec<u8>>) -> bool {
    let stored_session = approval
        .request
        .headers
        .iter()
        .find(|(name, _)| name == mcp::SESSION_HEADER)
        .map(|(_, value)| value.clone());
    if stored_session != *mcp_session {
        return false;
    }
    // Bodies of pending approvals were strictly parsed when stored.
    serde_json::from_slice::<Value>(&approval.request.body)
        .ok()
        .and_then(|message| message.get("id").cloned())
        .is_some_and(|id| ids.contains(&id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn response(status: u16, content_type: &str, body: &str) -> StoredResponse {
        StoredResponse {
            status,
            headers: vec![("content-type".into(), content_type.as_bytes().to_vec())],
            body: Some(body.as_bytes().to_vec()),
        }
    }

    #[test]
    fn only_a_json_rpc_response_in_a_2xx_answer_is_readdressed() {
        let json = response(
            200,
            "application/json",
            r#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
        );
        assert_eq!(readdress(&json, &json!(5)).unwrap()[0]["id"], 5);
        let sse = response(
            200,
            "text/event-stream",
            "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n",
        );
        assert_eq!(readdress(&sse, &json!("x")).unwrap()[0]["id"], "x");
        let notification_only = response(
            200,
            "text/event-stream",
            "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}\n\n",
        );
        assert!(readdress(&notification_only, &json!(1)).is_none());
        let not_found = response(
            404,
            "application/json",
            r#"{"jsonrpc":"2.0","id":1,"error":{}}"#,
        );
        assert!(readdress(&not_found, &json!(1)).is_none());
    }
}
