//! The typed client: every operation of the API as a method, over the node's Unix socket or
//! over QUIC (`starling/api/1`) to the managers of a [`Context`](crate::Context).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use starling_transport::{
    Connection, Endpoint, EndpointConfig, NodeCredentials, NodeId, PeerPolicy, Protocol, Role,
    ring_provider,
};

use crate::services::{LabelChange, ScaleRequest, ServiceList, ServiceSpec, ServiceView, TaskList};
use crate::types::*;
use crate::{ApiError, ErrorCode};

/// The ALPN of the remote API.
pub const API_ALPN: &[u8] = b"starling/api/1";

/// The response header in which a manager lists the managers (`id@addr,id@addr`), so a
/// remote client learns the current set from every answer.
pub const MANAGERS_HEADER: &str = "starling-managers";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The request was never sent (no node reachable, socket missing): it had no effect and
    /// may be retried.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The request may have been delivered but no answer came: a write may or may not have
    /// been applied.
    #[error("no answer: {0}")]
    NoAnswer(String),
    /// The node answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The answer could not be read.
    #[error("unreadable answer: {0}")]
    BadAnswer(String),
}

impl ClientError {
    /// The API error code, if the node answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A raw answer: status, body, and the managers the node listed.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Bytes,
}

/// The typed API client.
///
/// A client runs one call at a time over its one connection (a Unix connection kept open, or
/// one QUIC connection to the manager in use): give each concurrent caller its own client,
/// as the bench does with one per simulated client. Over QUIC, a cached connection to a
/// manager that died is noticed by QUIC's idle timeout (30 s); a fresh client (a new CLI
/// command) dials afresh.
pub struct Client {
    via: Via,
}

enum Via {
    Unix {
        path: PathBuf,
        conn: tokio::sync::Mutex<Option<Kept>>,
    },
    Remote(Remote),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.via {
            Via::Unix { path, .. } => write!(f, "Client(unix {})", path.display()),
            Via::Remote(r) => write!(f, "Client(remote {:?})", r.managers()),
        }
    }
}

