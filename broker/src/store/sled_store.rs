//! [`Store`] on sled: one tree, records told apart by key prefix, so that a whole
//! [`ChangeSet`] is one atomic `apply_batch` followed by one `flush`.
//!
//! Keys:
//! ```text
//! r/<referral id>                       referral record
//! v/<referral id>                       its summary, while the view watches it (read at start)
//! h/<bucket u32 BE>                     applied inbound messages whose dedup key's keyed hash
//!                                       falls in the bucket: key, applied-at, digest each
//!                                       (`buckets.rs`)
//! m/bucket-key                          the secret of that hash (16 random bytes)
//! s/<dedup key>                         (stores written before h/: one key per applied id,
//! d/<segment BE>                         with its time index in segments, or older still
//! S/<applied-at BE><dedup key>           one key each; read and pruned away, never written)
//! o/<u64 BE>                            outbox entry
//! t/<at BE><kind><referral id>          deadline
//! x/<stream seq BE>                     dead letter
//! c/<consent id>                        consent record
//! A/<segment BE>                        audit entries (hash-chained), AUDIT_PER_SEGMENT a key
//! a/<u64 BE>                            (stores written before A/: one audit entry a key)
//! m/audit-head                          last audit sequence (u64 BE) + hash (32 bytes)
//! m/checkpoint                          highest applied inbound stream sequence (u64 BE)
//! m/state-seq                           state-log sequence of the last change set (u64 BE)
//! m/view-counts                         the view's counters over every referral (read at start)
//! ```
//! Audit entries are packed into segments (`segments.rs`) and applied ids into buckets
//! (`buckets.rs`): sled 0.34's memory follows the number of keys, and they were 7 of the 10
//! keys a received referral left.
//! sled's page cache is capped at [`CACHE_BYTES`]: the working set is the referrals in flight
//! and the recent log, not the millions that have ended (sled's default is 1 GB).
//! sled's `flush` writes and `sync_file_range`s but does not fsync (see NATS-NOTES.md): a
//! flushed commit survives a killed process, not a power cut. What a power cut loses is
//! rebuilt from the inbound stream, from the checkpoint on.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use super::buckets::{self, Applied};
use super::codec;
use super::segments::Segments;
use super::{
    ChangeSet, DeadLetter, Deadline, OutboxEntry, PruneStep, SeenVisitor, Store, StoreStats,
};
use crate::audit;
use crate::consent::Consent;
use crate::error::{Error, Result};
use crate::referral::{DeadlineKind, Millis, Referral};
use crate::view::{Counts, Summary};

const CHECKPOINT: &[u8] = b"m/checkpoint";
const STATE_SEQ: &[u8] = b"m/state-seq";
const AUDIT_HEAD: &[u8] = b"m/audit-head";
/// Marks a store (before view counts) whose every referral had a `v/` summary.
const SUMMARIES: &[u8] = b"m/summaries";
const COUNTS: &[u8] = b"m/view-counts";
/// A background step longer than this is logged with where its time went (issue 17's bound).
const SLOW_STEP: Duration = Duration::from_millis(50);
/// How often sled's own flusher writes what was committed without a flush (its default).
const BACKGROUND_FLUSH_MS: u64 = 500;
/// A prune step reads no more buckets once this long has passed (its first bucket always): a
/// step whose pages come from a busy disk, or whose thread is preempted on a shared machine,
/// stops early instead of reading its whole budget slowly. A 45 ms step was measured at a
/// million open referrals with none of that logged.
const STEP_READING: Duration = Duration::from_millis(15);
/// sled's page cache, bytes.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// Referrals migrated per batch when an older store is opened.
const MIGRATE_BATCH: usize = 10_000;
/// Audit entries (~250 bytes each) per `A/` key.
const AUDIT_PER_SEGMENT: usize = 32;
/// Applied-id records (~60 bytes each) per `d/` key, in stores written before buckets.
const APPLIED_PER_SEGMENT: usize = 64;

/// Bytes committed after which the database is reopened, so that sled writes its recovery
/// snapshot (see [`SledStore::snapshot_if_due`]).
const SNAPSHOT_AFTER_BYTES: u64 = 1 << 30;
/// How long a reopen waits for the closed database's last threads to let go of its lock.
const REOPEN_WAIT: Duration = Duration::from_secs(30);

