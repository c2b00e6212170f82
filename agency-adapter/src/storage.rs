//! [`Storage`]: the adapter's one durable store (sled), owner of every tree it keeps, committing
//! in groups. No other module of the adapter names sled: they call the typed methods here, and
//! write through [`Storage::commit`] with the typed operations of [`Tx`].
//!
//! ```text
//! handled           message id     -> recorded at (i64 ms BE)     handled ids (dedup), follow-ups sent
//! by_time           at (u64 BE) ++ id -> ()                       the same, by time, for pruning
//! http_pending      seq (u64 BE)   -> queue entry (JSON)          the HTTP bridge's queue (http/queue.rs)
//! http_finishing    seq (u64 BE)   -> queue entry (JSON)          taken, its follow-up not yet published
//! http_index        message id     -> seq (u64 BE)                which entry holds a message
//! http_idempotency  key            -> record (JSON)               Idempotency-Key (http/idempotency.rs)
//! outbox            seq (u64 BE)   -> outbox record (binary)      messages accepted, not yet PubAcked (outbox.rs)
//! outbox_corrupt    seq (u64 BE)   -> the record's bytes as found an outbox record that did not decode, set aside
//! ```
//! (The layout of the stores written before this module: they open unchanged.)
//!
//! # Group commit, and the promise it keeps
//!
//! Every write goes through [`Storage::commit`]: the caller's operation is queued to one writer
//! thread, which takes *everything* queued at that moment, applies it in **one** sled
//! transaction over all the trees, **flushes once**, and only then answers every waiter — with
//! its result if the flush succeeded, with the error if the transaction or the flush failed
//! (then no waiter is told its write is durable). A caller acknowledges nothing — no JetStream
//! message, no HTTP response — before its `commit` returned `Ok`, so whatever it promised is on
//! disk first. Many items ready at once share one flush instead of paying one each (the broker
//! commits once per turn the same way).
//!
//! Crash safety: a crash before the flush loses the whole group (one transaction: sled's
//! background flush cannot persist part of it) and no waiter was answered, so every message of
//! the group comes again and is handled again (handling is idempotent). A crash after the
//! flush keeps the group; a waiter that had not yet acknowledged sees its message again and
//! finds it recorded. sled's flush survives a killed process, not a power cut (see
//! NATS-NOTES.md): a lost record means a message is handed over again, which the idempotent
//! handoff and derived follow-up ids absorb.
//!
//! # Blocking work
//!
//! Commits and flushes run on the writer thread; scans (the queue's lists, the prunes' range
//! scans) run on tokio's blocking pool ([`tokio::task::spawn_blocking`]). Point reads
//! ([`Storage::contains`], [`Storage::queue_index`], [`Storage::idempotency_record`]) stay on
//! the caller's thread: one key, from sled's page cache.
//!
//! A blocking `flush` on the writer thread, not sled's `flush_async`: in sled 0.34,
//! `flush_async` futures polled concurrently can wait forever (sled issue #1308).

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, Transactional,
    TransactionalTree, UnabortableTransactionError,
};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

const HANDLED: &str = "handled";
const BY_TIME: &str = "by_time";
const PENDING: &str = "http_pending";
const FINISHING: &str = "http_finishing";
const INDEX: &str = "http_index";
const IDEMPOTENCY: &str = "http_idempotency";
const OUTBOX: &str = "outbox";
const OUTBOX_CORRUPT: &str = "outbox_corrupt";

const DAY_MS: i64 = 24 * 60 * 60 * 1000;
/// At most this many handled ids are removed per [`Storage::prune_handled`] call.
const PRUNE_BATCH: usize = 10_000;
/// At most this many operations go into one group (one transaction, one flush).
const MAX_GROUP: usize = 1024;
/// How long opening waits for a lock that this process's previous handle still holds (sled
/// lets go of it a moment after the drop); another process's lock is reported after it.
pub(crate) const OPEN_WAIT: Duration = Duration::from_secs(2);

/// A sled failure, shared by every waiter of the group it failed (hence `Arc`).
#[derive(Clone)]
pub struct StoreError(Arc<sled::Error>);

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A failure inside a [`Storage::commit`] operation: the whole group fails with it.
#[derive(Debug)]
pub(crate) struct TxError(UnabortableTransactionError);

impl From<UnabortableTransactionError> for TxError {
    fn from(e: UnabortableTransactionError) -> TxError {
        TxError(e)
    }
}

