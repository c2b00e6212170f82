//! The agency registry: which agencies exist, their Korean display names and kinds, their
//! signing keys, their public sealing keys (checked here, used only by the adapters: the broker
//! never seals nor opens), and their NATS identities (`nats_password_bcrypt`, from which
//! `referral-broker agency add` generates the NATS server's authorization config).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use yeongye_proto::seal::{self, SealingKeyEntry};
use yeongye_proto::signing::{KeyRing, PublicKeyEntry};
use yeongye_proto::subject::is_valid_agency_id;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agency {
    pub id: String,
    pub name: String,
    pub kind: String,
}

#[derive(Debug, Clone, Default)]
pub struct Registry {
    agencies: BTreeMap<String, Agency>,
    /// Every signer's public keys (agencies, and the broker as `broker`).
    keys: KeyRing,
    /// The bcrypt hash of each NATS user's password, by user (agency id, or `broker`).
    nats_passwords: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    agency: Vec<Entry>,
    broker: Option<BrokerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    name: String,
    kind: String,
    /// Its Ed25519 public keys (see `referral-broker agency add` and `rotate-key`).
    #[serde(default)]
    keys: Vec<PublicKeyEntry>,
    /// Its X25519 public sealing keys (PROTOCOL.md, "Sealed client data"): the senders' adapters
    /// seal to the current one. Checked at load; the broker itself never uses them.
    #[serde(default)]
    sealing_keys: Vec<SealingKeyEntry>,
    /// The bcrypt hash of its NATS password (the user is the agency id); absent: the agency has
    /// no NATS identity yet and cannot connect to a server configured from this registry.
    nats_password_bcrypt: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerEntry {
    #[serde(default)]
    keys: Vec<PublicKeyEntry>,
    /// The bcrypt hash of the NATS user `broker`'s password.
    nats_password_bcrypt: Option<String>,
}

impl Registry {
    pub fn load(path: &Path) -> Result<Registry> {
        let err = |message: String| Error::Registry {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Registry::from_toml(&text).map_err(err)
    }

    pub fn from_toml(text: &str) -> std::result::Result<Registry, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut agencies = BTreeMap::new();
        let mut keys = KeyRing::default();
        let mut nats_passwords = BTreeMap::new();
        // Only to check the sealing keys: well-formed ids, 32-byte X25519 keys, no id twice.
        let mut sealing = seal::Directory::default();
        if let Some(b) = &file.broker {
            for k in &b.keys {
                keys.add(yeongye_proto::BROKER_ID, k)
                    .map_err(|e| format!("broker: {e}"))?;
            }
            if let Some(hash) = &b.nats_password_bcrypt {
                check_bcrypt(hash).map_err(|e| format!("broker: nats_password_bcrypt {e}"))?;
                nats_passwords.insert(yeongye_proto::BROKER_ID.to_owned(), hash.clone());
            }
        }
        for e in file.agency {
            if !is_valid_agency_id(&e.id) || e.id == yeongye_proto::BROKER_ID {
                return Err(format!(
                    "agency id {:?} is not valid: use 1-64 of a-z, 0-9 and '-', not \"broker\"",
                    e.id
                ));
            }
            if e.name.trim().is_empty() {
                return Err(format!("agency {} has an empty name", e.id));
            }
            for k in &e.keys {
                keys.add(&e.id, k)
                    .map_err(|err| format!("agency {}: {err}", e.id))?;
            }
            for k in &e.sealing_keys {
                sealing
                    .add(&e.id, k)
                    .map_err(|err| format!("agency {}: {err}", e.id))?;
            }
            if let Some(hash) = &e.nats_password_bcrypt {
                check_bcrypt(hash)
                    .map_err(|err| format!("agency {}: nats_password_bcrypt {err}", e.id))?;
                nats_passwords.insert(e.id.clone(), hash.clone());
            }
            let agency = Agency {
                id: e.id.clone(),
                name: e.name,
                kind: e.kind,
            };
            if agencies.insert(e.id.clone(), agency).is_some() {
                return Err(format!("agency {} is listed twice", e.id));
            }
        }
        Ok(Registry {
            agencies,
            keys,
            nats_passwords,
        })
    }

    /// The bcrypt hash of a NATS user's password (`user`: an agency id, or `broker`), if the
    /// registry gives that user a NATS identity.
    pub fn nats_password_bcrypt(&self, user: &str) -> Option<&str> {
        self.nats_passwords.get(user).map(String::as_str)
    }