pub struct SledStore {
    /// Behind a lock only so that [`SledStore::snapshot_if_due`] can close and reopen it;
    /// None only after a reopen failed (every call then fails).
    db: RwLock<Option<sled::Db>>,
    /// Where it lives (None: a temporary store, never reopened).
    dir: Option<PathBuf>,
    /// Bytes of records committed since the database was opened (keys not counted).
    written: AtomicU64,
    snapshot_after: u64,
    /// sled's background flusher is on (off only for tests: `open_without_background_flush`).
    background_flush: bool,
    audit: Segments,
    /// The time index of applied ids in a store written before buckets (drained, never added to).
    applied: Segments,
    /// The secret of the buckets' hash (`m/bucket-key`).
    secret: [u8; 16],
    /// Applied ids are still kept one key each (`s/`, a store written before buckets): looked up
    /// and pruned there too until none is left.
    legacy: AtomicBool,
    /// Where the prune's sweep of the buckets goes on (None: at the first bucket).
    sweep: Mutex<Option<Vec<u8>>>,
    /// No outbox key below this is handed out: one above the highest key ever committed here
    /// (also by change sets applied from another broker's state log).
    outbox_floor: AtomicU64,
}

/// The open database, read-locked.
struct Db<'a>(RwLockReadGuard<'a, Option<sled::Db>>);

impl Deref for Db<'_> {
    type Target = sled::Db;
    fn deref(&self) -> &sled::Db {
        match self.0.as_ref() {
            Some(db) => db,
            None => unreachable!("SledStore::db hands out only an open database"),
        }
    }
}

/// `open()` again while it fails because a just-closed database's last threads still hold its
/// file lock (sled releases it a moment after the drop), for at most `wait`. For callers with a
/// generic error (the tests' `reopen`): the lock is recognised by its message, the constant the
/// shared crate `yeongye-sled` recognises it by too; typed callers use
/// [`yeongye_sled::retry_while_locked`], which also checks the variant and the kind.
#[cfg(test)]
pub(super) fn retry_while_locked<T, E: std::fmt::Display>(
    wait: Duration,
    open: impl FnMut() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    yeongye_sled::retry_while(
        wait,
        |e: &E| e.to_string().contains(yeongye_sled::LOCK_MESSAGE),
        open,
    )
}

impl yeongye_sled::LockError for Error {
    fn is_lock_error(&self) -> bool {
        matches!(self, Error::Store(e) if yeongye_sled::is_lock_error(e))
    }
}

