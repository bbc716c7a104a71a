//! Join tokens: `STRL-1-<sha256 of the CA certificate>-<secret>`, both parts in lower-case
//! base32 without padding.
//!
//! The digest lets a joiner pin the cluster's CA before it trusts anything; the secret proves
//! to a manager that the joiner was invited. Each role has its own secret (SwarmKit's manager
//! and worker tokens), so the secret a joiner presents decides the role it gets.

use std::fmt;
use std::str::FromStr;

use ring::rand::SecureRandom;

use crate::identity::Role;

const PREFIX: &str = "STRL";
const VERSION: &str = "1";
const DIGEST_LEN: usize = 32;
const SECRET_LEN: usize = 16;
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Which part of a token an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPart {
    /// The CA digest, the third field.
    Digest,
    /// The secret, the fourth field.
    Secret,
}

impl fmt::Display for TokenPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenPart::Digest => "CA digest",
            TokenPart::Secret => "secret",
        })
    }
}

/// Why a string is not a join token. Parsing changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token does not start with `STRL-`.
    #[error("not a Starling join token: it must start with \"STRL-\"")]
    WrongPrefix,
    /// The token is of a version this build does not know.
    #[error("unknown join token version {0:?} (this build knows version 1)")]
    UnknownVersion(String),
    /// The token does not have the four `-`-separated fields `STRL-1-<digest>-<secret>`.
    #[error("malformed join token: expected STRL-1-<digest>-<secret>, found {0} fields")]
    WrongFieldCount(usize),
    /// A field has the wrong number of characters.
    #[error("join token {part} has {found} characters, expected {expected}")]
    BadLength {
        /// The field.
        part: TokenPart,
        /// Characters expected.
        expected: usize,
        /// Characters found.
        found: usize,
    },
    /// A field holds a character outside lower-case base32 (`a-z`, `2-7`).
    #[error("join token {part} has an invalid character {character:?} at position {position}")]
    BadCharacter {
        /// The field.
        part: TokenPart,
        /// The offending character.
        character: char,
        /// Its position in the field, from 0.
        position: usize,
    },
    /// The field's last character carries bits that a canonical encoding leaves zero.
    #[error("join token {part} is not canonically encoded (was it edited by hand?)")]
    NonCanonical {
        /// The field.
        part: TokenPart,
    },
}

fn encoded_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(encoded_len(bytes.len()));
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

fn decode<const N: usize>(part: TokenPart, text: &str) -> Result<[u8; N], TokenError> {
    let expected = encoded_len(N);
    let found = text.chars().count();
    if found != expected {
        return Err(TokenError::BadLength {
            part,
            expected,
            found,
        });
    }
    let mut out = [0u8; N];
    let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
    for (position, character) in text.chars().enumerate() {
        let v = match character {
            'a'..='z' => character as u32 - 'a' as u32,
            '2'..='7' => character as u32 - '2' as u32 + 26,
            _ => {
                return Err(TokenError::BadCharacter {
                    part,
                    character,
                    position,
                });
            }
        };
        acc = ((acc << 5) | v) & 0xfff;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            if let Some(slot) = out.get_mut(n) {
                *slot = (acc >> bits) as u8;
            }
            n += 1;
        }
    }
    if acc & ((1 << bits) - 1) != 0 {
        return Err(TokenError::NonCanonical { part });
    }
    Ok(out)
}

/// The operating system's random number generator failed; nothing was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the operating system's random number generator is unavailable")]
pub struct RandomnessError;

/// `N` bytes from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], RandomnessError> {
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| RandomnessError)?;
    Ok(bytes)
}

/// SHA-256 of a CA certificate (DER): what a join token pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaDigest(pub [u8; DIGEST_LEN]);

impl CaDigest {
    /// The digest of the first certificate in a PEM text, or `None` if there is none.
    pub fn of_pem_certificate(pem: &str) -> Option<Self> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .ok()
            .map(|der| Self::of_certificate(&der))
    }

    /// The digest of a DER certificate.
    pub fn of_certificate(der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(d.as_ref());
        CaDigest(out)
    }
}

/// Lowercase hex, as the cluster records which root signed a node's certificate.
impl fmt::Display for CaDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CaDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaDigest({})", encode(&self.0))
    }
}

/// The random secret of a join token. `Debug` does not print it; equality runs in constant
/// time.
#[derive(Clone)]
pub struct JoinSecret([u8; SECRET_LEN]);

