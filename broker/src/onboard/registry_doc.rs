//! Editing the registry file in place with `toml_edit`, keeping its comments and layout: add or
//! remove an `[[agency]]`, set the `[broker]` identity, add a key, set a key's cutoff — for the
//! signing keys (`keys`) and the agencies' sealing keys (`sealing_keys`) alike.
//!
//! Every edit is checked afterwards by parsing the result as a [`Registry`], so a change that
//! would leave the broker unable to load the file is never written.

use std::path::Path;

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};
use yeongye_proto::seal::SealingKeyEntry;
use yeongye_proto::signing::PublicKeyEntry;

use crate::error::{Error, Result};
use crate::registry::Registry;

/// The header of a registry that `init` creates.
pub(super) const NEW_REGISTRY: &str = "\
# The agency registry, written by `referral-broker init` and `referral-broker agency
# add|remove|rotate-key` (they keep comments and layout). Each [[agency]]: `id` (its NATS subject
# token and user name), `name`, `kind`, its Ed25519 public keys ([[agency.keys]]), its X25519
# public sealing keys ([[agency.sealing_keys]]) and the bcrypt hash of its NATS password.
# [broker]: the broker's keys and NATS identity.

[broker]
";

/// The list of a signer's Ed25519 public keys.
pub(super) const SIGNING: &str = "keys";
/// The list of an agency's X25519 public sealing keys.
pub(super) const SEALING: &str = "sealing_keys";

/// A key entry of either list: id, base64 public key, cutoff (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyEntry {
    pub(super) id: String,
    pub(super) public_key: String,
    pub(super) not_after_ms: i64,
}

impl From<&PublicKeyEntry> for KeyEntry {
    fn from(k: &PublicKeyEntry) -> KeyEntry {
        KeyEntry {
            id: k.id.clone(),
            public_key: k.public_key.clone(),
            not_after_ms: k.not_after_ms,
        }
    }
}

impl From<&SealingKeyEntry> for KeyEntry {
    fn from(k: &SealingKeyEntry) -> KeyEntry {
        KeyEntry {
            id: k.id.clone(),
            public_key: k.public_key.clone(),
            not_after_ms: k.not_after_ms,
        }
    }
}

