//! Shared set-up for the transport tests: a cluster CA, node credentials, endpoints and an
//! echo server, all on 127.0.0.1 with ephemeral ports.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use starling_transport::rkyv::{Archive, Deserialize, Serialize};
use starling_transport::*;

pub const RAFT: &[u8] = b"test/raft/1";
pub const GOSSIP: &[u8] = b"test/gossip/1";
pub const JOIN: &[u8] = b"test/join/1";

pub fn raft() -> Protocol {
    Protocol::new(RAFT, PeerPolicy::roles([Role::MANAGER])).unwrap()
}
pub fn gossip() -> Protocol {
    Protocol::new(GOSSIP, PeerPolicy::any_member()).unwrap()
}
pub fn join() -> Protocol {
    Protocol::new(JOIN, PeerPolicy::roles([Role::MANAGER]).allow_anonymous()).unwrap()
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Clone)]
pub struct Echo {
    pub seq: u64,
    pub text: String,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "starling_transport=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub struct Cluster {
    pub ca: ClusterCa,
}

impl Cluster {
    pub fn new(id: &str) -> Self {
        init_tracing();
        Cluster {
            ca: ClusterCa::create(ClusterId::new(id).unwrap()).unwrap(),
        }
    }

    pub fn creds(&self, node: &str, role: Role) -> NodeCredentials {
        self.ca
            .issue(&NodeId::new(node).unwrap(), &role, &CertOptions::default())
            .unwrap()
    }

    pub fn endpoint(&self, node: &str, role: Role) -> Endpoint {
        Endpoint::bind(
            EndpointConfig::default(),
            ring_provider(),
            Some(self.creds(node, role)),
        )
        .unwrap()
    }
}

pub fn config() -> EndpointConfig {
    EndpointConfig {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        ..EndpointConfig::default()
    }
}

pub fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// Serves `protocol` on `endpoint`: requests of `Echo` are answered with the text upper-cased
/// (undecodable ones refused with UNDECODABLE), one-way messages are echoed back as one-way
/// messages, datagrams are echoed as datagrams. Returns a counter of admitted connections.
pub fn serve_echo(
    endpoint: &Endpoint,
    protocol: &Protocol,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let mut listener = endpoint.listen(protocol).unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Some(conn) = listener.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dg = conn.clone();
            tokio::spawn(async move {
                while let Ok(f) = dg.read_datagram().await {
                    let _ = dg.send_datagram(f.as_bytes());
                }
            });
            tokio::spawn(async move {
                loop {
                    match conn.accept().await {
                        Ok(Inbound::Request(req)) => match req.decode::<Echo>() {
                            Ok(e) => {
                                let reply = Echo {
                                    seq: e.seq,
                                    text: e.text.to_uppercase(),
                                };
                                let _ = req.respond_with(&reply).await;
                            }
                            Err(_) => req.refuse(StreamCode::UNDECODABLE),
                        },
                        Ok(Inbound::Message(m)) => {
                            let _ = conn.send(m.as_bytes()).await;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
        }
    });
    count
}

/// Polls `f` until it returns true or `deadline` passes.
pub async fn eventually(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}

/// A hostile or misconfigured peer, built from quinn and rustls directly so that none of the
/// library's own guard rails apply: it presents `client` (certificate and key, or nothing),
/// trusts `roots`, dials `server_name` at `addr` on `alpn`, and waits for the server's
/// admission. Returns how the server answered.
pub async fn raw_dial(
    client: Option<(&NodeCredentials, &ClusterCa)>,
    roots: &[&ClusterCa],
    alpn: &[u8],
    server_name: &str,
    addr: std::net::SocketAddr,
) -> Result<(), quinn::ConnectionError> {
    use std::sync::Arc;
    let provider = ring_provider();
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.certificate().clone()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(store);
    let mut tls = match client {
        Some((creds, _)) => {
            let dir = tempfile::tempdir().unwrap();
            creds.save(dir.path()).unwrap();
            let pem = std::fs::read(dir.path().join("node.pem")).unwrap();
            use rustls::pki_types::pem::PemObject;
            let cert = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem).unwrap();
            builder.with_client_auth_cert(vec![cert], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = ep.connect(addr, server_name).unwrap().await?;
    let mut admission = conn.accept_uni().await?;
    let mut byte = [0u8; 1];
    admission.read_exact(&mut byte).await.map_err(|e| match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => c,
        _ => quinn::ConnectionError::LocallyClosed,
    })?;
    Ok(())
}

/// Whether the server closed with application code `code`.
pub fn closed_with(e: &quinn::ConnectionError, code: CloseCode) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if u64::from(c.error_code) == u64::from(code.0))
}

/// Whether the server aborted the handshake with TLS alert `alert`.
pub fn alerted(e: &quinn::ConnectionError, alert: rustls::AlertDescription) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c) if u64::from(c.error_code) == 0x100 + u64::from(u8::from(alert)))
}
