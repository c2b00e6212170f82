//! The durable record of handled message ids (sled), so that a redelivered message is
//! recognised and its effect happens once.
//!
//! Two trees: `handled` maps a message id to the time it was recorded (i64 ms, big-endian), and
//! `by_time` indexes the same entries by `time ++ id`, so that pruning entries older than the
//! retention is a range scan. Both are written in one transaction.
//!
//! The same sled database holds the HTTP bridge's trees (its queue and idempotency keys), so
//! that the bridge can queue an item and record it as handled in one transaction
//! ([`DedupStore::db`], [`record_in`]).
//!
//! Durability: call [`DedupStore::flush`] before acknowledging anything. sled's flush survives a
//! killed process, not a power cut (see NATS-NOTES.md); a lost record only means one message is
//! handed over again, which the idempotent handoff and derived receipt ids absorb.

use std::path::{Path, PathBuf};

use sled::transaction::{
    ConflictableTransactionResult, TransactionError, Transactional, TransactionalTree,
    UnabortableTransactionError,
};

use crate::error::{Error, Result};

const DAY_MS: i64 = 24 * 60 * 60 * 1000;
/// At most this many entries are removed per [`DedupStore::prune`] call.
const PRUNE_BATCH: usize = 10_000;

/// The dedup store of one agency's state directory. Cheap to clone.
#[derive(Clone)]
pub(crate) struct DedupStore {
    db: sled::Db,
    handled: sled::Tree,
    by_time: sled::Tree,
    path: PathBuf,
    retention_ms: i64,
}

impl DedupStore {
    /// Opens (creating if needed) the store at `path`. Fails with
    /// [`Error::StateDirInUse`] if another process has it open.
    pub(crate) fn open(path: &Path, retention_days: u32) -> Result<DedupStore> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        let db = sled::Config::new().path(path).open().map_err(|e| match e {
            sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                Error::StateDirInUse {
                    path: path.to_owned(),
                }
            }
            e => store_err(path, e),
        })?;
        let handled = db.open_tree("handled").map_err(|e| store_err(path, e))?;
        let by_time = db.open_tree("by_time").map_err(|e| store_err(path, e))?;
        Ok(DedupStore {
            db,
            handled,
            by_time,
            path: path.to_owned(),
            retention_ms: i64::from(retention_days) * DAY_MS,
        })
    }

    /// The sled database (for the trees of the HTTP bridge).
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The trees a transaction that records ids must include, for [`record_in`].
    pub(crate) fn trees(&self) -> (&sled::Tree, &sled::Tree) {
        (&self.handled, &self.by_time)
    }

    /// The store's directory (for errors).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `message_id` was recorded (and not yet pruned).
    pub(crate) fn contains(&self, message_id: &str) -> Result<bool> {
        self.handled
            .contains_key(message_id.as_bytes())
            .map_err(|e| self.err(e))
    }

    /// When `message_id` was recorded, in Unix ms.
    #[cfg(test)]
    pub(crate) fn recorded_at(&self, message_id: &str) -> Result<Option<i64>> {
        let v = self
            .handled
            .get(message_id.as_bytes())
            .map_err(|e| self.err(e))?;
        Ok(v.as_deref().and_then(decode_time))
    }

    /// Records `message_id` as handled at `at_ms`. Recording an id twice keeps the first time.
    /// Not durable until [`flush`](Self::flush).
    pub(crate) fn record(&self, message_id: &str, at_ms: i64) -> Result<()> {
        self.record_all(&[message_id], at_ms)
    }

    /// Records every id of `message_ids` at `at_ms`, all or none (one transaction: sled's
    /// background flush cannot persist some without the others). Not durable until
    /// [`flush`](Self::flush).
    pub(crate) fn record_all(&self, message_ids: &[&str], at_ms: i64) -> Result<()> {
        (&self.handled, &self.by_time)
            .transaction(
                |(handled, by_time)| -> ConflictableTransactionResult<(), ()> {
                    for id in message_ids {
                        record_in(handled, by_time, id.as_bytes(), at_ms)?;
                    }
                    Ok(())
                },
            )
            .map_err(|e| match e {
                TransactionError::Storage(e) => self.err(e),
                TransactionError::Abort(()) => Error::Protocol("dedup transaction aborted".into()),
            })
    }

    /// Makes everything recorded so far survive a killed process.
    ///
    /// A blocking `flush` on the blocking pool, not sled's `flush_async`: in sled 0.34,
    /// `flush_async` futures polled concurrently can wait forever (sled issue #1308, fixed only
    /// in sled's unreleased main branch) — an agency system completing several items at once
    /// through the SDK hung this way.
    pub(crate) async fn flush(&self) -> Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| self.err(sled::Error::Io(std::io::Error::other(e.to_string()))))?
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Removes entries recorded before `now_ms - retention` (at most a batch per call) and
    /// returns how many were removed.
    pub(crate) fn prune(&self, now_ms: i64) -> Result<usize> {
        let cutoff = time_key(now_ms.saturating_sub(self.retention_ms), b"");
        let mut removed = 0;
        for entry in self.by_time.range(..cutoff).take(PRUNE_BATCH) {
            let (key, _) = entry.map_err(|e| self.err(e))?;
            let Some((at_ms, id)) = split_time_key(&key) else {
                self.by_time.remove(&key).map_err(|e| self.err(e))?;
                continue;
            };
            (&self.handled, &self.by_time)
                .transaction(
                    |(handled, by_time)| -> ConflictableTransactionResult<(), ()> {
                        // Only the entry this index line describes (not a later record of the id).
                        if handled.get(id)?.as_deref().and_then(decode_time) == Some(at_ms) {
                            handled.remove(id)?;
                        }
                        by_time.remove(&*key)?;
                        Ok(())
                    },
                )
                .map_err(|e| match e {
                    TransactionError::Storage(e) => self.err(e),
                    TransactionError::Abort(()) => {
                        Error::Protocol("dedup transaction aborted".into())
                    }
                })?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Number of ids held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.handled.len()
    }

    fn err(&self, e: sled::Error) -> Error {
        store_err(&self.path, e)
    }
}

