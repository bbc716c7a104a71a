//! The control API server: one axum router inside one service ([`Api`]), served on the
//! node's Unix socket (`DIR/control.sock`, local callers) and, on managers, over QUIC on
//! ALPN `starling/api/1` (remote callers with an `admin` or `viewer` client certificate).
//! One file per resource; each handler takes typed input and returns
//! `Result<Json<T>, Failure>`.
//!
//! ```text
//!   UnixListener ─┐                               ┌─ info.rs     GET  /v1/info
//!                 ├─ hyper http1 ─ Api ─ Router ──┼─ nodes.rs    /v1/nodes…
//!   QUIC streams ─┘  (caller role as an           ├─ kv.rs       /v1/kv…, /v1/watch
//!   (starling/api/1)  extension; viewers          ├─ tokens.rs   /v1/join-token…
//!                     may only GET)               ├─ cluster.rs  /v1/cluster
//!                                                 ├─ members.rs  /v1/members, /v1/leave
//!                                                 └─ certs.rs    /v1/certs…
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use starling_api::{ApiError, ErrorCode, MANAGERS_HEADER};
use starling_raft_store::{Store, StoreError};
use utoipa::OpenApi;

use crate::daemon::{Current, RunningNode};

pub(crate) mod certs;
pub mod cluster;
pub(crate) mod endpoints;
pub(crate) mod info;
pub(crate) mod kv;
pub(crate) mod logs;
pub(crate) mod members;
pub(crate) mod nodes;
pub(crate) mod services;
pub(crate) mod tokens;

/// Largest request body accepted (etcd's request limit is 1.5 MiB; a value is at most
/// 1 MiB once in a command).
pub const MAX_BODY: usize = 16 << 20;

/// Time for a client to send a request's headers (and the longest a kept connection may
/// stay idle).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Time for a client to send a request's body once its headers arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is calling, from the transport the request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Through the node's own Unix socket (mode 0600: the node's user).
    Local,
    /// A remote client certificate with role `admin`.
    Admin,
    /// A remote client certificate with role `viewer`: reads only.
    Viewer,
}

/// What every handler gets: the node as it runs now (replaced on a role change).
#[derive(Clone)]
pub struct ApiState {
    current: Current,
    max_watch_wait: Duration,
    /// The `starling-managers` header, kept until the store or its membership changes
    /// (every answer carries it).
    managers_header: Arc<std::sync::Mutex<Option<ManagersHeader>>>,
}

/// A rendered `starling-managers` header and what it was rendered from: the store (its
/// address, only compared) and the log index of its membership.
struct ManagersHeader {
    store: usize,
    membership: u64,
    value: HeaderValue,
}

/// The longest a watch long poll waits for its first event, unless configured otherwise.
pub const MAX_WATCH_WAIT: Duration = Duration::from_secs(300);

/// No configuration makes a watch wait longer than this (a day).
const LONGEST_WATCH_WAIT: Duration = Duration::from_secs(86_400);

impl ApiState {
    /// The state for `current`.
    pub fn new(current: Current) -> Self {
        ApiState {
            current,
            max_watch_wait: MAX_WATCH_WAIT,
            managers_header: Arc::default(),
        }
    }

    /// Caps how long a watch long poll waits (default [`MAX_WATCH_WAIT`]): a proxy with a
    /// shorter idle timeout between the client and the node needs a smaller cap.
    pub fn with_max_watch_wait(mut self, cap: Duration) -> Self {
        self.max_watch_wait = cap.min(LONGEST_WATCH_WAIT);
        self
    }

    /// The cap on a watch's wait.
    pub(crate) fn max_watch_wait(&self) -> Duration {
        self.max_watch_wait
    }

    /// The node now.
    pub(crate) fn node(&self) -> Arc<RunningNode> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// An error answer: an [`ApiError`] sent as JSON with its status.
#[derive(Debug)]
pub struct Failure(pub ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(store_error(&e))
    }
}

