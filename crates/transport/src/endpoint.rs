//! The endpoint: one UDP socket that serves and dials every protocol, with role policies
//! checked right after each handshake, a connection pool and certificate rotation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::codec::Frame;
use crate::connection::{Connection, Limits, MessageError, WeakConnection};
use crate::error::CloseCode;
use crate::identity::{ClusterId, NodeId, PeerIdentity, Role, dns_name};
use crate::pki::NodeCredentials;
use crate::tls::{self, CertStore};
use crate::token::{CaDigest, JoinToken};
use crate::udp::ReadinessProbe;

/// The byte a server sends on its first uni stream once it admitted a connection. A dialer
/// waits for it, so a refusal (which TLS 1.3 client authentication reports only after the
/// client's handshake completes) surfaces in `connect`, not at the first request.
const ADMITTED: u8 = 0xA1;

/// The largest `max_frame_size` accepted.
const MAX_FRAME_LIMIT: usize = 256 << 20;

/// The server name a joiner dials; not verified (the CA pin is), but it must be a DNS name.
const JOIN_SERVER_NAME: &str = "join.starling";

/// The crypto provider Starling uses: *ring*. Pass it to [`Endpoint::bind`]; the process-wide
/// default provider is never consulted.
pub fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The secret behind QUIC stateless resets (RFC 9000 §10.3). An endpoint restarted with
/// the key its previous process used answers packets of that process's connections with a
/// reset the peer recognises, so peers drop those connections at once instead of sending
/// into them until their idle timeout. Its `Debug` does not show the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ResetKey(pub [u8; 32]);

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

/// Random 8-byte connection ids (from the system's CSPRNG), with no keyed check: any id
/// may be answered with a stateless reset.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 8];
        // SystemRandom fails only without an OS randomness source, where nothing here works;
        // the id is then still unique enough to route by, if not secret.
        if ring::rand::SystemRandom::new().fill(&mut id).is_err() {
            id = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                .to_le_bytes();
        }
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Settings of an endpoint. Plain fields; [`EndpointConfig::validate`] checks them.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The UDP address to bind (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Largest frame (message body) accepted or sent. Default 8 MiB, at most 256 MiB. A
    /// peer can make this side buffer up to 32 frames per connection, so keep it modest and
    /// stream large transfers in chunks.
    pub max_frame_size: usize,
    /// Time for a request to get its response, and for an inbound stream to deliver its
    /// frame. Default 10 s.
    pub request_timeout: Duration,
    /// Time for a dial: handshake and admission. Default 5 s.
    pub connect_timeout: Duration,
    /// A connection with no traffic for this long is closed. Default 30 s.
    pub idle_timeout: Duration,
    /// Keep-alive interval, below `idle_timeout`. Default 5 s.
    pub keep_alive: Duration,
    /// Requested `SO_RCVBUF`/`SO_SNDBUF`. Default 4 MiB (the kernel may cap it at
    /// `net.core.rmem_max`).
    pub socket_buffer: usize,
    /// Concurrent streams a peer may open per connection, each direction. Default 256.
    pub max_concurrent_streams: u32,
    /// Admitted connections waiting for a protocol's `accept` before new ones are refused
    /// with [`CloseCode::OVERLOADED`]. Default 256.
    pub accept_queue: usize,
    /// Keeps stateless resets valid across restarts of one node: give the same key each
    /// time (a node keeps it in its data directory). `None` (the default): a random key per
    /// endpoint, so a restart leaves peers' old connections to time out.
    pub reset_key: Option<ResetKey>,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_frame_size: 8 << 20,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            socket_buffer: 4 << 20,
            max_concurrent_streams: 256,
            accept_queue: 256,
            reset_key: None,
        }
    }
}

/// A setting is out of range. Nothing was bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint setting {field}: {why}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub why: String,
}

impl EndpointConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, why: &str| {
            Err(ConfigError {
                field,
                why: why.to_owned(),
            })
        };
        if self.max_frame_size == 0 || self.max_frame_size > MAX_FRAME_LIMIT {
            return err("max_frame_size", "must be between 1 byte and 256 MiB");
        }
        for (field, d) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("keep_alive", self.keep_alive),
        ] {
            if d.is_zero() {
                return err(field, "must be above zero");
            }
        }
        if self.keep_alive >= self.idle_timeout {
            return err("keep_alive", "must be shorter than idle_timeout");
        }
        if self.idle_timeout > Duration::from_secs(3600) {
            return err("idle_timeout", "must be at most an hour");
        }
        if self.max_concurrent_streams == 0 {
            return err("max_concurrent_streams", "must be above zero");
        }
        if self.accept_queue == 0 {
            return err("accept_queue", "must be above zero");
        }
        Ok(())
    }
}

/// Who may connect on a protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    roles: Option<Vec<Role>>,
    anonymous: bool,
}

impl PeerPolicy {
    /// Any node of the cluster, whatever its role.
    pub fn any_member() -> Self {
        PeerPolicy {
            roles: None,
            anonymous: false,
        }
    }