impl JoinSecret {
    /// A fresh secret from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, RandomnessError> {
        Ok(JoinSecret(random_bytes()?))
    }

    /// Compares two secrets in time independent of their contents.
    pub fn ct_eq(&self, other: &JoinSecret) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }

    /// The secret's bytes (to persist it in the cluster state).
    pub fn as_bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// A secret from persisted bytes.
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        JoinSecret(bytes)
    }
}

impl PartialEq for JoinSecret {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other)
    }
}
impl Eq for JoinSecret {}

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinSecret(..)")
    }
}

/// A join token: which CA to trust and the secret that admits the joiner.
///
/// ```
/// use starling_transport::{CaDigest, JoinSecret, JoinToken};
/// let token = JoinToken::new(CaDigest::of_certificate(b"ca"), JoinSecret::generate()?);
/// let text = token.to_string();
/// assert!(text.starts_with("STRL-1-"));
/// assert_eq!(text.parse::<JoinToken>()?, token);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The digest of the cluster CA certificate.
    pub ca_digest: CaDigest,
    /// The secret.
    pub secret: JoinSecret,
}

impl JoinToken {
    /// A token from its parts.
    pub fn new(ca_digest: CaDigest, secret: JoinSecret) -> Self {
        JoinToken { ca_digest, secret }
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}-{VERSION}-{}-{}",
            encode(&self.ca_digest.0),
            encode(&self.secret.0)
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_digest", &self.ca_digest)
            .finish_non_exhaustive()
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let fields: Vec<&str> = s.split('-').collect();
        if fields.first() != Some(&PREFIX) {
            return Err(TokenError::WrongPrefix);
        }
        match fields.get(1) {
            Some(&VERSION) => {}
            Some(v) => return Err(TokenError::UnknownVersion((*v).to_owned())),
            None => return Err(TokenError::WrongFieldCount(fields.len())),
        }
        let [_, _, digest, secret] = fields[..] else {
            return Err(TokenError::WrongFieldCount(fields.len()));
        };
        Ok(JoinToken {
            ca_digest: CaDigest(decode(TokenPart::Digest, digest)?),
            secret: JoinSecret(decode(TokenPart::Secret, secret)?),
        })
    }
}

/// The secrets a cluster accepts, one per role, kept by the managers.
///
/// ```
/// use starling_transport::{CaDigest, JoinSecrets, Role};
/// let digest = CaDigest::of_certificate(b"ca");
/// let mut secrets = JoinSecrets::new(digest);
/// secrets.rotate(Role::WORKER)?;
/// let token = secrets.token(&Role::WORKER).ok_or("no worker secret")?;
/// assert_eq!(secrets.authorize(&token), Some(Role::WORKER));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct JoinSecrets {
    ca_digest: CaDigest,
    by_role: Vec<(Role, JoinSecret)>,
}

impl JoinSecrets {
    /// No secrets yet, for the CA with this digest.
    pub fn new(ca_digest: CaDigest) -> Self {
        JoinSecrets {
            ca_digest,
            by_role: Vec::new(),
        }
    }

    /// Sets the secret of `role` (a persisted one, say).
    pub fn set(&mut self, role: Role, secret: JoinSecret) {
        self.by_role.retain(|(r, _)| *r != role);
        self.by_role.push((role, secret));
    }

    /// Replaces the secret of `role` with a fresh one: tokens issued before stop working.
    pub fn rotate(&mut self, role: Role) -> Result<JoinSecret, RandomnessError> {
        let secret = JoinSecret::generate()?;
        self.set(role, secret.clone());
        Ok(secret)
    }

