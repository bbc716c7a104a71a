//! The cluster's own PKI: a root CA, node keys and CSRs, signing, and PEM files on disk.
//!
//! The CA takes **only the public key** from a CSR. Every name, usage and date in a node
//! certificate comes from the CA's own parameters, so a joiner cannot ask for a role, a name
//! or a lifetime it was not given (SwarmKit's signing policy does the same).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};

use crate::identity::{ClusterId, IdentityError, NodeId, PeerIdentity, Role, dns_name, spiffe_uri};
use crate::token::{CaDigest, RandomnessError, random_bytes};

/// Lifetime of a cluster root CA: 20 years, as SwarmKit.
pub const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

/// Why a PKI operation failed. Nothing on disk changed unless the variant says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused to build, parse or sign (bad key, bad parameters).
    #[error("certificate operation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The CSR is not valid DER, its self-signature is wrong, or it asks for extensions the
    /// CA does not parse. Nothing was signed.
    #[error("certificate signing request rejected: {0}")]
    BadCsr(String),
    /// The CSR's key is not ECDSA P-256. Nothing was signed.
    #[error(
        "certificate signing request uses an unsupported key type (only ECDSA P-256 is accepted)"
    )]
    UnsupportedKey,
    /// A PEM file did not hold what was expected.
    #[error("{path}: {why}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Reading or writing a file failed. A write goes to a temporary file first, so the old
    /// file, if any, is intact.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A certificate does not carry a valid node identity.
    #[error("certificate identity: {0}")]
    Identity(#[from] IdentityError),
    /// The OS random number generator failed.
    #[error(transparent)]
    Randomness(#[from] RandomnessError),
    /// A key does not match its certificate.
    #[error("private key does not match the certificate: {0}")]
    KeyMismatch(String),
    /// The certificate has expired.
    #[error("the certificate has expired")]
    Expired,
    /// The certificate is not signed by the first trusted root.
    #[error("the certificate is not signed by the trusted CA: {0}")]
    NotSignedByRoot(String),
    /// A time is out of the range a certificate can carry.
    #[error("time out of range for a certificate")]
    TimeOutOfRange,
    /// An expired certificate presented for renewal was refused; the reason says why.
    #[error("renewal refused: {0}")]
    RenewalRefused(String),
}

/// Parameters of node certificates the CA signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertOptions {
    /// How long a certificate is valid from `now` (default 90 days).
    pub lifetime: Duration,
    /// How far before `now` validity starts, for clock skew between nodes (default 1 hour).
    pub backdate: Duration,
}

impl Default for CertOptions {
    fn default() -> Self {
        CertOptions {
            lifetime: Duration::from_secs(90 * 24 * 3600),
            backdate: Duration::from_secs(3600),
        }
    }
}

fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_err(|_| PkiError::TimeOutOfRange)?,
        Err(e) => -i64::try_from(e.duration().as_secs()).map_err(|_| PkiError::TimeOutOfRange)?,
    };
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| PkiError::TimeOutOfRange)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes: [u8; 16] = random_bytes()?;
    // Positive, and a non-zero first byte so the DER INTEGER keeps all 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn checked_sub(t: SystemTime, d: Duration) -> Result<SystemTime, PkiError> {
    t.checked_sub(d).ok_or(PkiError::TimeOutOfRange)
}

fn checked_add(t: SystemTime, d: Duration) -> Result<SystemTime, PkiError> {
    t.checked_add(d).ok_or(PkiError::TimeOutOfRange)
}

fn root_params(
    cluster_id: &ClusterId,
    now: SystemTime,
    common_name: String,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, cluster_id.as_str());
    params.distinguished_name = dn;
    // One CA below it: the next root, cross-signed by this one during a rotation.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(checked_sub(now, Duration::from_secs(3600))?)?;
    params.not_after = to_offset(checked_add(now, CA_LIFETIME)?)?;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// A cluster's root certificate authority: a P-256 key and a self-signed certificate.
pub struct ClusterCa {
    cluster_id: ClusterId,
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster_id", &self.cluster_id)
            .field("digest", &self.digest())
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new CA for `cluster_id`, valid for 20 years from now.
    pub fn create(cluster_id: ClusterId) -> Result<Self, PkiError> {
        Self::create_at(cluster_id, SystemTime::now())
    }