/// Records `id` at `at_ms` inside a transaction over the trees of [`DedupStore::trees`], unless
/// it is recorded already. Returns whether it was new.
pub(crate) fn record_in(
    handled: &TransactionalTree,
    by_time: &TransactionalTree,
    id: &[u8],
    at_ms: i64,
) -> Result<bool, UnabortableTransactionError> {
    if handled.get(id)?.is_some() {
        return Ok(false);
    }
    handled.insert(id, &at_ms.to_be_bytes())?;
    by_time.insert(time_key(at_ms, id), &[])?;
    Ok(true)
}

pub(crate) fn store_err(path: &Path, source: sled::Error) -> Error {
    Error::Store {
        path: path.to_owned(),
        source,
    }
}

/// `time (u64 big-endian, negative clamped to 0) ++ id`: sorts by time.
fn time_key(at_ms: i64, id: &[u8]) -> Vec<u8> {
    let t = u64::try_from(at_ms).unwrap_or(0);
    let mut key = Vec::with_capacity(8 + id.len());
    key.extend_from_slice(&t.to_be_bytes());
    key.extend_from_slice(id);
    key
}

fn split_time_key(key: &[u8]) -> Option<(i64, &[u8])> {
    let (t, id) = key.split_first_chunk::<8>()?;
    Some((i64::try_from(u64::from_be_bytes(*t)).ok()?, id))
}

fn decode_time(v: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(*v.first_chunk::<8>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many items completed at once: each records its id in a transaction and flushes. With
    /// sled 0.34's `flush_async` this hung for good (sled #1308; seen here every time), with
    /// the runtime's workers stuck, so the work runs on a runtime of its own thread and the
    /// test waits for it with a plain timeout, to fail with a message instead of hanging.
    #[test]
    fn concurrent_records_and_flushes_all_finish() {
        let dir = tempfile::tempdir().unwrap();
        let store = DedupStore::open(&dir.path().join("dedup"), 14).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = store.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            let result = rt.block_on(async move {
                let mut tasks = Vec::new();
                for task in 0..32 {
                    let store = worker.clone();
                    tasks.push(tokio::spawn(async move {
                        for n in 0..20 {
                            let id = format!("m-{task}-{n}");
                            store.record_all(&[&id, &format!("{id}-receipt")], 1_000)?;
                            store.flush().await?;
                        }
                        Ok::<(), Error>(())
                    }));
                }
                futures::future::join_all(tasks).await
            });
            let _ = tx.send(result);
        });
        let results = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("32 tasks recording and flushing at once did not finish within 60 s (hung?)");
        for r in results {
            r.unwrap().unwrap();
        }
        assert_eq!(store.len(), 32 * 20 * 2);
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup");
        {
            let store = DedupStore::open(&path, 14).unwrap();
            assert!(!store.contains("m-1").unwrap());
            store.record("m-1", 1_000).unwrap();
            store.record("m-1", 2_000).unwrap();
            store.flush().await.unwrap();
        }
        // sled's threads let go of the file lock just after the drop: wait for that.
        let started = std::time::Instant::now();
        let store = loop {
            match DedupStore::open(&path, 14) {
                Err(Error::StateDirInUse { .. })
                    if started.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.unwrap(),
            }
        };
        assert!(store.contains("m-1").unwrap());
        assert_eq!(store.recorded_at("m-1").unwrap(), Some(1_000));
        assert!(!store.contains("m-2").unwrap());
    }

    #[test]
    fn second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup");
        let _first = DedupStore::open(&path, 14).unwrap();
        let e = DedupStore::open(&path, 14).err().unwrap();
        assert!(matches!(e, Error::StateDirInUse { .. }), "{e}");
    }

    #[test]
    fn records_several_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = DedupStore::open(&dir.path().join("dedup"), 14).unwrap();
        store.record("a", 5).unwrap();
        store.record_all(&["a", "b", "c"], 9).unwrap();
        assert_eq!(store.recorded_at("a").unwrap(), Some(5));
        assert_eq!(store.recorded_at("b").unwrap(), Some(9));
        assert_eq!(store.recorded_at("c").unwrap(), Some(9));
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn prunes_only_old_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = DedupStore::open(&dir.path().join("dedup"), 1).unwrap();
        let now = 10 * DAY_MS;
        store.record("old-1", now - 2 * DAY_MS).unwrap();
        store.record("old-2", now - DAY_MS - 1).unwrap();
        store.record("new-1", now - DAY_MS + 1).unwrap();
        store.record("new-2", now).unwrap();
        assert_eq!(store.prune(now).unwrap(), 2);
        assert!(!store.contains("old-1").unwrap());
        assert!(!store.contains("old-2").unwrap());
        assert!(store.contains("new-1").unwrap());
        assert!(store.contains("new-2").unwrap());
        assert_eq!(store.len(), 2);
        assert_eq!(store.prune(now).unwrap(), 0);
    }

    #[test]
    fn time_keys_sort_by_time() {
        assert!(time_key(1, b"z") < time_key(2, b"a"));
        assert_eq!(split_time_key(&time_key(42, b"id")), Some((42, &b"id"[..])));
        assert_eq!(time_key(-5, b""), time_key(0, b""));
    }
}
