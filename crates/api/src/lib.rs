//! Starling's control API: the request and response types of every operation, one error
//! type with stable codes, and the typed [`Client`] the CLI, the tests and the bench use.
//!
//! ```text
//!   starling CLI, tests/, bench/ ──▶ Client ──HTTP/1.1 + JSON──▶ DIR/control.sock   (local)
//!                                          └─HTTP/1.1 over QUIC──▶ manager:port   (remote,
//!                                             ALPN starling/api/1, keep-alive per stream,
//!                                             client certificate admin|viewer, Context)
//!   node (axum router, one handler file per resource) ◀─ the same types, both ways
//! ```
//!
//! Every error answer is an [`ApiError`] — `{"code": "...", "error": "..."}` — whose
//! [`ErrorCode`] maps to one HTTP status; clients branch on the code, never on the text.
//! Enum values travel as lower-case names; byte values as base64 beside their text.
//!
//! ```
//! use starling_api::{ApiError, ErrorCode};
//!
//! let e: ApiError = serde_json::from_str(r#"{"code":"no_quorum","error":"1 of 3 managers reachable"}"#)?;
//! assert_eq!((e.code, e.status()), (ErrorCode::NoQuorum, 503));
//! # Ok::<(), serde_json::Error>(())
//! ```

mod client;
mod context;
pub mod dispatch;
mod error;
pub mod logs;
mod services;
mod types;

pub use client::{
    API_ALPN, Client, ClientError, LogsQuery, MANAGERS_HEADER, RawResponse, RecordReader,
    percent_encode,
};
pub use context::{Context, ContextError, ContextMeta, Registry, check_name};
pub use error::{ApiError, ErrorCode};
pub use logs::{LogRecord, LogStream};
pub use services::*;
pub use types::*;

/// The `http` crate the client speaks (for [`Client::raw`]'s method).
pub use http;

/// Milliseconds since the Unix epoch on this machine's clock (the unit of every timestamp the
/// API, the state and the dispatcher carry).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The Starling version of this build (`node ls` shows each node's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
