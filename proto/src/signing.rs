//! How envelopes are signed (part of the wire contract, `docs/PROTOCOL.md` "Signatures"), the
//! private key file, and the key ring of public keys read from the agency registry.
//!
//! The signature is Ed25519 over a domain-separated encoding of the envelope's fields:
//!
//! ```text
//! "yeongye.v1.envelope-signature\0"
//! u32be(len) message_id | u32be(len) sender | i64be sent_at_ms | i32be payload_type | u32be(len) payload
//! ```
//!
//! so that a signature can never be taken for one over other bytes, and every field the
//! broker relies on is covered. `key_id` names the key; it is not signed (a wrong one only
//! makes verification fail).

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, Verifier};
use serde::Deserialize;

use crate::v1::Envelope;

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// The domain separator every signing input starts with.
pub const DOMAIN: &[u8] = b"yeongye.v1.envelope-signature\0";
/// The first word of a private key file.
const KEY_FILE_TAG: &str = "yeongye-ed25519-v1";

/// The bytes that are signed for `e`.
pub fn signing_input(e: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        DOMAIN.len() + 32 + e.message_id.len() + e.sender.len() + e.payload.len(),
    );
    out.extend_from_slice(DOMAIN);
    for field in [e.message_id.as_bytes(), e.sender.as_bytes()] {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field);
    }
    out.extend_from_slice(&e.sent_at_ms.to_be_bytes());
    out.extend_from_slice(&e.payload_type.to_be_bytes());
    out.extend_from_slice(&(e.payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&e.payload);
    out
}

/// A private signing key with its id, as kept in a key file.
#[derive(Clone)]
pub struct PrivateKey {
    pub id: String,
    pub key: SigningKey,
}

/// The key's id and public half only.
impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("id", &self.id)
            .field("public", &self.public_b64())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {message}")]
    File { path: String, message: String },
    #[error("public key {id}: {message}")]
    Public { id: String, message: String },
    #[error("registry: {0}")]
    Registry(String),
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    #[error(transparent)]
    Exposed(#[from] crate::credentials::ExposedSecret),
}

impl PrivateKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate(id: &str) -> Result<PrivateKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(PrivateKey {
            id: id.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn public_b64(&self) -> String {
        B64.encode(self.key.verifying_key().as_bytes())
    }

    /// Signs `e` in place: sets `key_id` and `signature`.
    pub fn sign(&self, e: &mut Envelope) {
        e.key_id = self.id.clone();
        e.signature = self.signature(e);
    }

    /// The signature [`sign`](Self::sign) puts in `e` (the key id is not signed), leaving `e`
    /// as it is: for signing many envelopes from shared references.
    pub fn signature(&self, e: &Envelope) -> Vec<u8> {
        self.key.sign(&signing_input(e)).to_bytes().to_vec()
    }

    /// `yeongye-ed25519-v1 <key id> <base64 seed>`.
    pub fn to_file_text(&self) -> String {
        format!(
            "{KEY_FILE_TAG} {} {}\n",
            self.id,
            B64.encode(self.key.to_bytes())
        )
    }

    pub fn parse(text: &str, path: &str) -> Result<PrivateKey, KeyError> {
        let bad = |message: &str| KeyError::File {
            path: path.to_owned(),
            message: message.to_owned(),
        };
        let mut words = text.split_whitespace();
        if words.next() != Some(KEY_FILE_TAG) {
            return Err(bad("not a yeongye-ed25519-v1 key file"));
        }
        let id = words.next().ok_or_else(|| bad("no key id"))?;
        let seed = words.next().ok_or_else(|| bad("no key"))?;
        let seed: [u8; 32] = B64
            .decode(seed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("the key is not 32 bytes of base64"))?;
        if words.next().is_some() {
            return Err(bad("trailing data"));
        }
        Ok(PrivateKey {
            id: id.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads a key file, refusing one that others than its owner may read
    /// ([`check_private`](crate::credentials::check_private)).
    pub fn load(path: &Path) -> Result<PrivateKey, KeyError> {
        let shown = path.display().to_string();
        crate::credentials::check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::File {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        PrivateKey::parse(&text, &shown)
    }

    /// Writes the key file readable by its owner only (mode 0600), refusing to overwrite.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        crate::credentials::write_private(path, self.to_file_text().as_bytes()).map_err(|e| {
            KeyError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            }
        })
    }
}

/// A public key as listed in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyEntry {
    pub id: String,
    /// Base64 of the 32-byte Ed25519 public key.
    pub public_key: String,
    /// Messages stored after this time (Unix ms) are no longer accepted under this key; 0 or
    /// absent: no cutoff. Set when the key is rotated out.
    #[serde(default)]
    pub not_after_ms: i64,
}

#[derive(Debug, Clone)]
struct PublicKey {
    id: String,
    key: VerifyingKey,
    not_after_ms: i64,
}

/// Longest key id shown in an error or a log.
pub const MAX_KEY_ID_LEN: usize = 128;

