//! Every answer the gateway gives instead of the upstream: problem+json.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, Session};
use pingora::{Error, ErrorSource, ErrorType};

use super::{CallCtx, Countersign, JsonReply, APPROVAL_ID_HEADER};
use crate::approval::engine;
use crate::ciba::CibaError;
use crate::problem::{Problem, ProblemCode, CONTENT_TYPE};
use crate::store::StoredResponse;

impl Countersign {
    pub(super) async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        problem: Problem,
    ) -> Result<()> {
        ctx.outcome = super::CallOutcome::Refused(problem.kind);
        let problem = match &ctx.approval_id {
            Some(id) => problem.with_approval_id(id.clone()),
            None => problem,
        };
        let body = Bytes::from(problem.to_json());
        let mut header = own_header(ctx, problem.status, CONTENT_TYPE, &body)?;
        if let Some(seconds) = problem.retry_after {
            header.insert_header(http::header::RETRY_AFTER, seconds.to_string())?;
        }
        if problem.status == 401 {
            header.insert_header(http::header::WWW_AUTHENTICATE, "Bearer")?;
        }
        write_to_agent(session, header, body).await
    }

    /// JSON the gateway answers itself (`202 Accepted`, a status resource).
    pub(super) async fn answer_json(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        reply: JsonReply,
    ) -> Result<()> {
        let body = Bytes::from(serde_json::to_vec(&reply.body).unwrap_or_default());
        let mut header = own_header(ctx, reply.status, "application/json", &body)?;
        if let Some(seconds) = reply.retry_after {
            header.insert_header(http::header::RETRY_AFTER, seconds.to_string())?;
        }
        if let Some(location) = reply.location {
            header.insert_header(http::header::LOCATION, location)?;
        }
        self.write(session, header, body).await
    }

    /// The upstream's recorded answer to the approved call.
    pub(super) async fn answer_replay(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        response: StoredResponse,
    ) -> Result<()> {
        let body = Bytes::from(response.body.unwrap_or_default());
        let header = upstream_header(ctx, response.status, response.headers, Some(body.len()))?;
        self.write(session, header, body).await
    }

    /// The upstream's answer to the approved call, too large to record,
    /// streamed as it arrives. Its `Content-Length` (if any) is the
    /// upstream's; without one pingora frames it.
    pub(super) async fn answer_stream(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        answer: engine::LargeAnswer,
    ) -> Result<()> {
        let engine::LargeAnswer {
            status,
            headers,
            body: mut rest,
        } = answer;
        let header = upstream_header(ctx, status, headers, None)?;
        begin(session, header).await?;
        let read = std::mem::take(&mut rest.read);
        session
            .write_response_body(Some(Bytes::from(read)), false)
            .await?;
        loop {
            match rest.next_chunk().await {
                Ok(Some(chunk)) => session.write_response_body(Some(chunk), false).await?,
                Ok(None) => return session.write_response_body(None, true).await,
                Err(reason) => {
                    // Nothing more can be said to the agent mid-body: cut
                    // the connection so it sees the answer is incomplete.
                    tracing::warn!(%reason, "the upstream's large answer broke off while streaming");
                    session.set_keepalive(None);
                    return Error::e_explain(ErrorType::ReadError, "upstream answer broke off");
                }
            }
        }
    }

    async fn write(
        &self,
        session: &mut Session,
        header: ResponseHeader,
        body: Bytes,
    ) -> Result<()> {
        begin(session, header).await?;
        session.write_response_body(Some(body), true).await
    }

    /// pingora could not forward the call (or the agent left).
    pub(super) async fn answer_failure(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut CallCtx,
    ) -> FailToProxy {
        let code = match error.esource() {
            ErrorSource::Downstream => {
                if agent_hung_up(error) {
                    ctx.outcome = super::CallOutcome::ClientDisconnected;
                }
                None
            }
            ErrorSource::Upstream => Some(ProblemCode::UpstreamUnavailable),
            _ => match error.etype() {
                ErrorType::HTTPStatus(status) if *status < 500 => {
                    let _ = session.respond_error(*status).await;
                    return FailToProxy {
                        error_code: *status,
                        can_reuse_downstream: false,
                    };
                }
                _ => Some(ProblemCode::UpstreamUnavailable),
            },
        };
        let Some(code) = code else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        tracing::warn!(
            approval_id = ctx.approval_id.as_deref(),
            upstream = ctx.upstream.as_ref().map(|u| u.name.as_str()),
            error = %error,
            "forwarding failed"
        );
        let problem = Problem::new(code);
        let status = problem.status;
        // pingora drops this connection after a failed forward: say so, or
        // the agent's client reuses it and meets a reset.
        session.set_keepalive(None);
        if let Err(e) = self.answer(session, ctx, problem).await {
            tracing::debug!(error = %e, "could not answer the agent");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }
}

/// The agent's connection closed, reset or stalled: not the gateway's error.
fn agent_hung_up(error: &Error) -> bool {
    matches!(
        error.etype(),
        ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
    )
}

/// The answer to an approval that failed (not denied, not expired).
pub(super) fn failed_approval(error: CibaError) -> Problem {
    let code = engine::problem_for(&error);
    match (&error, code) {
        (CibaError::Unavailable { retry_after, .. }, _) => {
            tracing::warn!(%error, "authorization server unavailable");
            let problem = Problem::new(code);
            match retry_after {
                Some(after) => problem.with_retry_after(after.as_secs().max(1)),
                None => problem,
            }
        }
        (_, ProblemCode::ApprovalFailed) => {
            tracing::error!(%error, "approval failed");
            Problem::new(code)
        }
        _ => {
            tracing::warn!(%error, "authorization server refused the approval request");
            Problem::new(code)
        }
    }
}

/// The upstream's status and headers on the approved call's answer, with
/// its approval id. `content_length`: the body's, replacing the upstream's
/// (a recorded body); `None` keeps the upstream's framing (a stream).
fn upstream_header(
    ctx: &CallCtx,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    content_length: Option<usize>,
) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(status, Some(headers.len() + 2))?;
    for (name, value) in headers {
        if content_length.is_some() && name == "content-length" {
            continue;
        }
        header.append_header(name, value.as_slice())?;
    }
    if let Some(length) = content_length {
        header.insert_header(http::header::CONTENT_LENGTH, length.to_string())?;
    }
    if let Some(id) = &ctx.approval_id {
        header.insert_header(APPROVAL_ID_HEADER, id.as_str())?;
    }
    Ok(header)
}

/// The header of an answer of the gateway's own: `status`, `content_type`
/// and the length of `body`, never cached, with the call's approval id
/// when it has one.
pub(super) fn own_header(
    ctx: &CallCtx,
    status: u16,
    content_type: &str,
    body: &Bytes,
) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(status, Some(6))?;
    header.insert_header(http::header::CONTENT_TYPE, content_type)?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    if let Some(id) = &ctx.approval_id {
        header.insert_header(APPROVAL_ID_HEADER, id.as_str())?;
    }
    Ok(header)
}

/// Writes a whole answer of the gateway's own; a failure is the agent's
/// connection's, the only one these writes can meet.
pub(super) async fn write_to_agent(
    session: &mut Session,
    header: ResponseHeader,
    body: Bytes,
) -> Result<()> {
    begin(session, header).await.map_err(|e| e.into_down())?;
    session
        .write_response_body(Some(body), true)
        .await
        .map_err(|e| e.into_down())
}

/// Writes the header of an answer of the gateway's own.
async fn begin(session: &mut Session, header: ResponseHeader) -> Result<()> {
    // A body we did not read would be parsed as the next request.
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(header), false).await
}
