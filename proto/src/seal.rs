//! Sealed client data (part of the wire contract, `docs/PROTOCOL.md` "Sealed client data"):
//! the sending adapter seals everything personal to the reader's X25519 key with HPKE
//! (RFC 9180), base mode, suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305,
//! info [`INFO`], and binds the routing metadata as associated data, so that a ciphertext
//! moved onto other metadata (another referral, recipient, purpose, categories…) does not open.
//! The broker checks and relays the metadata and never holds a key that opens the seal.
//!
//! Associated data of a referral's seal ([`referral_aad`]):
//!
//! ```text
//! "yeongye.v1.sealed-referral\0"
//! str referral_id | str from_agency | str to_agency | str client.pseudonym_id
//! | i32be field | i32be urgency | i32be purpose
//! | u32be(count) i32be data_categories… (in the order sent)
//! | str basis ("consent:<id>" or "statute:<STATUTE number>")
//! | i64be receive_by_ms | str parent_referral_id | str key_id
//! ```
//!
//! of a status note's seal ([`note_aad`]):
//!
//! ```text
//! "yeongye.v1.sealed-note\0"
//! str referral_id | str author | str reader | i32be status | str key_id
//! ```
//!
//! where `str` is `u32be(byte length)` then the UTF-8 bytes.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use prost::Message as _;
use serde::Deserialize;

use crate::v1;

/// HPKE's `info` for every Yeongye seal.
pub const INFO: &[u8] = b"yeongye.v1.seal";
/// The first bytes of a referral seal's associated data.
pub const REFERRAL_DOMAIN: &[u8] = b"yeongye.v1.sealed-referral\0";
/// The first bytes of a status note seal's associated data.
pub const NOTE_DOMAIN: &[u8] = b"yeongye.v1.sealed-note\0";
/// The first word of a sealing key file line.
const KEY_FILE_TAG: &str = "yeongye-x25519-v1";

type Kem = X25519HkdfSha256;
type SecretKey = <Kem as hpke::Kem>::PrivateKey;
type Public = <Kem as hpke::Kem>::PublicKey;
type Encapped = <Kem as hpke::Kem>::EncappedKey;

/// Why something does not seal or open. None of these carries the sealed text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("no sealing key of agency {0:?} in the registry")]
    NoKeyFor(String),
    /// The key id as [`crate::signing::shown_key_id`] shows it.
    #[error(
        "sealed to key {0}, which this agency does not hold (unknown, or past its grace period)"
    )]
    UnknownKey(String),
    #[error(
        "the seal does not open with this key and metadata (changed in transit, or not for us)"
    )]
    Open,
    #[error("the sealed contents are not a SealedContents message")]
    Contents,
    #[error("the seal is malformed: {0}")]
    Malformed(&'static str),
    #[error("sealing failed")]
    Seal,
    #[error("sealing key file {path}: {message}")]
    File { path: String, message: String },
    #[error("sealing key {id}: {message}")]
    Public { id: String, message: String },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The legal basis as the associated data names it.
pub fn basis_text(r: &v1::Referral) -> String {
    match &r.legal_basis {
        Some(v1::referral::LegalBasis::ConsentId(id)) => format!("consent:{id}"),
        Some(v1::referral::LegalBasis::StatutoryBasis(b)) => format!("statute:{}", b.statute),
        None => String::new(),
    }
}

/// The associated data that binds a referral's metadata to its seal under `key_id`.
pub fn referral_aad(r: &v1::Referral, key_id: &str) -> Vec<u8> {
    let pseudonym = r.client.as_ref().map_or("", |c| c.pseudonym_id.as_str());
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(REFERRAL_DOMAIN);
    for s in [&r.referral_id, &r.from_agency, &r.to_agency] {
        put_str(&mut out, s);
    }
    put_str(&mut out, pseudonym);
    for n in [r.field, r.urgency, r.purpose] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&(r.data_categories.len() as u32).to_be_bytes());
    for c in &r.data_categories {
        out.extend_from_slice(&c.to_be_bytes());
    }
    put_str(&mut out, &basis_text(r));
    out.extend_from_slice(&r.receive_by_ms.to_be_bytes());
    put_str(&mut out, &r.parent_referral_id);
    put_str(&mut out, key_id);
    out
}