    /// A new CA valid from `now` − 1 h for [`CA_LIFETIME`].
    pub fn create_at(cluster_id: ClusterId, now: SystemTime) -> Result<Self, PkiError> {
        let params = root_params(&cluster_id, now, format!("starling root CA {cluster_id}"))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cluster_id,
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A new root for the same cluster, to rotate to, and that root's certificate signed by
    /// this CA's key (the cross-signed certificate): a node that still trusts only this root
    /// accepts a certificate of the new one when it is presented with the cross-signed
    /// certificate after it. The new root's name differs from this one's (a random tag),
    /// so a path builder never confuses the two.
    pub fn rotated_at(
        &self,
        now: SystemTime,
    ) -> Result<(ClusterCa, CertificateDer<'static>), PkiError> {
        let tag: [u8; 4] = random_bytes()?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let cn = format!("starling root CA {} {tag}", self.cluster_id);
        let params = root_params(&self.cluster_id, now, cn)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        let cross = params.signed_by(&key, &self.issuer)?;
        Ok((
            ClusterCa {
                cluster_id: self.cluster_id.clone(),
                cert: cert.der().clone(),
                issuer: Issuer::new(params, key),
            },
            cross.der().clone(),
        ))
    }

    /// A CA from its certificate and key in PEM (as saved by [`ClusterCa::to_pem`]).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::BadFile {
                path: "CA certificate".into(),
                why: e.to_string(),
            })?;
        let key = KeyPair::from_pem(key_pem)?;
        let cluster_id = ca_cluster_id(&cert)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        let ca = ClusterCa {
            cluster_id,
            cert,
            issuer,
        };
        // The key must be the certificate's: sign a throwaway certificate and check it chains.
        let probe = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let signed = ca.sign_key(
            &probe,
            &NodeId::new("probe")?,
            &Role::new("probe")?,
            &CertOptions::default(),
            SystemTime::now(),
        )?;
        verify_chain(&signed, &ca.cert).map_err(PkiError::KeyMismatch)?;
        Ok(ca)
    }

    /// The certificate and key in PEM, to replicate or save.
    pub fn to_pem(&self) -> (String, String) {
        (pem_cert(&self.cert), self.issuer.key().serialize_pem())
    }

    /// Saves `ca.crt` and `ca.key` in `dir` (files created with mode 0600).
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        let (cert, key) = self.to_pem();
        write_private(&dir.join("ca.crt"), cert.as_bytes())?;
        write_private(&dir.join("ca.key"), key.as_bytes())
    }

    /// Loads what [`ClusterCa::save`] wrote.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert = read_text(&dir.join("ca.crt"))?;
        let key = read_text(&dir.join("ca.key"))?;
        Self::from_pem(&cert, &key)
    }

    /// The cluster this CA serves.
    pub fn cluster_id(&self) -> &ClusterId {
        &self.cluster_id
    }

    /// The CA certificate (DER): what every node trusts.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// SHA-256 of the CA certificate, as pinned by join tokens.
    pub fn digest(&self) -> CaDigest {
        CaDigest::of_certificate(&self.cert)
    }

    /// Checks a certificate presented to renew it after it expired (a node powered off for
    /// longer than its certificate lived): it must be this CA's, of this cluster, expired for
    /// less than `grace` at `now`, and the CSR (DER) must be for the very key the certificate
    /// was issued to, which proves the presenter holds that key. Returns the identity the
    /// certificate names; whether that node is still a member is the caller's question.
    pub fn check_expired_renewal(
        &self,
        cert: &[u8],
        csr: &[u8],
        now: SystemTime,
        grace: Duration,
    ) -> Result<PeerIdentity, PkiError> {
        check_renewal(&self.cert, &self.cluster_id, cert, csr, now, grace)
    }

    /// Signs a CSR (DER) for `node_id` with `role`, valid from now.
    pub fn sign_csr(
        &self,
        csr: &[u8],
        node_id: &NodeId,
        role: &Role,
        opts: &CertOptions,
    ) -> Result<CertificateDer<'static>, PkiError> {
        self.sign_csr_at(csr, node_id, role, opts, SystemTime::now())
    }

    /// Signs a CSR as of `now`. Only the CSR's public key is used, after its self-signature
    /// is checked; names, usages, serial and validity are chosen here.
    pub fn sign_csr_at(
        &self,
        csr: &[u8],
        node_id: &NodeId,
        role: &Role,
        opts: &CertOptions,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let csr_der = CertificateSigningRequestDer::from(csr);
        // rcgen checks the CSR's self-signature.
        let parsed = CertificateSigningRequestParams::from_der(&csr_der)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        // The key itself must be a P-256 point; the signature algorithm alone does not say.
        check_p256_key(csr)?;
        self.sign_key(&parsed.public_key, node_id, role, opts, now)
    }

    fn sign_key(
        &self,
        key: &impl rcgen::PublicKeyData,
        node_id: &NodeId,
        role: &Role,
        opts: &CertOptions,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id.as_str());
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::OrganizationName, self.cluster_id.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::DnsName(dns_name(node_id, &self.cluster_id).try_into()?),
            SanType::URI(spiffe_uri(&self.cluster_id, role, node_id).try_into()?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(checked_sub(now, opts.backdate)?)?;
        params.not_after = to_offset(checked_add(now, opts.lifetime)?)?;
        params.serial_number = Some(random_serial()?);
        Ok(params.signed_by(key, &self.issuer)?.der().clone())
    }

    /// Creates a key and a certificate for a node in one step (for the first manager, or
    /// tests): the same as [`NodeKey::generate`], [`NodeKey::csr`] and [`ClusterCa::sign_csr`].
    pub fn issue(
        &self,
        node_id: &NodeId,
        role: &Role,
        opts: &CertOptions,
    ) -> Result<NodeCredentials, PkiError> {
        self.issue_at(node_id, role, opts, SystemTime::now())
    }

    /// [`ClusterCa::issue`] as of `now`.
    pub fn issue_at(
        &self,
        node_id: &NodeId,
        role: &Role,
        opts: &CertOptions,
        now: SystemTime,
    ) -> Result<NodeCredentials, PkiError> {
        let key = NodeKey::generate()?;
        let cert = self.sign_csr_at(&key.csr()?, node_id, role, opts, now)?;
        NodeCredentials::new(cert, key, vec![self.cert.clone()])
    }
}

