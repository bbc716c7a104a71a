//! Cluster PKI and mutually authenticated QUIC for Starling, usable on its own.
//!
//! ```text
//!   ClusterCa ──signs CSR──▶ NodeCredentials (CN node id, OU role, O cluster,
//!      │                      DNS SAN <node>.<cluster>.starling, URI SAN spiffe://…)
//!      └─ digest ─▶ JoinToken "STRL-1-<sha256 of CA>-<secret>"
//!
//!   node A: Endpoint (one UDP socket)                 node B: Endpoint
//!     connect(&proto, "b", addr) ──── QUIC + TLS 1.3, both sides certified ───▶ Listener for proto
//!        verifies B's name and CA                    verifies A's CA, then proto's
//!        ◀──────────────────────── admitted ───────  PeerPolicy (roles), or closes
//!     Connection::request / send / send_datagram ◀──▶ Connection::accept / read_datagram
//!
//!   joiner (token only): connect_pinned(&join, addr, &token) ─▶ trusted only if the CA the
//!        server presents has the token's digest; no client certificate is sent.
//! ```
//!
//! - **PKI** ([`ClusterCa`], [`NodeKey`], [`NodeCredentials`]): P-256 keys from rcgen; the CA
//!   takes only the public key from a CSR and chooses every name, usage and date itself.
//! - **Join tokens** ([`JoinToken`], [`JoinSecrets`]): the CA digest to pin, and a secret per
//!   role compared in constant time.
//! - **Endpoint** ([`Endpoint`]): one socket serves and dials; protocols are told apart by
//!   ALPN, each with a [`PeerPolicy`]; a refused peer is closed with a [`CloseCode`]. The
//!   crypto provider is passed in ([`ring_provider`]), never taken from the process default.
//!   No TLS session resumption (it would skip certificate checks) and no 0-RTT.
//! - **Messages** ([`Connection`]): requests and responses on bi streams, one-way messages,
//!   datagrams; bodies are rkyv 0.8 archives validated before use ([`Encode`], [`Decode`],
//!   [`Frame`]); or raw [`ByteStream`]s for protocols with their own framing.
//! - **Pool** ([`Endpoint::connection`], [`Endpoint::request`]) per (node, ALPN), and
//!   **hot rotation** of certificate, key and roots ([`Endpoint::rotate`]).
//!
//! # Example
//!
//! ```
//! use starling_transport::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = ClusterCa::create(ClusterId::new("demo")?)?;
//! let opts = CertOptions::default();
//! let a = ca.issue(&NodeId::new("a")?, &Role::MANAGER, &opts)?;
//! let b = ca.issue(&NodeId::new("b")?, &Role::WORKER, &opts)?;
//!
//! let echo = Protocol::new("demo/echo/1", PeerPolicy::any_member())?;
//! let server = Endpoint::bind(EndpointConfig::default(), ring_provider(), Some(a))?;
//! let mut listener = server.listen(&echo)?;
//! tokio::spawn(async move {
//!     while let Some(conn) = listener.accept().await {
//!         tokio::spawn(async move {
//!             while let Ok(Inbound::Request(req)) = conn.accept().await {
//!                 let text: String = req.decode().unwrap_or_default();
//!                 let _ = req.respond_with(&text.to_uppercase()).await;
//!             }
//!         });
//!     }
//! });
//!
//! let client = Endpoint::bind(EndpointConfig::default(), ring_provider(), Some(b))?;
//! let conn = client.connect(&echo, &NodeId::new("a")?, server.local_addr()).await?;
//! assert_eq!(conn.peer().map(|p| p.role.clone()), Some(Role::MANAGER));
//! let answer: String = conn.call(&"hello".to_string()).await?;
//! assert_eq!(answer, "HELLO");
//! # Ok(())
//! # }
//! ```

mod codec;
mod connection;
mod endpoint;
mod error;
mod identity;
mod pki;
mod stream;
mod tls;
mod token;
mod udp;

pub use codec::{Decode, DecodeError, Encode, EncodeError, Frame, decode};
pub use connection::{Connection, Inbound, MessageError, Request};
pub use endpoint::{
    ConfigError, ConnectError, Endpoint, EndpointConfig, EndpointError, Listener, PeerPolicy,
    Protocol, RequestError, ResetKey, ring_provider,
};
pub use error::{CloseCode, StreamCode};
pub use identity::{CertSerial, ClusterId, IdentityError, NodeId, PeerIdentity, Role, check_label};
pub use pki::{
    CA_LIFETIME, CertOptions, ClusterCa, NodeCredentials, NodeKey, PkiError, certificate_from_pem,
    check_renewal, key_digest, renewal_time,
};
pub use stream::ByteStream;
pub use token::{
    CaDigest, JoinSecret, JoinSecrets, JoinToken, RandomnessError, TokenError, TokenPart,
};
pub use udp::ReadinessProbe;

/// Re-exported so users can derive message types with the same rkyv as this crate:
/// `#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]` with
/// `#[rkyv(crate = starling_transport::rkyv)]` when rkyv is not a direct dependency.
pub use rkyv;
