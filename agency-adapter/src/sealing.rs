//! The adapter's side of sealed client data (docs/PROTOCOL.md "Sealed client data"): the
//! sender seals a referral's personal fields (and a status note) to the reader's current key
//! from the registry; the recipient opens them with its own keys and takes in only what stays
//! within the referral's declared categories. The broker between them sees metadata only.
//!
//! Sealing happens when the adapter has the registry (`registry` in its configuration): every
//! referral is then sealed, and one whose recipient has no sealing key is refused before
//! anything is sent. The registry is read again when its file changes, and the key file when a
//! seal names a key it does not hold, so rotations need no restart. Without a registry the adapter sends in clear, as adapters did before
//! sealing, which a broker refuses unless `plaintext_referrals = "accept"`.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use yeongye_proto::seal::{self, Directory, KeyFile, PublicKey, SealError};
use yeongye_proto::v1::{self, ReasonCode};
use yeongye_proto::{rules, signing};

use crate::error::{Error, Result};

/// The keys an adapter seals to and opens with. Cheap to clone (clones share the keys).
#[derive(Debug, Clone, Default)]
pub struct Sealing {
    /// Every agency's public sealing keys (from `registry`); None: send in clear. Read again
    /// when the registry file changed (an agency added, a key rotated), so that a long-running
    /// adapter seals to the current keys.
    directory: Option<Arc<RwLock<Known>>>,
    registry: Option<PathBuf>,
    /// This agency's private sealing keys (`sealing_key_file`); None: nothing sealed to it
    /// opens. Read again when a seal names a key it does not hold (a rotation since start).
    keys: Arc<RwLock<Option<KeyFile>>>,
    key_file: Option<PathBuf>,
}

/// The directory as last read, and when its file was modified then.
#[derive(Debug)]
struct Known {
    directory: Directory,
    modified: Option<std::time::SystemTime>,
}

fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// What came of opening a delivered referral.
#[derive(Debug)]
pub(crate) enum Opened {
    /// The referral as its sender wrote it (opened, or sent in clear).
    Referral(Box<v1::Referral>),
    /// Not to be handed over: the adapter declines it with this reason.
    Refused(ReasonCode, &'static str),
}

impl Sealing {
    /// Reads the registry's sealing keys and the agency's key file (`registry` and
    /// `sealing_key_file` of the configuration).
    pub fn open(
        registry: Option<&std::path::Path>,
        sealing_key_file: Option<&std::path::Path>,
    ) -> Result<Sealing> {
        let directory = registry
            .map(|p| {
                let known = Known {
                    modified: modified(p),
                    directory: Directory::load(p)
                        .map_err(|e| Error::Config(format!("registry: {e}")))?,
                };
                Ok::<_, Error>(Arc::new(RwLock::new(known)))
            })
            .transpose()?;
        let keys = sealing_key_file
            .map(|p| KeyFile::load(p).map_err(|e| Error::Config(format!("sealing_key_file: {e}"))))
            .transpose()?;
        Ok(Sealing {
            directory,
            registry: registry.map(std::path::Path::to_path_buf),
            keys: Arc::new(RwLock::new(keys)),
            key_file: sealing_key_file.map(std::path::Path::to_path_buf),
        })
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Option<KeyFile>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// `open` with this agency's keys; if it names a key they lack, once more after reading the
    /// key file again (a rotation since start).
    fn with_keys<T>(
        &self,
        open: impl Fn(&KeyFile) -> std::result::Result<T, SealError>,
    ) -> std::result::Result<T, SealError> {
        let attempt = || match self.keys().as_ref() {
            Some(keys) => open(keys),
            None => Err(SealError::UnknownKey(String::new())),
        };
        match attempt() {
            Err(SealError::UnknownKey(_)) if self.reload_keys() => attempt(),
            done => done,
        }
    }

    /// Reads the key file again (after a seal named a key this adapter did not hold); keeps
    /// what it had if the file does not read.
    fn reload_keys(&self) -> bool {
        let Some(path) = &self.key_file else {
            return false;
        };
        match KeyFile::load(path) {
            Ok(k) => {
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(k);
                tracing::info!("sealing key file read again");
                true
            }
            Err(e) => {
                tracing::warn!(cause = %e, "reading the sealing key file again failed");
                false
            }
        }
    }

    /// Sealing with these keys (for tests and embedders that hold the keys themselves).
    pub fn new(directory: Option<Directory>, keys: Option<KeyFile>) -> Sealing {
        Sealing {
            directory: directory.map(|directory| {
                Arc::new(RwLock::new(Known {
                    directory,
                    modified: None,
                }))
            }),
            registry: None,
            keys: Arc::new(RwLock::new(keys)),
            key_file: None,
        }
    }

    /// Whether referrals and notes are sealed (the registry is known).
    pub fn seals(&self) -> bool {
        self.directory.is_some()
    }

    /// Whether the registry lists a current sealing key of `agency` (others seal to it).
    pub fn registry_has_key_of(&self, agency: &str) -> bool {
        self.directory.as_ref().is_some_and(|known| {
            known
                .read()
                .map(|k| k.directory.current(agency).is_ok())
                .unwrap_or(false)
        })
    }

    /// The ids of this agency's own sealing keys (for `check-config`).
    pub fn key_ids(&self) -> Vec<String> {
        self.keys()
            .as_ref()
            .map(|k| k.keys.iter().map(|k| k.id.clone()).collect())
            .unwrap_or_default()
    }

    /// The registry read again if its file changed since (kept as it was if it does not read).
    fn refresh(&self, known: &RwLock<Known>) {
        let Some(path) = &self.registry else { return };
        let now = modified(path);
        let stale = known.read().map_or(true, |k| k.modified != now);
        if !stale {
            return;
        }
        match Directory::load(path) {
            Ok(directory) => {
                *known.write().unwrap_or_else(|p| p.into_inner()) = Known {
                    directory,
                    modified: now,
                };
                tracing::info!("registry read again: sealing keys updated");
            }
            Err(e) => {
                tracing::warn!(cause = %e, "reading the changed registry failed; sealing to the keys read before")
            }
        }
    }

    /// The recipient's current key, if this adapter seals.
    fn key_for(&self, agency: &str) -> Result<Option<PublicKey>> {
        let Some(known) = &self.directory else {
            return Ok(None);
        };
        self.refresh(known);
        let known = known.read().unwrap_or_else(|p| p.into_inner());
        known
            .directory
            .current(agency)
            .cloned()
            .map(Some)
            .map_err(|_| {
                Error::invalid(
                    "to_agency",
                    "has no sealing key in the registry: the referral cannot be sealed to it \
                 (nothing was sent)",
                )
            })
    }

    /// Seals a checked referral's personal fields to its recipient (metadata final: it is
    /// bound to the seal). In clear if this adapter does not seal.
    pub(crate) fn seal_referral(&self, r: &mut v1::Referral) -> Result<()> {
        if let Some(key) = self.key_for(&r.to_agency)? {
            seal::seal_referral(r, &key)
                .map_err(|_| Error::invalid("client", "could not be sealed"))?;
        }
        Ok(())
    }

    /// Seals `note` from `me` to `reader` for a status update, if this adapter seals and the
    /// note is not empty.
    pub(crate) fn seal_note(
        &self,
        me: &str,
        reader: &str,
        referral_id: &str,
        status: v1::Status,
        note: &str,
    ) -> Result<Option<v1::Sealed>> {
        if note.is_empty() {
            return Ok(None);
        }
        let Some(key) = self.key_for(reader)? else {
            return Ok(None);
        };
        let aad = seal::note_aad(referral_id, me, reader, status as i32, &key.id);
        seal::seal(&key, &aad, note.as_bytes())
            .map(Some)
            .map_err(|_| Error::invalid("note", "could not be sealed"))
    }

    /// Opens a referral delivered to `me`, and checks that its contents stay within its
    /// declared categories (the check the broker cannot make on sealed data). A referral sent
    /// in clear (accepted by a broker in migration) is handed over as it came.
    pub(crate) fn open_referral(&self, r: &v1::Referral, now_ms: i64) -> Opened {
        if r.sealed.is_none() {
            return Opened::Referral(Box::new(r.clone()));
        }
        let contents = match self.with_keys(|keys| seal::open_referral(r, keys, now_ms)) {
            Ok(Some(c)) => c,
            Ok(None) => return Opened::Referral(Box::new(r.clone())),
            Err(e) => return Opened::Refused(ReasonCode::SealedOpenFailed, open_failure(&e)),
        };
        let client = contents.client.clone().unwrap_or_default();
        if rules::undeclared_category(&client, &r.data_categories).is_some() {
            // Dropped here, unread beyond the check: nothing of it is kept.
            return Opened::Refused(
                ReasonCode::SealedCategoryNotDeclared,
                "the sealed contents carry a data category the referral did not declare",
            );
        }
        Opened::Referral(Box::new(seal::unsealed(r, contents)))
    }

    /// Opens a notification's sealed note for `me` into `note` (left sealed if it is not for
    /// this agency's keys).
    pub(crate) fn open_note(&self, me: &str, n: &mut v1::Notification, now_ms: i64) {
        let Some(sealed) = &n.sealed_note else {
            return;
        };
        let author = n.by_agency.as_str();
        let status = note_status(n.state);
        let aad = seal::note_aad(&n.referral_id, author, me, status, &sealed.key_id);
        let opened = self.with_keys(|keys| seal::open(keys, sealed, &aad, now_ms));
        match opened.ok().and_then(|b| String::from_utf8(b).ok()) {
            Some(note) => {
                n.note = note;
                n.sealed_note = None;
            }
            None => tracing::warn!(
                key_id = %signing::shown_key_id(&sealed.key_id),
                "a notification's sealed note does not open with this agency's keys; passed on sealed"
            ),
        }
    }
}

/// Why a seal did not open, in words that quote nothing from the wire.
fn open_failure(e: &SealError) -> &'static str {
    match e {
        SealError::UnknownKey(_) => {
            "sealed to a key this agency does not hold (unknown, or past its grace period)"
        }
        SealError::Open => {
            "the seal does not open: its metadata was changed in transit, or it is not for us"
        }
        _ => "the seal is malformed",
    }
}

/// The `Status` whose update moved a referral into `state` (the note's associated data names
/// the status the author sent).
fn note_status(state: i32) -> i32 {
    use v1::ReferralState as S;
    let status = match S::try_from(state) {
        Ok(S::Received) => v1::Status::Received,
        Ok(S::Accepted) => v1::Status::Accepted,
        Ok(S::Declined) => v1::Status::Declined,
        Ok(S::InProgress) => v1::Status::InProgress,
        Ok(S::Completed) => v1::Status::Completed,
        Ok(S::Cancelled) => v1::Status::Cancelled,
        _ => v1::Status::Unspecified,
    };
    status as i32
}

#[cfg(test)]
mod tests;