/// Percent-encodes a path segment or query value (unreserved characters stay as they are).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// A client of the node whose control socket is `path` (`DIR/control.sock`). One
    /// connection is kept open and reused between calls (up to 20 s apart).
    pub fn unix(path: impl Into<PathBuf>) -> Client {
        Client {
            via: Via::Unix {
                path: path.into(),
                conn: tokio::sync::Mutex::new(None),
            },
        }
    }

    /// A client of the cluster's managers over QUIC, with a client certificate.
    /// Managers are tried in a random order, each dial bounded by `dial_timeout`; a
    /// manager that cannot be reached or answers `unavailable` is skipped. Reads are
    /// retried on the next manager; a write that may have been delivered is not.
    pub fn remote(
        credentials: NodeCredentials,
        managers: Vec<ManagerAddr>,
        dial_timeout: Duration,
    ) -> Result<Client, ClientError> {
        let endpoint = Remote::bind(credentials, &managers, dial_timeout)?;
        Ok(Client {
            via: Via::Remote(Remote::new(endpoint, managers, dial_timeout)?),
        })
    }

    /// A client of the cluster's managers over QUIC through `endpoint`, an endpoint already
    /// bound with a client certificate (of the managers' address family). Like
    /// [`Client::remote`], each client keeps its own connection and serves one call at a
    /// time; unlike it, clients made on one endpoint share its UDP socket, so a process
    /// running many clients at once reads their datagrams in batches instead of one
    /// socket per client. The endpoint stays open while any of its clients or clones live.
    ///
    /// ```no_run
    /// # async fn f(creds: starling_transport::NodeCredentials,
    /// #            managers: Vec<starling_api::ManagerAddr>) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use starling_transport::{Endpoint, EndpointConfig, ring_provider};
    ///
    /// let cfg = EndpointConfig { listen: "0.0.0.0:0".parse()?, ..EndpointConfig::default() };
    /// let endpoint = Endpoint::bind(cfg, ring_provider(), Some(creds))?;
    /// let clients: Vec<starling_api::Client> = (0..16)
    ///     .map(|_| starling_api::Client::remote_on(&endpoint, managers.clone(), Duration::from_secs(5)))
    ///     .collect::<Result<_, _>>()?;
    /// # Ok(()) }
    /// ```
    pub fn remote_on(
        endpoint: &Endpoint,
        managers: Vec<ManagerAddr>,
        dial_timeout: Duration,
    ) -> Result<Client, ClientError> {
        if endpoint.identity().is_none() {
            return Err(ClientError::NotSent(
                "the endpoint has no client certificate".into(),
            ));
        }
        Ok(Client {
            via: Via::Remote(Remote::new(endpoint.clone(), managers, dial_timeout)?),
        })
    }

    /// The managers a remote client knows now (updated from every answer); empty for a
    /// Unix-socket client.
    pub fn managers(&self) -> Vec<ManagerAddr> {
        match &self.via {
            Via::Unix { .. } => Vec::new(),
            Via::Remote(r) => r.managers(),
        }
    }

    /// One request, answered with its status and body whatever the status.
    pub async fn raw(
        &self,
        method: Method,
        target: &str,
        body: Bytes,
    ) -> Result<RawResponse, ClientError> {
        self.send(method, target, body, OCTETS).await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        target: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let r = self.send(method, target, body, OCTETS).await?;
        decode(r)
    }

    async fn json_body<T: DeserializeOwned>(
        &self,
        method: Method,
        target: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let r = self.send(method, target, body, JSON).await?;
        decode(r)
    }

    async fn send(
        &self,
        method: Method,
        target: &str,
        body: Bytes,
        content_type: &'static str,
    ) -> Result<RawResponse, ClientError> {
        let req = Outgoing {
            method,
            target,
            body,
            content_type,
        };
        match &self.via {
            Via::Unix { path, conn } => unix_call(path, conn, req).await,
            Via::Remote(r) => match r.call(req, false).await? {
                Got::Full(raw) => Ok(raw),
                Got::Open(..) => Err(ClientError::BadAnswer("an unexpected stream".into())),
            },
        }
    }

    /// A GET whose answer is a stream of NDJSON records (logs): an error answer comes back
    /// as the error, a success as a reader of the records.
    async fn open_stream(&self, target: &str) -> Result<RecordReader, ClientError> {
        let out = Outgoing {
            method: Method::GET,
            target,
            body: Bytes::new(),
            content_type: OCTETS,
        };
        let body = match &self.via {
            Via::Unix { path, .. } => {
                // Its own connection: the kept one stays free for other calls. The sender is
                // dropped at once; hyper's connection task still reads this answer to its end.
                let (_, resp) = send_kept(None, out.build()?, || unix_stream(path))
                    .await
                    .map_err(ClientError::from)?;
                if !resp.status().is_success() {
                    let (raw, _) = read_answer(resp).await?;
                    return Err(decode::<serde_json::Value>(raw).err().unwrap_or_else(|| {
                        ClientError::BadAnswer("an error without a body".into())
                    }));
                }
                resp.into_body()
            }
            Via::Remote(r) => match r.call(out, true).await? {
                Got::Open(body) => body,
                Got::Full(raw) => {
                    return Err(decode::<serde_json::Value>(raw)
                        .err()
                        .unwrap_or_else(|| ClientError::BadAnswer("no stream".into())));
                }
            },
        };
        Ok(RecordReader {
            body,
            buf: Vec::new(),
            done: false,
        })
    }

    /// `GET /v1/services/{name}/endpoints`: the service's endpoints as the answering node's
    /// gossip state has them; with `index` (from an earlier answer), waits up to `wait_s`
    /// seconds for the list to change.
    pub async fn service_endpoints(
        &self,
        name: &str,
        passing: bool,
        index: Option<u64>,
        wait_s: Option<u64>,
    ) -> Result<EndpointList, ClientError> {
        let mut target = format!(
            "/v1/services/{}/endpoints?passing={passing}",
            percent_encode(name)
        );
        if let Some(i) = index {
            target.push_str(&format!("&index={i}"));
        }
        if let Some(w) = wait_s {
            target.push_str(&format!("&wait={w}"));
        }
        self.get(&target).await
    }

    /// `GET /v1/services/{id}/logs`: a service's logs as a stream of records.
    pub async fn service_logs(&self, id: &str, q: &LogsQuery) -> Result<RecordReader, ClientError> {
        let target = format!("/v1/services/{}/logs{}", percent_encode(id), q.query());
        self.open_stream(&target).await
    }

    /// `GET /v1/tasks/{id}/logs`: one task's logs as a stream of records.
    pub async fn task_logs(&self, id: &str, q: &LogsQuery) -> Result<RecordReader, ClientError> {
        let target = format!("/v1/tasks/{}/logs{}", percent_encode(id), q.query());
        self.open_stream(&target).await
    }

    async fn get<T: DeserializeOwned>(&self, target: &str) -> Result<T, ClientError> {
        self.json(Method::GET, target, Bytes::new()).await
    }

    /// `GET /v1/info`.
    pub async fn info(&self) -> Result<Info, ClientError> {
        self.get("/v1/info").await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<NodeList, ClientError> {
        self.get("/v1/nodes").await
    }

    /// `GET /v1/nodes/{id}`.
    pub async fn node(&self, id: &str) -> Result<NodeDetail, ClientError> {
        self.get(&format!("/v1/nodes/{}", percent_encode(id))).await
    }

    /// `POST /v1/nodes/{id}/promote`.
    pub async fn promote(&self, id: &str) -> Result<Promoted, ClientError> {
        let target = format!("/v1/nodes/{}/promote", percent_encode(id));
        self.json(Method::POST, &target, Bytes::new()).await
    }

    /// `POST /v1/nodes/{id}/demote`.
    pub async fn demote(&self, id: &str) -> Result<Demoted, ClientError> {
        let target = format!("/v1/nodes/{}/demote", percent_encode(id));
        self.json(Method::POST, &target, Bytes::new()).await
    }

    /// `PUT /v1/nodes/{id}/availability`.
    pub async fn set_availability(
        &self,
        id: &str,
        availability: Availability,
    ) -> Result<Written, ClientError> {
        let target = format!("/v1/nodes/{}/availability", percent_encode(id));
        let body = to_json(&AvailabilityUpdate { availability })?;
        self.json_body(Method::PUT, &target, body).await
    }

    /// `DELETE /v1/nodes/{id}[?force=true]`.
    pub async fn remove_node(&self, id: &str, force: bool) -> Result<Written, ClientError> {
        let target = format!("/v1/nodes/{}?force={force}", percent_encode(id));
        self.json(Method::DELETE, &target, Bytes::new()).await
    }

    /// `GET /v1/services`.
    pub async fn services(&self) -> Result<ServiceList, ClientError> {
        self.get("/v1/services").await
    }

    /// `GET /v1/services/{id}` (an id, an id prefix or a name).
    pub async fn service(&self, id: &str) -> Result<ServiceView, ClientError> {
        self.get(&format!("/v1/services/{}", percent_encode(id)))
            .await
    }

    /// `POST /v1/services`.
    pub async fn create_service(&self, spec: &ServiceSpec) -> Result<ServiceView, ClientError> {
        self.create_service_with(spec, true).await
    }

    /// `POST /v1/services[?resolve_program=false]`: `resolve_program` false skips the
    /// manager's check that the program exists (for a program only the workers have).
    pub async fn create_service_with(
        &self,
        spec: &ServiceSpec,
        resolve_program: bool,
    ) -> Result<ServiceView, ClientError> {
        let target = if resolve_program {
            "/v1/services"
        } else {
            "/v1/services?resolve_program=false"
        };
        self.json_body(Method::POST, target, to_json(spec)?).await
    }

    /// `PUT /v1/services/{id}[?version=N]`: replaces the spec (`version`: only if the
    /// service is still at that version).
    pub async fn update_service(
        &self,
        id: &str,
        spec: &ServiceSpec,
        version: Option<u64>,
    ) -> Result<ServiceView, ClientError> {
        let mut target = format!("/v1/services/{}", percent_encode(id));
        if let Some(v) = version {
            target.push_str(&format!("?version={v}"));
        }
        self.json_body(Method::PUT, &target, to_json(spec)?).await
    }

    /// `POST /v1/services/{id}/scale`.
    pub async fn scale_service(&self, id: &str, replicas: u32) -> Result<ServiceView, ClientError> {
        let target = format!("/v1/services/{}/scale", percent_encode(id));
        self.json_body(Method::POST, &target, to_json(&ScaleRequest { replicas })?)
            .await
    }

    /// `POST /v1/services/{id}/rollback`: back to the previous spec.
    pub async fn rollback_service(&self, id: &str) -> Result<ServiceView, ClientError> {
        let target = format!("/v1/services/{}/rollback", percent_encode(id));
        self.json_body(Method::POST, &target, bytes::Bytes::new())
            .await
    }

    /// `DELETE /v1/services/{id}`.
    pub async fn remove_service(&self, id: &str) -> Result<ServiceView, ClientError> {
        let target = format!("/v1/services/{}", percent_encode(id));
        self.json(Method::DELETE, &target, Bytes::new()).await
    }

    /// `GET /v1/tasks[?service=S][&node=N]`.
    pub async fn tasks(
        &self,
        service: Option<&str>,
        node: Option<&str>,
    ) -> Result<TaskList, ClientError> {
        let mut q = Vec::new();
        if let Some(s) = service {
            q.push(format!("service={}", percent_encode(s)));
        }
        if let Some(n) = node {
            q.push(format!("node={}", percent_encode(n)));
        }
        let target = if q.is_empty() {
            "/v1/tasks".to_owned()
        } else {
            format!("/v1/tasks?{}", q.join("&"))
        };
        self.get(&target).await
    }

    /// `PUT /v1/nodes/{id}/labels`.
    pub async fn node_labels(
        &self,
        id: &str,
        change: &LabelChange,
    ) -> Result<Written, ClientError> {
        let target = format!("/v1/nodes/{}/labels", percent_encode(id));
        self.json_body(Method::PUT, &target, to_json(change)?).await
    }

    /// `GET /v1/members`.
    pub async fn members(&self) -> Result<MemberList, ClientError> {
        self.get("/v1/members").await
    }

    /// `GET /v1/kv/{key}`.
    pub async fn kv_get(&self, key: &str, c: Consistency) -> Result<KvEntry, ClientError> {
        let c = match c {
            Consistency::Linearizable => "linearizable",
            Consistency::Stale => "stale",
        };
        self.get(&format!("/v1/kv/{}?consistency={c}", percent_encode(key)))
            .await
    }

    /// `PUT /v1/kv/{key}`.
    pub async fn kv_put(&self, key: &str, value: impl Into<Bytes>) -> Result<Written, ClientError> {
        let target = format!("/v1/kv/{}", percent_encode(key));
        self.json(Method::PUT, &target, value.into()).await
    }

    /// `PUT /v1/kv/{key}?expect-revision=N`: compare-and-swap; a failed compare is
    /// [`ErrorCode::CompareFailed`].
    pub async fn kv_cas(
        &self,
        key: &str,
        expect_revision: u64,
        value: impl Into<Bytes>,
    ) -> Result<Written, ClientError> {
        let target = format!(
            "/v1/kv/{}?expect-revision={expect_revision}",
            percent_encode(key)
        );
        self.json(Method::PUT, &target, value.into()).await
    }

    /// `DELETE /v1/kv/{key}`.
    pub async fn kv_delete(&self, key: &str) -> Result<KvDeleted, ClientError> {
        let target = format!("/v1/kv/{}", percent_encode(key));
        self.json(Method::DELETE, &target, Bytes::new()).await
    }

    /// `GET /v1/kv?prefix=P`.
    pub async fn kv_list(&self, prefix: &str, c: Consistency) -> Result<KvList, ClientError> {
        let c = match c {
            Consistency::Linearizable => "linearizable",
            Consistency::Stale => "stale",
        };
        self.get(&format!(
            "/v1/kv?prefix={}&consistency={c}",
            percent_encode(prefix)
        ))
        .await
    }

    /// `GET /v1/watch`: changes under `prefix` from revision `from`, waiting up to `wait`
    /// seconds for the first.
    pub async fn watch(
        &self,
        prefix: &str,
        from: u64,
        wait: u64,
    ) -> Result<WatchEvents, ClientError> {
        self.get(&format!(
            "/v1/watch?prefix={}&from={from}&wait={wait}",
            percent_encode(prefix)
        ))
        .await
    }

    /// `GET /v1/join-token/{role}`.
    pub async fn join_token(&self, role: &str) -> Result<JoinTokenView, ClientError> {
        self.get(&format!("/v1/join-token/{}", percent_encode(role)))
            .await
    }

    /// `POST /v1/join-token/{role}/rotate`.
    pub async fn rotate_join_token(&self, role: &str) -> Result<JoinTokenView, ClientError> {
        let target = format!("/v1/join-token/{}/rotate", percent_encode(role));
        self.json(Method::POST, &target, Bytes::new()).await
    }

    /// `GET /v1/cluster`.
    pub async fn cluster(&self) -> Result<ClusterView, ClientError> {
        self.get("/v1/cluster").await
    }

    /// `PATCH /v1/cluster`.
    pub async fn update_cluster(&self, update: &ClusterUpdate) -> Result<ClusterView, ClientError> {
        self.json_body(Method::PATCH, "/v1/cluster", to_json(update)?)
            .await
    }

    /// `POST /v1/cluster/ca/rotate`.
    pub async fn rotate_ca(&self) -> Result<ClusterView, ClientError> {
        self.json(Method::POST, "/v1/cluster/ca/rotate", Bytes::new())
            .await
    }

    /// `POST /v1/leave` (only meaningful on a node's own socket).
    pub async fn leave(&self) -> Result<Left, ClientError> {
        self.json(Method::POST, "/v1/leave", Bytes::new()).await
    }

    /// `POST /v1/certs`.
    pub async fn issue_cert(&self, req: &CertRequest) -> Result<IssuedCert, ClientError> {
        self.json_body(Method::POST, "/v1/certs", to_json(req)?)
            .await
    }

    /// `GET /v1/certs`.
    pub async fn certs(&self) -> Result<ClientList, ClientError> {
        self.get("/v1/certs").await
    }

    /// `DELETE /v1/certs/{name}`.
    pub async fn revoke_cert(&self, name: &str) -> Result<ClientView, ClientError> {
        let target = format!("/v1/certs/{}", percent_encode(name));
        self.json(Method::DELETE, &target, Bytes::new()).await
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Bytes, ClientError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| ClientError::NotSent(format!("cannot encode the request: {e}")))
}