    /// Every signer's public keys.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    pub fn get(&self, id: &str) -> Option<&Agency> {
        self.agencies.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.agencies.contains_key(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Agency> {
        self.agencies.values()
    }

    pub fn len(&self) -> usize {
        self.agencies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agencies.is_empty()
    }
}

/// A bcrypt hash as nats-server reads it: `$2a$`, `$2b$`, `$2x$` or `$2y$`, a two-digit cost,
/// `$`, then 53 characters of bcrypt's base64 (`./A-Za-z0-9`). Nothing else may reach the
/// generated NATS configuration.
fn check_bcrypt(hash: &str) -> std::result::Result<(), String> {
    let b = hash.as_bytes();
    let ok = b.len() == 60
        && b.starts_with(b"$2")
        && matches!(b[2], b'a' | b'b' | b'x' | b'y')
        && b[3] == b'$'
        && b[4].is_ascii_digit()
        && b[5].is_ascii_digit()
        && b[6] == b'$'
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/');
    if ok {
        Ok(())
    } else {
        Err("is not a bcrypt hash ($2b$<cost>$<53 characters>)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_the_deploy_registry() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agencies.toml");
        let r = Registry::load(&path).unwrap();
        assert_eq!(r.len(), 8);
        assert_eq!(r.get("hope-support").unwrap().name, "한빛구 희망복지지원단");
    }

    #[test]
    fn nats_identities() {
        let hash = format!("$2b$11${}", "a".repeat(53));
        let r = Registry::from_toml(&format!(
            "[broker]\nnats_password_bcrypt = \"{hash}\"\n[[agency]]\nid = \"a\"\nname = \"x\"\nkind = \"k\"\nnats_password_bcrypt = \"{hash}\"\n[[agency]]\nid = \"b\"\nname = \"y\"\nkind = \"k\"\n"
        ))
        .unwrap();
        assert_eq!(r.nats_password_bcrypt("broker"), Some(hash.as_str()));
        assert_eq!(r.nats_password_bcrypt("a"), Some(hash.as_str()));
        assert_eq!(r.nats_password_bcrypt("b"), None);
    }

    #[test]
    fn sealing_keys_are_checked() {
        let key = seal::PrivateKey::derive("a-seal-1", &[7; 32]);
        let good = format!(
            "[[agency]]\nid = \"a\"\nname = \"x\"\nkind = \"k\"\nsealing_keys = [{{ id = \"a-seal-1\", public_key = \"{}\", not_after_ms = 5 }}, {{ id = \"a-seal-2\", public_key = \"{}\" }}]\n",
            key.public().to_b64(),
            seal::PrivateKey::derive("a-seal-2", &[8; 32])
                .public()
                .to_b64(),
        );
        let r = Registry::from_toml(&good).unwrap();
        assert!(r.contains("a"));
        let d = seal::Directory::from_registry_toml(&good).unwrap();
        assert_eq!(d.current("a").unwrap().id, "a-seal-2");
        let entry = |id: &str, public_key: &str, extra: &str| {
            format!(
                "[[agency]]\nid = \"a\"\nname = \"x\"\nkind = \"k\"\n[[agency.sealing_keys]]\nid = \"{id}\"\npublic_key = \"{public_key}\"\n{extra}"
            )
        };
        let pk = key.public().to_b64();
        for (text, needle) in [
            (entry("a-seal-1", "not base64!", ""), "not base64"),
            (entry("a-seal-1", "AAAA", ""), "32-byte"),
            (entry("a seal", &pk, ""), "key id"),
            (entry("a-seal-1", &pk, "colour = 1\n"), "colour"),
            (
                entry("a-seal-1", &pk, "not_after_ms = \"soon\"\n"),
                "not_after_ms",
            ),
            (
                format!(
                    "{}[[agency.sealing_keys]]\nid = \"a-seal-1\"\npublic_key = \"{pk}\"\n",
                    entry("a-seal-1", &pk, "")
                ),
                "listed twice",
            ),
        ] {
            let err = Registry::from_toml(&text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn rejects_bad_registries() {
        for (text, needle) in [
            (
                "[[agency]]\nid = \"A\"\nname = \"x\"\nkind = \"k\"",
                "not valid",
            ),
            (
                "[[agency]]\nid = \"a.b\"\nname = \"x\"\nkind = \"k\"",
                "not valid",
            ),
            (
                "[[agency]]\nid = \"broker\"\nname = \"x\"\nkind = \"k\"",
                "not valid",
            ),
            (
                "[[agency]]\nid = \"a\"\nname = \" \"\nkind = \"k\"",
                "empty name",
            ),
            (
                "[[agency]]\nid = \"a\"\nname = \"x\"\nkind = \"k\"\n[[agency]]\nid = \"a\"\nname = \"y\"\nkind = \"k\"",
                "twice",
            ),
            ("[[agency]]\nid = \"a\"\nkind = \"k\"", "name"),
            (
                "[[agency]]\nid = \"a\"\nname = \"x\"\nkind = \"k\"\nextra = 1",
                "extra",
            ),
            ("agency = 3", "agency"),
            (
                "[[agency]]\nid = \"a\"\nname = \"x\"\nkind = \"k\"\nnats_password_bcrypt = \"pw\"",
                "bcrypt",
            ),
            (
                "[broker]\nnats_password_bcrypt = \"$2b$11$\\\"}]\\nusers = [\"",
                "bcrypt",
            ),
            ("[broker]\nextra = 1", "extra"),
        ] {
            let err = Registry::from_toml(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
