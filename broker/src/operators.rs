//! The operators file (`operators_file` in the broker's config): who may change state through
//! the operators' HTTP API (replay or discard a dead letter, reload the registry). One entry
//! per operator: a name and the SHA-256 of the operator's bearer token, never the token itself.
//! Written by `referral-broker operator add|remove` ([`crate::onboard::operators`]); read by
//! the HTTP endpoint at every request that needs an operator, so that adding or removing one
//! takes effect at once, without a restart.
//!
//! ```toml
//! [[operator]]
//! name = "kim-minji"
//! token_sha256 = "9f86d0…"   # hex SHA-256 of the token in <secrets>/operators/kim-minji.token
//! ```
//!
//! Tokens are 256 random bits (base64url, prefixed `yop_`): with that much entropy a plain
//! SHA-256 is as good as a slow hash, and costs nothing per request. Comparison is of digests,
//! in constant time, against every entry (no early exit).

use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What every token starts with (so that a leaked one is recognisable, e.g. by secret scanners).
pub const TOKEN_PREFIX: &str = "yop_";
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// Longest operator name.
pub const MAX_NAME: usize = 64;

/// One operator: a name and the digest of its token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub token_sha256: String,
}

/// The operators file, parsed and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operators {
    entries: Vec<(String, [u8; 32])>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    operator: Vec<Operator>,
}

/// Whether `name` may name an operator: 1-64 of a-z, 0-9, '-', '.', '_', starting with a
/// letter or digit (it is recorded in the audit and shown in tables).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

/// The digest of a token, as the file records it.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// A fresh token: `yop_` and 256 random bits, base64url.
pub fn generate_token() -> Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| Error::Onboard(format!("no randomness from the operating system: {e}")))?;
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

impl Operators {
    /// Parses the file's text; `path` is only for errors.
    pub fn parse(text: &str, path: &Path) -> Result<Operators> {
        let bad = |message: String| Error::File {
            path: path.to_owned(),
            message,
        };
        let file: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut entries: Vec<(String, [u8; 32])> = Vec::with_capacity(file.operator.len());
        for op in file.operator {
            if !is_valid_name(&op.name) {
                return Err(bad(format!("operator name {:?} is not valid", op.name)));
            }
            if entries.iter().any(|(n, _)| *n == op.name) {
                return Err(bad(format!("operator {} is listed twice", op.name)));
            }
            let mut digest = [0u8; 32];
            hex::decode_to_slice(op.token_sha256.trim(), &mut digest).map_err(|_| {
                bad(format!(
                    "operator {}: token_sha256 is not 64 hex digits",
                    op.name
                ))
            })?;
            entries.push((op.name, digest));
        }
        Ok(Operators { entries })
    }

    /// Reads and parses the file.
    pub fn load(path: &Path) -> Result<Operators> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::File {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Operators::parse(&text, path)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// The operator whose token this is. Compares the token's digest with every entry's in
    /// constant time and without stopping at a match.
    pub fn verify(&self, token: &str) -> Option<&str> {
        let given = token_digest(token);
        let mut found = None;
        for (name, digest) in &self.entries {
            let diff = given
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(name.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_against_their_digest_only() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() >= 4 + 43, "{a}");
        assert_ne!(a, b);
        let text = format!(
            "[[operator]]\nname = \"kim\"\ntoken_sha256 = \"{}\"\n\n[[operator]]\nname = \"lee-1\"\ntoken_sha256 = \"{}\"\n",
            hex::encode(token_digest(&a)),
            hex::encode(token_digest(&b))
        );
        let ops = Operators::parse(&text, Path::new("o.toml")).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops.verify(&a), Some("kim"));
        assert_eq!(ops.verify(&format!("{b}\n")), Some("lee-1"));
        assert_eq!(ops.verify(""), None);
        assert_eq!(ops.verify(&a[..a.len() - 1]), None);
        assert_eq!(ops.verify(&hex::encode(token_digest(&a))), None);
        assert_eq!(Operators::default().verify(&a), None);
    }

    #[test]
    fn bad_files_and_names() {
        let p = Path::new("o.toml");
        for text in [
            "[[operator]]\nname = \"Kim\"\ntoken_sha256 = \"00\"",
            "[[operator]]\nname = \"kim\"\ntoken_sha256 = \"zz\"",
            "[[operator]]\nname = \"kim\"\ntoken = \"x\"",
            &format!(
                "[[operator]]\nname = \"a\"\ntoken_sha256 = \"{0}\"\n[[operator]]\nname = \"a\"\ntoken_sha256 = \"{0}\"",
                "0".repeat(64)
            ),
        ] {
            assert!(Operators::parse(text, p).is_err(), "{text}");
        }
        assert!(Operators::parse("", p).unwrap().is_empty());
        for good in ["kim", "kim-minji", "op.1", "a_b", "0"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in [
            "",
            "-kim",
            "Kim",
            "kim minji",
            "a/b",
            "김민지",
            &"a".repeat(65),
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