/// [`ClusterCa::check_expired_renewal`] against a root certificate alone (no key): a
/// certificate `root` signed for `cluster_id`, valid or expired for less than `grace` at
/// `now`, and a CSR for its very key. Used for the root a cluster rotated away from, whose
/// key is gone but whose nodes that missed the rotation still hold its certificates.
pub fn check_renewal(
    root: &[u8],
    cluster_id: &ClusterId,
    cert: &[u8],
    csr: &[u8],
    now: SystemTime,
    grace: Duration,
) -> Result<PeerIdentity, PkiError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let refused = |why: String| PkiError::RenewalRefused(why);
    verify_chain(cert, root)
        .map_err(|e| refused(format!("not a certificate of this cluster's CA ({e})")))?;
    let identity = PeerIdentity::from_certificate(cert)?;
    if identity.cluster_id != *cluster_id {
        return Err(refused(format!(
            "a certificate of cluster {}",
            identity.cluster_id
        )));
    }
    let deadline = identity
        .not_after
        .checked_add(grace)
        .ok_or(PkiError::TimeOutOfRange)?;
    if deadline <= now {
        return Err(refused(format!(
            "the certificate expired more than {} s ago, beyond the renewal grace",
            grace.as_secs()
        )));
    }
    let (_, req) =
        X509CertificationRequest::from_der(csr).map_err(|e| PkiError::BadCsr(e.to_string()))?;
    req.verify_signature()
        .map_err(|e| PkiError::BadCsr(format!("bad self-signature: {e}")))?;
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| refused(e.to_string()))?;
    if req.certification_request_info.subject_pki.raw != parsed.public_key().raw {
        return Err(refused(
            "the request is not for the certificate's key".into(),
        ));
    }
    Ok(identity)
}

fn check_p256_key(csr: &[u8]) -> Result<(), PkiError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    use x509_parser::prelude::FromDer;
    let (_, req) =
        X509CertificationRequest::from_der(csr).map_err(|e| PkiError::BadCsr(e.to_string()))?;
    let spki = &req.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let point = &spki.subject_public_key.data;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_EC_P256)
        || point.len() != 65
        || point.first() != Some(&0x04)
    {
        return Err(PkiError::UnsupportedKey);
    }
    Ok(())
}