/// The associated data that binds a status note to its referral, author, reader and status.
pub fn note_aad(
    referral_id: &str,
    author: &str,
    reader: &str,
    status: i32,
    key_id: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(NOTE_DOMAIN);
    for s in [referral_id, author, reader] {
        put_str(&mut out, s);
    }
    out.extend_from_slice(&status.to_be_bytes());
    put_str(&mut out, key_id);
    out
}

/// An agency's public sealing key, as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealingKeyEntry {
    pub id: String,
    /// Base64 of the 32-byte X25519 public key.
    pub public_key: String,
    /// Set when the key is rotated out: senders seal to it no more; its holder opens what was
    /// sealed to it until this time (Unix ms). 0 or absent: the current key.
    #[serde(default)]
    pub not_after_ms: i64,
}

/// A public key to seal to.
#[derive(Clone)]
pub struct PublicKey {
    pub id: String,
    key: Public,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey").field("id", &self.id).finish()
    }
}

impl PublicKey {
    pub fn parse(entry: &SealingKeyEntry) -> Result<PublicKey, SealError> {
        let bad = |message: &str| SealError::Public {
            id: entry.id.clone(),
            message: message.to_owned(),
        };
        if !crate::signing::is_well_formed_key_id(&entry.id) {
            return Err(bad("a key id is 1-128 of A-Z a-z 0-9 . _ -"));
        }
        let bytes = B64
            .decode(entry.public_key.trim())
            .map_err(|_| bad("not base64"))?;
        let key = Public::from_bytes(&bytes).map_err(|_| bad("not a 32-byte X25519 public key"))?;
        Ok(PublicKey {
            id: entry.id.clone(),
            key,
        })
    }

    pub fn to_b64(&self) -> String {
        B64.encode(self.key.to_bytes())
    }
}

/// A private sealing key with its id and, once rotated out, the end of its grace period.
#[derive(Clone)]
pub struct PrivateKey {
    pub id: String,
    secret: SecretKey,
    /// 0: the current key.
    pub not_after_ms: i64,
}

/// The key's id only.
impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("id", &self.id)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate(id: &str) -> PrivateKey {
        let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
        let (secret, _) = Kem::gen_keypair(&mut rng);
        PrivateKey {
            id: id.to_owned(),
            secret,
            not_after_ms: 0,
        }
    }

    /// The key derived from `ikm` (RFC 9180 DeriveKeyPair): for test vectors only.
    pub fn derive(id: &str, ikm: &[u8]) -> PrivateKey {
        let (secret, _) = Kem::derive_keypair(ikm);
        PrivateKey {
            id: id.to_owned(),
            secret,
            not_after_ms: 0,
        }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            id: self.id.clone(),
            key: Kem::sk_to_pk(&self.secret),
        }
    }

    /// The registry entry of its public half.
    pub fn entry(&self) -> SealingKeyEntry {
        SealingKeyEntry {
            id: self.id.clone(),
            public_key: self.public().to_b64(),
            not_after_ms: self.not_after_ms,
        }
    }

    pub fn secret_b64(&self) -> String {
        B64.encode(self.secret.to_bytes())
    }

    /// `yeongye-x25519-v1 <key id> <base64 secret> <not_after_ms>`.
    fn to_line(&self) -> String {
        format!(
            "{KEY_FILE_TAG} {} {} {}\n",
            self.id,
            self.secret_b64(),
            self.not_after_ms
        )
    }
}

/// An agency's private sealing keys: the current one, and those rotated out and still in their
/// grace period. Kept in one file (mode 0600), a line a key.
#[derive(Debug, Clone, Default)]
pub struct KeyFile {
    pub keys: Vec<PrivateKey>,
}

