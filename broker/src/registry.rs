//! The agency registry: which agencies exist, their Korean display names and kinds.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerEntry {
    #[serde(default)]
    keys: Vec<PublicKeyEntry>,
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
        if let Some(b) = &file.broker {
            for k in &b.keys {
                keys.add(yeongye_proto::BROKER_ID, k)
                    .map_err(|e| format!("broker: {e}"))?;
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
            let agency = Agency {
                id: e.id.clone(),
                name: e.name,
                kind: e.kind,
            };
            if agencies.insert(e.id.clone(), agency).is_some() {
                return Err(format!("agency {} is listed twice", e.id));
            }
        }
        Ok(Registry { agencies, keys })
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
        ] {
            let err = Registry::from_toml(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