/// The registry file being edited.
pub(super) struct RegistryDoc {
    doc: DocumentMut,
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Registry {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

impl RegistryDoc {
    /// Parses `text` (the file at `path`), which must also be a valid registry.
    /// Inline forms (`agency = [{ .. }]`, `broker = { .. }`, `keys = [{ .. }]`) are turned
    /// into tables, so that every edit below finds tables.
    pub(super) fn parse(text: &str, path: &Path) -> Result<RegistryDoc> {
        Registry::from_toml(text).map_err(|m| invalid(path, m))?;
        let mut doc: DocumentMut = text.parse().map_err(|e| invalid(path, e))?;
        if let Some(item) = doc.get_mut("agency")
            && let Some(agencies) = as_array_of_tables(item)
        {
            for t in agencies.iter_mut() {
                for list in [SIGNING, SEALING] {
                    if let Some(keys) = t.get_mut(list) {
                        as_array_of_tables(keys);
                    }
                }
            }
        }
        if let Some(item) = doc.get_mut("broker")
            && let Some(t) = as_table(item)
            && let Some(keys) = t.get_mut("keys")
        {
            as_array_of_tables(keys);
        }
        Ok(RegistryDoc { doc })
    }

    /// The text, checked to be a valid registry.
    pub(super) fn render(&self, path: &Path) -> Result<(String, Registry)> {
        let text = self.doc.to_string();
        let registry = Registry::from_toml(&text)
            .map_err(|m| invalid(path, format!("the edited registry would not load: {m}")))?;
        Ok((text, registry))
    }

    fn agencies(&self) -> Option<&ArrayOfTables> {
        self.doc.get("agency").and_then(Item::as_array_of_tables)
    }

    fn agencies_mut(&mut self) -> Option<&mut ArrayOfTables> {
        let item = self
            .doc
            .entry("agency")
            .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
        as_array_of_tables(item)
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.agencies()?
            .iter()
            .position(|t| t.get("id").and_then(Item::as_str) == Some(id))
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.index_of(id).is_some()
    }

    /// The `[[agency]]` table of `id`, or the `[broker]` table for [`yeongye_proto::BROKER_ID`].
    fn signer_mut(&mut self, id: &str) -> Option<&mut Table> {
        if id == yeongye_proto::BROKER_ID {
            return self.doc.get_mut("broker").and_then(as_table);
        }
        let i = self.index_of(id)?;
        self.agencies_mut()?.get_mut(i)
    }

    /// The signing key entries listed for `id` (an agency or the broker).
    pub(super) fn keys(&self, id: &str) -> Vec<PublicKeyEntry> {
        self.key_list(id, SIGNING)
            .into_iter()
            .map(|k| PublicKeyEntry {
                id: k.id,
                public_key: k.public_key,
                not_after_ms: k.not_after_ms,
            })
            .collect()
    }

    /// The sealing key entries listed for agency `id`.
    pub(super) fn sealing_keys(&self, id: &str) -> Vec<SealingKeyEntry> {
        self.key_list(id, SEALING)
            .into_iter()
            .map(|k| SealingKeyEntry {
                id: k.id,
                public_key: k.public_key,
                not_after_ms: k.not_after_ms,
            })
            .collect()
    }

    /// The entries of `id`'s key list `list` ([`SIGNING`] or [`SEALING`]).
    fn key_list(&self, id: &str, list: &str) -> Vec<KeyEntry> {
        let table = if id == yeongye_proto::BROKER_ID {
            self.doc.get("broker").and_then(Item::as_table)
        } else {
            self.index_of(id)
                .and_then(|i| self.agencies().and_then(|a| a.get(i)))
        };
        let Some(keys) = table
            .and_then(|t| t.get(list))
            .and_then(Item::as_array_of_tables)
        else {
            return Vec::new();
        };
        keys.iter()
            .map(|k| KeyEntry {
                id: k.get("id").and_then(Item::as_str).unwrap_or("").to_owned(),
                public_key: k
                    .get("public_key")
                    .and_then(Item::as_str)
                    .unwrap_or("")
                    .to_owned(),
                not_after_ms: k
                    .get("not_after_ms")
                    .and_then(Item::as_integer)
                    .unwrap_or(0),
            })
            .collect()
    }

    /// Appends a new `[[agency]]` with its first signing and sealing keys; `false` if the file's
    /// `agency` is not a list of tables.
    pub(super) fn push_agency(
        &mut self,
        id: &str,
        name: &str,
        kind: &str,
        key: &PublicKeyEntry,
        sealing_key: &SealingKeyEntry,
        bcrypt: &str,
    ) -> bool {
        let mut t = Table::new();
        t.decor_mut().set_prefix("\n");
        t.insert("id", value(id));
        t.insert("name", value(name));
        t.insert("kind", value(kind));
        t.insert("nats_password_bcrypt", value(bcrypt));
        t.insert(SIGNING, Item::ArrayOfTables(ArrayOfTables::new()));
        push_key_into(&mut t, SIGNING, &key.into());
        t.insert(SEALING, Item::ArrayOfTables(ArrayOfTables::new()));
        push_key_into(&mut t, SEALING, &sealing_key.into());
        match self.agencies_mut() {
            Some(agencies) => {
                agencies.push(t);
                true
            }
            None => false,
        }
    }

    /// Removes `id`'s `[[agency]]`; `false` if it is not there. Comments written above the
    /// file's first table (its header) are kept.
    pub(super) fn remove_agency(&mut self, id: &str) -> bool {
        let Some(i) = self.index_of(id) else {
            return false;
        };
        let first = self.first_position();
        let Some(agencies) = self.agencies_mut() else {
            return false;
        };
        let removed = agencies.get(i).map(|t| {
            (
                t.position(),
                t.decor()
                    .prefix()
                    .and_then(|p| p.as_str())
                    .map(str::to_owned),
            )
        });
        agencies.remove(i);
        if let Some((position, Some(prefix))) = removed
            && position.is_some()
            && position == first
            && prefix.contains('#')
            && let Some(next) = self.first_table_mut()
        {
            next.decor_mut().set_prefix(prefix);
        }
        true
    }

    /// The smallest position of any table in the file.
    fn first_position(&self) -> Option<isize> {
        let mut best = None::<isize>;
        for (_, item) in self.doc.iter() {
            let positions: Vec<Option<isize>> = match item {
                Item::Table(t) => vec![t.position()],
                Item::ArrayOfTables(a) => a.iter().map(Table::position).collect(),
                _ => Vec::new(),
            };
            for p in positions.into_iter().flatten() {
                best = Some(best.map_or(p, |b| b.min(p)));
            }
        }
        best
    }

    fn first_table_mut(&mut self) -> Option<&mut Table> {
        let first = self.first_position()?;
        for (_, item) in self.doc.iter_mut() {
            match item {
                Item::Table(t) if t.position() == Some(first) => return Some(t),
                Item::ArrayOfTables(a) => {
                    if let Some(t) = a.iter_mut().find(|t| t.position() == Some(first)) {
                        return Some(t);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Sets `[broker]`'s NATS identity and first key (creating the table); `false` if
    /// `broker` is not a table.
    pub(super) fn set_broker(&mut self, key: &PublicKeyEntry, bcrypt: &str) -> bool {
        let item = self.doc.entry("broker").or_insert_with(|| {
            let mut t = Table::new();
            t.decor_mut().set_prefix("\n");
            Item::Table(t)
        });
        match as_table(item) {
            Some(t) => {
                t.insert("nats_password_bcrypt", value(bcrypt));
                push_key_into(t, SIGNING, &key.into());
                true
            }
            None => false,
        }
    }

    /// Adds a key to `id`'s list `list` ([`SIGNING`] or [`SEALING`]); `false` if there is no
    /// such signer.
    pub(super) fn push_key(&mut self, id: &str, list: &str, key: &KeyEntry) -> bool {
        match self.signer_mut(id) {
            Some(t) => {
                push_key_into(t, list, key);
                true
            }
            None => false,
        }
    }

    /// Sets the cutoff of key `key_id` in `id`'s list `list`; `false` if there is no such key.
    pub(super) fn set_cutoff(
        &mut self,
        id: &str,
        list: &str,
        key_id: &str,
        not_after_ms: i64,
    ) -> bool {
        let Some(keys) = self
            .signer_mut(id)
            .and_then(|t| t.get_mut(list))
            .and_then(Item::as_array_of_tables_mut)
        else {
            return false;
        };
        match keys
            .iter_mut()
            .find(|k| k.get("id").and_then(Item::as_str) == Some(key_id))
        {
            Some(k) => {
                k.insert("not_after_ms", value(not_after_ms));
                true
            }
            None => false,
        }
    }
}

fn push_key_into(table: &mut Table, list: &str, key: &KeyEntry) {
    let mut k = Table::new();
    k.insert("id", value(key.id.as_str()));
    k.insert("public_key", value(key.public_key.as_str()));
    if key.not_after_ms != 0 {
        k.insert("not_after_ms", value(key.not_after_ms));
    }
    let item = table
        .entry(list)
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
    if let Some(keys) = as_array_of_tables(item) {
        keys.push(k);
    }
}

/// The item as an array of tables, converting an inline array of inline tables (or an empty
/// inline array) in place; `None` if it is something else.
fn as_array_of_tables(item: &mut Item) -> Option<&mut ArrayOfTables> {
    if item.is_value() {
        let taken = std::mem::take(item);
        *item = match taken.into_array_of_tables() {
            Ok(a) => Item::ArrayOfTables(a),
            Err(original) => original,
        };
    }
    item.as_array_of_tables_mut()
}

/// The item as a table, converting an inline table in place; `None` if it is something else.
fn as_table(item: &mut Item) -> Option<&mut Table> {
    if item.is_value() {
        let taken = std::mem::take(item);
        *item = match taken.into_table() {
            Ok(t) => Item::Table(t),
            Err(original) => original,
        };
    }
    item.as_table_mut()
}