fn ca_cluster_id(cert: &[u8]) -> Result<ClusterId, PkiError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    if !parsed.is_ca() {
        return Err(PkiError::BadFile {
            path: "CA certificate".into(),
            why: "not a CA certificate".into(),
        });
    }
    let org = parsed
        .subject()
        .iter_organization()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(IdentityError::MissingField("organization"))?;
    Ok(ClusterId::new(org)?)
}

/// SHA-256 of a certificate's public key (its SubjectPublicKeyInfo), hex: what binds a node
/// to its key across renewals (they keep the key) and root rotations.
pub fn key_digest(cert: &[u8]) -> Result<String, PkiError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let d = ring::digest::digest(&ring::digest::SHA256, parsed.public_key().raw);
    Ok(d.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// The first certificate of a PEM text, DER.
pub fn certificate_from_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadFile {
        path: "certificate".into(),
        why: e.to_string(),
    })
}

/// Checks that `leaf` is signed by `ca` (any validity period). Returns why not.
fn verify_chain(leaf: &[u8], ca: &[u8]) -> Result<(), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, leaf) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let (_, ca) = X509Certificate::from_der(ca).map_err(|e| e.to_string())?;
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|e| e.to_string())
}

/// A node's private key (ECDSA P-256).
pub struct NodeKey(KeyPair);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

impl NodeKey {
    /// A fresh P-256 key.
    pub fn generate() -> Result<Self, PkiError> {
        Ok(NodeKey(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?))
    }

    /// A certificate signing request (DER) for this key. It names nothing: the CA decides.
    pub fn csr(&self) -> Result<Vec<u8>, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        Ok(params.serialize_request(&self.0)?.der().to_vec())
    }

    fn der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.0.serialize_der().into())
    }
}

/// When a certificate valid until `not_after`, seen at `now`, is to be renewed: after
/// `0.5 + 0.3 × jitter` of the time it has left, `jitter` drawn uniformly from `[0, 1]` by
/// the caller, so that nodes whose certificates were issued together spread their renewals
/// over 30 % of the lifetime (SwarmKit renews at a random 50–80 % too).
pub fn renewal_time(now: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let left = not_after.duration_since(now).unwrap_or_default();
    now + left.mul_f64(0.5 + 0.3 * jitter.clamp(0.0, 1.0))
}

/// What a node needs to take part: its certificate, its key, the CA certificates it
/// trusts, and the certificates it presents after its own (during and after a root CA
/// rotation: the new root cross-signed by the old one, so nodes that trust only the old
/// root accept it). The identity in the certificate is parsed once, here.
pub struct NodeCredentials {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    identity: PeerIdentity,
}

