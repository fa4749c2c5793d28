//! Sending an approved call to its upstream, once, and recording the answer.
//!
//! Approved calls are forwarded by the gateway itself rather than through
//! pingora's proxy path, so that the call is made whether or not the agent is
//! still connected, exactly once, and its answer can be replayed to retries.

use std::collections::HashMap;
use std::time::Duration;

use thiserror::Error;

use crate::config::UpstreamConfig;
use crate::dpop::DpopKey;
use crate::headers::{
    APPROVAL_ID_HEADER, COUNTERSIGN_TOKENS_HEADER, GATEWAY_HEADER_PREFIX, TRACEPARENT_HEADER,
};
use crate::secret::Secret;
use crate::store::{StoredRequest, StoredResponse};

/// Headers that are the connection's, not the call's (hop-by-hop): dropped
/// from both the stored request and the recorded answer.
const HOP_BY_HOP_HEADERS: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the gateway sets itself when it forwards.
const SET_BY_GATEWAY_HEADERS: [&str; 4] = [
    "expect",
    "content-length",
    "authorization",
    "proxy-authorization",
];

/// Whether a header of the agent's call is kept in the stored request.
pub fn keeps_request_header(name: &str, identity_header: Option<&str>) -> bool {
    // `_` spellings too: CGI-style servers read `x_countersign_user` as
    // `x-countersign-user`.
    let dashed = crate::request::dashed(name);
    !HOP_BY_HOP_HEADERS.contains(&name)
        && !SET_BY_GATEWAY_HEADERS.contains(&name)
        && !dashed.starts_with(GATEWAY_HEADER_PREFIX)
        && !dashed.eq_ignore_ascii_case(COUNTERSIGN_TOKENS_HEADER)
        && identity_header.is_none_or(|h| !crate::request::dashed(h).eq_ignore_ascii_case(&dashed))
}

/// The `Host` header a stored call reaches its upstream with: the agent's
/// with `preserve_host`, otherwise the upstream's own authority. Call
/// binding names it, so [`UpstreamClient::send`] sends exactly this.
pub fn forwarded_host(config: &UpstreamConfig, headers: &[(String, Vec<u8>)]) -> String {
    config
        .preserve_host
        .then(|| headers.iter().find(|(name, _)| name == "host"))
        .flatten()
        .map_or_else(
            || config.url.authority().to_owned(),
            |(_, value)| String::from_utf8_lossy(value).into_owned(),
        )
}

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("unknown upstream {0}")]
    UnknownUpstream(String),
    /// Nothing was sent: safe to report as a failure.
    #[error("the call could not be sent: {0}")]
    NotSent(String),
    /// The call may have reached the upstream: its outcome is unknown.
    #[error("the upstream's answer was lost: {0}")]
    AnswerLost(String),
}

impl ForwardError {
    /// A short name for a span's status (never the reason's text).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownUpstream(_) => "unknown_upstream",
            Self::NotSent(_) => "not_sent",
            Self::AnswerLost(_) => "answer_lost",
        }
    }
}

/// HTTP clients for every upstream.
#[derive(Debug)]
pub struct UpstreamClient {
    upstreams: HashMap<String, (reqwest::Client, UpstreamConfig)>,
    max_response_bytes: usize,
}

impl UpstreamClient {
    pub fn new(
        upstreams: impl IntoIterator<Item = (String, UpstreamConfig)>,
        max_response_bytes: usize,
    ) -> Result<Self, String> {
        let upstreams = upstreams
            .into_iter()
            .map(|(name, config)| {
                let mut builder = reqwest::Client::builder()
                    .connect_timeout(config.connect_timeout)
                    .timeout(config.timeout + Duration::from_secs(5))
                    .redirect(reqwest::redirect::Policy::none())
                    .pool_idle_timeout(Duration::from_secs(4));
                if let Some(tls) = &config.tls_material {
                    builder = tls
                        .configure_client(builder)
                        .map_err(|e| format!("HTTP client for upstream {name}: {e}"))?;
                }
                let client = builder
                    .build()
                    .map_err(|e| format!("HTTP client for upstream {name}: {e}"))?;
                Ok((name, (client, config)))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            upstreams,
            max_response_bytes,
        })
    }

    /// The longest a call to `upstream` can take before it is given up.
    pub fn longest_call(&self, upstream: &str) -> Duration {
        self.upstreams
            .get(upstream)
            .map_or(Duration::from_secs(120), |(_, config)| {
                config.connect_timeout + config.timeout + Duration::from_secs(5)
            })
    }

