//! rustls configuration: TLS 1.3 only, mutual authentication against the cluster CA, no
//! session resumption (a resumed session would skip certificate verification), no 0-RTT,
//! a hot-swappable certificate, and the CA-pinning verifier used to join.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::token::CaDigest;

/// The node's current certificate and key, read by every new handshake, replaced on rotation.
#[derive(Debug, Default)]
pub(crate) struct CertStore {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertStore {
    pub(crate) fn set(&self, key: Arc<CertifiedKey>) {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        *guard = Some(key);
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    Ok(Arc::new(store))
}

/// The server side: clients with a certificate must chain to `roots`; clients without one
/// are let through the handshake and confined to anonymous protocols afterwards.
pub(crate) fn server_config(
    provider: &Arc<CryptoProvider>,
    roots: &[CertificateDer<'static>],
    certs: Arc<CertStore>,
    alpns: Vec<Vec<u8>>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(roots)?, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    cfg.alpn_protocols = alpns;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// The client side of a member connection: the server must chain to `roots` and carry the
/// DNS name that is dialed (the expected node's).
pub(crate) fn client_config(
    provider: &Arc<CryptoProvider>,
    roots: &[CertificateDer<'static>],
    certs: Arc<CertStore>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let verifier =
        WebPkiServerVerifier::builder_with_provider(root_store(roots)?, provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_cert_resolver(certs);
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.resumption = Resumption::disabled();
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// The client side of a join: no client certificate, and the server is trusted only if a
/// CA certificate it sends has the digest of the join token and its certificate chains to it.
pub(crate) fn pinned_client_config(
    provider: &Arc<CryptoProvider>,
    digest: CaDigest,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let verifier = Arc::new(PinnedCaVerifier {
        digest,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.resumption = Resumption::disabled();
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// The server's CA certificate does not have the digest in the join token.
#[derive(thiserror::Error)]
#[error(
    "the server presented no CA certificate with the pinned digest (a join token's, or for a renewal this node's root: the cluster's root may have been rotated while the node was away)"
)]
pub(crate) struct PinMismatch;

// rustls shows the inner error of `CertificateError::Other` with `Debug`: make that readable.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Trusts a server that sends the CA certificate with a given digest after its own, and
/// whose certificate chains to that CA (directly, or through the other certificates sent). The server name is not checked: a joiner does not know the manager's
/// node id yet, and the pin already ties the server to the cluster.
#[derive(Debug)]
struct PinnedCaVerifier {
    digest: CaDigest,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pinned CA may be anywhere after the leaf: during and after a root rotation a
        // server presents the cross-signed new root and both roots.
        let Some(at) = intermediates
            .iter()
            .position(|c| CaDigest::of_certificate(c) == self.digest)
        else {
            return Err(rustls::Error::InvalidCertificate(
                if intermediates.is_empty() {
                    rustls::CertificateError::UnknownIssuer
                } else {
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch)))
                },
            ));
        };
        let ca = &intermediates[at];
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != at)
            .map(|(_, c)| c.clone())
            .collect();
        let roots = root_store(&[ca.clone().into_owned()])?;
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &rest,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so a TLS 1.2 signature is a protocol violation.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
