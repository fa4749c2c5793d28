//! Why a call is refused, rendered exactly as docs/call-binding.md says:
//! `application/problem+json` (RFC 9457) and, for a 401, `WWW-Authenticate`.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use serde::Serialize;

/// The answer to a call that is not the one the person approved (or carries
/// no valid token for it). Its [`code`](Refusal::code) and
/// [`field`](Refusal::field) are those of the contract; render it with
/// [`Refusal::into_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    field: Option<&'static str>,
    detail: String,
    challenge: Option<&'static str>,
}

/// The `WWW-Authenticate` challenges of the contract.
pub(crate) const BEARER_INVALID_TOKEN: &str = r#"Bearer error="invalid_token""#;
pub(crate) const DPOP_INVALID_TOKEN: &str = r#"DPoP error="invalid_token""#;
pub(crate) const DPOP_INVALID_PROOF: &str = r#"DPoP error="invalid_dpop_proof""#;

/// The body, in the member order of the contract; `field` only when named.
#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    code: &'a str,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl Refusal {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        field: Option<&'static str>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            field,
            detail: detail.into(),
            challenge: None,
        }
    }

    /// A 401 with the challenge that tells the client what to fix.
    pub(crate) fn unauthorized(
        code: &'static str,
        field: Option<&'static str>,
        detail: impl Into<String>,
        challenge: &'static str,
    ) -> Self {
        Self {
            challenge: Some(challenge),
            ..Self::new(StatusCode::UNAUTHORIZED, code, field, detail)
        }
    }

    /// A 403 `binding_mismatch` naming the entry's field that differs.
    pub(crate) fn mismatch(field: &'static str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "binding_mismatch",
            Some(field),
            detail,
        )
    }

    /// The HTTP status: 401, 403, or 413/400 for a body the layer could not buffer.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The contract's code, e.g. `binding_mismatch`; the problem `type` is
    /// `urn:countersign:problem:<code>`.
    pub fn code(&self) -> &str {
        self.code
    }

    /// What differs, where the contract names it (`body`, `target`, `htu`, ...).
    pub fn field(&self) -> Option<&str> {
        self.field
    }

    /// A sentence for the caller. Never holds the token or the body.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// A short, fixed summary of the code.
    pub fn title(&self) -> &'static str {
        match self.code {
            "token_missing" => "Access token missing",
            "token_invalid" => "Access token invalid",
            "insufficient_scope" => "Insufficient scope",
            "dpop_proof_missing" => "DPoP proof missing",
            "dpop_proof_invalid" => "DPoP proof invalid",
            "dpop_proof_replayed" => "DPoP proof replayed",
            "binding_missing" => "Call binding missing",
            "binding_mismatch" => "Call binding mismatch",
            "approval_replayed" => "Approval replayed",
            "countersign_missing" => "Countersignatures missing",
            "countersign_invalid" => "Countersignature invalid",
            "countersign_insufficient" => "Too few countersigners",
            "body_too_large" => "Request body too large",
            "body_unreadable" => "Request body unreadable",
            _ => "Request refused",
        }
    }

    /// The `WWW-Authenticate` value sent with it (401s only).
    pub fn www_authenticate(&self) -> Option<&str> {
        self.challenge
    }

    /// The `application/problem+json` body.
    pub fn body(&self) -> String {
        let problem = Problem {
            kind: format!("urn:countersign:problem:{}", self.code),
            title: self.title(),
            status: self.status.as_u16(),
            code: self.code,
            detail: &self.detail,
            field: self.field,
        };
        // Serialising a struct of strings and an integer cannot fail.
        serde_json::to_string(&problem).unwrap_or_default()
    }

    /// The complete HTTP answer, for any body type made from a `String`
    /// (`axum::body::Body`, `http_body_util::Full<Bytes>`, `String`, ...).
    pub fn into_response<B: From<String>>(self) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(challenge) = self.challenge {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        response
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.code)?;
        if let Some(field) = self.field {
            write!(f, " ({field})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_body_and_headers_follow_the_contract() {
        let refusal = Refusal::mismatch("body", "the body is not the one approved");
        let response = refusal.clone().into_response::<String>();
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert!(response.headers().get(WWW_AUTHENTICATE).is_none());
        let body: serde_json::Value = serde_json::from_str(response.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "urn:countersign:problem:binding_mismatch",
                "title": "Call binding mismatch",
                "status": 403,
                "code": "binding_mismatch",
                "detail": "the body is not the one approved",
                "field": "body",
            })
        );

        let missing = Refusal::unauthorized("token_missing", None, "no", BEARER_INVALID_TOKEN)
            .into_response::<String>();
        assert_eq!(
            missing.headers()[WWW_AUTHENTICATE],
            r#"Bearer error="invalid_token""#
        );
        let body: serde_json::Value = serde_json::from_str(missing.body()).unwrap();
        assert!(body.get("field").is_none(), "no field unless named");
    }
}
