//! [`FolderInbox`]: hands items to an agency system through a folder, one JSON file per item.
//!
//! ```text
//! <root>/referrals/<referral_id>.json          a delivered Referral (proto3 JSON, pretty)
//! <root>/notifications/<message_id>.json       a Notification
//! <root>/rejections/<message_id>.json          a Rejection
//! <root>/escalations/<message_id>.json         an Escalation
//! <root>/withdrawals/<message_id>.json         a Withdrawal (ids only)
//! ```
//!
//! Handing over a withdrawal purges: the withdrawn referral's file is removed (and the removal
//! made durable) before the withdrawal's own file is written, so a withdrawal file means the
//! purge is done. Both steps are idempotent.
//!
//! Each file is written no-replace and crash-safe ([`write_new_file`]): a temporary file in the
//! same directory is written and fsynced, hard-linked to its final name (which fails if the name
//! exists), removed, and the directory is fsynced. A file therefore appears whole or not at
//! all, and handing the same item over twice (after a crash before it was marked done) leaves
//! the first copy untouched. An id that is not safe as a file name is replaced by a UUIDv5
//! derived from it (`x-<uuid>.json`), so names stay stable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::ids;
use crate::item::{Item, ItemKind};
use crate::json::to_pretty_json;

/// Sub-folders, one per kind of item.
pub const REFERRALS: &str = "referrals";
pub const NOTIFICATIONS: &str = "notifications";
pub const REJECTIONS: &str = "rejections";
pub const ESCALATIONS: &str = "escalations";
pub const WITHDRAWALS: &str = "withdrawals";

const TMP_SUFFIX: &str = ".tmp";
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What a no-replace write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// The file was created.
    Written,
    /// A file of that name was already there (handed over before); it was left alone.
    AlreadyPresent,
}

/// A folder that items are handed over to.
#[derive(Debug, Clone)]
pub struct FolderInbox {
    root: PathBuf,
}

impl FolderInbox {
    /// Creates the folder and its sub-folders if needed, and removes temporary files left by a
    /// crash. Only one adapter may write to a folder.
    pub fn open(root: impl Into<PathBuf>) -> Result<FolderInbox> {
        let root = root.into();
        for sub in [
            REFERRALS,
            NOTIFICATIONS,
            REJECTIONS,
            ESCALATIONS,
            WITHDRAWALS,
        ] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
            remove_stale_temp_files(&dir);
        }
        Ok(FolderInbox { root })
    }

    /// The folder's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes the item's file (see the module docs) and returns its path and what happened.
    /// Idempotent: an item handed over again finds its file present.
    pub async fn hand_over(&self, item: &Item) -> Result<(PathBuf, Handoff)> {
        if let ItemKind::Withdrawal(w) = item.kind() {
            self.purge(&w.referral_id).await?;
        }
        let (sub, name, bytes) = render(item.kind(), item.message_id())?;
        let dir = self.root.join(sub);
        let path = dir.join(&name);
        let result = tokio::task::spawn_blocking(move || write_new_file(&dir, &name, &bytes))
            .await
            .map_err(|e| Error::io("handoff task failed", io::Error::other(e)))?
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        if result == Handoff::AlreadyPresent {
            debug!(path = %path.display(), "already handed over; left as it was");
        }
        Ok((path, result))
    }
}

impl FolderInbox {
    /// Removes the file of referral `referral_id`, if there is one, durably. Returns whether
    /// there was one.
    pub async fn purge(&self, referral_id: &str) -> Result<bool> {
        let dir = self.root.join(REFERRALS);
        let path = dir.join(file_name_for(referral_id));
        let shown = path.display().to_string();
        let removed = tokio::task::spawn_blocking(move || remove_durably(&dir, &path))
            .await
            .map_err(|e| Error::io("purge task failed", io::Error::other(e)))?
            .map_err(|e| Error::io(format!("cannot remove {shown}"), e))?;
        if removed {
            debug!(path = %shown, "purged");
        }
        Ok(removed)
    }
}

/// Removes `path` (in `dir`) if it exists and fsyncs `dir`. Returns whether it existed.
fn remove_durably(dir: &Path, path: &Path) -> io::Result<bool> {
    let existed = match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    // Synced even when nothing was there: a removal just before a crash may not be durable yet.
    File::open(dir)?.sync_all()?;
    Ok(existed)
}

/// The sub-folder, file name and contents for an item.
fn render(kind: &ItemKind, message_id: &str) -> Result<(&'static str, String, Vec<u8>)> {
    let (folder, name) = match kind {
        ItemKind::Delivery { referral, .. } => (REFERRALS, referral.referral_id.as_str()),
        ItemKind::Notification(_) => (NOTIFICATIONS, message_id),
        ItemKind::Rejection(_) => (REJECTIONS, message_id),
        ItemKind::Escalation(_) => (ESCALATIONS, message_id),
        ItemKind::Withdrawal(_) => (WITHDRAWALS, message_id),
    };
    Ok((
        folder,
        file_name_for(name),
        to_pretty_json(&kind.to_json()?)?,
    ))
}

/// `<id>.json` if `id` is 1-128 characters of `A-Z a-z 0-9 . _ -` not starting with `.`;
/// otherwise `x-<UUIDv5 of id>.json`.
pub fn file_name_for(id: &str) -> String {
    let safe = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if safe {
        format!("{id}.json")
    } else {
        format!("x-{}.json", ids::derived_token(id))
    }
}