/// Whether `id` has the shape of a key id (1-128 of `A-Z a-z 0-9 . _ -`, as onboarding makes
/// them: `<agency>-<n>`). Only such an id is ever quoted back: an envelope's `key_id` comes
/// off the wire, and anything else in it could be personal data.
pub fn is_well_formed_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// How a key id from the wire may be shown: quoted if well-formed, else not at all.
pub fn shown_key_id(id: &str) -> String {
    if is_well_formed_key_id(id) {
        format!("{id:?}")
    } else {
        "(a key id that is not well-formed)".to_owned()
    }
}

/// Why a signature does not hold. Each maps to one wire reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the envelope is not signed")]
    Missing,
    /// The key id as [`shown_key_id`] shows it: never a hostile id's text.
    #[error("the signer has no key {0} in the registry")]
    UnknownKey(String),
    #[error("key {0:?} was rotated out before this message")]
    KeyExpired(String),
    #[error("the signature does not match the envelope")]
    Invalid,
}

/// Every signer's public keys: agencies by id, and the broker as `broker`.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, Vec<PublicKey>>,
}

impl KeyRing {
    pub fn add(&mut self, signer: &str, entry: &PublicKeyEntry) -> Result<(), KeyError> {
        let bad = |message: &str| KeyError::Public {
            id: entry.id.clone(),
            message: message.to_owned(),
        };
        if entry.id.is_empty() || entry.id.len() > 128 || entry.id.chars().any(char::is_whitespace)
        {
            return Err(bad("a key id is 1-128 characters without spaces"));
        }
        let bytes: [u8; 32] = B64
            .decode(entry.public_key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("not 32 bytes of base64"))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad("not an Ed25519 public key"))?;
        let list = self.keys.entry(signer.to_owned()).or_default();
        if list.iter().any(|k| k.id == entry.id) {
            return Err(bad("listed twice"));
        }
        list.push(PublicKey {
            id: entry.id.clone(),
            key,
            not_after_ms: entry.not_after_ms,
        });
        Ok(())
    }

    /// The public keys in a registry file's text: `[[agency]]` entries' `keys` and the
    /// `[broker]` table's `keys`. Other fields are ignored here.
    pub fn from_registry_toml(text: &str) -> Result<KeyRing, KeyError> {
        #[derive(Deserialize)]
        struct Signer {
            id: Option<String>,
            #[serde(default)]
            keys: Vec<PublicKeyEntry>,
        }
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            agency: Vec<Signer>,
            broker: Option<Signer>,
        }
        let file: File = toml::from_str(text).map_err(|e| KeyError::Registry(e.to_string()))?;
        let mut ring = KeyRing::default();
        for a in &file.agency {
            let id =
                a.id.as_deref()
                    .ok_or_else(|| KeyError::Registry("an agency has no id".into()))?;
            for k in &a.keys {
                ring.add(id, k)?;
            }
        }
        if let Some(b) = &file.broker {
            for k in &b.keys {
                ring.add(crate::BROKER_ID, k)?;
            }
        }
        Ok(ring)
    }

    pub fn load(path: &Path) -> Result<KeyRing, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Registry(format!("{}: {e}", path.display())))?;
        KeyRing::from_registry_toml(&text)
    }

    /// Whether `signer` has any key at all.
    pub fn knows(&self, signer: &str) -> bool {
        self.keys.get(signer).is_some_and(|k| !k.is_empty())
    }

    /// Checks `e`'s signature as `signer`'s, for a message stored at `at` (Unix ms).
    pub fn verify(&self, signer: &str, e: &Envelope, at: i64) -> Result<(), SignatureError> {
        if e.signature.is_empty() {
            return Err(SignatureError::Missing);
        }
        let key = self
            .keys
            .get(signer)
            .and_then(|keys| keys.iter().find(|k| k.id == e.key_id))
            .ok_or_else(|| SignatureError::UnknownKey(shown_key_id(&e.key_id)))?;
        if key.not_after_ms != 0 && at > key.not_after_ms {
            return Err(SignatureError::KeyExpired(key.id.clone()));
        }
        let sig: [u8; 64] = e
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| SignatureError::Invalid)?;
        key.key
            .verify(
                &signing_input(e),
                &ed25519_dalek::Signature::from_bytes(&sig),
            )
            .map_err(|_| SignatureError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            message_id: "m1".into(),
            sender: "a".into(),
            sent_at_ms: 7,
            payload_type: 1,
            payload: vec![1, 2, 3],
            ..Default::default()
        }
    }

    fn ring(k: &PrivateKey, not_after_ms: i64) -> KeyRing {
        let mut r = KeyRing::default();
        r.add(
            "a",
            &PublicKeyEntry {
                id: k.id.clone(),
                public_key: k.public_b64(),
                not_after_ms,
            },
        )
        .unwrap();
        r
    }

    #[test]
    fn a_signature_covers_every_field() {
        let k = PrivateKey::generate("a-1").unwrap();
        let r = ring(&k, 0);
        let mut e = envelope();
        assert_eq!(r.verify("a", &e, 10), Err(SignatureError::Missing));
        k.sign(&mut e);
        assert_eq!(r.verify("a", &e, 10), Ok(()));
        let tamper: [fn(&mut Envelope); 5] = [
            |e| e.message_id.push('x'),
            |e| e.sender = "b".into(),
            |e| e.sent_at_ms += 1,
            |e| e.payload_type = 2,
            |e| e.payload[1] ^= 1,
        ];
        for (i, t) in tamper.iter().enumerate() {
            let mut bad = e.clone();
            t(&mut bad);
            let who = if i == 1 { "b" } else { "a" };
            assert!(r.verify(who, &bad, 10).is_err(), "tamper {i} passed");
        }
        let mut other = e.clone();
        other.key_id = "nope".into();
        assert_eq!(
            r.verify("a", &other, 10),
            Err(SignatureError::UnknownKey("\"nope\"".into()))
        );
    }

    #[test]
    fn a_rotated_key_holds_until_its_cutoff() {
        let k = PrivateKey::generate("a-1").unwrap();
        let r = ring(&k, 100);
        let mut e = envelope();
        k.sign(&mut e);
        assert_eq!(r.verify("a", &e, 100), Ok(()));
        assert_eq!(
            r.verify("a", &e, 101),
            Err(SignatureError::KeyExpired("a-1".into()))
        );
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = PrivateKey::generate("hope-1").unwrap();
        let path = dir.path().join("signing.key");
        k.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(k.save(&path).is_err(), "never overwrites a key");
        let back = PrivateKey::load(&path).unwrap();
        assert_eq!(back.public_b64(), k.public_b64());
        assert!(
            !format!("{back:?}").contains(&B64.encode(k.key.to_bytes())),
            "Debug hides the secret"
        );
        for bad in [
            "",
            "other a AAAA",
            "yeongye-ed25519-v1 a",
            "yeongye-ed25519-v1 a AAAA",
            "yeongye-ed25519-v1 a !!!",
        ] {
            assert!(PrivateKey::parse(bad, "x").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn garbage_missing_and_shared_key_files_are_refused_by_load() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.key");
        let e = PrivateKey::load(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.key"), "{e}");
        let seed = B64.encode([7u8; 32]);
        for (name, text) in [
            ("empty.key", String::new()),
            ("pem.key", "-----BEGIN PRIVATE KEY-----\nAAAA\n".to_owned()),
            (
                "short.key",
                format!("yeongye-ed25519-v1 a-1 {}", &seed[..20]),
            ),
            ("binary.key", "\u{0}\u{1}yeongye".to_owned()),
        ] {
            let path = dir.path().join(name);
            crate::credentials::write_private(&path, text.as_bytes()).unwrap();
            let e = PrivateKey::load(&path).unwrap_err().to_string();
            assert!(e.contains(name), "{name}: {e}");
            assert!(!e.contains(&seed[..20]), "never quotes the key: {e}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join("shared.key");
            PrivateKey::generate("a-1").unwrap().save(&path).unwrap();
            for mode in [0o640, 0o604, 0o644, 0o660] {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
                let e = PrivateKey::load(&path).unwrap_err();
                assert!(matches!(e, KeyError::Exposed(_)), "{mode:o}: {e}");
                let e = e.to_string();
                assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
            PrivateKey::load(&path).unwrap();
        }
    }

    #[test]
    fn a_hostile_key_id_is_never_quoted() {
        let k = PrivateKey::generate("a-1").unwrap();
        let ring = ring(&k, 0);
        let mut e = envelope();
        k.sign(&mut e);
        for (key_id, shown) in [
            ("a-2", true),
            ("a.2_x", true),
            ("Hong Gildong 010-1234-5678", false),
            ("홍길동", false),
            ("a\nb", false),
            ("", false),
        ] {
            e.key_id = key_id.to_owned();
            let err = ring.verify("a", &e, 0).unwrap_err();
            assert!(matches!(err, SignatureError::UnknownKey(_)), "{err}");
            let text = format!("{err} {err:?}");
            assert_eq!(text.contains(&format!("{key_id:?}")), shown, "{text}");
            if !shown {
                assert!(text.contains("not well-formed"), "{text}");
            }
        }
        assert!(!is_well_formed_key_id(&"a".repeat(MAX_KEY_ID_LEN + 1)));
    }

    #[test]
    fn the_registry_lists_keys() {
        let k = PrivateKey::generate("a-1").unwrap();
        let text = format!(
            "[[agency]]\nid = \"a\"\nname = \"n\"\nkind = \"k\"\n[[agency.keys]]\nid = \"a-1\"\npublic_key = \"{}\"\n\n[broker]\n",
            k.public_b64()
        );
        let r = KeyRing::from_registry_toml(&text).unwrap();
        assert!(r.knows("a") && !r.knows("b"));
        for bad in [
            "[[agency]]\nid = \"a\"\n[[agency.keys]]\nid = \"a-1\"\npublic_key = \"AAAA\"",
            "[[agency]]\nid = \"a\"\n[[agency.keys]]\nid = \"a 1\"\npublic_key = \"AAAA\"",
            "[[agency]]\n[[agency.keys]]\nid = \"a-1\"\npublic_key = \"AAAA\"",
        ] {
            assert!(KeyRing::from_registry_toml(bad).is_err(), "{bad:?}");
        }
    }
}