/// The API error for a store error: its code follows the variant, never the text.
pub fn store_error(e: &StoreError) -> ApiError {
    let code = match e {
        StoreError::NoQuorum { .. } => ErrorCode::NoQuorum,
        StoreError::Unknown(_) => ErrorCode::OutcomeUnknown,
        StoreError::Compacted { .. } => ErrorCode::Compacted,
        StoreError::TooLarge { .. } => ErrorCode::TooLarge,
        StoreError::NotLeader { .. }
        | StoreError::Raft(_)
        | StoreError::MembershipChangeInProgress
        | StoreError::Stopped(_)
        | StoreError::Lagging { .. } => ErrorCode::Unavailable,
        StoreError::Storage(_) | StoreError::Config(_) => ErrorCode::Internal,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, e)
}

/// The API error for a failed write: an error that may come after the command reached the
/// leader is `outcome_unknown`, never `unavailable` (which promises nothing changed, so a
/// client may send the write elsewhere).
pub fn write_error(e: StoreError) -> Failure {
    match e {
        StoreError::Raft(_) => Failure(ApiError::new(ErrorCode::OutcomeUnknown, e)),
        e => Failure(store_error(&e)),
    }
}

/// A handler's answer.
pub type Answer<T> = Result<Json<T>, Failure>;

/// The store, on a manager; workers serve only info, members and leave.
pub(crate) fn store_of(node: &RunningNode) -> Result<Arc<Store>, Failure> {
    node.store.clone().ok_or_else(|| {
        Failure(ApiError::unavailable(
            "this node is a worker: run this command against a manager's data directory or context",
        ))
    })
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Starling control API",
        description = "HTTP/JSON on a node's Unix socket (DIR/control.sock) and, on managers, over QUIC (ALPN starling/api/1) for client certificates with role admin or viewer. Every error is an ApiError with a stable code.",
        license(name = "Apache-2.0"),
    ),
    paths(
        info::info,
        info::openapi_json,
        nodes::list,
        nodes::inspect,
        nodes::remove,
        nodes::promote,
        nodes::demote,
        nodes::availability,
        nodes::labels,
        services::list,
        services::inspect,
        services::create,
        services::update,
        services::scale,
        services::rollback,
        services::remove,
        services::tasks,
        logs::service_logs,
        endpoints::endpoints,
        logs::task_logs,
        kv::get,
        kv::put,
        kv::delete,
        kv::list,
        kv::watch,
        members::members,
        members::leave,
        tokens::show,
        tokens::rotate,
        cluster::inspect,
        cluster::update,
        cluster::rotate_ca,
        certs::issue,
        certs::list,
        certs::revoke,
    ),
    components(schemas(ApiError, ErrorCode))
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what `GET /v1/openapi.json` serves and
/// `crates/api/openapi.json` holds).
pub fn openapi_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

/// The control API for `state`.
pub fn router(state: ApiState) -> Api {
    let router = Router::new()
        .route("/v1/info", get(info::info))
        .route("/v1/openapi.json", get(info::openapi_json))
        .route("/v1/nodes", get(nodes::list))
        .route("/v1/nodes/{id}", get(nodes::inspect).delete(nodes::remove))
        .route("/v1/nodes/{id}/promote", post(nodes::promote))
        .route("/v1/nodes/{id}/demote", post(nodes::demote))
        .route("/v1/nodes/{id}/availability", put(nodes::availability))
        .route("/v1/nodes/{id}/labels", put(nodes::labels))
        .route("/v1/services", get(services::list).post(services::create))
        .route(
            "/v1/services/{id}",
            get(services::inspect)
                .put(services::update)
                .delete(services::remove),
        )
        .route("/v1/services/{id}/scale", post(services::scale))
        .route("/v1/services/{id}/rollback", post(services::rollback))
        .route("/v1/services/{id}/logs", get(logs::service_logs))
        .route("/v1/services/{id}/endpoints", get(endpoints::endpoints))
        .route("/v1/tasks", get(services::tasks))
        .route("/v1/tasks/{id}/logs", get(logs::task_logs))
        .route("/v1/kv", get(kv::list))
        .route(
            "/v1/kv/{*key}",
            get(kv::get).put(kv::put).delete(kv::delete),
        )
        .route("/v1/watch", get(kv::watch))
        .route("/v1/members", get(members::members))
        .route("/v1/leave", post(members::leave))
        .route("/v1/join-token/{role}", get(tokens::show))
        .route("/v1/join-token/{role}/rotate", post(tokens::rotate))
        .route("/v1/cluster", get(cluster::inspect).patch(cluster::update))
        .route("/v1/cluster/ca/rotate", post(cluster::rotate_ca))
        .route("/v1/certs", get(certs::list).post(certs::issue))
        .route("/v1/certs/{name}", axum::routing::delete(certs::revoke))
        .fallback(not_found)
        .with_state(state.clone());
    Api::new(router, Some(state))
}

