//! Holding a call: buffering its body for the replay upstream, and noticing
//! when the agent hangs up.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::problem::{Problem, ProblemCode};

/// Reads the whole body (at most `limit` bytes) and arms pingora's retry
/// buffer so the same bytes are replayed upstream after the approval.
pub(super) async fn read_body(
    session: &mut Session,
    limit: usize,
) -> Result<Option<Bytes>, Problem> {
    let too_large = || {
        Problem::new(ProblemCode::BodyTooLarge).with_detail(format!(
            "The request body is larger than the {limit} bytes this gateway holds for approval."
        ))
    };
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    // The agent may wait for "100 Continue" before sending the body; pingora
    // does not answer it when the body is read here.
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue {
        session
            .req_header_mut()
            .remove_header(&http::header::EXPECT);
        session
            .downstream_session
            .write_continue_response()
            .await
            .map_err(|_| {
                Problem::new(ProblemCode::InvalidBody)
                    .with_detail("The request body could not be read.")
            })?;
    }
    session.enable_retry_buffering();
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => {
                return Err(Problem::new(ProblemCode::InvalidBody)
                    .with_detail("The request body could not be read."))
            }
        }
    }
    if session.retry_buffer_truncated() {
        return Err(too_large());
    }
    Ok((!body.is_empty()).then(|| body.freeze()))
}

/// Resolves when the agent closes its connection (after the body was read).
pub(super) async fn client_gone(session: &mut Session) {
    loop {
        match session.downstream_session.read_body_or_idle(true).await {
            Ok(Some(_)) => {
                // Bytes of a pipelined next request: the agent is still there.
                std::future::pending::<()>().await;
            }
            Ok(None) | Err(_) => return,
        }
    }
}
