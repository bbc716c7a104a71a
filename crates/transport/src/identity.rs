//! Who a peer is: node id, role and cluster id, and how they appear in a certificate.
//!
//! The certificate is the only source of a peer's identity. Each name is written in three
//! places that must agree: the subject (CN = node id, OU = role, O = cluster id), a DNS SAN
//! `<node-id>.<cluster-id>.starling` (the name a dialer verifies, since webpki matches DNS
//! names only) and a URI SAN `spiffe://<cluster-id>/<role>/<node-id>`.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Suffix of the DNS name that a node certificate carries and a dialer verifies.
pub(crate) const DNS_SUFFIX: &str = "starling";

/// Why a name or a certificate does not describe a valid identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A node id, cluster id or role is not a DNS label: 1 to 63 characters of `a-z`, `0-9`
    /// and `-`, not starting or ending with `-`. Nothing was created.
    #[error("invalid {kind} {value:?}: {why}")]
    InvalidName {
        /// Which name: "node id", "cluster id" or "role".
        kind: &'static str,
        /// The rejected value.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The certificate is not valid DER X.509.
    #[error("certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// A field that a node certificate must have is missing or appears twice.
    #[error("certificate has no single {0}")]
    MissingField(&'static str),
    /// The names in the subject and in the SANs disagree.
    #[error("certificate names disagree: {0}")]
    Inconsistent(String),
}

/// Checks that `value` is a DNS label (`a-z`, `0-9`, `-`, 1 to 63 characters, not starting
/// or ending with `-`), the rule for every name in a certificate; `kind` names it in the
/// error. Checking changes nothing.
pub fn check_label(kind: &'static str, value: &str) -> Result<(), IdentityError> {
    let err = |why| IdentityError::InvalidName {
        kind,
        value: value.to_owned(),
        why,
    };
    if value.is_empty() {
        return Err(err("empty"));
    }
    if value.len() > 63 {
        return Err(err("longer than 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err("only a-z, 0-9 and '-' are allowed"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(err("must not start or end with '-'"));
    }
    Ok(())
}

macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Cow<'static, str>);

        impl $name {
            /// Checks that `value` is a DNS label (`a-z`, `0-9`, `-`, 1 to 63 characters).
            pub fn new(value: impl Into<String>) -> Result<Self, IdentityError> {
                let value = value.into();
                check_label($kind, &value)?;
                Ok(Self(Cow::Owned(value)))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdentityError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
    };
}

label_type!(
    /// A node's id, unique in its cluster and never reused: the certificate's CN.
    NodeId,
    "node id"
);
label_type!(
    /// A cluster's id: the certificate's O, shared by every node of the cluster.
    ClusterId,
    "cluster id"
);
label_type!(
    /// A node's role: the certificate's OU. An open set: Starling uses [`Role::MANAGER`] and
    /// [`Role::WORKER`]; other projects define their own with [`Role::new`].
    Role,
    "role"
);

impl Role {
    /// A Starling manager: holds the replicated state and signs certificates.
    pub const MANAGER: Role = Role(Cow::Borrowed("manager"));
    /// A Starling worker: runs tasks, gossips, has no vote.
    pub const WORKER: Role = Role(Cow::Borrowed("worker"));
}

/// The identity of an authenticated peer, read from its certificate after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node id (CN).
    pub node_id: NodeId,
    /// The role (OU).
    pub role: Role,
    /// The cluster (O).
    pub cluster_id: ClusterId,
    /// The certificate's serial number, big-endian bytes.
    pub serial: CertSerial,
    /// When the certificate expires.
    pub not_after: SystemTime,
}

/// A certificate serial number; `Display` prints it as lower-case hex.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CertSerial(pub Vec<u8>);

impl fmt::Display for CertSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CertSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertSerial({self})")
    }
}

/// The DNS name a node's certificate carries and a dialer verifies.
pub(crate) fn dns_name(node: &NodeId, cluster: &ClusterId) -> String {
    format!("{node}.{cluster}.{DNS_SUFFIX}")
}

/// The URI SAN of a node certificate.
pub(crate) fn spiffe_uri(cluster: &ClusterId, role: &Role, node: &NodeId) -> String {
    format!("spiffe://{cluster}/{role}/{node}")
}

fn single_attr<'a>(
    mut it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
    field: &'static str,
) -> Result<String, IdentityError> {
    let first = it.next().ok_or(IdentityError::MissingField(field))?;
    if it.next().is_some() {
        return Err(IdentityError::MissingField(field));
    }
    first
        .as_str()
        .map(str::to_owned)
        .map_err(|_| IdentityError::MissingField(field))
}

impl PeerIdentity {
    /// Reads and cross-checks the identity in a node certificate (DER). Does not verify the
    /// signature or validity period: that is the TLS verifier's job, done before this.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        if !rest.is_empty() {
            return Err(IdentityError::Unparsable(
                "trailing bytes after the certificate".into(),
            ));
        }
        let subject = cert.subject();
        let node_id = NodeId::new(single_attr(subject.iter_common_name(), "common name")?)?;
        let role = Role::new(single_attr(
            subject.iter_organizational_unit(),
            "organizational unit",
        )?)?;
        let cluster_id = ClusterId::new(single_attr(subject.iter_organization(), "organization")?)?;

        let sans = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?
            .ok_or(IdentityError::MissingField("subject alternative name"))?;
        let want_dns = dns_name(&node_id, &cluster_id);
        let want_uri = spiffe_uri(&cluster_id, &role, &node_id);
        let (mut dns_ok, mut uri_ok) = (false, false);
        for name in &sans.value.general_names {
            match name {
                GeneralName::DNSName(d) if *d == want_dns => dns_ok = true,
                GeneralName::URI(u) if *u == want_uri => uri_ok = true,
                GeneralName::DNSName(d) => {
                    return Err(IdentityError::Inconsistent(format!(
                        "DNS SAN {d:?} is not {want_dns:?}"
                    )));
                }
                GeneralName::URI(u) => {
                    return Err(IdentityError::Inconsistent(format!(
                        "URI SAN {u:?} is not {want_uri:?}"
                    )));
                }
                _ => {}
            }
        }
        if !dns_ok {
            return Err(IdentityError::MissingField("DNS SAN"));
        }
        if !uri_ok {
            return Err(IdentityError::MissingField("URI SAN"));
        }
        let secs = cert.validity().not_after.timestamp();
        let not_after = if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        };
        Ok(PeerIdentity {
            node_id,
            role,
            cluster_id,
            serial: CertSerial(cert.raw_serial().to_vec()),
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_dns_rules() {
        assert!(NodeId::new("m1").is_ok());
        assert!(NodeId::new("a-b-0").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("-a").is_err());
        assert!(NodeId::new("a-").is_err());
        assert!(NodeId::new("A").is_err());
        assert!(NodeId::new("a.b").is_err());
        assert!(NodeId::new("x".repeat(64)).is_err());
        assert!(NodeId::new("x".repeat(63)).is_ok());
        assert_eq!(Role::new("manager").ok(), Some(Role::MANAGER));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            PeerIdentity::from_certificate(b"not a certificate"),
            Err(IdentityError::Unparsable(_))
        ));
        assert!(PeerIdentity::from_certificate(&[]).is_err());
    }
}