    /// Only nodes with one of these roles. On a dial, the server must have one of them too.
    pub fn roles(roles: impl IntoIterator<Item = Role>) -> Self {
        PeerPolicy {
            roles: Some(roles.into_iter().collect()),
            anonymous: false,
        }
    }

    /// Also admit peers without a certificate (a joiner). Meant for the join protocol only:
    /// every other protocol should require a certificate.
    pub fn allow_anonymous(mut self) -> Self {
        self.anonymous = true;
        self
    }

    /// Whether a certified peer with `role` is admitted.
    pub fn admits(&self, role: &Role) -> bool {
        self.roles.as_ref().is_none_or(|r| r.contains(role))
    }

    fn names_roles(&self) -> bool {
        self.roles.as_ref().is_some_and(|r| !r.is_empty())
    }

    /// Whether certificate-less peers are admitted.
    pub fn admits_anonymous(&self) -> bool {
        self.anonymous
    }
}

/// A protocol: an ALPN and the policy of who may speak it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    alpn: Vec<u8>,
    policy: PeerPolicy,
}

impl Protocol {
    /// A protocol on `alpn` (1 to 255 bytes, e.g. `b"starling/raft/1"`).
    pub fn new(alpn: impl Into<Vec<u8>>, policy: PeerPolicy) -> Result<Self, ConfigError> {
        let alpn = alpn.into();
        if alpn.is_empty() || alpn.len() > 255 {
            return Err(ConfigError {
                field: "alpn",
                why: "must be 1 to 255 bytes".into(),
            });
        }
        Ok(Protocol { alpn, policy })
    }

    /// The ALPN.
    pub fn alpn(&self) -> &[u8] {
        &self.alpn
    }

    /// The policy.
    pub fn policy(&self) -> &PeerPolicy {
        &self.policy
    }
}

/// The endpoint could not be created or changed. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The UDP socket could not be created or bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// rustls refused the configuration (a bad certificate or key).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A protocol is already listening on this ALPN.
    #[error("a protocol already listens on ALPN {0:?}")]
    AlreadyListening(String),
    /// `bind` was called outside a tokio runtime.
    #[error("Endpoint::bind must be called inside a tokio runtime")]
    NoRuntime,
    /// The endpoint was closed.
    #[error("the endpoint is closed")]
    Closed,
    /// New credentials are unusable: the certificate is expired or not signed by the first
    /// trusted root.
    #[error("credentials rejected: {0}")]
    BadCredentials(String),
    /// New credentials are for another cluster or another node.
    #[error("credentials are for {found}, this endpoint is {expected}")]
    IdentityChanged {
        /// This endpoint's node and cluster.
        expected: String,
        /// The credentials'.
        found: String,
    },
}

/// A dial failed. The pool, if it was a pooled dial, holds no connection for the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// This endpoint has no certificate yet (it has not joined); only
    /// [`Endpoint::connect_pinned`] works.
    #[error("this endpoint has no certificate yet")]
    NoCredentials,
    /// The target is this node itself.
    #[error("refusing to dial this node itself")]
    DialSelf,
    /// The peer closed the connection after the handshake with a code from the table.
    #[error("refused by the peer: {code}: {reason}")]
    Refused {
        /// The close code.
        code: CloseCode,
        /// The peer's reason text.
        reason: String,
    },
    /// The peer rejected the TLS handshake with an alert (for example an unknown CA, an
    /// expired certificate, or no matching ALPN).
    #[error("the peer rejected the TLS handshake: {alert:?}: {reason}")]
    HandshakeRejected {
        /// The TLS alert.
        alert: rustls::AlertDescription,
        /// The peer's reason text, if any.
        reason: String,
    },
    /// This side did not trust the server's certificate (another CA, another node's name,
    /// expired, or a CA that does not match the join token's pin).
    #[error("the server's certificate is not trusted: {0}")]
    Untrusted(String),
    /// The server's certificate is valid but names another node or cluster than dialed.
    #[error("reached {found} instead of {expected}")]
    UnexpectedPeer {
        /// Who was dialed.
        expected: String,
        /// Who answered.
        found: String,
    },
    /// The server's role may not serve this protocol.
    #[error("the server's role {0} may not serve this protocol")]
    ServerRoleForbidden(Role),
    /// A pinned dial (join) needs a protocol whose policy names the server roles to trust;
    /// with [`PeerPolicy::any_member`] any node of the pinned CA could pose as a manager.
    #[error("a pinned dial needs a protocol policy that names the roles of the servers to trust")]
    PolicyTooWide,
    /// Another caller's dial to the same node, which this call waited for, just failed.
    #[error("a concurrent dial to this node failed: {0}")]
    DialFailed(String),
    /// The endpoint was closed.
    #[error("the endpoint is closed")]
    Closed,
    /// No handshake and admission within the connect timeout.
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    /// Another connection failure (unreachable, reset, idle).
    #[error("connection failed: {0}")]
    Connection(quinn::ConnectionError),
    /// quinn refused to start the dial (bad address, endpoint closed).
    #[error("cannot dial: {0}")]
    Dial(#[from] quinn::ConnectError),
    /// The TLS client configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

fn crypto_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8)
}