    /// Sends `request` with `token` to `upstream`. The answer's body is kept
    /// up to `max_response_bytes`; a larger one is handed back unread past
    /// that point, to be streamed to a waiting agent or drained.
    pub async fn send(
        &self,
        upstream: &str,
        approval_id: &str,
        request: &StoredRequest,
        credentials: Credentials<'_>,
        traceparent: Option<&str>,
    ) -> Result<Forwarded, ForwardError> {
        let Credentials {
            token,
            dpop,
            countersignatures,
        } = credentials;
        let (client, config) = self
            .upstreams
            .get(upstream)
            .ok_or_else(|| ForwardError::UnknownUpstream(upstream.to_owned()))?;
        let scheme = if config.url.tls { "https" } else { "http" };
        let url = format!(
            "{scheme}://{}{}",
            config.url.authority(),
            request.path_and_query
        );
        let method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|e| ForwardError::NotSent(e.to_string()))?;
        let host = forwarded_host(config, &request.headers);
        // A DPoP token goes with a proof for this request: `htu` names the
        // host the upstream is told it is (the Host header it receives).
        let authorization = match dpop {
            Some(key) => {
                let htu = format!("{scheme}://{host}{}", request.path_and_query);
                let proof = key.proof(&request.method, &htu, Some(token.expose()), false);
                (format!("DPoP {}", token.expose()), Some(proof))
            }
            None => (format!("Bearer {}", token.expose()), None),
        };
        let mut builder = client.request(method, url).header(http::header::HOST, host);
        if let Some(proof) = authorization.1 {
            builder = builder.header("dpop", proof);
        }
        if !countersignatures.is_empty() {
            let tokens: Vec<&str> = countersignatures.iter().map(Secret::expose).collect();
            builder = builder.header(COUNTERSIGN_TOKENS_HEADER, tokens.join(", "));
        }
        if let Some(traceparent) = traceparent {
            builder = builder.header(TRACEPARENT_HEADER, traceparent);
        }
        for (name, value) in &request.headers {
            // The agent's own trace context is replaced by the forward's
            // span (of the same trace) when traces are on.
            if name == "host" || (traceparent.is_some() && name == TRACEPARENT_HEADER) {
                continue;
            }
            builder = builder.header(name.as_str(), value.as_slice());
        }
        let mut response = builder
            .header(http::header::AUTHORIZATION, authorization.0)
            .header(APPROVAL_ID_HEADER, approval_id)
            .body(request.body.clone())
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() || e.is_builder() {
                    ForwardError::NotSent(e.to_string())
                } else {
                    ForwardError::AnswerLost(e.to_string())
                }
            })?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter(|(name, _)| !HOP_BY_HOP_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        let mut body = Vec::new();
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|e| ForwardError::AnswerLost(e.to_string()))?;
            let Some(chunk) = chunk else {
                break;
            };
            body.extend_from_slice(&chunk);
            if body.len() > self.max_response_bytes {
                return Ok(Forwarded {
                    recorded: StoredResponse {
                        status,
                        headers,
                        body: None,
                    },
                    overflow: Some(Overflow {
                        read: body,
                        rest: response,
                    }),
                });
            }
        }
        Ok(Forwarded {
            recorded: StoredResponse {
                status,
                headers,
                body: Some(body),
            },
            overflow: None,
        })
    }
}

/// What authorizes a forwarded call: the person's token (DPoP-bound or
/// not) and the countersigners' tokens.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub token: &'a Secret,
    pub dpop: Option<&'a DpopKey>,
    pub countersignatures: &'a [Secret],
}

/// The upstream's answer to an approved call.
#[derive(Debug)]
pub struct Forwarded {
    /// What is recorded and replayed (`body: None`: too large to keep).
    pub recorded: StoredResponse,
    pub overflow: Option<Overflow>,
}

/// The body of an answer larger than `max_response_bytes`: what was read so
/// far, and the rest, still coming from the upstream.
#[derive(Debug)]
pub struct Overflow {
    pub read: Vec<u8>,
    rest: reqwest::Response,
}

impl Overflow {
    /// The next piece of the rest; `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, String> {
        self.rest.chunk().await.map_err(|e| e.to_string())
    }

    /// Reads the rest and drops it, so that the upstream is not cut off
    /// mid-answer when nobody is waiting for it.
    pub async fn drain(mut self) {
        while let Ok(Some(_)) = self.next_chunk().await {}
    }
}