/// sled's own flusher writes what was committed without a flush (`commit_logged`, a prune
/// step) every half second; `background_flush` false turns it off (for tests).
fn open_db(dir: &Path, background_flush: bool) -> sled::Result<sled::Db> {
    yeongye_sled::open_serialized(dir, || {
        sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(background_flush.then_some(BACKGROUND_FLUSH_MS))
            .open()
    })
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<SledStore> {
        SledStore::on(open_db(dir, true)?, Some(dir.to_path_buf()))
    }

    /// [`SledStore::open`] with sled's background flusher off, so that nothing committed
    /// without a flush reaches the disk until the store closes or reopens: for tests of a
    /// broker killed before its store wrote its turns (they come back from the state log).
    pub fn open_without_background_flush(dir: &Path) -> Result<SledStore> {
        let mut store = SledStore::on(open_db(dir, false)?, Some(dir.to_path_buf()))?;
        store.background_flush = false;
        Ok(store)
    }

    /// Reopens for sled's snapshot once `bytes` of records were committed since the open
    /// (see [`SledStore::snapshot_if_due`]), instead of [`SNAPSHOT_AFTER_BYTES`]: for tests.
    pub fn reopen_after(mut self, bytes: u64) -> SledStore {
        self.snapshot_after = bytes.max(1);
        self
    }

    fn on(db: sled::Db, dir: Option<PathBuf>) -> Result<SledStore> {
        let outbox_floor = match db.scan_prefix(b"o/").keys().next_back() {
            Some(k) => u64_from("outbox", &k?[2..])?.saturating_add(1),
            None => 0,
        };
        let secret = match db.get(buckets::SECRET_KEY)? {
            Some(v) => <[u8; 16]>::try_from(v.as_ref()).map_err(|_| Error::CorruptRecord {
                key: "m/bucket-key".into(),
                message: "not 16 bytes".into(),
            })?,
            None => {
                let secret = buckets::new_secret()?;
                db.insert(buckets::SECRET_KEY, &secret)?;
                db.flush()?;
                secret
            }
        };
        let legacy = [&b"s/"[..], b"d/", b"S/"]
            .iter()
            .any(|p| db.scan_prefix(p).next().is_some());
        let store = SledStore {
            secret,
            legacy: AtomicBool::new(legacy),
            sweep: Mutex::new(None),
            outbox_floor: AtomicU64::new(outbox_floor),
            audit: Segments::open(&db, b"A/", AUDIT_PER_SEGMENT)?,
            applied: Segments::open(&db, b"d/", APPLIED_PER_SEGMENT)?,
            db: RwLock::new(Some(db)),
            dir,
            written: AtomicU64::new(0),
            snapshot_after: SNAPSHOT_AFTER_BYTES,
            background_flush: true,
        };
        store.add_missing_counts()?;
        Ok(store)
    }

    /// The open database, read-locked until the guard is dropped. Never take it again while
    /// holding it (nor call another method that does, nor the store from a visitor): a reopen
    /// waiting for the write lock queues every later reader behind it, so a second read lock
    /// on the same thread waits for a writer that waits for the first (a deadlock).
    fn db(&self) -> Result<Db<'_>> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(Error::StoreClosed);
        }
        Ok(Db(guard))
    }

    /// A store written before view counts gets them once: from its `v/` summaries (then kept
    /// only for watched referrals), or, older still, from its referrals.
    fn add_missing_counts(&self) -> Result<()> {
        let db = self.db()?;
        if db.contains_key(COUNTS)? {
            return Ok(());
        }
        let from_summaries = db.contains_key(SUMMARIES)?;
        let mut counts = Counts::default();
        let mut b = sled::Batch::default();
        let (mut in_batch, mut seen) = (0, 0usize);
        let prefix: &[u8] = if from_summaries { b"v/" } else { b"r/" };
        for kv in db.scan_prefix(prefix) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[2..]).into_owned();
            let summary = if from_summaries {
                codec::decode_summary(&id, &v)?
            } else {
                Summary::of(&codec::decode_referral(&id, &v)?)
            };
            counts.change(None, &summary);
            match (summary.watched(), from_summaries) {
                (false, true) => b.remove(k),
                (true, false) => {
                    b.insert(key(b"v/", id.as_bytes()), codec::encode_summary(&summary))
                }
                _ => {}
            }
            in_batch += 1;
            seen += 1;
            if in_batch == MIGRATE_BATCH {
                db.apply_batch(std::mem::take(&mut b))?;
                in_batch = 0;
            }
        }
        b.insert(COUNTS, codec::encode_counts(&counts));
        b.remove(SUMMARIES);
        db.apply_batch(b)?;
        db.flush()?;
        if seen > 0 {
            tracing::info!(
                referrals = seen,
                "counted every stored referral for the operators' view, once"
            );
        }
        Ok(())
    }

    /// A store in a temporary directory, removed on drop: for tests.
    /// One step of draining an older store's applied ids (`s/` keys, indexed by the `d/`
    /// segments or, older still, by `S/` keys) that are older than `before`: at most about
    /// `budget` of them. Returns how many it put removals for into `b`.
    fn prune_legacy_step(
        &self,
        db: &sled::Db,
        b: &mut sled::Batch,
        before: Millis,
        budget: usize,
    ) -> Result<usize> {
        let mut n = self.applied.drain_front(
            db,
            b,
            |r| time_from_be(r).is_some_and(|at| at < before),
            |b, r| b.remove(key(b"s/", r.get(8..).unwrap_or_default())),
            budget.div_ceil(APPLIED_PER_SEGMENT),
        )?;
        if n == 0 {
            let start = key(b"S/", &time_be(Millis::MIN));
            let end = key(b"S/", &time_be(before));
            for kv in db.range(start..end).take(budget) {
                let (k, _) = kv?;
                b.remove(key(b"s/", k.get(10..).unwrap_or_default()));
                b.remove(k);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deadlines at or before `now`, earliest first, at most `limit`, each to `f`. (A bulk
    /// read needs no [`touch`]: deadline keys are ~50 bytes and have no value, so the pages a
    /// scan of them keeps are small.)
    fn deadlines_until(
        &self,
        now: Millis,
        limit: usize,
        f: &mut dyn FnMut(Deadline) -> Result<()>,
    ) -> Result<()> {
        let start = key(b"t/", &time_be(Millis::MIN));
        let end = key(b"t/", &time_be(now.saturating_add(1)));
        let db = self.db()?;
        for kv in db.range(start..end).take(limit) {
            let (k, _) = kv?;
            let rest = &k[2..];
            let corrupt = || Error::CorruptRecord {
                key: String::from_utf8_lossy(&k).into_owned(),
                message: "bad deadline key".into(),
            };
            let at = time_from_be(rest).ok_or_else(corrupt)?;
            let kind = rest
                .get(8)
                .copied()
                .and_then(kind_from)
                .ok_or_else(corrupt)?;
            let id = std::str::from_utf8(&rest[9..]).map_err(|_| corrupt())?;
            f(Deadline {
                at,
                kind,
                referral_id: id.to_owned(),
            })?;
        }
        Ok(())
    }

    pub fn temporary() -> Result<SledStore> {
        SledStore::on(sled::Config::new().temporary(true).open()?, None)
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db()?.size_on_disk()?)
    }

    /// Every key's prefix (up to its first `/`) with the bytes of key and value, for sizing
    /// investigations (`yeongye-bench --probe-store`). Reads the whole store.
    pub fn key_census(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for kv in self.db()?.iter() {
            let (k, v) = kv?;
            let end = k.iter().position(|&b| b == b'/').map_or(k.len(), |i| i + 1);
            let prefix = String::from_utf8_lossy(&k[..end]).into_owned();
            out.push((prefix, (k.len() + v.len()) as u64));
        }
        Ok(out)
    }
}

/// Bytes of a value read in a bulk scan per extra look-up of its key ([`touch`]).
const TOUCH_BYTES: usize = 1024;

/// Looks `key` up again, once per [`TOUCH_BYTES`] of its `value_len`, in a bulk scan.
///
/// sled 0.34 tells its page cache that a page was used only once 64 uses of pages of the same
/// shard (one of 256) have piled up, and only then evicts; a scan uses each page once (its
/// iterator keeps the page it is on), so a scan of fewer than 64 × 256 pages evicts nothing
/// and keeps every page it read: a snapshot's read of a million-referral store kept its ~7,800
/// pages of audit segments (~100 KB each), +400 MB. Looked up again in proportion to its
/// bytes, a page is reported as used often enough that the cache keeps up, and what a scan
/// keeps stays near the cache's capacity whatever the store's size.
/// How many applied ids the buckets hold (reads every bucket).
fn count_bucketed(db: &sled::Db) -> Result<u64> {
    let mut n = 0;
    for kv in db.scan_prefix(buckets::PREFIX) {
        let (k, v) = kv?;
        n += buckets::decode(&k, &v)?.len() as u64;
    }
    Ok(n)
}

fn touch(db: &sled::Db, key: &[u8], value_len: usize) -> Result<()> {
    for _ in 0..value_len.div_ceil(TOUCH_BYTES) {
        db.get(key)?;
    }
    Ok(())
}

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest);
    k
}

