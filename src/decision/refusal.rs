//! The problem a request refused before routing gets (its code names the
//! spelling refused, the detail says why).

use crate::problem::{Problem, ProblemCode};
use crate::request::{RequestError, METHOD_OVERRIDE_HEADERS, PATH_OVERRIDE_HEADERS};

/// The answer to a request refused before routing.
pub fn request_problem(error: RequestError) -> Problem {
    let code = match &error {
        RequestError::NotOriginForm
        | RequestError::NotUtf8
        | RequestError::Path(_)
        | RequestError::EncodedPercent => ProblemCode::InvalidPath,
        RequestError::Host(_)
        | RequestError::MissingHost
        | RequestError::RepeatedHost
        | RequestError::HostMismatch { .. }
        | RequestError::ForwardedHostMismatch(_) => ProblemCode::InvalidHost,
        RequestError::MethodOverrideHeader(_) | RequestError::MethodOverrideParameter => {
            ProblemCode::MethodOverrideRefused
        }
        RequestError::PathOverrideHeader(_) => ProblemCode::PathOverrideRefused,
        RequestError::Upgrade => ProblemCode::UpgradeRefused,
        RequestError::HeaderTwin { reads_as, .. } => twin_code(reads_as),
    };
    Problem::new(code).with_detail(format!("The request was refused: {error}."))
}

/// A refused header twin gets the code of the header it would be read as.
fn twin_code(reads_as: &str) -> ProblemCode {
    if METHOD_OVERRIDE_HEADERS.contains(&reads_as) {
        ProblemCode::MethodOverrideRefused
    } else if PATH_OVERRIDE_HEADERS.contains(&reads_as) {
        ProblemCode::PathOverrideRefused
    } else if reads_as == "x-forwarded-host" {
        ProblemCode::InvalidHost
    } else if reads_as.starts_with("mcp-") {
        ProblemCode::McpHeaderMismatch
    } else {
        ProblemCode::InvalidBody
    }
}