impl Clone for NodeCredentials {
    fn clone(&self) -> Self {
        NodeCredentials {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            identity: self.identity.clone(),
        }
    }
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("identity", &self.identity)
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl NodeCredentials {
    /// Credentials from a signed certificate, the key it was signed for, and the trusted CA
    /// certificates (the first is the one that signed `cert`).
    pub fn new(
        cert: CertificateDer<'static>,
        key: NodeKey,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, PkiError> {
        Self::from_parts(cert, key.der(), roots)
    }

    fn from_parts(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, PkiError> {
        let identity = PeerIdentity::from_certificate(&cert)?;
        if roots.is_empty() {
            return Err(PkiError::BadFile {
                path: "credentials".into(),
                why: "no trusted CA certificate".into(),
            });
        }
        // The key must match the certificate: rustls checks it against the public key.
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key.clone_key(), &provider)
            .map_err(|e| PkiError::KeyMismatch(e.to_string()))?;
        Ok(NodeCredentials {
            cert,
            key,
            roots,
            chain: Vec::new(),
            identity,
        })
    }

    /// The identity in the certificate.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// The node certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The trusted CA certificates (DER).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The certificates presented after the node's own, never trusted by this node (DER).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The same credentials presenting `chain` after the certificate.
    pub fn with_chain(mut self, chain: Vec<CertificateDer<'static>>) -> Self {
        self.chain = chain;
        self
    }

    /// What the node presents in a handshake after its own certificate: the chain, then
    /// the trusted roots (a joiner pins one of them by digest), each once.
    pub fn presented(&self) -> Vec<CertificateDer<'static>> {
        let mut out = vec![self.cert.clone()];
        for c in self.chain.iter().chain(&self.roots) {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
        out
    }

    pub(crate) fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// This certificate's key, to ask for a renewal of the certificate with the same key.
    pub fn node_key(&self) -> Result<NodeKey, PkiError> {
        let bad = |why: String| PkiError::BadFile {
            path: "credentials".into(),
            why,
        };
        match &self.key {
            PrivateKeyDer::Pkcs8(k) => KeyPair::try_from(k)
                .map(NodeKey)
                .map_err(|e| bad(e.to_string())),
            _ => Err(bad("only PKCS#8 keys are supported".into())),
        }
    }

    /// The same key and roots with a new certificate for that key (a renewal or a role
    /// change); `roots` replaces the trusted roots when given. The chain is kept.
    pub fn renewed(
        &self,
        cert: CertificateDer<'static>,
        roots: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Self, PkiError> {
        Ok(Self::from_parts(
            cert,
            self.key.clone_key(),
            roots.unwrap_or_else(|| self.roots.clone()),
        )?
        .with_chain(self.chain.clone()))
    }

    /// Checks that the certificate is valid at `now` and signed by a trusted root, directly
    /// or through a certificate of the chain that a trusted root signed.
    pub fn check_usable(&self, now: SystemTime) -> Result<(), PkiError> {
        if self.identity.not_after <= now {
            return Err(PkiError::Expired);
        }
        if self.roots.is_empty() {
            return Err(PkiError::BadFile {
                path: "credentials".into(),
                why: "no trusted CA certificate".into(),
            });
        }
        let mut why = String::new();
        for root in &self.roots {
            match verify_chain(&self.cert, root) {
                Ok(()) => return Ok(()),
                Err(e) => why = e,
            }
            for link in &self.chain {
                if verify_chain(&self.cert, link).is_ok() && verify_chain(link, root).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(PkiError::NotSignedByRoot(why))
    }

    /// Saves the certificate, the key and every trusted root as one PEM file,
    /// `dir/node.pem`, created with mode 0600 and replaced atomically, so a crash never
    /// leaves a certificate beside a key that does not match it.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        let path = dir.join(NODE_PEM);
        let key_pem = match &self.key {
            PrivateKeyDer::Pkcs8(k) => pem_block("PRIVATE KEY", k.secret_pkcs8_der()),
            _ => {
                return Err(PkiError::BadFile {
                    path,
                    why: "only PKCS#8 keys are stored".into(),
                });
            }
        };
        let mut bundle = pem_cert(&self.cert);
        bundle.push_str(&key_pem);
        for root in &self.roots {
            bundle.push_str(&pem_cert(root));
        }
        // The chain first: a crash between the two files leaves at worst a chain presented
        // beside the old certificate, which nobody trusts because of it.
        let chain_path = dir.join(CHAIN_PEM);
        if self.chain.is_empty() {
            match fs::remove_file(&chain_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PkiError::Io {
                        path: chain_path,
                        source,
                    });
                }
            }
        } else {
            let chain: String = self.chain.iter().map(|c| pem_cert(c)).collect();
            write_private(&chain_path, chain.as_bytes())?;
        }
        write_private(&path, bundle.as_bytes())
    }

    /// Loads what [`NodeCredentials::save`] wrote: the first certificate in `node.pem` is
    /// the node's, the others are trusted roots.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let path = dir.join(NODE_PEM);
        let text = read_text(&path)?;
        let bad = |why: String| PkiError::BadFile {
            path: path.clone(),
            why,
        };
        let mut certs = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?
            .into_iter();
        let cert = certs.next().ok_or_else(|| bad("no certificate".into()))?;
        let key = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let creds = Self::from_parts(cert, key, certs.collect())?;
        let chain_path = dir.join(CHAIN_PEM);
        let chain = match fs::read(&chain_path) {
            Ok(bytes) => CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| PkiError::BadFile {
                    path: chain_path,
                    why: e.to_string(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(PkiError::Io {
                    path: chain_path,
                    source,
                });
            }
        };
        Ok(creds.with_chain(chain))
    }
}

/// The file [`NodeCredentials::save`] writes.
const NODE_PEM: &str = "node.pem";
/// The certificates presented after the node's own, beside [`NODE_PEM`] (absent: none).
const CHAIN_PEM: &str = "chain.pem";

fn pem_cert(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `bytes` to `path` through a temporary file created with mode 0600, fsynced and
/// renamed over the target, so a crash leaves either the old file or the new one.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ca() -> ClusterCa {
        ClusterCa::create(ClusterId::new("c1").unwrap()).unwrap()
    }

    #[test]
    fn renewal_falls_between_half_and_four_fifths_of_the_time_left() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_after = now + Duration::from_secs(1000);
        let at = |j: f64| {
            renewal_time(now, not_after, j)
                .duration_since(now)
                .unwrap()
                .as_secs()
        };
        assert_eq!(at(0.0), 500);
        assert_eq!(at(1.0), 800);
        assert_eq!(at(0.5), 650);
        // Out-of-range jitter is clamped; an expired certificate is due at once.
        assert_eq!(at(7.0), 800);
        assert_eq!(renewal_time(not_after, now, 0.3), not_after);
    }