/// Order-preserving big-endian encoding of an i64.
fn time_be(at: Millis) -> [u8; 8] {
    ((at as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from_be(b: &[u8]) -> Option<Millis> {
    let arr: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(arr) ^ (1 << 63)) as i64)
}

fn kind_byte(k: DeadlineKind) -> u8 {
    match k {
        DeadlineKind::Receipt => b'r',
        DeadlineKind::Acceptance => b'a',
    }
}

fn kind_from(b: u8) -> Option<DeadlineKind> {
    match b {
        b'r' => Some(DeadlineKind::Receipt),
        b'a' => Some(DeadlineKind::Acceptance),
        _ => None,
    }
}

fn deadline_key(d: &Deadline) -> Vec<u8> {
    let mut k = key(b"t/", &time_be(d.at));
    k.push(kind_byte(d.kind));
    k.extend_from_slice(d.referral_id.as_bytes());
    k
}

fn u64_from(key: &str, b: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = b.try_into().map_err(|_| Error::CorruptRecord {
        key: key.to_owned(),
        message: "not 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(arr))
}

impl SledStore {
    /// The change set in one atomic batch; flushed (written to the OS: it survives the
    /// process) when `flush`.
    fn write_change(&self, c: &ChangeSet, flush: bool) -> Result<()> {
        if c.is_empty() {
            return Ok(());
        }
        let mut b = sled::Batch::default();
        // Bytes of records written (keys and small records not counted), for snapshot_if_due.
        let mut written = 0usize;
        for r in &c.referrals {
            let record = codec::encode_referral(r);
            written += record.len();
            b.insert(key(b"r/", r.id.as_bytes()), record);
            let summary = Summary::of(r);
            let k = key(b"v/", r.id.as_bytes());
            if summary.watched() {
                b.insert(k, codec::encode_summary(&summary));
            } else {
                b.remove(k);
            }
        }
        // Each bucket an id falls into, read and rewritten once (the event loop is the only
        // writer of a store: nothing changes a bucket between this read and the batch).
        let mut touched: std::collections::BTreeMap<[u8; 6], Vec<Applied>> = Default::default();
        for (k, at, digest) in &c.seen {
            let bucket = buckets::bucket_key(&self.secret, k);
            let records = match touched.entry(bucket) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let now = match self.db()?.get(bucket)? {
                        Some(v) => buckets::decode(&bucket, &v)?,
                        None => Vec::new(),
                    };
                    e.insert(now)
                }
            };
            buckets::put(
                records,
                Applied {
                    key: k.clone(),
                    at: *at,
                    digest: digest.to_vec(),
                },
            );
        }
        for (bucket, records) in &touched {
            let value = buckets::encode(records)?;
            written += value.len();
            b.insert(&bucket[..], value);
        }
        for e in &c.outbox_put {
            let record = codec::encode_outbox(e);
            written += record.len();
            b.insert(key(b"o/", &e.key.to_be_bytes()), record);
        }
        for k in &c.outbox_remove {
            b.remove(key(b"o/", &k.to_be_bytes()));
        }
        for d in &c.deadlines_remove {
            b.remove(deadline_key(d));
        }
        for d in &c.deadlines_put {
            b.insert(deadline_key(d), &[]);
        }
        for d in c.dead_letters.iter().chain(&c.dead_letter_updates) {
            b.insert(
                key(b"x/", &d.stream_seq.to_be_bytes()),
                codec::encode_dead_letter(d),
            );
        }
        for consent in &c.consents {
            b.insert(
                key(b"c/", consent.id.as_bytes()),
                codec::encode_consent(consent),
            );
        }
        if let Some(counts) = &c.counts {
            b.insert(COUNTS, codec::encode_counts(counts));
        }
        // Entries at or below the head are there already (a change set applied again over a
        // snapshot read while it was being written).
        let above = if c.audit.is_empty() {
            0
        } else {
            self.audit_head()?.0
        };
        let new_audit: Vec<&audit::Entry> = c.audit.iter().filter(|e| e.seq > above).collect();
        let entries: Vec<Vec<u8>> = new_audit
            .iter()
            .map(|e| prost::Message::encode_to_vec(*e))
            .collect();
        let audit = self.audit.stage(&mut b, entries.iter().map(Vec::as_slice));
        if let Some(last) = new_audit.last() {
            let mut head = last.seq.to_be_bytes().to_vec();
            head.extend_from_slice(&last.hash);
            b.insert(AUDIT_HEAD, head);
        }
        if let Some(seq) = c.checkpoint {
            // Never move the checkpoint backwards (a redelivered old message in a batch).
            if seq > self.checkpoint()? {
                b.insert(CHECKPOINT, &seq.to_be_bytes());
            }
        }
        if let Some(seq) = c.state_seq
            && seq > self.state_position()?
        {
            b.insert(STATE_SEQ, &seq.to_be_bytes());
        }
        let last_outbox_key = c.outbox_put.iter().map(|e| e.key).max();
        written += entries.iter().map(Vec::len).sum::<usize>() + audit.rewritten();
        self.db()?.apply_batch(b)?;
        self.audit.install(audit);
        if flush {
            self.db()?.flush()?;
        }
        if let Some(k) = last_outbox_key {
            self.outbox_floor
                .fetch_max(k.saturating_add(1), Ordering::Relaxed);
        }
        self.written.fetch_add(
            u64::try_from(written).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(())
    }
}

impl Store for SledStore {
    fn referral(&self, id: &str) -> Result<Option<Referral>> {
        match self.db()?.get(key(b"r/", id.as_bytes()))? {
            Some(v) => Ok(Some(codec::decode_referral(id, &v)?)),
            None => Ok(None),
        }
    }

    fn seen_digest(&self, dedup_key: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db()?;
        let k = buckets::bucket_key(&self.secret, dedup_key);
        if let Some(v) = db.get(k)?
            && let Some(r) = buckets::decode(&k, &v)?
                .into_iter()
                .find(|r| r.key == dedup_key)
        {
            return Ok(Some(r.digest));
        }
        if !self.legacy.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // An older store's key: the applied-at time (8 bytes), then the digest.
        Ok(db
            .get(key(b"s/", dedup_key.as_bytes()))?
            .map(|v| v.get(8..).unwrap_or_default().to_vec()))
    }

    fn commit(&self, c: &ChangeSet) -> Result<()> {
        self.write_change(c, true)
    }

    fn commit_logged(&self, c: &ChangeSet) -> Result<()> {
        // Not flushed: the state log holds it; sled's own flusher writes it out within half a
        // second, and a store that lost it in a crash reads it back from the log.
        self.write_change(c, false)
    }

    fn next_outbox_key(&self) -> Result<u64> {
        // sled's generator knows only the keys this process drew: a change set applied from
        // the state log (another broker's) may have put higher ones.
        let drawn = self.db()?.generate_id()?;
        let floor = self.outbox_floor.load(Ordering::Relaxed);
        let key = drawn.max(floor);
        self.outbox_floor
            .fetch_max(key.saturating_add(1), Ordering::Relaxed);
        Ok(key)
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        let mut out = Vec::new();
        for kv in self.db()?.scan_prefix(b"o/") {
            let (k, v) = kv?;
            let n = u64_from("outbox", &k[2..])?;
            out.push(codec::decode_outbox(n, &v)?);
        }
        Ok(out)
    }

    fn due(&self, now: Millis, limit: usize) -> Result<Vec<Deadline>> {
        let mut out = Vec::new();
        self.deadlines_until(now, limit, &mut |d| {
            out.push(d);
            Ok(())
        })?;
        Ok(out)
    }

    fn for_each_deadline(&self, f: &mut dyn FnMut(Deadline) -> Result<()>) -> Result<()> {
        self.deadlines_until(Millis::MAX, usize::MAX, f)
    }

    fn for_each_consent(&self, f: &mut dyn FnMut(Consent) -> Result<()>) -> Result<()> {
        let db = self.db()?;
        for kv in db.scan_prefix(b"c/") {
            let (k, v) = kv?;
            touch(&db, &k, v.len())?;
            f(codec::decode_consent(
                &String::from_utf8_lossy(&k[2..]),
                &v,
            )?)?;
        }
        Ok(())
    }

    fn state_position(&self) -> Result<u64> {
        match self.db()?.get(STATE_SEQ)? {
            Some(v) => u64_from("m/state-seq", &v),
            None => Ok(0),
        }
    }

    fn restart_state_position(&self) -> Result<()> {
        let db = self.db()?;
        db.remove(STATE_SEQ)?;
        db.flush()?;
        Ok(())
    }

    fn checkpoint(&self) -> Result<u64> {
        match self.db()?.get(CHECKPOINT)? {
            Some(v) => u64_from("m/checkpoint", &v),
            None => Ok(0),
        }
    }

    fn prune_seen_step(&self, before: Millis, budget: usize) -> Result<PruneStep> {
        let budget = budget.max(1);
        let db = self.db()?;
        let mut b = sled::Batch::default();
        // An older store's one-key-per-id index first, until nothing older is left in it.
        if self.legacy.load(Ordering::Relaxed) {
            let n = self.prune_legacy_step(&db, &mut b, before, budget)?;
            if n > 0 {
                db.apply_batch(b)?;
                return Ok(PruneStep {
                    forgotten: n,
                    done: false,
                });
            }
            if db.scan_prefix(b"s/").next().is_none() {
                self.legacy.store(false, Ordering::Relaxed);
            }
        }
        // Then the next `budget` buckets of the sweep, each rewritten without its old ids.
        let mut sweep = self.sweep.lock().unwrap_or_else(|p| p.into_inner());
        let from = sweep.take().unwrap_or_else(|| buckets::PREFIX.to_vec());
        let mut end = buckets::PREFIX.to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let (mut read, mut forgotten, mut last) = (0, 0, None);
        let started = Instant::now();
        let mut out_of_time = false;
        for kv in db.range(from..end).take(budget) {
            if read > 0 && started.elapsed() > STEP_READING {
                out_of_time = true;
                break;
            }
            let (k, v) = kv?;
            read += 1;
            let mut records = match buckets::decode(&k, &v) {
                Ok(records) => records,
                Err(e) => {
                    // Left as it is (its ids still count as applied, so nothing is applied
                    // twice): one damaged bucket must not stop every later one being pruned.
                    tracing::warn!(cause = %e, "an applied-ids bucket that does not read: kept, skipped");
                    last = Some(k);
                    continue;
                }
            };
            let had = records.len();
            records.retain(|r| r.at >= before);
            if records.len() < had {
                forgotten += had - records.len();
                if records.is_empty() {
                    b.remove(k.as_ref());
                } else {
                    b.insert(k.as_ref(), buckets::encode(&records)?);
                }
            }
            last = Some(k);
        }
        let done = !out_of_time && read < budget;
        if !done && let Some(last) = last {
            let mut next = last.to_vec();
            next.push(0);
            *sweep = Some(next);
        }
        // Not flushed here: a prune promises nothing, so its writes go out with sled's own
        // flush (every half second) or the next commit's, and a crash before that only leaves
        // them to be forgotten again. A flush here held the loop for a disk's stall.
        let reading = started.elapsed();
        if forgotten > 0 {
            db.apply_batch(b)?;
        }
        let took = started.elapsed();
        if took > SLOW_STEP {
            // Which half stalled: reading (pages from disk) or writing (sled's log).
            tracing::warn!(
                took_ms = crate::clock::ms(took),
                reading_ms = crate::clock::ms(reading),
                writing_ms = crate::clock::ms(took.saturating_sub(reading)),
                buckets = read,
                forgotten,
                "a prune step was slow"
            );
        }
        Ok(PruneStep { forgotten, done })
    }

    fn contains_referral(&self, id: &str) -> Result<bool> {
        Ok(self.db()?.contains_key(key(b"r/", id.as_bytes()))?)
    }

    fn for_each_seen(&self, f: &mut SeenVisitor<'_>) -> Result<()> {
        let db = self.db()?;
        for kv in db.scan_prefix(buckets::PREFIX) {
            let (k, v) = kv?;
            touch(&db, &k, v.len())?;
            for r in buckets::decode(&k, &v)? {
                f(&r.key, r.at, &r.digest)?;
            }
        }
        if !self.legacy.load(Ordering::Relaxed) {
            return Ok(());
        }
        for kv in db.scan_prefix(b"s/") {
            let (k, v) = kv?;
            let dedup_key = String::from_utf8_lossy(&k[2..]);
            let at = time_from_be(&v).ok_or_else(|| Error::CorruptRecord {
                key: format!("s/{dedup_key}"),
                message: "no applied-at time".into(),
            })?;
            f(&dedup_key, at, v.get(8..).unwrap_or_default())?;
        }
        Ok(())
    }

    fn referrals(&self) -> Result<Vec<Referral>> {
        let mut out = Vec::new();
        self.for_each_referral(&mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    fn counts(&self) -> Result<Counts> {
        match self.db()?.get(COUNTS)? {
            Some(v) => codec::decode_counts(&v),
            None => Ok(Counts::default()),
        }
    }

    fn for_each_watched(&self, f: &mut dyn FnMut(Summary)) -> Result<()> {
        for kv in self.db()?.scan_prefix(b"v/") {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[2..]);
            f(codec::decode_summary(&id, &v)?);
        }
        Ok(())
    }

    fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        for kv in self.db()?.scan_prefix(b"x/") {
            let (k, v) = kv?;
            out.push(codec::decode_dead_letter(
                u64_from("dead-letter", &k[2..])?,
                &v,
            )?);
        }
        Ok(out)
    }

    fn dead_letter(&self, seq: u64) -> Result<Option<DeadLetter>> {
        match self.db()?.get(key(b"x/", &seq.to_be_bytes()))? {
            Some(v) => Ok(Some(codec::decode_dead_letter(seq, &v)?)),
            None => Ok(None),
        }
    }

    fn consent(&self, id: &str) -> Result<Option<Consent>> {
        match self.db()?.get(key(b"c/", id.as_bytes()))? {
            Some(v) => Ok(Some(codec::decode_consent(id, &v)?)),
            None => Ok(None),
        }
    }

    fn consents(&self) -> Result<Vec<Consent>> {
        let mut out = Vec::new();
        self.for_each_consent(&mut |c| {
            out.push(c);
            Ok(())
        })?;
        Ok(out)
    }

    /// sled 0.34 writes its recovery snapshot only when it opens a database, so a start
    /// replays every write since the last open: after a long run, minutes and a lot of memory.
    /// Once [`SNAPSHOT_AFTER_BYTES`] were committed, this closes the database and opens it
    /// again (readers wait; about as long as a broker restart takes, whatever was written:
    /// a standby calls it between records and a broker once stopped, never a leader's loop).
    fn snapshot_if_due(&self) -> Result<bool> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        if self.written.load(Ordering::Relaxed) < self.snapshot_after {
            return Ok(false);
        }
        let started = Instant::now();
        // sled replays its log on open: a bulk read (`yeongye-alloc`).
        let _bulk = yeongye_alloc::purge_at_once();
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        // Dropped (closed) at the end of this statement unless its flush failed.
        if let Some(db) = slot.take()
            && let Err(e) = db.flush()
        {
            *slot = Some(db);
            return Err(e.into());
        }
        let db =
            yeongye_sled::retry_while_locked(REOPEN_WAIT, || open_db(dir, self.background_flush))
                .inspect_err(|e| {
                tracing::error!(cause = %e, store = %dir.display(), "reopening the store failed");
            })?;
        *slot = Some(db);
        let written = self.written.swap(0, Ordering::Relaxed);
        tracing::info!(
            written_mb = written >> 20,
            took_ms = crate::clock::ms(started.elapsed()),
            "store reopened: sled wrote its recovery snapshot"
        );
        Ok(true)
    }

    fn audit_head(&self) -> Result<(u64, audit::Hash)> {
        match self.db()?.get(AUDIT_HEAD)? {
            None => Ok((0, audit::GENESIS)),
            Some(v) => {
                let corrupt = || Error::CorruptRecord {
                    key: "m/audit-head".into(),
                    message: "not 40 bytes".into(),
                };
                let seq = u64_from("m/audit-head", v.get(..8).ok_or_else(corrupt)?)?;
                let hash: audit::Hash = v
                    .get(8..40)
                    .and_then(|h| h.try_into().ok())
                    .ok_or_else(corrupt)?;
                Ok((seq, hash))
            }
        }
    }

    fn audit_raw(&self) -> Result<Vec<audit::Stored>> {
        let mut out = Vec::new();
        self.for_each_audit(&mut |seq, bytes| {
            out.push((seq, bytes));
            Ok(())
        })?;
        Ok(out)
    }

    fn for_each_audit(&self, f: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>) -> Result<()> {
        // A store written before segments keeps its first entries one to a key.
        let mut seq = 0;
        for kv in self.db()?.scan_prefix(b"a/") {
            let (k, v) = kv?;
            seq = u64_from("audit", &k[2..])?;
            f(seq, v.to_vec())?;
        }
        // Then the segments: an entry's place in them is its sequence number.
        let db = self.db()?;
        self.audit
            .for_each(&db, &mut |k, len| touch(&db, k, len), &mut |_, entries| {
                for bytes in entries {
                    seq += 1;
                    f(seq, bytes)?;
                }
                Ok(())
            })
    }

    fn for_each_referral(&self, f: &mut dyn FnMut(Referral) -> Result<()>) -> Result<()> {
        let db = self.db()?;
        for kv in db.scan_prefix(b"r/") {
            let (k, v) = kv?;
            touch(&db, &k, v.len())?;
            let id = String::from_utf8_lossy(&k[2..]).into_owned();
            f(codec::decode_referral(&id, &v)?)?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<StoreStats> {
        let db = self.db()?;
        let count = |p: &[u8]| db.scan_prefix(p).keys().count() as u64;
        Ok(StoreStats {
            referrals: count(b"r/"),
            outbox: count(b"o/"),
            deadlines: count(b"t/"),
            dead_letters: count(b"x/"),
            seen: count(b"s/") + count_bucketed(&db)?,
        })
    }
}

#[cfg(test)]
mod tests;