impl KeyFile {
    pub fn parse(text: &str, path: &str) -> Result<KeyFile, SealError> {
        let bad = |n: usize, message: &str| SealError::File {
            path: path.to_owned(),
            message: format!("line {n}: {message}"),
        };
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let mut words = line.split_whitespace();
            let Some(tag) = words.next() else { continue };
            if tag != KEY_FILE_TAG {
                return Err(bad(n, "not a yeongye-x25519-v1 key"));
            }
            let id = words.next().ok_or_else(|| bad(n, "no key id"))?;
            if !crate::signing::is_well_formed_key_id(id) {
                return Err(bad(n, "the key id is not 1-128 of A-Z a-z 0-9 . _ -"));
            }
            let secret = words
                .next()
                .and_then(|w| B64.decode(w).ok())
                .and_then(|b| SecretKey::from_bytes(&b).ok())
                .ok_or_else(|| bad(n, "the key is not 32 bytes of base64"))?;
            let not_after_ms = match words.next() {
                None => 0,
                Some(w) => w
                    .parse()
                    .map_err(|_| bad(n, "not_after_ms is not a number"))?,
            };
            if words.next().is_some() {
                return Err(bad(n, "trailing data"));
            }
            if keys.iter().any(|k: &PrivateKey| k.id == id) {
                return Err(bad(n, "key id listed twice"));
            }
            keys.push(PrivateKey {
                id: id.to_owned(),
                secret,
                not_after_ms,
            });
        }
        if keys.is_empty() {
            return Err(SealError::File {
                path: path.to_owned(),
                message: "no key".into(),
            });
        }
        Ok(KeyFile { keys })
    }

    pub fn to_file_text(&self) -> String {
        self.keys.iter().map(PrivateKey::to_line).collect()
    }

    /// Reads a key file, refusing one that others than its owner may read.
    pub fn load(path: &Path) -> Result<KeyFile, SealError> {
        let shown = path.display().to_string();
        let file_err = |message: String| SealError::File {
            path: shown.clone(),
            message,
        };
        crate::credentials::check_private(path).map_err(|e| file_err(e.to_string()))?;
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        KeyFile::parse(&text, &shown)
    }

    /// The key a seal names, if held and (at `now_ms`) not past its grace period.
    pub fn usable(&self, id: &str, now_ms: i64) -> Option<&PrivateKey> {
        self.keys
            .iter()
            .find(|k| k.id == id && (k.not_after_ms == 0 || now_ms <= k.not_after_ms))
    }

    /// The file without the keys whose grace period ended before `now_ms`: what onboarding
    /// writes back, so that an old key is gone from disk once nothing may be sealed to it.
    pub fn without_expired(&self, now_ms: i64) -> KeyFile {
        KeyFile {
            keys: self
                .keys
                .iter()
                .filter(|k| k.not_after_ms == 0 || now_ms <= k.not_after_ms)
                .cloned()
                .collect(),
        }
    }
}

/// Every agency's public sealing keys, from the registry.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    keys: BTreeMap<String, Vec<(PublicKey, i64)>>,
}

impl Directory {
    pub fn add(&mut self, agency: &str, entry: &SealingKeyEntry) -> Result<(), SealError> {
        let key = PublicKey::parse(entry)?;
        let list = self.keys.entry(agency.to_owned()).or_default();
        if list.iter().any(|(k, _)| k.id == key.id) {
            return Err(SealError::Public {
                id: key.id,
                message: "listed twice".into(),
            });
        }
        list.push((key, entry.not_after_ms));
        Ok(())
    }

    /// The sealing keys in a registry file's text (`[[agency]]` entries' `sealing_keys`).
    pub fn from_registry_toml(text: &str) -> Result<Directory, SealError> {
        #[derive(Deserialize)]
        struct Agency {
            id: String,
            #[serde(default)]
            sealing_keys: Vec<SealingKeyEntry>,
        }
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            agency: Vec<Agency>,
        }
        let file: File = toml::from_str(text).map_err(|e| SealError::File {
            path: "registry".into(),
            message: e.message().to_owned(),
        })?;
        let mut d = Directory::default();
        for a in &file.agency {
            for k in &a.sealing_keys {
                d.add(&a.id, k)?;
            }
        }
        Ok(d)
    }

    pub fn load(path: &Path) -> Result<Directory, SealError> {
        let text = std::fs::read_to_string(path).map_err(|e| SealError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Directory::from_registry_toml(&text)
    }

    /// The key to seal to for `agency`: its current key (the last listed without an end).
    pub fn current(&self, agency: &str) -> Result<&PublicKey, SealError> {
        self.keys
            .get(agency)
            .and_then(|l| l.iter().rev().find(|(_, end)| *end == 0))
            .map(|(k, _)| k)
            .ok_or_else(|| SealError::NoKeyFor(agency.to_owned()))
    }
}

