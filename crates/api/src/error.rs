//! One error type for every operation of the API, with stable machine-readable codes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What went wrong, as a stable lower-case code (`"no_quorum"`, `"not_found"`, …): clients
/// branch on this, never on the message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is malformed or names an impossible value (400). Nothing changed.
    InvalidArgument,
    /// The caller's certificate does not allow this (403): a viewer's write. Nothing changed.
    PermissionDenied,
    /// The node, key, client or endpoint does not exist (404). Nothing changed.
    NotFound,
    /// The method is not served on this path (405). Nothing changed.
    MethodNotAllowed,
    /// The request contradicts the cluster's state (409): promote a manager, remove a node
    /// that is up without `force`, demote the last manager. Nothing changed.
    Conflict,
    /// A watch asked for revisions that are no longer kept (410).
    Compacted,
    /// A compare-and-swap found the key at another revision (412). Nothing changed.
    CompareFailed,
    /// The body is over the limit (413). Nothing changed.
    TooLarge,
    /// A bug or an unreadable file on the node (500). Whether anything changed is unknown.
    Internal,
    /// No quorum of managers is reachable (503): writes and linearizable reads fail within a
    /// bounded time. Nothing was acknowledged; a write that reached the leader may still be
    /// committed if the quorum comes back before a new leader is chosen (as etcd's
    /// timeouts), so clients do not resend it elsewhere.
    NoQuorum,
    /// This node cannot serve the request now (503): a worker asked for a manager's
    /// operation, a manager could not be reached, or a membership change is still being
    /// committed. Nothing changed; another manager or a retry may succeed.
    Unavailable,
    /// A write reached the leader but its answer was lost (504): it may or may not have
    /// been applied. Clients never retry such a write blindly.
    OutcomeUnknown,
}

impl ErrorCode {
    /// The HTTP status this code is sent with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::Compacted => 410,
            ErrorCode::CompareFailed => 412,
            ErrorCode::TooLarge => 413,
            ErrorCode::Internal => 500,
            ErrorCode::NoQuorum | ErrorCode::Unavailable => 503,
            ErrorCode::OutcomeUnknown => 504,
        }
    }

    /// The code a bare HTTP status stands for (for answers that did not come from a
    /// Starling handler, such as a proxy's).
    pub fn from_status(status: u16) -> ErrorCode {
        match status {
            400 | 408 | 415 | 422 => ErrorCode::InvalidArgument,
            401 | 403 => ErrorCode::PermissionDenied,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            409 => ErrorCode::Conflict,
            410 => ErrorCode::Compacted,
            412 => ErrorCode::CompareFailed,
            413 => ErrorCode::TooLarge,
            503 => ErrorCode::Unavailable,
            504 => ErrorCode::OutcomeUnknown,
            _ => ErrorCode::Internal,
        }
    }

    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Compacted => "compacted",
            ErrorCode::CompareFailed => "compare_failed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::NoQuorum => "no_quorum",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer: `{"code": "not_found", "error": "no such node: x"}`, with the revision
/// the answer reflects where there is one (a missing key, a failed compare).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, thiserror::Error)]
#[error("{error}")]
pub struct ApiError {
    /// The stable code.
    pub code: ErrorCode,
    /// What happened, for people.
    pub error: String,
    /// The revision the answer reflects, when it reflects one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl std::fmt::Display) -> Self {
        ApiError {
            code,
            error: message.to_string(),
            revision: None,
        }
    }

    /// The same error, noting the revision it reflects.
    pub fn at_revision(mut self, revision: u64) -> Self {
        self.revision = Some(revision);
        self
    }

    /// The HTTP status it is sent with.
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// `invalid_argument`.
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// `not_found`.
    pub fn not_found(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// `conflict`.
    pub fn conflict(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// `unavailable`.
    pub fn unavailable(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// `internal`.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// `permission_denied`.
    pub fn permission_denied(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_lower_case_names() {
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::PermissionDenied,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Conflict,
            ErrorCode::Compacted,
            ErrorCode::CompareFailed,
            ErrorCode::TooLarge,
            ErrorCode::Internal,
            ErrorCode::NoQuorum,
            ErrorCode::Unavailable,
            ErrorCode::OutcomeUnknown,
        ] {
            let json = serde_json::to_string(&code).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            if code != ErrorCode::NoQuorum && code != ErrorCode::Internal {
                assert_eq!(
                    ErrorCode::from_status(code.status()).status(),
                    code.status()
                );
            }
        }
        let e: ApiError = serde_json::from_str(r#"{"code":"no_quorum","error":"1 of 3"}"#)
            .unwrap_or_else(|e| {
                panic!("{e}");
            });
        assert_eq!((e.code, e.status()), (ErrorCode::NoQuorum, 503));
    }
}
