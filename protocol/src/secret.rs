//! Secrets: join tokens, resume secrets, one-time connection secrets.
//!
//! A [`Secret`] never shows its value in `Debug`; relays store only [`Secret::hash`] and
//! compare in constant time.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::limits::SECRET_BYTES;

/// A secret string. `Debug` prints `Secret(***)`; use [`Secret::expose`] where the value is
/// really needed (sending it on the wire, writing a token file).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// Equality of secrets is constant-time, like every other comparison of them.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other)
    }
}

impl Eq for Secret {}

/// SHA-256 of a secret: what the relay keeps instead of the secret itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    /// The digest bytes (for the relay's state store).
    pub fn to_bytes(self) -> [u8; 32] {
        self.0
    }

    /// A hash read back from the state store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl Secret {
    /// A new random 256-bit secret, hex-encoded, with a short prefix that tells a person
    /// what kind of secret it is (`phj_` join token, `phr_` resume secret, ...).
    pub fn generate(prefix: &str) -> Self {
        let mut bytes = [0u8; SECRET_BYTES];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(format!("{prefix}{}", hex::encode(bytes)))
    }

    /// Wraps a value that came from a peer, a file or the environment.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret's value.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the value.
    pub fn hash(&self) -> SecretHash {
        SecretHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// Constant-time comparison against a stored hash.
    pub fn matches(&self, hash: &SecretHash) -> bool {
        self.hash().0.ct_eq(&hash.0).into()
    }

    /// Constant-time comparison of two secrets (by their hashes, so lengths do not leak).
    pub fn ct_eq(&self, other: &Secret) -> bool {
        self.matches(&other.hash())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHash(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::generate("phj_");
        assert!(!format!("{s:?}").contains(&s.expose()[4..]));
        assert_eq!(format!("{:?}", s.hash()), "SecretHash(***)");
    }

    #[test]
    fn generated_secrets_are_256_bit_and_distinct() {
        let a = Secret::generate("x_");
        let b = Secret::generate("x_");
        assert_eq!(a.expose().len(), 2 + 64);
        assert!(!a.ct_eq(&b));
        assert!(a.ct_eq(&a.clone()));
        assert!(a.matches(&a.hash()));
        assert!(!b.matches(&a.hash()));
    }
}