/// Seals `plaintext` to `to` under `aad`.
pub fn seal(to: &PublicKey, aad: &[u8], plaintext: &[u8]) -> Result<v1::Sealed, SealError> {
    let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
    let (enc, ciphertext) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
        &OpModeS::Base,
        &to.key,
        INFO,
        plaintext,
        aad,
        &mut rng,
    )
    .map_err(|_| SealError::Seal)?;
    Ok(v1::Sealed {
        key_id: to.id.clone(),
        enc: enc.to_bytes().to_vec(),
        ciphertext,
    })
}

/// Opens `sealed` with `keys` under `aad`, as of `now_ms`.
pub fn open(
    keys: &KeyFile,
    sealed: &v1::Sealed,
    aad: &[u8],
    now_ms: i64,
) -> Result<Vec<u8>, SealError> {
    let key = keys
        .usable(&sealed.key_id, now_ms)
        .ok_or_else(|| SealError::UnknownKey(crate::signing::shown_key_id(&sealed.key_id)))?;
    let enc = Encapped::from_bytes(&sealed.enc)
        .map_err(|_| SealError::Malformed("enc is not 32 bytes"))?;
    hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Base,
        &key.secret,
        &enc,
        INFO,
        &sealed.ciphertext,
        aad,
    )
    .map_err(|_| SealError::Open)
}

/// Seals a referral's personal fields to its recipient: moves the client block (but its
/// pseudonym), the reason and a statutory justification into the seal, leaving them empty in
/// clear. The metadata must be final: it is bound to the seal.
pub fn seal_referral(r: &mut v1::Referral, to: &PublicKey) -> Result<(), SealError> {
    let justification = match &mut r.legal_basis {
        Some(v1::referral::LegalBasis::StatutoryBasis(b)) => std::mem::take(&mut b.justification),
        _ => String::new(),
    };
    let client = r.client.take().unwrap_or_default();
    let contents = v1::SealedContents {
        client: Some(client.clone()),
        reason: std::mem::take(&mut r.reason),
        justification,
    };
    r.client = Some(v1::Client {
        pseudonym_id: client.pseudonym_id,
        ..Default::default()
    });
    let aad = referral_aad(r, &to.id);
    r.sealed = Some(seal(to, &aad, &contents.encode_to_vec())?);
    Ok(())
}

/// Whether a referral carries personal data in clear: a client field beyond the pseudonym, a
/// reason, or a statutory justification.
pub fn has_clear_personal_data(r: &v1::Referral) -> bool {
    let client = r.client.as_ref().is_some_and(|c| {
        !(c.name.is_empty()
            && c.birth_date.is_empty()
            && c.phone.is_empty()
            && c.address.is_empty()
            && c.household.is_empty())
    });
    let justification = matches!(
        &r.legal_basis,
        Some(v1::referral::LegalBasis::StatutoryBasis(b)) if !b.justification.is_empty()
    );
    client || !r.reason.is_empty() || justification
}

/// Opens a sealed referral with the recipient's keys: the contents, checked to carry the same
/// pseudonym as the clear metadata. `Ok(None)` if it was not sealed.
pub fn open_referral(
    r: &v1::Referral,
    keys: &KeyFile,
    now_ms: i64,
) -> Result<Option<v1::SealedContents>, SealError> {
    let Some(sealed) = &r.sealed else {
        return Ok(None);
    };
    let plain = open(keys, sealed, &referral_aad(r, &sealed.key_id), now_ms)?;
    let contents = v1::SealedContents::decode(plain.as_slice()).map_err(|_| SealError::Contents)?;
    let clear = r.client.as_ref().map_or("", |c| c.pseudonym_id.as_str());
    let inside = contents
        .client
        .as_ref()
        .map_or("", |c| c.pseudonym_id.as_str());
    if clear != inside {
        return Err(SealError::Malformed(
            "the sealed pseudonym differs from the one in clear",
        ));
    }
    Ok(Some(contents))
}

/// The referral as its sender wrote it: the opened contents put back in place.
pub fn unsealed(r: &v1::Referral, contents: v1::SealedContents) -> v1::Referral {
    let mut out = r.clone();
    out.sealed = None;
    out.client = contents.client;
    out.reason = contents.reason;
    if let Some(v1::referral::LegalBasis::StatutoryBasis(b)) = &mut out.legal_basis {
        b.justification = contents.justification;
    }
    out
}

#[cfg(test)]
mod tests;