/// The control API as one service: the routes, and around them what every request goes
/// through. Outermost first: the body limit ([`MAX_BODY`]) and the body timeout
/// ([`BODY_TIMEOUT`]); a viewer's write refused; a handler that panics (a bug) answers
/// `internal` while the node and its other requests go on; error answers that are not JSON
/// yet (axum's rejections, timeouts, limits) become typed [`ApiError`]s; on a manager,
/// every answer lists the managers.
///
/// These are written as one service with one boxed future per request, not as layers:
/// each `axum::middleware::from_fn` layer clones and boxes the service under it and boxes
/// two futures per request, and `Router::layer` wraps every route in every layer.
#[derive(Clone)]
pub struct Api {
    stack:
        <DefaultBodyLimit as tower::Layer<tower_http::timeout::RequestBodyTimeout<Typed>>>::Service,
}

impl Api {
    /// `routes` with the API's handling around them; with the node's `state`, every answer
    /// lists the managers (on a manager) and reads and writes of keys are answered without
    /// the router ([`kv::KeyCall`]).
    fn new(routes: Router, state: Option<ApiState>) -> Self {
        use tower::Layer as _;
        let typed = Typed { routes, state };
        let timed = tower_http::timeout::RequestBodyTimeout::new(typed, BODY_TIMEOUT);
        Api {
            stack: DefaultBodyLimit::max(MAX_BODY).layer(timed),
        }
    }
}

impl<B> tower::Service<Request<B>> for Api
where
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.stack.call(req)
    }
}

/// The API's handling inside the body limit and timeout (see [`Api`]).
#[derive(Clone)]
struct Typed {
    routes: Router,
    state: Option<ApiState>,
}

impl<B> tower::Service<Request<B>> for Typed
where
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        use futures::FutureExt as _;
        use std::panic::AssertUnwindSafe;
        // Each future below is made inside the one boxed future, not before it and moved in:
        // a future moved into an `async` block is held twice there (as what the block
        // captured and as what it awaits), and the box is allocated and copied at its full
        // size on every request — 21 KB per key write when the answer was made outside.
        let req = req.map(axum::body::Body::new);
        let state = self.state.clone();
        if let Some(refusal) = refused(&req).or_else(|| over_limit(&req)) {
            return Box::pin(async move {
                drain(req.into_body()).await;
                Ok(finish(state.as_ref(), refusal).await)
            });
        }
        let key_call = state
            .as_ref()
            .and_then(|_| kv::KeyCall::of(req.method(), req.uri()));
        match (key_call, state) {
            (Some(call), Some(state)) => Box::pin(answer_key(state, call, req)),
            (_, state) => {
                // The router's future is boxed by the router; only its call is guarded here
                // (a handler may panic as it is called or as its future runs).
                let routes = &mut self.routes;
                let called = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    tower::Service::call(routes, req)
                }));
                Box::pin(async move {
                    let answer = match called {
                        Ok(future) => AssertUnwindSafe(future)
                            .catch_unwind()
                            .await
                            .map(|routed| routed.unwrap_or_else(|never| match never {}))
                            .unwrap_or_else(panicked),
                        Err(cause) => panicked(cause),
                    };
                    Ok(finish(state.as_ref(), answer).await)
                })
            }
        }
    }
}

