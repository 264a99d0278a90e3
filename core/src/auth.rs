//! Shared-secret authentication (`DEVCCL_SECRET`).
//!
//! The secret never travels. Ranks prove they know it with HMAC-SHA256 tags over fresh
//! nonces (rendezvous join, data-connection handshake). The key is derived from the secret
//! with a domain-separated SHA-256 so the raw secret is not used as a MAC key directly.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// A key derived from the shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey([u8; 32]);

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

impl AuthKey {
    /// Derive the key from a secret string.
    pub fn from_secret(secret: &str) -> AuthKey {
        let mut h = Sha256::new();
        h.update(b"devccl-secret-v1\0");
        h.update(secret.as_bytes());
        AuthKey(h.finalize().into())
    }

    /// HMAC-SHA256 over the concatenation of `parts`, with a domain label.
    pub fn tag(&self, domain: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(domain.as_bytes());
        m.update(&[0]);
        for p in parts {
            m.update(&(p.len() as u32).to_le_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Constant-time check of a tag.
    pub fn verify(&self, domain: &str, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(domain.as_bytes());
        m.update(&[0]);
        for p in parts {
            m.update(&(p.len() as u32).to_le_bytes());
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }
}

/// Tag for an optional key: zeros without a secret. Verification without a key accepts only
/// the zero tag, so a rank with a secret and a rank without one never connect.
pub fn tag_opt(key: Option<&AuthKey>, domain: &str, parts: &[&[u8]]) -> [u8; 32] {
    key.map_or([0; 32], |k| k.tag(domain, parts))
}

/// Verify against an optional key (see [`tag_opt`]).
pub fn verify_opt(key: Option<&AuthKey>, domain: &str, parts: &[&[u8]], tag: &[u8]) -> bool {
    match key {
        Some(k) => k.verify(domain, parts, tag),
        None => tag.iter().all(|&b| b == 0),
    }
}

/// 16 random bytes.
pub fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).expect("OS random source");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_and_differ() {
        let k = AuthKey::from_secret("s3cret");
        let t = k.tag("d", &[b"a", b"bc"]);
        assert!(k.verify("d", &[b"a", b"bc"], &t));
        assert!(!k.verify("d", &[b"ab", b"c"], &t), "length-prefixed parts");
        assert!(!AuthKey::from_secret("other").verify("d", &[b"a", b"bc"], &t));
        assert!(!verify_opt(None, "d", &[], &t));
        assert!(verify_opt(None, "d", &[], &[0; 32]));
        assert!(!verify_opt(Some(&k), "d", &[], &[0; 32]));
    }
}