fn classify(e: quinn::ConnectionError) -> ConnectError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => ConnectError::Refused {
            code: CloseCode::from_varint(c.error_code),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        quinn::ConnectionError::ConnectionClosed(c) => match crypto_alert(c.error_code) {
            Some(alert) => ConnectError::HandshakeRejected {
                alert: rustls::AlertDescription::from(alert),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            None => ConnectError::Connection(quinn::ConnectionError::ConnectionClosed(c)),
        },
        quinn::ConnectionError::TransportError(t) if crypto_alert(t.code).is_some() => {
            ConnectError::Untrusted(t.reason)
        }
        other => ConnectError::Connection(other),
    }
}

/// A pooled dial or its request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No connection could be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request failed on a live connection.
    #[error(transparent)]
    Message(#[from] MessageError),
}

struct Listening {
    policy: PeerPolicy,
    tx: mpsc::Sender<Connection>,
}

struct State {
    credentials: Option<NodeCredentials>,
    listening: HashMap<Vec<u8>, Listening>,
    closed: bool,
    /// Nodes removed from the cluster: refused on every protocol, both ways.
    revoked: std::collections::BTreeSet<NodeId>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Connection>,
    /// When the last dial failed, and why: callers that were already waiting get that
    /// answer instead of dialing again one after another.
    failed: Option<(std::time::Instant, String)>,
}

type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// A peer's pooled connections, one slot per ALPN (a peer speaks one or a few protocols).
type PeerSlots = Vec<(Vec<u8>, Slot)>;

struct Shared {
    quinn: quinn::Endpoint,
    provider: Arc<CryptoProvider>,
    config: EndpointConfig,
    transport: Arc<quinn::TransportConfig>,
    certs: Arc<CertStore>,
    state: RwLock<State>,
    /// Pooled connections by peer, then by ALPN: found on each request without copying
    /// the peer's id or the protocol's name.
    pool: Mutex<HashMap<NodeId, PeerSlots>>,
    /// Every open connection with a peer certificate, both directions, by peer: what
    /// [`Endpoint::revoke`] and [`Endpoint::close_peer`] close.
    live: Mutex<LiveConnections>,
    local_addr: SocketAddr,
    socket_buffers: (usize, usize),
    probe: ReadinessProbe,
}

/// The connections of each peer, held weakly; entries of closed connections are dropped as
/// new ones arrive.
#[derive(Default)]
struct LiveConnections {
    by_peer: HashMap<NodeId, Vec<WeakConnection>>,
    added: usize,
}

impl LiveConnections {
    fn add(&mut self, node: NodeId, conn: &Connection) {
        let open = |w: &WeakConnection| w.upgrade().is_some_and(|c| c.close_reason().is_none());
        let list = self.by_peer.entry(node).or_default();
        list.retain(open);
        list.push(conn.downgrade());
        self.added += 1;
        if self.added.is_multiple_of(1024) {
            self.by_peer.retain(|_, l| {
                l.retain(open);
                !l.is_empty()
            });
        }
    }

    fn of(&self, node: &NodeId) -> Vec<Connection> {
        self.by_peer
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(WeakConnection::upgrade)
            .collect()
    }
}