/// A read or write of one key answered without the router ([`kv::KeyCall`]), guarded as a
/// routed request is.
async fn answer_key(
    state: ApiState,
    call: kv::KeyCall,
    req: Request,
) -> Result<Response, std::convert::Infallible> {
    use futures::FutureExt as _;
    let answer = std::panic::AssertUnwindSafe(call.answer(state.clone(), req))
        .catch_unwind()
        .await
        .unwrap_or_else(panicked);
    Ok(finish(Some(&state), answer).await)
}

/// What every answer goes through last: an error that is not JSON yet made a typed
/// [`ApiError`]; on a manager, the managers listed.
async fn finish(state: Option<&ApiState>, resp: Response) -> Response {
    let resp = typed_error(resp).await;
    match state {
        Some(state) => with_managers(state, resp),
        None => resp,
    }
}

fn panicked(cause: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = cause
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| cause.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned());
    tracing::error!(panic = %what, "an API handler panicked");
    Failure(ApiError::internal(format!(
        "the request failed inside the node (a bug: {what}); it was not carried out or its outcome is unknown"
    )))
    .into_response()
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Failure {
    Failure(ApiError::not_found(format!(
        "no such endpoint: {method} {}",
        uri.path()
    )))
}

/// The refusal of a request whose declared body is over [`MAX_BODY`], before reading it.
/// (A body without a length is cut at the limit as it is read: the extractors' limit.)
fn over_limit(req: &Request) -> Option<Response> {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    (declared > MAX_BODY as u64).then(|| {
        Failure(ApiError::new(
            ErrorCode::TooLarge,
            format!("the request body of {declared} bytes is over the limit of {MAX_BODY} bytes"),
        ))
        .into_response()
    })
}

/// Most of a body [`drain`] reads before it gives up: past it, the connection is closed
/// under the sender.
const DRAIN_MAX: usize = 4 * MAX_BODY;

/// Reads and drops a request's body (up to [`DRAIN_MAX`] bytes, each part within the body
/// timeout) before answering without it. A client still writing its body when the answer
/// comes would otherwise have the connection closed under its write (a broken pipe, or
/// QUIC's STOP_SENDING) and lose the answer; drained, it reads the answer and keeps the
/// connection.
async fn drain(mut body: axum::body::Body) {
    use http_body_util::BodyExt as _;
    let mut read = 0;
    while read <= DRAIN_MAX {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            Some(Err(_)) | None => return,
        }
    }
}

/// A viewer may only read, and not the join tokens (a manager token is the keys to the
/// cluster): the refusal of a viewer's other requests. A request without a caller marker
/// is treated as a viewer's.
fn refused(req: &Request) -> Option<Response> {
    let caller = req
        .extensions()
        .get::<Caller>()
        .copied()
        .unwrap_or(Caller::Viewer);
    if caller != Caller::Viewer {
        return None;
    }
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    let secret = req.uri().path().starts_with("/v1/join-token");
    if read && !secret {
        return None;
    }
    Some(
        Failure(ApiError::permission_denied(format!(
            "a viewer certificate may only read, and not join tokens: {} {} needs an admin certificate",
            req.method(),
            req.uri().path()
        )))
        .into_response(),
    )
}