/// What a [`Storage::commit`] operation returns.
pub(crate) type TxResult<T> = std::result::Result<T, TxError>;

/// Every tree, opened once.
#[derive(Clone)]
struct Trees {
    db: sled::Db,
    handled: sled::Tree,
    by_time: sled::Tree,
    pending: sled::Tree,
    finishing: sled::Tree,
    index: sled::Tree,
    idempotency: sled::Tree,
    outbox: sled::Tree,
    outbox_corrupt: sled::Tree,
    /// The next outbox seq: seeded at open above every seq of `outbox` and `outbox_corrupt`,
    /// taken inside the writer's transaction, so entries keep the order their commits came in.
    outbox_next: Arc<AtomicU64>,
    /// The next queue seq. Not sled's `generate_id`: called inside a transaction, that can
    /// wait for a lock the transaction holds. Seeded at open above every seq in use and above
    /// `generate_id` (which earlier stores used), so entries stay in arrival order.
    next_seq: Arc<AtomicU64>,
}

/// The adapter's store of one state directory. Cheap to clone; the last clone dropped stops
/// the writer thread (after it answered everything queued) and closes the database.
#[derive(Clone)]
pub(crate) struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    trees: Trees,
    path: PathBuf,
    retention_ms: i64,
    /// To the writer thread; None once dropping.
    writer: Mutex<Option<mpsc::Sender<Box<dyn Pending>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Groups committed (transactions applied and flushed), for tests.
    #[cfg(test)]
    flushes: Arc<AtomicU64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop once it has answered what is queued;
        // joining it means the database is closed when the last `Storage` is gone.
        drop(lock(&self.writer).take());
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Storage {
    /// Opens (creating if needed) the store at `path`, keeping handled ids for
    /// `retention_days`. Fails with [`Error::StateDirInUse`] if another process has it open.
    /// Blocks (opening reads the store; a lock just released is waited for): call it where
    /// blocking is allowed, or use [`open_async_waiting`](Self::open_async_waiting).
    #[cfg(test)]
    pub(crate) fn open(path: &Path, retention_days: u32) -> Result<Storage> {
        Storage::open_waiting(path, retention_days, OPEN_WAIT)
    }

    /// [`open`](Self::open), waiting at most `wait` for a lock held (zero: fail at once if
    /// another process has the store).
    pub(crate) fn open_waiting(
        path: &Path,
        retention_days: u32,
        wait: Duration,
    ) -> Result<Storage> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        let db = yeongye_sled::retry_while_locked(wait, || {
            yeongye_sled::open_serialized(path, || sled::Config::new().path(path).open())
        })
        .map_err(|e| {
            if yeongye_sled::is_lock_error(&e) {
                Error::StateDirInUse {
                    path: path.to_owned(),
                }
            } else {
                store_err(path, e)
            }
        })?;
        let open = |name: &str| db.open_tree(name).map_err(|e| store_err(path, e));
        let (pending, finishing) = (open(PENDING)?, open(FINISHING)?);
        let mut next_seq = db.generate_id().map_err(|e| store_err(path, e))?;
        for tree in [&pending, &finishing] {
            if let Some((last, _)) = tree.last().map_err(|e| store_err(path, e))? {
                next_seq = next_seq.max(decode_seq(&last)?.saturating_add(1));
            }
        }
        let (outbox, outbox_corrupt) = (open(OUTBOX)?, open(OUTBOX_CORRUPT)?);
        let mut outbox_next = 1u64;
        for tree in [&outbox, &outbox_corrupt] {
            if let Some((last, _)) = tree.last().map_err(|e| store_err(path, e))? {
                outbox_next = outbox_next.max(decode_seq(&last)?.saturating_add(1));
            }
        }
        let trees = Trees {
            outbox,
            outbox_corrupt,
            outbox_next: Arc::new(AtomicU64::new(outbox_next)),
            handled: open(HANDLED)?,
            by_time: open(BY_TIME)?,
            pending,
            finishing,
            index: open(INDEX)?,
            idempotency: open(IDEMPOTENCY)?,
            next_seq: Arc::new(AtomicU64::new(next_seq)),
            db,
        };
        let (tx, rx) = mpsc::channel();
        let flushes = Arc::new(AtomicU64::new(0));
        let thread = {
            let (trees, path, flushes) = (trees.clone(), path.to_owned(), Arc::clone(&flushes));
            std::thread::Builder::new()
                .name("adapter-store".into())
                .spawn(move || write_groups(&trees, &path, &rx, &flushes))
                .map_err(|e| Error::io("cannot start the store's writer thread", e))?
        };
        Ok(Storage {
            inner: Arc::new(Inner {
                trees,
                path: path.to_owned(),
                retention_ms: i64::from(retention_days) * DAY_MS,
                writer: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                #[cfg(test)]
                flushes,
            }),
        })
    }

    /// [`open_waiting`](Self::open_waiting) on tokio's blocking pool.
    pub(crate) async fn open_async_waiting(
        path: PathBuf,
        retention_days: u32,
        wait: Duration,
    ) -> Result<Storage> {
        tokio::task::spawn_blocking(move || Storage::open_waiting(&path, retention_days, wait))
            .await
            .map_err(|e| Error::io("opening the store failed", std::io::Error::other(e)))?
    }

    fn err(&self, e: sled::Error) -> Error {
        store_err(&self.inner.path, e)
    }

    /// Groups committed so far (each one transaction and one flush).
    #[cfg(test)]
    pub(crate) fn groups_committed(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }

    /// Applies `op` in the next group (see the module docs) and returns its result once the
    /// group is flushed. `op` may run more than once (a transaction retried after a conflict):
    /// it must only read and write through `tx`. An `Err` from `op` — or any failure of the
    /// group's transaction or flush — fails every operation of the group; none of their writes
    /// may be relied on.
    pub(crate) async fn commit<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Tx<'_>) -> TxResult<T> + Send + 'static,
    {
        self.submit(op)?.await.map_err(|_| {
            Error::io(
                "the store's writer stopped",
                std::io::Error::other("writer thread gone"),
            )
        })?
    }

    /// Queues `op` for the next group without waiting for it: for writes whose loss in a crash
    /// is harmless (the outbox's removals after a PubAck: a lost one only sends a message
    /// again, under its id). A failure is logged by the writer.
    pub(crate) fn commit_detached<T, F>(&self, op: F) -> Result<()>
    where
        T: Send + 'static,
        F: FnMut(&Tx<'_>) -> TxResult<T> + Send + 'static,
    {
        self.submit(op).map(drop)
    }

    /// Queues `op` for the writer; the receiver gets its outcome.
    fn submit<T, F>(&self, op: F) -> Result<oneshot::Receiver<Result<T>>>
    where
        T: Send + 'static,
        F: FnMut(&Tx<'_>) -> TxResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let queued = lock(&self.inner.writer).as_ref().is_some_and(|w| {
            w.send(Box::new(Op {
                op,
                result: None,
                reply,
            }))
            .is_ok()
        });
        if !queued {
            return Err(Error::io(
                "the store's writer stopped",
                std::io::Error::other("writer thread gone"),
            ));
        }
        Ok(answer)
    }

    /// Records every id of `message_ids` as handled at `at_ms` (an id recorded before keeps its
    /// first time), durably: one group commit.
    pub(crate) async fn record_all(&self, message_ids: &[&str], at_ms: i64) -> Result<()> {
        let ids: Vec<String> = message_ids.iter().map(|s| (*s).to_owned()).collect();
        self.commit(move |tx| {
            for id in &ids {
                tx.record(id, at_ms)?;
            }
            Ok(())
        })
        .await
    }

    /// Whether `message_id` was recorded (and not yet pruned).
    pub(crate) fn contains(&self, message_id: &str) -> Result<bool> {
        self.inner
            .trees
            .handled
            .contains_key(message_id.as_bytes())
            .map_err(|e| self.err(e))
    }

    /// When `message_id` was recorded, in Unix ms.
    #[cfg(test)]
    pub(crate) fn recorded_at(&self, message_id: &str) -> Result<Option<i64>> {
        let v = self
            .inner
            .trees
            .handled
            .get(message_id.as_bytes())
            .map_err(|e| self.err(e))?;
        Ok(v.as_deref().and_then(decode_time))
    }

    /// Number of handled ids held.
    #[cfg(test)]
    pub(crate) fn handled_len(&self) -> usize {
        self.inner.trees.handled.len()
    }

    /// Removes handled ids recorded before `now_ms - retention` (at most a batch per call) and
    /// returns how many were removed. The range scan runs on the blocking pool, the removal in
    /// a group commit.
    pub(crate) async fn prune_handled(&self, now_ms: i64) -> Result<usize> {
        let cutoff = time_key(now_ms.saturating_sub(self.inner.retention_ms), b"");
        let by_time = self.inner.trees.by_time.clone();
        let keys = self
            .blocking(move || {
                by_time
                    .range(..cutoff)
                    .keys()
                    .take(PRUNE_BATCH)
                    .map(|k| k.map(|k| k.to_vec()))
                    .collect::<sled::Result<Vec<_>>>()
            })
            .await?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.commit(move |tx| {
            for key in &keys {
                if let Some((at_ms, id)) = split_time_key(key)
                    // Only the entry this index line describes (not a later record of the id).
                    && tx.handled.get(id)?.as_deref().and_then(decode_time) == Some(at_ms)
                {
                    tx.handled.remove(id)?;
                }
                tx.by_time.remove(key.as_slice())?;
            }
            Ok(keys.len())
        })
        .await
    }

    /// The seq of the queue entry holding `message_id`, if any.
    pub(crate) fn queue_index(&self, message_id: &str) -> Result<Option<u64>> {
        let Some(seq) = self
            .inner
            .trees
            .index
            .get(message_id.as_bytes())
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        decode_seq(&seq).map(Some)
    }

    /// Up to `limit` pending queue entries (seq, bytes), oldest first.
    pub(crate) async fn queue_pending(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let tree = self.inner.trees.pending.clone();
        with_seqs(self.blocking(move || scan(&tree, limit)).await?)
    }

    /// How many queue entries are pending.
    pub(crate) fn queue_pending_len(&self) -> usize {
        self.inner.trees.pending.len()
    }

    /// Every finishing queue entry (seq, bytes), oldest first.
    pub(crate) async fn queue_finishing(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let tree = self.inner.trees.finishing.clone();
        with_seqs(self.blocking(move || scan(&tree, usize::MAX)).await?)
    }

    /// The idempotency record stored under `key`, if any.
    pub(crate) fn idempotency_record(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .trees
            .idempotency
            .get(key.as_bytes())
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
    }

    /// Removes every idempotency record that `expired` says is old (given its bytes); returns
    /// how many. The scan runs on the blocking pool, the removal in a group commit.
    pub(crate) async fn prune_idempotency(
        &self,
        expired: impl Fn(&[u8]) -> bool + Send + 'static,
    ) -> Result<usize> {
        let tree = self.inner.trees.idempotency.clone();
        let keys = self
            .blocking(move || {
                let mut keys = Vec::new();
                for kv in tree.iter() {
                    let (k, v) = kv?;
                    if expired(&v) {
                        keys.push(k.to_vec());
                    }
                }
                Ok::<_, sled::Error>(keys)
            })
            .await?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.commit(move |tx| {
            for key in &keys {
                tx.idempotency.remove(key.as_slice())?;
            }
            Ok(keys.len())
        })
        .await
    }

    /// Up to `limit` outbox records (seq, bytes) with a seq above `after`, oldest first.
    pub(crate) async fn outbox_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let tree = self.inner.trees.outbox.clone();
        let from = after.saturating_add(1).to_be_bytes();
        with_seqs(
            self.blocking(move || {
                tree.range(from..)
                    .take(limit)
                    .collect::<sled::Result<Vec<_>>>()
            })
            .await?,
        )
    }

    /// The outbox record `seq`, if present (one key, from sled's page cache).
    pub(crate) fn outbox_get(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .trees
            .outbox
            .get(seq.to_be_bytes())
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
    }

    /// Where the store lives.
    pub(crate) fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The seqs of the outbox records set aside as corrupt.
    pub(crate) async fn outbox_corrupt_seqs(&self) -> Result<Vec<u64>> {
        let tree = self.inner.trees.outbox_corrupt.clone();
        let keys = self
            .blocking(move || {
                tree.iter()
                    .keys()
                    .map(|k| k.map(|k| k.to_vec()))
                    .collect::<sled::Result<Vec<_>>>()
            })
            .await?;
        keys.iter().map(|k| decode_seq(k)).collect()
    }

    /// Writes raw bytes as the outbox record `seq` (tests: a corrupt record).
    #[cfg(test)]
    pub(crate) fn outbox_put_raw(&self, seq: u64, bytes: &[u8]) -> Result<()> {
        self.inner
            .trees
            .outbox
            .insert(seq.to_be_bytes(), bytes)
            .map_err(|e| self.err(e))?;
        self.inner.trees.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Runs `f` on the blocking pool, mapping its sled error.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> sled::Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| self.err(sled::Error::Io(std::io::Error::other(e.to_string()))))?
            .map_err(|e| self.err(e))
    }
}