fn decode<T: DeserializeOwned>(r: RawResponse) -> Result<T, ClientError> {
    if r.status >= 400 {
        let err = serde_json::from_slice::<ApiError>(&r.body).unwrap_or_else(|_| {
            ApiError::new(
                ErrorCode::from_status(r.status),
                format!(
                    "HTTP {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body).trim()
                ),
            )
        });
        return Err(ClientError::Api(err));
    }
    serde_json::from_slice(&r.body).map_err(|e| ClientError::BadAnswer(e.to_string()))
}

const JSON: &str = "application/json";
const OCTETS: &str = "application/octet-stream";

/// A request to send (cheap to clone: the body is shared).
#[derive(Clone)]
struct Outgoing<'a> {
    method: Method,
    target: &'a str,
    body: Bytes,
    content_type: &'static str,
}

impl Outgoing<'_> {
    fn build(&self) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.target)
            .header(http::header::HOST, "starling")
            .header(http::header::CONTENT_LENGTH, self.body.len());
        if !self.body.is_empty() {
            b = b.header(http::header::CONTENT_TYPE, self.content_type);
        }
        b.body(Full::new(self.body.clone()))
            .map_err(|e| ClientError::NotSent(format!("bad request: {e}")))
    }
}

async fn read_answer(
    resp: http::Response<hyper::body::Incoming>,
) -> Result<(RawResponse, Option<HeaderValue>), ClientError> {
    let status = resp.status();
    // Shares the header's bytes (no copy): every answer of a manager carries it.
    let managers = resp.headers().get(MANAGERS_HEADER).cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::NoAnswer(format!("answer cut short: {e}")))?
        .to_bytes();
    Ok((
        RawResponse {
            status: StatusCode::as_u16(&status),
            body,
        },
        managers,
    ))
}