/// Answers that did not come from a handler (a malformed query, a body over the limit, a
/// wrong method) become [`ApiError`]s too, so every error carries a code.
async fn typed_error(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let code = ErrorCode::from_status(status.as_u16());
    let (_, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_else(|_| Bytes::from_static(b"request failed"));
    let mut message = String::from_utf8_lossy(&text).trim().to_owned();
    if message.is_empty() {
        message = status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase();
    }
    let status = StatusCode::from_u16(code.status()).unwrap_or(status);
    (status, Json(ApiError::new(code, message))).into_response()
}

/// Every answer of a manager lists the managers, so remote clients learn the current set.
fn with_managers(state: &ApiState, mut resp: Response) -> Response {
    if let Some(store) = &state.node().store {
        let key = (Arc::as_ptr(store) as usize, store.membership_index());
        let mut cache = state
            .managers_header
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let value = match cache.as_ref() {
            Some(h) if (h.store, h.membership) == key => Some(h.value.clone()),
            _ => {
                let list: Vec<String> = store
                    .managers()
                    .iter()
                    .map(|(_, n)| format!("{}@{}", n.name, n.addr))
                    .collect();
                let value = HeaderValue::from_str(&list.join(",")).ok();
                *cache = value.clone().map(|value| ManagersHeader {
                    store: key.0,
                    membership: key.1,
                    value,
                });
                value
            }
        };
        drop(cache);
        if let Some(v) = value {
            resp.headers_mut().insert(MANAGERS_HEADER, v);
        }
    }
    resp
}

/// Serves `service` on one byte stream (a Unix connection, a QUIC stream, a TCP
/// connection) with HTTP/1.1: keep-alive, headers within [`HEADER_TIMEOUT`].
pub async fn serve_io<IO, S>(io: IO, service: S)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(error = %e, "control connection ended");
    }
}

/// The API as one caller's connection sees it: the caller's role put on every request
/// and, for a remote client, its revocation checked first.
#[derive(Clone)]
struct CallerService {
    api: Api,
    caller: Caller,
    /// The remote client, whose revocation is checked before each of its requests.
    client: Option<ApiClient>,
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for CallerService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<
        std::future::Ready<Result<Response, std::convert::Infallible>>,
        futures::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>,
    >;

    fn call(&self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        if self.client.as_ref().is_some_and(ApiClient::revoked) {
            let refused = Failure(ApiError::permission_denied(
                "this client certificate is revoked".to_string(),
            ));
            return futures::future::Either::Left(std::future::ready(Ok(refused.into_response())));
        }
        req.extensions_mut().insert(self.caller);
        // `Api` is always ready (its `poll_ready` answers at once).
        futures::future::Either::Right(tower::Service::call(&mut self.api.clone(), req))
    }
}