    /// The current token for `role`, if it has a secret.
    pub fn token(&self, role: &Role) -> Option<JoinToken> {
        self.by_role
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, s)| JoinToken::new(self.ca_digest, s.clone()))
    }

    /// The role that `token` admits, or `None`. Every secret is compared, in constant time,
    /// so the time taken does not say which one (if any) was close.
    pub fn authorize(&self, token: &JoinToken) -> Option<Role> {
        let mut found = None;
        for (role, secret) in &self.by_role {
            if secret.ct_eq(&token.secret) && found.is_none() {
                found = Some(role.clone());
            }
        }
        if token.ca_digest != self.ca_digest {
            return None;
        }
        found
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn token_from(d: [u8; 32], s: [u8; 16]) -> JoinToken {
        JoinToken::new(CaDigest(d), JoinSecret(s))
    }

    #[test]
    fn token_has_documented_shape() {
        let t = token_from([0; 32], [255; 16]).to_string();
        assert_eq!(t.len(), 4 + 1 + 1 + 1 + 52 + 1 + 26);
        assert!(t.starts_with("STRL-1-aaaa"));
    }

    #[test]
    fn each_mistake_has_its_own_error() {
        let good = token_from([7; 32], [9; 16]).to_string();
        let fields: Vec<&str> = good.split('-').collect();
        assert_eq!(
            "SWMTKN-1-x-y".parse::<JoinToken>(),
            Err(TokenError::WrongPrefix)
        );
        assert_eq!(
            format!("STRL-2-{}-{}", fields[2], fields[3]).parse::<JoinToken>(),
            Err(TokenError::UnknownVersion("2".into()))
        );
        assert_eq!(
            "STRL-1-abc".parse::<JoinToken>(),
            Err(TokenError::WrongFieldCount(3))
        );
        assert_eq!(
            format!("STRL-1-{}-{}", &fields[2][1..], fields[3]).parse::<JoinToken>(),
            Err(TokenError::BadLength {
                part: TokenPart::Digest,
                expected: 52,
                found: 51
            })
        );
        assert_eq!(
            format!("STRL-1-{}-{}x", fields[2], fields[3]).parse::<JoinToken>(),
            Err(TokenError::BadLength {
                part: TokenPart::Secret,
                expected: 26,
                found: 27
            })
        );
        let mut bad = fields[3].to_owned();
        bad.replace_range(3..4, "1");
        assert_eq!(
            format!("STRL-1-{}-{bad}", fields[2]).parse::<JoinToken>(),
            Err(TokenError::BadCharacter {
                part: TokenPart::Secret,
                character: '1',
                position: 3
            })
        );
        // 128 bits in 26 characters leave 2 bits over; a final '7' sets them.
        let mut nc = fields[3].to_owned();
        nc.replace_range(25..26, "7");
        assert_eq!(
            format!("STRL-1-{}-{nc}", fields[2]).parse::<JoinToken>(),
            Err(TokenError::NonCanonical {
                part: TokenPart::Secret
            })
        );
    }

    #[test]
    fn secrets_bind_roles_and_rotate() {
        let digest = CaDigest([1; 32]);
        let mut s = JoinSecrets::new(digest);
        s.rotate(Role::WORKER).unwrap();
        s.rotate(Role::MANAGER).unwrap();
        let worker = s.token(&Role::WORKER).unwrap();
        let manager = s.token(&Role::MANAGER).unwrap();
        assert_eq!(s.authorize(&worker), Some(Role::WORKER));
        assert_eq!(s.authorize(&manager), Some(Role::MANAGER));
        let other_ca = JoinToken::new(CaDigest([2; 32]), worker.secret.clone());
        assert_eq!(s.authorize(&other_ca), None);
        s.rotate(Role::WORKER).unwrap();
        assert_eq!(s.authorize(&worker), None);
        assert_eq!(s.authorize(&manager), Some(Role::MANAGER));
    }

    #[test]
    fn secret_debug_hides_the_secret() {
        let t = token_from([0; 32], [0xab; 16]);
        let shown = format!("{t:?} {:?}", t.secret);
        assert!(!shown.contains(&encode(&[0xab; 16])));
    }

    proptest! {
        #[test]
        fn display_round_trips(d in any::<[u8; 32]>(), s in any::<[u8; 16]>()) {
            let t = token_from(d, s);
            let parsed: JoinToken = t.to_string().parse().unwrap();
            prop_assert_eq!(parsed.ca_digest, t.ca_digest);
            prop_assert!(parsed.secret.ct_eq(&t.secret));
        }

        #[test]
        fn garbage_never_panics(s in "\\PC*") {
            let _ = s.parse::<JoinToken>();
        }

        #[test]
        fn near_misses_are_rejected(s in "STRL-[0-9]-[a-z2-7A-Z0-9]{0,60}-[a-z2-7A-Z0-9]{0,30}") {
            // Any string that parses must print back to itself: no two texts mean one token.
            if let Ok(t) = s.parse::<JoinToken>() {
                prop_assert_eq!(t.to_string(), s);
            }
        }

        #[test]
        fn one_flipped_character_is_caught(d in any::<[u8; 32]>(), s in any::<[u8; 16]>(), i in 7usize..86, c in any::<char>()) {
            let text = token_from(d, s).to_string();
            let mut chars: Vec<char> = text.chars().collect();
            prop_assume!(chars[i] != c);
            chars[i] = c;
            let edited: String = chars.into_iter().collect();
            if let Ok(t) = edited.parse::<JoinToken>() {
                prop_assert_ne!(t, token_from(d, s));
            }
        }
    }
}