/// Why an exchange failed, on the control socket or a manager's QUIC connection.
enum Exchange {
    /// Nothing reached the node: the call may go to another (or be tried again).
    NotSent(String),
    /// The request may have reached it and been acted on.
    Lost(String),
}

/// Longest a kept connection is reused after its last exchange. A node closes a connection
/// idle for 30 s (its header timeout); a request sent just as it does could be cut off
/// mid-body, its outcome unknown: past this, a call opens a fresh connection instead.
const KEPT_IDLE: Duration = Duration::from_secs(20);

/// The HTTP/1.1 sender of the last whole exchange, kept for the next call.
struct Kept {
    send: SendRequest<Full<Bytes>>,
    since: tokio::time::Instant,
}

impl Kept {
    fn new(send: SendRequest<Full<Bytes>>) -> Self {
        Kept {
            send,
            since: tokio::time::Instant::now(),
        }
    }

    /// The sender, unless its connection closed or has been idle for [`KEPT_IDLE`].
    fn reusable(self) -> Option<SendRequest<Full<Bytes>>> {
        (!self.send.is_closed() && self.since.elapsed() < KEPT_IDLE).then_some(self.send)
    }
}

/// Sends `req` on `kept` (the HTTP/1.1 sender of the last exchange) if it still takes
/// requests, else on a fresh connection over the stream `open` gives; returns the sender (to
/// keep for the next call) and the answer's head. A request the kept sender hands back unsent
/// (the peer closed it while idle) goes on the fresh connection: the control socket and the
/// remote API's QUIC streams share this.
async fn send_kept<IO, Fut>(
    kept: Option<Kept>,
    mut req: Request<Full<Bytes>>,
    open: impl FnOnce() -> Fut,
) -> Result<
    (
        SendRequest<Full<Bytes>>,
        http::Response<hyper::body::Incoming>,
    ),
    Exchange,