/// The trees as one group's transaction sees them: the typed operations an operation of
/// [`Storage::commit`] may use.
pub(crate) struct Tx<'a> {
    next_seq: &'a AtomicU64,
    outbox_next: &'a AtomicU64,
    outbox: &'a TransactionalTree,
    outbox_corrupt: &'a TransactionalTree,
    handled: &'a TransactionalTree,
    by_time: &'a TransactionalTree,
    pending: &'a TransactionalTree,
    finishing: &'a TransactionalTree,
    index: &'a TransactionalTree,
    idempotency: &'a TransactionalTree,
}

impl Tx<'_> {
    /// Records `id` as handled at `at_ms`, unless it is recorded already. Returns whether it
    /// was new.
    pub(crate) fn record(&self, id: &str, at_ms: i64) -> TxResult<bool> {
        let id = id.as_bytes();
        if self.handled.get(id)?.is_some() {
            return Ok(false);
        }
        self.handled.insert(id, &at_ms.to_be_bytes())?;
        self.by_time.insert(time_key(at_ms, id), &[])?;
        Ok(true)
    }

    /// Appends `entry` (bytes) to the queue's pending entries for `message_id`; returns its
    /// seq (increasing).
    pub(crate) fn queue_push(&self, message_id: &str, entry: &[u8]) -> TxResult<u64> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let key = seq.to_be_bytes();
        self.pending.insert(&key, entry)?;
        self.index.insert(message_id.as_bytes(), &key)?;
        Ok(seq)
    }

    /// Removes the pending entry `seq` and returns its bytes, if it was pending.
    pub(crate) fn pending_remove(&self, seq: u64) -> TxResult<Option<Vec<u8>>> {
        Ok(self.pending.remove(&seq.to_be_bytes())?.map(|v| v.to_vec()))
    }

    /// Stores `entry` (bytes) as finishing under `seq`.
    pub(crate) fn finishing_put(&self, seq: u64, entry: &[u8]) -> TxResult<()> {
        self.finishing.insert(&seq.to_be_bytes(), entry)?;
        Ok(())
    }

    /// Removes the finishing entry `seq`.
    pub(crate) fn finishing_remove(&self, seq: u64) -> TxResult<()> {
        self.finishing.remove(&seq.to_be_bytes())?;
        Ok(())
    }

    /// Forgets which queue entry holds `message_id`.
    pub(crate) fn index_remove(&self, message_id: &str) -> TxResult<()> {
        self.index.remove(message_id.as_bytes())?;
        Ok(())
    }

    /// The idempotency record under `key`.
    pub(crate) fn idempotency_get(&self, key: &str) -> TxResult<Option<Vec<u8>>> {
        Ok(self.idempotency.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Stores the idempotency record under `key`.
    pub(crate) fn idempotency_put(&self, key: &str, record: &[u8]) -> TxResult<()> {
        self.idempotency.insert(key.as_bytes(), record)?;
        Ok(())
    }

    /// Appends `record` to the outbox; returns its seq (increasing in commit order).
    pub(crate) fn outbox_push(&self, record: &[u8]) -> TxResult<u64> {
        let seq = self.outbox_next.fetch_add(1, Ordering::Relaxed);
        self.outbox.insert(&seq.to_be_bytes(), record)?;
        Ok(seq)
    }

    /// Removes the outbox record `seq` (sent and acknowledged).
    pub(crate) fn outbox_remove(&self, seq: u64) -> TxResult<()> {
        self.outbox.remove(&seq.to_be_bytes())?;
        Ok(())
    }

    /// Moves the outbox record `seq` to the corrupt records, bytes unchanged.
    pub(crate) fn outbox_set_aside(&self, seq: u64) -> TxResult<()> {
        let key = seq.to_be_bytes();
        if let Some(bytes) = self.outbox.remove(&key)? {
            self.outbox_corrupt.insert(&key, bytes)?;
        }
        Ok(())
    }

    /// Fails the operation, and with it the group (for tests of a failed commit).
    #[cfg(test)]
    pub(crate) fn fail(&self, why: &str) -> TxResult<()> {
        Err(TxError(UnabortableTransactionError::Storage(
            sled::Error::Unsupported(why.to_owned()),
        )))
    }
}

/// One queued operation of a group, type-erased.
trait Pending: Send {
    /// Runs the operation inside the group's transaction (perhaps again, after a conflict),
    /// keeping its result.
    fn apply(&mut self, tx: &Tx<'_>) -> TxResult<()>;
    /// Answers the waiter: its kept result if the group was flushed, else the group's error.
    fn answer(self: Box<Self>, group: std::result::Result<(), &Error>);
}

struct Op<T, F> {
    op: F,
    result: Option<T>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Pending for Op<T, F>
where
    T: Send,
    F: FnMut(&Tx<'_>) -> TxResult<T> + Send,
{
    fn apply(&mut self, tx: &Tx<'_>) -> TxResult<()> {
        self.result = Some((self.op)(tx)?);
        Ok(())
    }

    fn answer(self: Box<Self>, group: std::result::Result<(), &Error>) {
        let outcome = match (group, self.result) {
            (Ok(()), Some(result)) => Ok(result),
            (Ok(()), None) => Err(Error::Protocol(
                "store operation committed without a result".into(),
            )),
            (Err(e), _) => Err(e.share()),
        };
        // A waiter that went away (its task cancelled) needs no answer.
        let _ = self.reply.send(outcome);
    }
}

/// The writer thread: until the channel closes, takes everything queued, applies it in one
/// transaction, flushes once, answers every waiter.
fn write_groups(
    trees: &Trees,
    path: &Path,
    queue: &mpsc::Receiver<Box<dyn Pending>>,
    flushes: &AtomicU64,
) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let outcome = commit_group(trees, path, &mut group)
            .and_then(|()| trees.db.flush().map(|_| ()).map_err(|e| store_err(path, e)));
        if outcome.is_ok() {
            flushes.fetch_add(1, Ordering::Relaxed);
        } else if let Err(e) = &outcome {
            tracing::warn!(operations = group.len(), cause = %e, "store commit failed; every waiter is told");
        }
        for op in group {
            op.answer(outcome.as_ref().map(|_| ()));
        }
    }
}

/// Applies a group's operations in one transaction over every tree.
fn commit_group(trees: &Trees, path: &Path, group: &mut [Box<dyn Pending>]) -> Result<()> {
    let group = RefCell::new(group);
    (
        &trees.handled,
        &trees.by_time,
        &trees.pending,
        &trees.finishing,
        &trees.index,
        &trees.idempotency,
        &trees.outbox,
        &trees.outbox_corrupt,
    )
        .transaction(
            |(handled, by_time, pending, finishing, index, idempotency, outbox, outbox_corrupt)| -> ConflictableTransactionResult<(), ()> {
                let tx = Tx {
                    next_seq: &trees.next_seq,
                    outbox_next: &trees.outbox_next,
                    outbox,
                    outbox_corrupt,
                    handled,
                    by_time,
                    pending,
                    finishing,
                    index,
                    idempotency,
                };
                for op in group.borrow_mut().iter_mut() {
                    op.apply(&tx)
                        .map_err(|TxError(e)| ConflictableTransactionError::<()>::from(e))?;
                }
                Ok(())
            },
        )
        .map_err(|e| match e {
            TransactionError::Storage(e) => store_err(path, e),
            TransactionError::Abort(()) => Error::Protocol("store transaction aborted".into()),
        })
}

impl Error {
    /// The same error for another waiter of a failed group.
    fn share(&self) -> Error {
        match self {
            Error::Store { path, source } => Error::Store {
                path: path.clone(),
                source: source.clone(),
            },
            other => Error::Protocol(other.to_string()),
        }
    }
}

pub(crate) fn store_err(path: &Path, source: sled::Error) -> Error {
    Error::Store {
        path: path.to_owned(),
        source: StoreError(Arc::new(source)),
    }
}

/// Up to `limit` entries of a seq-keyed tree, oldest first.
fn scan(tree: &sled::Tree, limit: usize) -> sled::Result<Vec<(sled::IVec, sled::IVec)>> {
    tree.iter().take(limit).collect()
}

/// Entries of a seq-keyed tree with their seqs decoded.
fn with_seqs(entries: Vec<(sled::IVec, sled::IVec)>) -> Result<Vec<(u64, Vec<u8>)>> {
    entries
        .into_iter()
        .map(|(k, v)| Ok((decode_seq(&k)?, v.to_vec())))
        .collect()
}

fn decode_seq(bytes: &[u8]) -> Result<u64> {
    let seq: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::Protocol("corrupt queue key".into()))?;
    Ok(u64::from_be_bytes(seq))
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
mod tests;