    #[test]
    fn an_expired_certificate_renews_within_the_grace_with_its_own_key() {
        let ca = ca();
        let node = NodeId::new("n1").unwrap();
        let day = Duration::from_secs(24 * 3600);
        let opts = CertOptions {
            lifetime: day,
            ..CertOptions::default()
        };
        let now = SystemTime::now();
        // Issued 3 days ago for one day: expired 2 days ago.
        let old = ca
            .issue_at(&node, &Role::WORKER, &opts, now - 3 * day)
            .unwrap();
        let csr = old.node_key().unwrap().csr().unwrap();
        let id = ca
            .check_expired_renewal(old.certificate(), &csr, now, 30 * day)
            .unwrap();
        assert_eq!(id.node_id, node);
        // The renewed credentials keep the key and are usable.
        let cert = ca.sign_csr(&csr, &node, &Role::WORKER, &opts).unwrap();
        let renewed = old.renewed(cert, None).unwrap();
        renewed.check_usable(now).unwrap();
        assert_ne!(renewed.identity().serial, old.identity().serial);

        // Beyond the grace.
        let e = ca
            .check_expired_renewal(old.certificate(), &csr, now, day)
            .unwrap_err();
        assert!(e.to_string().contains("beyond the renewal grace"), "{e}");
        // Another key: the presenter does not hold the certificate's key.
        let other = NodeKey::generate().unwrap().csr().unwrap();
        let e = ca
            .check_expired_renewal(old.certificate(), &other, now, 30 * day)
            .unwrap_err();
        assert!(
            e.to_string().contains("not for the certificate's key"),
            "{e}"
        );
        // Another CA's certificate.
        let foreign = ClusterCa::create(ClusterId::new("c1").unwrap())
            .unwrap()
            .issue_at(&node, &Role::WORKER, &opts, now - 3 * day)
            .unwrap();
        let csr = foreign.node_key().unwrap().csr().unwrap();
        let e = ca
            .check_expired_renewal(foreign.certificate(), &csr, now, 30 * day)
            .unwrap_err();
        assert!(
            e.to_string().contains("not a certificate of this cluster"),
            "{e}"
        );
        // Garbage.
        assert!(
            ca.check_expired_renewal(b"junk", b"junk", now, day)
                .is_err()
        );
        assert!(
            ca.check_expired_renewal(old.certificate(), b"junk", now, 30 * day)
                .is_err()
        );
    }

    #[test]
    fn signed_certificate_carries_the_identity() {
        let ca = ca();
        let creds = ca
            .issue(
                &NodeId::new("n7").unwrap(),
                &Role::WORKER,
                &CertOptions::default(),
            )
            .unwrap();
        let id = creds.identity();
        assert_eq!(id.node_id.as_str(), "n7");
        assert_eq!(id.role, Role::WORKER);
        assert_eq!(id.cluster_id.as_str(), "c1");
        assert_eq!(id.serial.0.len(), 16);
        let life = id
            .not_after
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((89 * 24 * 3600..=90 * 24 * 3600).contains(&life), "{life}");
        verify_chain(creds.certificate(), ca.certificate()).unwrap();
    }