>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    Fut: Future<Output = Result<IO, String>>,
{
    if let Some(mut send) = kept.and_then(Kept::reusable)
        && send.ready().await.is_ok()
    {
        match send.try_send_request(req).await {
            Ok(resp) => return Ok((send, resp)),
            Err(e) => match unsent(e) {
                (Some(back), _) => req = back,
                (None, why) => return Err(Exchange::Lost(why)),
            },
        }
    }
    let io = open().await.map_err(Exchange::NotSent)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Exchange::NotSent(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    match send.try_send_request(req).await {
        Ok(resp) => Ok((send, resp)),
        Err(e) => Err(match unsent(e) {
            (Some(_), why) => Exchange::NotSent(why),
            (None, why) => Exchange::Lost(why),
        }),
    }
}

/// A failed send: the request if it never left (so it may go elsewhere), and why.
fn unsent(
    mut e: hyper::client::conn::TrySendError<Request<Full<Bytes>>>,
) -> (Option<Request<Full<Bytes>>>, String) {
    let back = e.take_message();
    (back, e.into_error().to_string())
}

async fn unix_call(
    path: &Path,
    slot: &tokio::sync::Mutex<Option<Kept>>,
    out: Outgoing<'_>,
) -> Result<RawResponse, ClientError> {
    let req = out.build()?;
    let mut slot = slot.lock().await;
    let (send, resp) = send_kept(slot.take(), req, || unix_stream(path)).await?;
    *slot = Some(Kept::new(send));
    read_answer(resp).await.map(|(r, _)| r)
}

async fn unix_stream(path: &Path) -> Result<tokio::net::UnixStream, String> {
    tokio::net::UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach the node's control socket {}: {e}",
            path.display()
        )
    })
}