impl Shared {
    /// Keeps track of an admitted connection, and closes it at once if its peer was revoked
    /// meanwhile (the check before admission and the revocation may have crossed).
    fn track(&self, conn: &Connection) {
        let Some(peer) = conn.peer() else { return };
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(peer.node_id.clone(), conn);
        if self.state().revoked.contains(&peer.node_id) {
            conn.close(CloseCode::REVOKED, "node was removed from the cluster");
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_frame: self.config.max_frame_size,
            request_timeout: self.config.request_timeout,
        }
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, PeerSlots>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs a server configuration for the current credentials and protocols. Without
    /// credentials there is nothing to serve with.
    fn refresh_server_config(&self) -> Result<(), rustls::Error> {
        let state = self.state();
        let server = match &state.credentials {
            Some(creds) if !state.closed => {
                self.build_server_config(creds.roots(), state.listening.keys().cloned().collect())?
            }
            _ => None,
        };
        self.quinn.set_server_config(server);
        Ok(())
    }

    /// A server configuration for `roots` and `alpns`, or `None` when there is nothing to
    /// serve.
    fn build_server_config(
        &self,
        roots: &[CertificateDer<'static>],
        mut alpns: Vec<Vec<u8>>,
    ) -> Result<Option<quinn::ServerConfig>, rustls::Error> {
        if alpns.is_empty() {
            return Ok(None);
        }
        alpns.sort();
        let cfg = tls::server_config(&self.provider, roots, self.certs.clone(), alpns)?;
        let quic = QuicServerConfig::try_from(cfg)
            .map_err(|e| rustls::Error::General(format!("QUIC server config: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(self.transport.clone());
        Ok(Some(server))
    }

    fn client_config(
        &self,
        tls: rustls::ClientConfig,
    ) -> Result<quinn::ClientConfig, rustls::Error> {
        let quic = QuicClientConfig::try_from(tls)
            .map_err(|e| rustls::Error::General(format!("QUIC client config: {e}")))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(self.transport.clone());
        Ok(cfg)
    }
}

struct Inner {
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared
            .quinn
            .close(CloseCode::SHUTDOWN.to_varint(), b"endpoint dropped");
    }
}

/// A node's QUIC endpoint: one UDP socket that serves every registered protocol and dials
/// peers, authenticating both sides with certificates from the cluster CA.
///
/// Cheap to clone; the socket closes when the last clone is dropped or on [`Endpoint::close`].
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.inner.shared.local_addr)
            .field("identity", &self.identity())
            .finish()
    }
}

fn bind_socket(
    config: &EndpointConfig,
) -> Result<(std::net::UdpSocket, (usize, usize)), EndpointError> {
    use socket2::{Domain, Socket, Type};
    let addr = config.listen;
    let io = |source| EndpointError::Bind { addr, source };
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(io)?;
    // Large buffers keep bursts (snapshots, gossip rounds) from being dropped by the kernel;
    // the kernel may grant less (net.core.rmem_max), which is logged, not fatal.
    if let Err(e) = socket.set_recv_buffer_size(config.socket_buffer) {
        warn!(error = %e, "cannot set SO_RCVBUF");
    }
    if let Err(e) = socket.set_send_buffer_size(config.socket_buffer) {
        warn!(error = %e, "cannot set SO_SNDBUF");
    }
    let granted = (
        socket.recv_buffer_size().unwrap_or(0),
        socket.send_buffer_size().unwrap_or(0),
    );
    if granted.0 < config.socket_buffer {
        debug!(
            requested = config.socket_buffer,
            granted = granted.0,
            "kernel capped SO_RCVBUF"
        );
    }
    socket.bind(&addr.into()).map_err(io)?;
    Ok((socket.into(), granted))
}

impl Endpoint {
    /// Binds `config.listen` and starts serving. `credentials` may be `None` for a node that
    /// has yet to join: it can then only [`connect_pinned`](Endpoint::connect_pinned) until
    /// [`rotate`](Endpoint::rotate) gives it a certificate.
    ///
    /// Must be called inside a tokio runtime.
    pub fn bind(
        config: EndpointConfig,
        provider: Arc<CryptoProvider>,
        credentials: Option<NodeCredentials>,
    ) -> Result<Self, EndpointError> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EndpointError::NoRuntime);
        }
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(config.idle_timeout).map_err(|_| ConfigError {
                    field: "idle_timeout",
                    why: "out of range".into(),
                })?,
            ))
            .keep_alive_interval(Some(config.keep_alive))
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(config.max_concurrent_streams))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(config.max_concurrent_streams));
        let (socket, socket_buffers) = bind_socket(&config)?;
        let listen = config.listen;
        let endpoint_config = match &config.reset_key {
            Some(ResetKey(key)) => {
                let mut c = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    key,
                )));
                // quinn's default connection ids carry a check keyed per process, and a packet
                // whose id fails it is dropped before a reset is considered, so the previous
                // process's peers would never get theirs. Plain random ids pass everywhere.
                c.cid_generator(|| Box::new(RandomCids));
                c
            }
            None => quinn::EndpointConfig::default(),
        };
        let bind_error = |source| EndpointError::Bind {
            addr: listen,
            source,
        };
        let socket = crate::udp::Socket::wrap(socket).map_err(bind_error)?;
        let probe = ReadinessProbe::new(&socket);
        let quinn = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        let local_addr = quinn.local_addr().map_err(bind_error)?;
        let certs = Arc::new(CertStore::default());
        let shared = Arc::new(Shared {
            quinn,
            provider,
            config,
            transport: Arc::new(transport),
            certs,
            state: RwLock::new(State {
                credentials: None,
                listening: HashMap::new(),
                closed: false,
                revoked: Default::default(),
            }),
            pool: Mutex::new(HashMap::new()),
            live: Mutex::new(LiveConnections::default()),
            local_addr,
            socket_buffers,
            probe,
        });
        let endpoint = Endpoint {
            inner: Arc::new(Inner {
                shared: shared.clone(),
            }),
        };
        if let Some(c) = credentials {
            endpoint.rotate(c)?;
        }
        tokio::spawn(accept_loop(shared));
        Ok(endpoint)
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared().local_addr
    }

    /// Tells whether a datagram waits on this endpoint's socket; see [`ReadinessProbe`].
    pub fn readiness_probe(&self) -> ReadinessProbe {
        self.shared().probe.clone()
    }

    /// The socket buffer sizes the kernel granted (receive, send).
    pub fn socket_buffers(&self) -> (usize, usize) {
        self.shared().socket_buffers
    }

    /// This node's identity, once it has credentials.
    pub fn identity(&self) -> Option<PeerIdentity> {
        self.shared()
            .state()
            .credentials
            .as_ref()
            .map(|c| c.identity().clone())
    }

    /// Starts accepting connections on `protocol`. Each admitted connection is handed to the
    /// returned listener; dropping the listener stops the protocol.
    pub fn listen(&self, protocol: &Protocol) -> Result<Listener, EndpointError> {
        let (tx, rx) = mpsc::channel(self.shared().config.accept_queue);
        {
            let mut state = self.shared().state_mut();
            if state.closed {
                return Err(EndpointError::Closed);
            }
            if state.listening.contains_key(protocol.alpn()) {
                return Err(EndpointError::AlreadyListening(
                    String::from_utf8_lossy(protocol.alpn()).into_owned(),
                ));
            }
            state.listening.insert(
                protocol.alpn().to_vec(),
                Listening {
                    policy: protocol.policy().clone(),
                    tx,
                },
            );
        }
        if let Err(e) = self.shared().refresh_server_config() {
            self.shared().state_mut().listening.remove(protocol.alpn());
            return Err(e.into());
        }
        Ok(Listener {
            rx,
            alpn: protocol.alpn().to_vec(),
            shared: Arc::downgrade(self.shared()),
        })
    }

    /// Replaces this node's certificate, key and trusted roots while running. New
    /// connections (both directions) use the new material; existing ones keep working. The
    /// node id and cluster must stay the same (the role may change: promotion, demotion).
    pub fn rotate(&self, credentials: NodeCredentials) -> Result<(), EndpointError> {
        let shared = self.shared();
        credentials
            .check_usable(std::time::SystemTime::now())
            .map_err(|e| EndpointError::BadCredentials(e.to_string()))?;
        // The chain and the roots too: a joiner pins a root by digest, and a node that trusts
        // only an older root follows the cross-signed certificate.
        let key = rustls::sign::CertifiedKey::from_der(
            credentials.presented(),
            credentials.key().clone_key(),
            &shared.provider,
        )?;
        let mut state = shared.state_mut();
        if state.closed {
            return Err(EndpointError::Closed);
        }
        if let Some(old) = &state.credentials {
            let (o, n) = (old.identity(), credentials.identity());
            if o.node_id != n.node_id || o.cluster_id != n.cluster_id {
                return Err(EndpointError::IdentityChanged {
                    expected: format!("{} of {}", o.node_id, o.cluster_id),
                    found: format!("{} of {}", n.node_id, n.cluster_id),
                });
            }
        }
        // Build everything that can fail before changing anything.
        let server = shared.build_server_config(
            credentials.roots(),
            state.listening.keys().cloned().collect(),
        )?;
        shared.certs.set(Arc::new(key));
        state.credentials = Some(credentials);
        shared.quinn.set_server_config(server);
        Ok(())
    }

    /// Digests of the CA certificates this node trusts now, in the order its credentials
    /// list them (empty before it has credentials).
    pub fn trusted_roots(&self) -> Vec<CaDigest> {
        self.shared()
            .state()
            .credentials
            .as_ref()
            .map(|c| {
                c.roots()
                    .iter()
                    .map(|r| CaDigest::of_certificate(r))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Dials `node` at `addr` on `protocol`: a fresh connection, not pooled. The server must
    /// prove it is `node` of this cluster (its certificate's DNS name is checked by TLS and
    /// its identity again after), with a role the protocol's policy admits.
    pub async fn connect(
        &self,
        protocol: &Protocol,
        node: &NodeId,
        addr: SocketAddr,
    ) -> Result<Connection, ConnectError> {
        let shared = self.shared();
        let (own, roots) = {
            let state = shared.state();
            if state.closed {
                return Err(ConnectError::Closed);
            }
            let creds = state
                .credentials
                .as_ref()
                .ok_or(ConnectError::NoCredentials)?;
            (creds.identity().clone(), creds.roots().to_vec())
        };
        if own.node_id == *node || addr == shared.local_addr {
            return Err(ConnectError::DialSelf);
        }
        let tls = tls::client_config(
            &shared.provider,
            &roots,
            shared.certs.clone(),
            protocol.alpn(),
        )?;
        let server_name = dns_name(node, &own.cluster_id);
        self.dial(
            tls,
            addr,
            &server_name,
            protocol,
            Some(node),
            Some(&own.cluster_id),
        )
        .await
    }

    /// Handshake, the dialer's checks on the server, and admission, within the connect
    /// timeout.
    async fn dial(
        &self,
        tls: rustls::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
        protocol: &Protocol,
        expected_node: Option<&NodeId>,
        cluster: Option<&ClusterId>,
    ) -> Result<Connection, ConnectError> {
        let shared = self.shared();
        let cfg = shared.client_config(tls)?;
        let connecting = shared.quinn.connect_with(cfg, addr, server_name)?;
        let timeout = shared.config.connect_timeout;
        let dial = async {
            let conn = connecting.await.map_err(classify)?;
            let peer = check_server(&conn, protocol, expected_node, cluster)?;
            if shared.state().revoked.contains(&peer.node_id) {
                let reason = format!("node {} was removed from the cluster", peer.node_id);
                warn!(remote = %addr, %reason, "refusing server");
                conn.close(CloseCode::REVOKED.to_varint(), reason.as_bytes());
                return Err(ConnectError::Refused {
                    code: CloseCode::REVOKED,
                    reason,
                });
            }
            await_admission(&conn).await?;
            let conn = Connection::new(conn, Some(peer), protocol.alpn().to_vec(), shared.limits());
            shared.track(&conn);
            Ok(conn)
        };
        tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| ConnectError::Timeout(timeout))?
    }

    /// Dials a manager at `addr` holding only a join token: the server is trusted only if
    /// the CA certificate it presents has the token's digest and signed its certificate.
    /// No client certificate is sent, so the server's protocol must allow anonymous peers.
    pub async fn connect_pinned(
        &self,
        protocol: &Protocol,
        addr: SocketAddr,
        token: &JoinToken,
    ) -> Result<Connection, ConnectError> {
        self.connect_anonymous(protocol, addr, token.ca_digest)
            .await
    }

    /// Dials a manager at `addr` without presenting a certificate, trusting the server only
    /// if the CA certificate it presents has digest `ca` and signed its certificate: for a
    /// node whose own certificate expired, which renews it on a protocol that admits
    /// anonymous peers. The server's protocol must allow anonymous peers.
    pub async fn connect_anonymous(
        &self,
        protocol: &Protocol,
        addr: SocketAddr,
        ca: CaDigest,
    ) -> Result<Connection, ConnectError> {
        let shared = self.shared();
        if addr == shared.local_addr {
            return Err(ConnectError::DialSelf);
        }
        if shared.state().closed {
            return Err(ConnectError::Closed);
        }
        if !protocol.policy().names_roles() {
            return Err(ConnectError::PolicyTooWide);
        }
        let tls = tls::pinned_client_config(&shared.provider, ca, protocol.alpn())?;
        self.dial(tls, addr, JOIN_SERVER_NAME, protocol, None, None)
            .await
    }

    /// A pooled connection to `node` on `protocol`: a live one is reused; otherwise one dial
    /// is made, shared by every caller asking at the same time.
    pub async fn connection(
        &self,
        protocol: &Protocol,
        node: &NodeId,
        addr: SocketAddr,
    ) -> Result<Connection, ConnectError> {
        let dials_self = self
            .shared()
            .state()
            .credentials
            .as_ref()
            .is_some_and(|c| c.identity().node_id == *node);
        if dials_self {
            return Err(ConnectError::DialSelf);
        }
        let slot = {
            let mut pool = self.shared().pool();
            let alpn = protocol.alpn();
            let pooled = pool.get(node).and_then(|slots| {
                slots
                    .iter()
                    .find(|(a, _)| a.as_slice() == alpn)
                    .map(|(_, slot)| slot.clone())
            });
            match pooled {
                Some(slot) => slot,
                None => {
                    let slot = Slot::default();
                    pool.entry(node.clone())
                        .or_default()
                        .push((alpn.to_vec(), slot.clone()));
                    slot
                }
            }
        };
        let arrived = std::time::Instant::now();
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.conn.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        if let Some((at, why)) = &guard.failed
            && *at >= arrived
        {
            return Err(ConnectError::DialFailed(why.clone()));
        }
        guard.conn = None;
        match self.connect(protocol, node, addr).await {
            Ok(conn) => {
                guard.conn = Some(conn.clone());
                guard.failed = None;
                Ok(conn)
            }
            Err(e) => {
                guard.failed = Some((std::time::Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Sends a request over the pooled connection to `node`. If that connection turns out
    /// to be closed before anything was sent (the peer restarted, say), it redials once and
    /// retries; a request that may have reached the peer is never sent twice.
    pub async fn request(
        &self,
        protocol: &Protocol,
        node: &NodeId,
        addr: SocketAddr,
        body: &[u8],
    ) -> Result<Frame, RequestError> {
        let conn = self.connection(protocol, node, addr).await?;
        match conn.request(body).await {
            Err(MessageError::NotSent(e)) => {
                debug!(%node, error = %e, "pooled connection was closed; redialing once");
                let conn = self.connection(protocol, node, addr).await?;
                Ok(conn.request(body).await?)
            }
            other => Ok(other?),
        }
    }

    /// Closes pooled connections to `node` (for a node that left or was removed).
    pub fn disconnect(&self, node: &NodeId) {
        let removed = self.shared().pool().remove(node);
        for (_, slot) in removed.into_iter().flatten() {
            if let Ok(guard) = slot.try_lock()
                && let Some(c) = guard.conn.as_ref()
            {
                c.close(CloseCode::SHUTDOWN, "disconnected");
            }
        }
    }

    /// Sets the nodes removed from the cluster: from now on they are refused on every
    /// protocol (close code [`CloseCode::REVOKED`]) whether they dial or are dialed, and
    /// every open connection with them, in either direction, is closed. Node ids are never
    /// reused, so the set only grows in practice; the whole set is given each time.
    pub fn revoke(&self, nodes: impl IntoIterator<Item = NodeId>) {
        let nodes: std::collections::BTreeSet<NodeId> = nodes.into_iter().collect();
        let added: Vec<NodeId> = {
            let mut state = self.shared().state_mut();
            let added = nodes.difference(&state.revoked).cloned().collect();
            state.revoked = nodes;
            added
        };
        for node in &added {
            info!(%node, "node revoked: refused from now on");
            self.disconnect(node);
            self.close_peer(
                node,
                |_| true,
                CloseCode::REVOKED,
                "node was removed from the cluster",
            );
        }
    }

    /// Closes every open connection with `node` (both directions, every protocol) that
    /// `which` selects, and returns how many it closed. For a demotion: the connections the
    /// node holds with its manager certificate close, and it comes back with its new one.
    pub fn close_peer(
        &self,
        node: &NodeId,
        which: impl Fn(&Connection) -> bool,
        code: CloseCode,
        reason: &str,
    ) -> usize {
        let conns = self
            .shared()
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .of(node);
        let mut closed = 0;
        for c in conns {
            if c.close_reason().is_none() && which(&c) {
                c.close(code, reason);
                closed += 1;
            }
        }
        closed
    }

    /// Closes every connection and the socket, and waits until peers were told.
    /// Listeners return `None` from then on; dials, `listen` and `rotate` fail with
    /// `Closed`.
    pub async fn close(&self) {
        let shared = self.shared();
        {
            let mut state = shared.state_mut();
            state.closed = true;
            // Dropping the senders ends every listener's `accept`.
            state.listening.clear();
        }
        shared.quinn.set_server_config(None);
        shared.pool().clear();
        shared
            .quinn
            .close(CloseCode::SHUTDOWN.to_varint(), b"endpoint closed");
        shared.quinn.wait_idle().await;
    }
}

fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The dialer's checks on the server after the handshake.
fn check_server(
    conn: &quinn::Connection,
    protocol: &Protocol,
    expected_node: Option<&NodeId>,
    cluster: Option<&ClusterId>,
) -> Result<PeerIdentity, ConnectError> {
    let refuse = |code: CloseCode, err: ConnectError| {
        warn!(remote = %conn.remote_address(), %code, error = %err, "refusing server");
        conn.close(code.to_varint(), err.to_string().as_bytes());
        err
    };
    if negotiated_alpn(conn).as_deref() != Some(protocol.alpn()) {
        return Err(refuse(
            CloseCode::UNKNOWN_PROTOCOL,
            ConnectError::Untrusted("server did not agree on the protocol".into()),
        ));
    }
    let Some(cert) = peer_certificate(conn) else {
        return Err(refuse(
            CloseCode::NO_CERTIFICATE,
            ConnectError::Untrusted("server sent no certificate".into()),
        ));
    };
    let peer = PeerIdentity::from_certificate(&cert).map_err(|e| {
        refuse(
            CloseCode::BAD_CERTIFICATE,
            ConnectError::Untrusted(e.to_string()),
        )
    })?;
    let unexpected = match (expected_node, cluster) {
        (Some(n), _) if peer.node_id != *n => Some(n.to_string()),
        (_, Some(c)) if peer.cluster_id != *c => Some(format!("a node of {c}")),
        _ => None,
    };
    if let Some(expected) = unexpected {
        return Err(refuse(
            CloseCode::UNEXPECTED_NODE,
            ConnectError::UnexpectedPeer {
                expected,
                found: format!("{} of {}", peer.node_id, peer.cluster_id),
            },
        ));
    }
    if !protocol.policy().admits(&peer.role) {
        return Err(refuse(
            CloseCode::ROLE_FORBIDDEN,
            ConnectError::ServerRoleForbidden(peer.role.clone()),
        ));
    }
    Ok(peer)
}

async fn await_admission(conn: &quinn::Connection) -> Result<(), ConnectError> {
    let mut recv = conn.accept_uni().await.map_err(classify)?;
    let mut byte = [0u8; 1];
    match recv.read_exact(&mut byte).await {
        Ok(()) if byte[0] == ADMITTED => Ok(()),
        Ok(()) | Err(quinn::ReadExactError::FinishedEarly(_)) => {
            conn.close(
                CloseCode::ADMISSION_FAILED.to_varint(),
                b"unexpected admission message",
            );
            Err(ConnectError::Refused {
                code: CloseCode::ADMISSION_FAILED,
                reason: "the server sent no admission".into(),
            })
        }
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => {
            Err(classify(e))
        }
        Err(quinn::ReadExactError::ReadError(e)) => Err(ConnectError::Refused {
            code: CloseCode::ADMISSION_FAILED,
            reason: e.to_string(),
        }),
    }
}

/// Receives the connections admitted on one protocol.
#[derive(Debug)]
pub struct Listener {
    rx: mpsc::Receiver<Connection>,
    alpn: Vec<u8>,
    shared: std::sync::Weak<Shared>,
}

impl Listener {
    /// The next admitted connection, or `None` once the endpoint is closed.
    pub async fn accept(&mut self) -> Option<Connection> {
        self.rx.recv().await
    }

    /// The protocol's ALPN.
    pub fn alpn(&self) -> &[u8] {
        &self.alpn
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.state_mut().listening.remove(&self.alpn);
            if let Err(e) = shared.refresh_server_config() {
                warn!(error = %e, "cannot update the server configuration");
            }
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    let quinn = shared.quinn.clone();
    let weak = Arc::downgrade(&shared);
    drop(shared);
    while let Some(incoming) = quinn.accept().await {
        let Some(shared) = weak.upgrade() else { break };
        tokio::spawn(admit(shared, incoming));
    }
}

/// Runs the server side of a new connection: handshake, then the protocol's policy, then
/// admission. Every refusal is logged with its reason and closes with a [`CloseCode`].
async fn admit(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let timeout = shared.config.connect_timeout;
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            warn!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            warn!(%remote, ?timeout, "handshake timed out");
            return;
        }
    };
    let refuse = |code: CloseCode, reason: String| {
        warn!(%remote, %code, %reason, "refused peer");
        conn.close(code.to_varint(), reason.as_bytes());
    };
    let Some(alpn) = negotiated_alpn(&conn) else {
        return refuse(CloseCode::UNKNOWN_PROTOCOL, "no ALPN negotiated".into());
    };
    let alpn_text = String::from_utf8_lossy(&alpn).into_owned();
    let (policy, tx, cluster) = {
        let state = shared.state();
        let Some(l) = state.listening.get(&alpn) else {
            drop(state);
            return refuse(
                CloseCode::UNKNOWN_PROTOCOL,
                format!("no protocol listens on {alpn_text:?}"),
            );
        };
        let cluster = state
            .credentials
            .as_ref()
            .map(|c| c.identity().cluster_id.clone());
        (l.policy.clone(), l.tx.clone(), cluster)
    };
    let peer = match peer_certificate(&conn) {
        None if policy.admits_anonymous() => None,
        None => {
            return refuse(
                CloseCode::NO_CERTIFICATE,
                format!("{alpn_text} requires a client certificate"),
            );
        }
        Some(cert) => match PeerIdentity::from_certificate(&cert) {
            Err(e) => return refuse(CloseCode::BAD_CERTIFICATE, e.to_string()),
            Ok(id) if Some(&id.cluster_id) != cluster.as_ref() => {
                return refuse(
                    CloseCode::WRONG_CLUSTER,
                    format!("certificate of cluster {}", id.cluster_id),
                );
            }
            Ok(id) if shared.state().revoked.contains(&id.node_id) => {
                return refuse(
                    CloseCode::REVOKED,
                    format!("node {} was removed from the cluster", id.node_id),
                );
            }
            Ok(id) if !policy.admits(&id.role) => {
                return refuse(
                    CloseCode::ROLE_FORBIDDEN,
                    format!("{alpn_text} does not admit role {}", id.role),
                );
            }
            Ok(id) => Some(id),
        },
    };
    // Refuse early if the queue is full; the slot is taken only after admission, so a peer
    // that stalls the admission cannot hold one.
    if tx.capacity() == 0 {
        return refuse(
            CloseCode::OVERLOADED,
            format!("{alpn_text} accept queue full"),
        );
    }
    let admitted = async {
        let mut s = conn.open_uni().await?;
        s.write_all(&[ADMITTED]).await?;
        s.finish()?;
        Ok::<_, MessageError>(())
    };
    match tokio::time::timeout(timeout, admitted).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "peer left before admission");
            return;
        }
        Err(_) => {
            return refuse(
                CloseCode::ADMISSION_FAILED,
                format!("admission not accepted within {timeout:?}"),
            );
        }
    }
    debug!(%remote, alpn = %alpn_text, peer = ?peer.as_ref().map(|p| p.node_id.to_string()), "admitted");
    let admitted = Connection::new(conn, peer, alpn, shared.limits());
    shared.track(&admitted);
    match tx.try_send(admitted) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(c)) => {
            c.close(CloseCode::OVERLOADED, "accept queue full");
            warn!(%remote, alpn = %alpn_text, "refused peer: accept queue full");
        }
        Err(mpsc::error::TrySendError::Closed(c)) => {
            c.close(CloseCode::UNKNOWN_PROTOCOL, "protocol stopped listening");
        }
    }
}