/// Binds the control socket at `path` (mode 0600), replacing a stale one.
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves local callers on the control socket until the task is aborted.
pub async fn serve_unix(listener: tokio::net::UnixListener, api: Api) {
    let service = CallerService {
        api,
        caller: Caller::Local,
        client: None,
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_io(stream, service.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The remote API protocol as a manager serves it: client certificates of role `admin` or
/// `viewer` only (node certificates are refused at admission).
pub fn api_server_protocol() -> Result<starling_transport::Protocol, starling_transport::ConfigError>
{
    starling_transport::Protocol::new(
        starling_api::API_ALPN,
        starling_transport::PeerPolicy::roles([
            starling_transport::Role::new("admin").map_err(config_error)?,
            starling_transport::Role::new("viewer").map_err(config_error)?,
        ]),
    )
}

fn config_error(e: starling_transport::IdentityError) -> starling_transport::ConfigError {
    starling_transport::ConfigError {
        field: "role",
        why: e.to_string(),
    }
}

/// Serves remote callers: every admitted connection's streams, each an HTTP/1.1
/// connection with keep-alive (a client keeps one stream for its calls in turn). Every
/// request is checked against the revoked set in `store` first, so a client revoked while
/// its connection is open is shut out at its next request and its connection closed.
pub async fn serve_quic(mut listener: starling_transport::Listener, api: Api, store: Arc<Store>) {
    while let Some(conn) = listener.accept().await {
        let Some(peer) = conn.peer().cloned() else {
            conn.close(
                starling_transport::CloseCode::ROLE_FORBIDDEN,
                "not an api client",
            );
            continue;
        };
        let caller = match peer.role.as_str() {
            "admin" => Caller::Admin,
            "viewer" => Caller::Viewer,
            _ => {
                conn.close(
                    starling_transport::CloseCode::ROLE_FORBIDDEN,
                    "not an api client",
                );
                continue;
            }
        };
        let service = CallerService {
            api: api.clone(),
            caller,
            client: Some(ApiClient {
                id: peer.node_id.as_str().to_owned(),
                store: store.clone(),
                conn: conn.clone(),
            }),
        };
        tokio::spawn(async move {
            // Revocation is checked per request (`CallerService`), which closes the
            // connection and so ends this loop.
            while let Ok(stream) = conn.accept_stream().await {
                tokio::spawn(serve_io(stream, service.clone()));
            }
        });
    }
}

/// A remote caller's identity and connection, to shut it out once revoked.
#[derive(Clone)]
struct ApiClient {
    id: String,
    store: Arc<Store>,
    conn: starling_transport::Connection,
}

impl ApiClient {
    /// Whether the client's certificate is revoked; if so its connection is closed.
    fn revoked(&self) -> bool {
        let (revoked, _) = self.store.read_applied(|s| s.is_revoked(&self.id));
        if revoked {
            tracing::info!(client = %self.id, "revoked api client: closing its connection");
            self.conn
                .close(starling_transport::CloseCode::REVOKED, "revoked");
        }
        revoked
    }
}

/// The metrics endpoint's router: Prometheus text on any path.
pub fn metrics_router(state: ApiState) -> Router {
    async fn metrics(State(state): State<ApiState>) -> Response {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            crate::metrics::render(&state.node()),
        )
            .into_response()
    }
    Router::new()
        .fallback(get(metrics))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// Serves the metrics router on TCP.
pub async fn serve_tcp(listener: tokio::net::TcpListener, router: Router) {
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_io(stream, TowerToHyperService::new(router.clone())));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_internal_and_the_router_goes_on() {
        use tower::ServiceExt;
        let app = Api::new(
            Router::new()
                .route("/boom", get(|| async { panic!("kaboom") as &'static str }))
                .route("/fine", get(|| async { "fine" })),
            None,
        );
        let get = |path: &str| {
            axum::http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let resp = app.clone().oneshot(get("/boom")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let e: ApiError = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.error.contains("kaboom"), "{}", e.error);
        let resp = app.oneshot(get("/fine")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    /// An answer given before the body is read — over the limit by its declared length, or
    /// a viewer's write — reaches a client still sending that body, and the connection
    /// takes the next request (the body was drained, not left unread under the sender).
    #[tokio::test]
    async fn an_answer_before_the_body_reaches_a_client_still_sending_it() {
        use http_body_util::{BodyExt as _, Full};
        for (caller, size, status, code) in [
            (
                Caller::Local,
                MAX_BODY + (1 << 20),
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
            ),
            (
                Caller::Viewer,
                4 << 20,
                StatusCode::FORBIDDEN,
                ErrorCode::PermissionDenied,
            ),
        ] {
            let api = Api::new(
                Router::new()
                    .route("/sink", put(|b: Bytes| async move { b.len().to_string() }))
                    .route("/fine", get(|| async { "fine" })),
                None,
            );
            let (server, client) = tokio::net::UnixStream::pair().unwrap();
            let served = tokio::spawn(serve_io(
                server,
                CallerService {
                    api,
                    caller,
                    client: None,
                },
            ));
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = axum::http::Request::put("/sink")
                .header(axum::http::header::CONTENT_LENGTH, size)
                .body(Full::new(Bytes::from(vec![7u8; size])))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), status, "{caller:?}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let e: ApiError = serde_json::from_slice(&body).unwrap();
            assert_eq!(e.code, code, "{}", e.error);
            send.ready().await.unwrap();
            let req = axum::http::Request::get("/fine")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{caller:?}");
            drop(send);
            served.await.unwrap();
        }
    }

    /// The future boxed for each request holds what it awaits once: a future moved into an
    /// `async` block before it is awaited is held twice there, and nested twice, four times
    /// (21 KB per key write, allocated and copied on every request, before this was tested).
    #[test]
    fn the_future_boxed_per_request_holds_its_answer_once() {
        fn returned<F, A, B, C, R>(_: F) -> usize
        where
            F: Fn(A, B, C) -> R,
        {
            std::mem::size_of::<R>()
        }
        let answer = returned(kv::KeyCall::answer);
        let boxed = returned(answer_key);
        assert!(answer > 1024, "a key call's answer is {answer} bytes");
        assert!(
            boxed <= answer + 512,
            "a key call's boxed future is {boxed} bytes for an answer of {answer}"
        );
        // A routed request: the router boxes its route's future; the box around it is small.
        let mut api = Api::new(Router::new(), None);
        let req = axum::http::Request::get("/v1/anything")
            .body(axum::body::Body::empty())
            .unwrap();
        let routed = tower::Service::call(&mut api, req);
        let size = std::mem::size_of_val(&*routed);
        assert!(
            size <= 2048,
            "a routed request's boxed future is {size} bytes"
        );
    }

    #[tokio::test]
    async fn a_viewer_may_only_read_and_every_error_is_typed() {
        use tower::ServiceExt;
        let app = Api::new(
            Router::new()
                .route(
                    "/v1/thing",
                    get(|| async { "read" }).put(|| async { "written" }),
                )
                .route("/v1/join-token/{role}", get(|| async { "secret" })),
            None,
        );
        let call = |method: Method, path: &str, caller: Option<Caller>| {
            let mut req = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .body(axum::body::Body::empty())
                .unwrap();
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            app.clone().oneshot(req)
        };
        let error = |resp: Response| async move {
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            let e: ApiError = serde_json::from_slice(&body).unwrap();
            (status, e.code)
        };
        // No caller marker counts as a viewer's request.
        for caller in [Some(Caller::Viewer), None] {
            let resp = call(Method::GET, "/v1/thing", caller).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let resp = call(Method::PUT, "/v1/thing", caller).await.unwrap();
            assert_eq!(
                error(resp).await,
                (StatusCode::FORBIDDEN, ErrorCode::PermissionDenied)
            );
            let resp = call(Method::GET, "/v1/join-token/worker", caller)
                .await
                .unwrap();
            assert_eq!(
                error(resp).await,
                (StatusCode::FORBIDDEN, ErrorCode::PermissionDenied)
            );
        }
        for caller in [Caller::Admin, Caller::Local] {
            let resp = call(Method::PUT, "/v1/thing", Some(caller)).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let resp = call(Method::GET, "/v1/join-token/worker", Some(caller))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        // axum's own answer to a wrong method is plain text: it comes out an ApiError.
        let resp = call(Method::POST, "/v1/thing", Some(Caller::Admin))
            .await
            .unwrap();
        let (status, code) = error(resp).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(code, ErrorCode::MethodNotAllowed);
    }

    #[test]
    fn store_errors_map_to_codes_by_variant() {
        let cases = [
            (
                StoreError::NoQuorum {
                    reachable: 1,
                    voters: 3,
                    needed: 2,
                    waited: Duration::from_secs(1),
                },
                ErrorCode::NoQuorum,
            ),
            (
                StoreError::Unknown("lost".into()),
                ErrorCode::OutcomeUnknown,
            ),
            (
                StoreError::Compacted {
                    requested: 1,
                    oldest: 5,
                },
                ErrorCode::Compacted,
            ),
            (
                StoreError::TooLarge { size: 2, max: 1 },
                ErrorCode::TooLarge,
            ),
            (
                StoreError::NotLeader { leader: None },
                ErrorCode::Unavailable,
            ),
            (
                StoreError::MembershipChangeInProgress,
                ErrorCode::Unavailable,
            ),
            (StoreError::Raft("stopped".into()), ErrorCode::Unavailable),
            (
                StoreError::Stopped("disk full".into()),
                ErrorCode::Unavailable,
            ),
            (StoreError::Lagging { index: 7 }, ErrorCode::Unavailable),
            (
                StoreError::Storage(std::io::Error::other("disk")),
                ErrorCode::Internal,
            ),
            (StoreError::Config("bad".into()), ErrorCode::Internal),
        ];
        for (e, code) in cases {
            let api = store_error(&e);
            assert_eq!(api.code, code, "{e}");
            assert_eq!(api.error, e.to_string());
        }
    }
}