impl From<Exchange> for ClientError {
    fn from(e: Exchange) -> Self {
        match e {
            Exchange::NotSent(why) => ClientError::NotSent(why),
            Exchange::Lost(why) => ClientError::NoAnswer(why),
        }
    }
}

/// What a remote call got: a whole answer, or (asked for a stream) a success whose body is
/// still coming.
enum Got {
    Full(RawResponse),
    Open(hyper::body::Incoming),
}

/// The query of a logs request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogsQuery {
    /// Keep streaming new lines.
    pub follow: bool,
    /// Only the last N lines of each task.
    pub tail: Option<u64>,
    /// Only lines at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
}

impl LogsQuery {
    fn query(&self) -> String {
        let mut q = vec![format!("follow={}", self.follow)];
        if let Some(n) = self.tail {
            q.push(format!("tail={n}"));
        }
        if let Some(t) = self.since_ms {
            q.push(format!("since={t}"));
        }
        format!("?{}", q.join("&"))
    }
}

/// Reads the records of a streamed answer as they come.
pub struct RecordReader {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    done: bool,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl RecordReader {
    /// The next record; `Ok(None)` at the end of the answer. A connection lost midway is
    /// [`ClientError::NoAnswer`].
    pub async fn next(&mut self) -> Result<Option<crate::LogRecord>, ClientError> {
        loop {
            if let Some(n) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=n).collect();
                if line.len() == 1 {
                    continue;
                }
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| ClientError::BadAnswer(format!("a record: {e}")));
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.buf);
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| ClientError::BadAnswer(format!("a record: {e}")));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(ClientError::NoAnswer(format!("stream cut: {e}"))),
                None => self.done = true,
            }
        }
    }
}

/// The remote half: a client endpoint with a client certificate and the managers to dial.
struct Remote {
    endpoint: Endpoint,
    protocol: Protocol,
    /// Shared, so a call takes them without copying their names and addresses.
    managers: Mutex<Vec<Arc<ManagerAddr>>>,
    current: tokio::sync::Mutex<Option<Current>>,
    dial_timeout: Duration,
    /// The last `starling-managers` header learned from.
    last_header: Mutex<Option<HeaderValue>>,
}