/// Creates `dir/name` holding `bytes`, durably, unless it exists (then leaves it untouched and
/// returns [`Handoff::AlreadyPresent`]). `name` must be a plain file name.
pub fn write_new_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<Handoff> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    let final_path = dir.join(name);
    let tmp_path = dir.join(format!(
        ".{name}.{}-{}{TMP_SUFFIX}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut tmp = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)?;
        tmp.write_all(bytes)?;
        tmp.sync_all()?;
        drop(tmp);
        fs::hard_link(&tmp_path, &final_path)
    })();
    if let Err(e) = fs::remove_file(&tmp_path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %tmp_path.display(), cause = %e, "cannot remove temporary file");
    }
    let outcome = match written {
        Ok(()) => Handoff::Written,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Handoff::AlreadyPresent,
        Err(e) => return Err(e),
    };
    // Make the new name (and the removal of the temporary one) durable. Done for an existing
    // file too: it may have been linked just before a crash that preceded this sync.
    File::open(dir)?.sync_all()?;
    Ok(outcome)
}

fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TMP_SUFFIX) {
            match fs::remove_file(entry.path()) {
                Ok(()) => debug!(file = %name, "removed stale temporary file"),
                Err(e) => warn!(file = %name, cause = %e, "cannot remove stale temporary file"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use yeongye_proto::v1;

    use super::*;

    #[test]
    fn no_replace() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            write_new_file(dir.path(), "a.json", b"first").unwrap(),
            Handoff::Written
        );
        assert_eq!(
            write_new_file(dir.path(), "a.json", b"second").unwrap(),
            Handoff::AlreadyPresent
        );
        assert_eq!(fs::read(dir.path().join("a.json")).unwrap(), b"first");
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["a.json"]);
    }

    #[test]
    fn refuses_paths() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(write_new_file(dir.path(), bad, b"x").is_err(), "{bad}");
        }
    }

    #[test]
    fn open_creates_folders_and_cleans_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("inbox");
        FolderInbox::open(&root).unwrap();
        let stale = root.join(REFERRALS).join(".r.json.1-0.tmp");
        fs::write(&stale, b"partial").unwrap();
        let keep = root.join(REFERRALS).join("r.json");
        fs::write(&keep, b"whole").unwrap();
        FolderInbox::open(&root).unwrap();
        assert!(!stale.exists());
        assert!(keep.exists());
    }

    #[test]
    fn file_names() {
        assert_eq!(
            file_name_for("0190f5a4-1c2b-7def-8123-456789abcdef"),
            "0190f5a4-1c2b-7def-8123-456789abcdef.json"
        );
        for hostile in [
            "../../etc/passwd",
            "",
            ".x",
            "a b",
            "희망",
            &"a".repeat(200),
        ] {
            let n = file_name_for(hostile);
            assert!(
                n.starts_with("x-") && n.ends_with(".json"),
                "{hostile}: {n}"
            );
            assert_eq!(n, file_name_for(hostile));
        }
        assert_ne!(file_name_for("a/b"), file_name_for("a\\b"));
    }

    #[test]
    fn renders_items() {
        let referral = v1::Referral {
            referral_id: "r-1".into(),
            to_agency: "cc-1".into(),
            ..Default::default()
        };
        let kind = ItemKind::Delivery {
            referral: referral.clone(),
            original: v1::Envelope::default(),
        };
        let (sub, name, bytes) = render(&kind, "m-1").unwrap();
        assert_eq!((sub, name.as_str()), (REFERRALS, "r-1.json"));
        let back: v1::Referral = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, referral);

        let kind = ItemKind::Rejection(v1::Rejection::default());
        let (sub, name, _) = render(&kind, "m-2").unwrap();
        assert_eq!((sub, name.as_str()), (REJECTIONS, "m-2.json"));

        let w = v1::Withdrawal {
            referral_id: "r-1".into(),
            consent_id: "c-1".into(),
            client_pseudonym_id: "p-1".into(),
            at_ms: 5,
        };
        let (sub, name, bytes) = render(&ItemKind::Withdrawal(w.clone()), "m-3").unwrap();
        assert_eq!((sub, name.as_str()), (WITHDRAWALS, "m-3.json"));
        let back: v1::Withdrawal = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, w);
        let kind = ItemKind::Escalation(v1::Escalation::default());
        let (sub, name, _) = render(&kind, "m-4").unwrap();
        assert_eq!((sub, name.as_str()), (ESCALATIONS, "m-4.json"));
    }

    #[tokio::test]
    async fn purge_removes_the_referral_file() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = FolderInbox::open(dir.path()).unwrap();
        let file = dir.path().join(REFERRALS).join("r-1.json");
        fs::write(&file, b"{}").unwrap();
        assert!(inbox.purge("r-1").await.unwrap());
        assert!(!file.exists());
        assert!(!inbox.purge("r-1").await.unwrap());
        // A hostile id names a derived file inside the folder, never a path outside it.
        let outside = dir.path().join("keep.json");
        fs::write(&outside, b"{}").unwrap();
        assert!(!inbox.purge("../keep").await.unwrap());
        assert!(outside.exists());
    }
}
