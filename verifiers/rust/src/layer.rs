//! The tower middleware: buffers the body (the digest needs all of it),
//! verifies, and only then lets the request reach the inner service, with
//! the same body bytes and the [`Approval`] in its extensions.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_layer::Layer;
use tower_service::Service;

use crate::{Approval, Refusal, Verifier};

/// Puts a [`Verifier`] in front of a service: `Router::layer(VerifyLayer::new(verifier))`.
///
/// Beyond the contract, a body larger than [`Config::max_body_bytes`](crate::Config::max_body_bytes)
/// is refused with 413 `body_too_large`, and a body that cannot be read
/// (the client went away mid-body) with 400 `body_unreadable`, both in the
/// same problem+json form. Refused calls never reach the inner service.
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    verifier: Verifier,
}

impl VerifyLayer {
    /// The layer; clones of `verifier` share its key and replay caches.
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// The service [`VerifyLayer`] wraps around `S`.
#[derive(Debug, Clone)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Verifier,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<Request<B>> for VerifyService<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    B: http_body::Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R: From<String>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service made ready by poll_ready is the one to call; leave a
        // fresh clone in its place (tower's usual pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let limit = verifier.config().max_body_bytes;
            let bytes = match read_body(&parts, body, limit).await {
                Ok(bytes) => bytes,
                Err(refusal) => return Ok(refusal.into_response()),
            };
            let approval: Approval = match verifier.verify(&parts, &bytes).await {
                Ok(approval) => approval,
                Err(refusal) => return Ok(refusal.into_response()),
            };
            let mut request = Request::from_parts(parts, B::from(bytes));
            request.extensions_mut().insert(approval);
            inner.call(request).await
        })
    }
}

fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        None,
        format!("the body is larger than the {limit} bytes this API verifies"),
    )
}

/// The whole body, at most `limit` bytes: refused early on a larger
/// `Content-Length`, and while reading otherwise.
async fn read_body<B>(parts: &http::request::Parts, body: B, limit: usize) -> Result<Bytes, Refusal>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large(limit)),
        Err(_) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "body_unreadable",
            None,
            "the request body could not be read",
        )),
    }
}