    #[test]
    fn only_the_csr_public_key_is_taken() {
        // A CSR that asks for another node's name and a CA bit gets neither.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["m1.c1.starling".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "manager");
        let csr = params.serialize_request(&key).unwrap();
        let ca = ca();
        let cert = ca
            .sign_csr(
                csr.der(),
                &NodeId::new("w9").unwrap(),
                &Role::WORKER,
                &CertOptions::default(),
            )
            .unwrap();
        let id = PeerIdentity::from_certificate(&cert).unwrap();
        assert_eq!(id.node_id.as_str(), "w9");
        assert_eq!(id.role, Role::WORKER);
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, x) = X509Certificate::from_der(&cert).unwrap();
        assert!(!x.is_ca());
    }

    #[test]
    fn garbage_and_tampered_csrs_are_rejected() {
        let ca = ca();
        let n = NodeId::new("n1").unwrap();
        let o = CertOptions::default();
        assert!(matches!(
            ca.sign_csr(b"junk", &n, &Role::WORKER, &o),
            Err(PkiError::BadCsr(_))
        ));
        let mut csr = NodeKey::generate().unwrap().csr().unwrap();
        let last = csr.len() - 3;
        csr[last] ^= 0x55;
        assert!(ca.sign_csr(&csr, &n, &Role::WORKER, &o).is_err());
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let other = KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::default()
                .serialize_request(&other)
                .unwrap();
            assert!(matches!(
                ca.sign_csr(csr.der(), &n, &Role::WORKER, &o),
                Err(PkiError::UnsupportedKey)
            ));
        }
    }

    #[test]
    fn files_are_private_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        ca.save(dir.path()).unwrap();
        let loaded = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(loaded.certificate(), ca.certificate());
        assert_eq!(loaded.cluster_id(), ca.cluster_id());
        let creds = loaded
            .issue(
                &NodeId::new("m1").unwrap(),
                &Role::MANAGER,
                &CertOptions::default(),
            )
            .unwrap();
        verify_chain(creds.certificate(), ca.certificate()).unwrap();
        let node_dir = dir.path().join("node");
        fs::create_dir(&node_dir).unwrap();
        creds.save(&node_dir).unwrap();
        let mode = fs::metadata(node_dir.join(NODE_PEM))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        for f in ["ca.crt", "ca.key"] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let back = NodeCredentials::load(&node_dir).unwrap();
        assert_eq!(back.identity(), creds.identity());
        assert_eq!(back.roots(), creds.roots());
    }

    #[test]
    fn usable_means_unexpired_and_signed_by_the_root() {
        let a = ca();
        let b = ca();
        let n = NodeId::new("n1").unwrap();
        let now = SystemTime::now();
        let creds = a.issue(&n, &Role::WORKER, &CertOptions::default()).unwrap();
        creds.check_usable(now).unwrap();
        assert!(matches!(
            creds.check_usable(now + Duration::from_secs(91 * 24 * 3600)),
            Err(PkiError::Expired)
        ));
        let key = NodeKey::generate().unwrap();
        let cert = a
            .sign_csr(
                &key.csr().unwrap(),
                &n,
                &Role::WORKER,
                &CertOptions::default(),
            )
            .unwrap();
        let wrong_root = NodeCredentials::new(cert, key, vec![b.certificate().clone()]).unwrap();
        assert!(matches!(
            wrong_root.check_usable(now),
            Err(PkiError::NotSignedByRoot(_))
        ));
    }

    #[test]
    fn mismatched_or_corrupt_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let a = ca();
        let b = ca();
        let (cert, _) = a.to_pem();
        let (_, key) = b.to_pem();
        assert!(matches!(
            ClusterCa::from_pem(&cert, &key),
            Err(PkiError::KeyMismatch(_))
        ));
        let creds = a
            .issue(
                &NodeId::new("m1").unwrap(),
                &Role::MANAGER,
                &CertOptions::default(),
            )
            .unwrap();
        creds.save(dir.path()).unwrap();
        fs::write(dir.path().join(NODE_PEM), "garbage").unwrap();
        assert!(matches!(
            NodeCredentials::load(dir.path()),
            Err(PkiError::BadFile { .. })
        ));
        // A bundle cut short (no key) is refused, not half-loaded.
        let (cert_only, _) = a.to_pem();
        fs::write(dir.path().join(NODE_PEM), cert_only).unwrap();
        assert!(NodeCredentials::load(dir.path()).is_err());
        fs::remove_file(dir.path().join(NODE_PEM)).unwrap();
        assert!(matches!(
            NodeCredentials::load(dir.path()),
            Err(PkiError::Io { .. })
        ));
    }
}
