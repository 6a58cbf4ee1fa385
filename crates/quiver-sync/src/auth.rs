//! Access tokens: stored as SHA-256 hashes, each scoped to shards and to
//! read-only or read-write, compared in constant time.

use quiver_core::wire::constant_time_eq;
use quiver_store::TokenRecord;
use sha2::{Digest, Sha256};

/// What a connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Shards it may see (`None`: all).
    pub shards: Option<Vec<String>>,
    pub read_only: bool,
}

impl Access {
    pub fn full() -> Access {
        Access {
            shards: None,
            read_only: false,
        }
    }

    pub fn allows(&self, shard: &str) -> bool {
        self.shards
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == shard))
    }
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random token (shown once, stored only as its hash).
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "qv_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Decides what a presented token grants. `master` is a token given to the
/// server directly (full access); `tokens` are the store's scoped tokens.
pub fn authorize(
    given: Option<&str>,
    master: Option<&str>,
    tokens: &[TokenRecord],
) -> Result<Access, &'static str> {
    if master.is_none() && tokens.is_empty() {
        return Ok(Access::full());
    }
    let Some(given) = given.filter(|g| !g.is_empty()) else {
        return Err("a token is required");
    };
    if let Some(m) = master {
        if constant_time_eq(given.as_bytes(), m.as_bytes()) {
            return Ok(Access::full());
        }
    }
    let h = hash_token(given);
    let mut granted = None;
    // Compare against every token, so timing does not tell which matched.
    for t in tokens {
        if constant_time_eq(t.hash.as_bytes(), h.as_bytes()) {
            granted = Some(Access {
                shards: (!t.shards.is_empty()).then(|| t.shards.clone()),
                read_only: t.read_only,
            });
        }
    }
    granted.ok_or("invalid token")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(token: &str, shards: &[&str], read_only: bool) -> TokenRecord {
        TokenRecord {
            id: 1,
            hash: hash_token(token),
            shards: shards.iter().map(|s| s.to_string()).collect(),
            read_only,
            label: None,
            created_at: 0,
        }
    }

    #[test]
    fn scopes_and_refusals() {
        assert_eq!(authorize(None, None, &[]), Ok(Access::full()));
        assert_eq!(authorize(None, Some("m"), &[]), Err("a token is required"));
        assert_eq!(authorize(Some("m"), Some("m"), &[]), Ok(Access::full()));
        let toks = [rec("ro", &["memory"], true), rec("rw", &[], false)];
        let ro = authorize(Some("ro"), None, &toks).unwrap();
        assert!(ro.read_only && ro.allows("memory") && !ro.allows("default"));
        let rw = authorize(Some("rw"), None, &toks).unwrap();
        assert!(!rw.read_only && rw.allows("anything"));
        assert_eq!(authorize(Some("nope"), None, &toks), Err("invalid token"));
        assert!(generate_token().starts_with("qv_") && generate_token().len() == 67);
    }
}