/// The manager in use: its connection, and the stream of the last whole exchange kept open
/// for the next one (HTTP/1.1 keep-alive on one QUIC stream: no stream set-up per call).
struct Current {
    manager: Arc<ManagerAddr>,
    conn: Connection,
    kept: Option<Kept>,
}

impl Remote {
    /// A client endpoint of its own, on an ephemeral port of the managers' address family.
    fn bind(
        credentials: NodeCredentials,
        managers: &[ManagerAddr],
        dial_timeout: Duration,
    ) -> Result<Endpoint, ClientError> {
        let ipv6 = managers
            .iter()
            .filter_map(|m| m.addr.parse::<SocketAddr>().ok())
            .any(|a| a.is_ipv6());
        let listen: SocketAddr = if ipv6 {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .map_err(|e| ClientError::NotSent(format!("{e}")))?;
        let cfg = EndpointConfig {
            listen,
            connect_timeout: dial_timeout,
            ..EndpointConfig::default()
        };
        Endpoint::bind(cfg, ring_provider(), Some(credentials))
            .map_err(|e| ClientError::NotSent(format!("cannot open a QUIC endpoint: {e}")))
    }

    fn new(
        endpoint: Endpoint,
        managers: Vec<ManagerAddr>,
        dial_timeout: Duration,
    ) -> Result<Remote, ClientError> {
        let protocol = Protocol::new(API_ALPN, PeerPolicy::roles([Role::MANAGER]))
            .map_err(|e| ClientError::NotSent(e.to_string()))?;
        let mut managers: Vec<Arc<ManagerAddr>> = managers.into_iter().map(Arc::new).collect();
        shuffle(&mut managers);
        Ok(Remote {
            endpoint,
            protocol,
            managers: Mutex::new(managers),
            current: tokio::sync::Mutex::new(None),
            dial_timeout,
            last_header: Mutex::new(None),
        })
    }

    fn managers(&self) -> Vec<ManagerAddr> {
        self.shared_managers()
            .iter()
            .map(|m| ManagerAddr::clone(m))
            .collect()
    }

    fn shared_managers(&self) -> Vec<Arc<ManagerAddr>> {
        self.managers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn learn(&self, header: Option<HeaderValue>) {
        let Some(header) = header else { return };
        {
            // Every answer carries the list; parse it only when it changed.
            let mut last = self.last_header.lock().unwrap_or_else(|p| p.into_inner());
            if last.as_ref() == Some(&header) {
                return;
            }
            *last = Some(header.clone());
        }
        let Ok(header) = header.to_str() else { return };
        let mut learned: Vec<ManagerAddr> = header
            .split(',')
            .filter_map(|m| {
                let (node_id, addr) = m.trim().split_once('@')?;
                addr.parse::<SocketAddr>().ok()?;
                Some(ManagerAddr {
                    node_id: node_id.to_owned(),
                    addr: addr.to_owned(),
                })
            })
            .collect();
        if learned.is_empty() {
            return;
        }
        let mut known = self.managers.lock().unwrap_or_else(|p| p.into_inner());
        let mut a: Vec<&ManagerAddr> = known.iter().map(|m| &**m).collect();
        a.sort();
        let mut b: Vec<&ManagerAddr> = learned.iter().collect();
        b.sort();
        if a != b {
            shuffle(&mut learned);
            *known = learned.into_iter().map(Arc::new).collect();
        }
    }

    async fn dial(&self, m: &ManagerAddr) -> Result<Connection, String> {
        let node = NodeId::new(m.node_id.clone()).map_err(|e| e.to_string())?;
        let addr: SocketAddr = m.addr.parse().map_err(|e| format!("{}: {e}", m.addr))?;
        match tokio::time::timeout(
            self.dial_timeout,
            self.endpoint.connect(&self.protocol, &node, addr),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!("{} ({}): {e}", m.node_id, m.addr)),
            Err(_) => Err(format!(
                "{} ({}): no answer within {:?}",
                m.node_id, m.addr, self.dial_timeout
            )),
        }
    }

    async fn call(&self, out: Outgoing<'_>, streaming: bool) -> Result<Got, ClientError> {
        let repeatable = out.method == Method::GET;
        let mut current = self.current.lock().await;
        let mut tried: Vec<String> = Vec::new();
        // The manager in use first; the others only if it fails (listed then, not on every
        // call).
        let head = current.as_ref().map(|c| c.manager.clone());
        let skip = head.clone();
        let others = std::iter::once(())
            .flat_map(|()| self.shared_managers())
            .filter(move |m| skip.as_ref() != Some(m));
        let mut last_unavailable: Option<ApiError> = None;
        for m in head.into_iter().chain(others) {
            let conn = match current.as_ref() {
                Some(c) if c.manager == m && c.conn.close_reason().is_none() => c.conn.clone(),
                _ => match self.dial(&m).await {
                    Ok(c) => {
                        *current = Some(Current {
                            manager: m.clone(),
                            conn: c.clone(),
                            kept: None,
                        });
                        c
                    }
                    Err(e) => {
                        tried.push(e);
                        continue;
                    }
                },
            };
            // A stream kept from the last exchange, unless this call streams its answer (that
            // stream stays busy until the caller drops the body).
            let kept = if streaming {
                None
            } else {
                current.as_mut().and_then(|c| c.kept.take())
            };
            let open = || async { conn.open_stream().await.map_err(|e| e.to_string()) };
            let (send, resp) = match send_kept(kept, out.build()?, open).await {
                Ok(x) => x,
                Err(Exchange::NotSent(e)) => {
                    *current = None;
                    tried.push(format!("{}: {e}", m.node_id));
                    continue;
                }
                Err(Exchange::Lost(e)) => {
                    *current = None;
                    if !repeatable {
                        return Err(ClientError::NoAnswer(format!(
                            "{} ({}): {e}",
                            m.node_id, m.addr
                        )));
                    }
                    tried.push(format!("{}: {e}", m.node_id));
                    continue;
                }
            };
            let answer = async {
                if streaming && resp.status().is_success() {
                    return Ok(Err(resp));
                }
                read_answer(resp).await.map(Ok).map_err(|e| e.to_string())
            }
            .await;
            match answer {
                Ok(Err(resp)) => {
                    self.learn(resp.headers().get(MANAGERS_HEADER).cloned());
                    return Ok(Got::Open(resp.into_body()));
                }
                Ok(Ok((raw, managers))) => {
                    self.learn(managers);
                    if raw.status == 503
                        && let Ok(e) = serde_json::from_slice::<ApiError>(&raw.body)
                        && e.code == ErrorCode::Unavailable
                    {
                        // The manager says nothing changed: the next one may serve it.
                        tried.push(format!("{}: {e}", m.node_id));
                        last_unavailable = Some(e);
                        *current = None;
                        continue;
                    }
                    // The exchange is over: keep its stream for the next call.
                    if !streaming && let Some(c) = current.as_mut() {
                        c.kept = Some(Kept::new(send));
                    }
                    return Ok(Got::Full(raw));
                }
                Err(e) => {
                    *current = None;
                    if !repeatable {
                        return Err(ClientError::NoAnswer(format!(
                            "{} ({}): {e}",
                            m.node_id, m.addr
                        )));
                    }
                    tried.push(format!("{}: {e}", m.node_id));
                }
            }
        }
        if let Some(e) = last_unavailable {
            return Err(ClientError::Api(e));
        }
        Err(ClientError::NotSent(format!(
            "no manager reachable: {}",
            if tried.is_empty() {
                "the context lists none".to_owned()
            } else {
                tried.join("; ")
            }
        )))
    }
}

fn shuffle<T>(v: &mut [T]) {
    use rand::seq::SliceRandom as _;
    v.shuffle(&mut rand::rng());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A kept connection is reused while it is open and recently used, never once it has
    /// been idle for [`KEPT_IDLE`] (the node may be closing it) or closed by the node.
    #[tokio::test]
    async fn a_kept_connection_is_reused_only_while_open_and_recently_used() {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        let driven = tokio::spawn(conn);
        let send = Kept::new(send).reusable().expect("just used: reused");
        let idle = Kept {
            send,
            since: tokio::time::Instant::now()
                .checked_sub(KEPT_IDLE + Duration::from_secs(1))
                .unwrap(),
        };
        assert!(idle.reusable().is_none(), "idle too long: not reused");

        let (ours, theirs2) = tokio::net::UnixStream::pair().unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        let driven2 = tokio::spawn(conn);
        drop(theirs2);
        let _ = driven2.await;
        assert!(
            Kept::new(send).reusable().is_none(),
            "closed by the peer: not reused"
        );
        drop(theirs);
        driven.abort();
    }
}
