//! Snapshots of a broker's store in the JetStream Object Store bucket `YEONGYE_SNAPSHOTS`, so
//! that the state log can be trimmed and a broker on an empty disk can start from the newest
//! snapshot plus the log after it.
//!
//! A snapshot is everything the store holds, as a series of change sets (the state log's own
//! encoding) that, committed in order to an empty store, rebuild it: the object
//! `state-<position, 20 digits>`. It is *fuzzy*: the leader notes its position P when one is
//! due and a thread reads the store while the event loop goes on writing, a chunk at a time
//! into a temporary file (memory: one chunk), then uploads the file. Restored and followed by
//! the log from P + 1, it is exact, because applying a change set again is harmless: records
//! are replaced whole, outbox entries and deadlines put and removed in log order, applied ids
//! inserted, audit entries appended only above the head, counters replaced, the checkpoint
//! only raised. The leader keeps the newest [`KEEP`] and trims the log up to the oldest kept
//! one's position — never further.
//!
//! Neither the temporary file nor the upload reaches the disk as one lump. Left to the kernel,
//! a few hundred MB written fast go out ~30 s later all at once, and while they do every write
//! on that disk waits: a 320 MB lump stalled sled's writes for ~200 ms, a 1 GB one for ~600 ms
//! (measured: a scratch program writing as the prune does, beside such a lump). So the file is
//! pushed to disk a window at a time as it is written, the leader's upload is paced
//! (`snapshot_upload_mib_per_sec`: nats-server's writes of it then go out a few seconds' worth
//! at a time), and the group's first snapshot — uploaded at full speed before its broker leads —
//! is followed by a sync of the store's filesystem, also before it leads.

use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

use async_nats::jetstream::{self, object_store};
use futures::StreamExt;

use crate::audit;
use crate::error::{Error, Result};
use crate::ops::Ops;
use crate::referral::Millis;
use crate::store::{ChangeSet, Store, decode_change_set, encode_change_set};

pub const SNAPSHOT_BUCKET: &str = "YEONGYE_SNAPSHOTS";
/// Snapshots kept: the log is trimmed up to the oldest of them (not before there are this many).
pub const KEEP: usize = 2;
const MAGIC: &[u8] = b"yeongye-snapshot-v1\n";
/// Records of each kind per change set of a snapshot.
const PER_CHUNK: usize = 2000;
/// The largest change set a snapshot may hold (a chunk of referrals with their envelopes).
const MAX_CHUNK_BYTES: usize = 1 << 30;
/// The temporary file goes to disk this much at a time as it is written.
const WINDOW: u64 = 8 << 20;

fn corrupt(message: impl Into<String>) -> Error {
    Error::CorruptRecord {
        key: "snapshot".into(),
        message: message.into(),
    }
}

/// Everything `store` holds, written to `out` a chunk at a time; returns the bytes written.
/// The store may be written meanwhile (see the module's note).
pub fn capture_to(store: &dyn Store, out: &mut dyn Write) -> Result<u64> {
    out.write_all(MAGIC)?;
    let mut written = MAGIC.len() as u64;
    let mut push = |c: &ChangeSet| -> Result<()> {
        let bytes = encode_change_set(c);
        out.write_all(&(bytes.len() as u64).to_be_bytes())?;
        out.write_all(&bytes)?;
        written += 8 + bytes.len() as u64;
        Ok(())
    };
    let mut referrals = Vec::with_capacity(PER_CHUNK);
    store.for_each_referral(&mut |r| {
        add(&mut referrals, r, &mut push, |referrals| ChangeSet {
            referrals,
            ..Default::default()
        })
    })?;
    let mut seen: Vec<(String, Millis, [u8; 32])> = Vec::with_capacity(PER_CHUNK);
    store.for_each_seen(&mut |k, at, digest| {
        // An id applied before digests were kept: restored with a zero digest.
        let d: [u8; 32] = digest.try_into().unwrap_or([0; 32]);
        add(&mut seen, (k.to_owned(), at, d), &mut push, |seen| {
            ChangeSet {
                seen,
                ..Default::default()
            }
        })
    })?;
    let mut audit = Vec::with_capacity(PER_CHUNK);
    store.for_each_audit(&mut |seq, bytes| {
        let entry = <audit::Entry as prost::Message>::decode(bytes.as_slice())
            .map_err(|e| corrupt(format!("audit entry {seq}: {e}")))?;
        add(&mut audit, entry, &mut push, |audit| ChangeSet {
            audit,
            ..Default::default()
        })
    })?;
    let mut deadlines = Vec::with_capacity(PER_CHUNK);
    store.for_each_deadline(&mut |d| {
        add(&mut deadlines, d, &mut push, |deadlines_put| ChangeSet {
            deadlines_put,
            ..Default::default()
        })
    })?;
    let mut consents = Vec::with_capacity(PER_CHUNK);
    store.for_each_consent(&mut |c| {
        add(&mut consents, c, &mut push, |consents| ChangeSet {
            consents,
            ..Default::default()
        })
    })?;
    push(&ChangeSet {
        referrals,
        seen,
        audit,
        deadlines_put: deadlines,
        consents,
        outbox_put: store.outbox()?,
        dead_letters: store.dead_letters()?,
        checkpoint: Some(store.checkpoint()?),
        counts: Some(store.counts()?),
        ..Default::default()
    })?;
    Ok(written)
}

/// Adds `item` to the chunk being filled; a full chunk goes out as the change set `wrap` makes
/// of it.
fn add<T>(
    pending: &mut Vec<T>,
    item: T,
    push: &mut dyn FnMut(&ChangeSet) -> Result<()>,
    wrap: fn(Vec<T>) -> ChangeSet,
) -> Result<()> {
    pending.push(item);
    if pending.len() == PER_CHUNK {
        push(&wrap(std::mem::take(pending)))?;
    }
    Ok(())
}

/// [`capture_to`] into memory (for tests and small stores).
pub fn capture(store: &dyn Store) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    capture_to(store, &mut out)?;
    Ok(out)
}

/// Commits a snapshot read from `input` to `store` (which should be empty), a chunk at a time,
/// and then its position.
pub fn restore_from(store: &dyn Store, input: &mut dyn Read, position: u64) -> Result<()> {
    let _bulk = yeongye_alloc::purge_at_once();
    let mut magic = vec![0; MAGIC.len()];
    input
        .read_exact(&mut magic)
        .map_err(|_| corrupt("not a yeongye v1 snapshot"))?;
    if magic != MAGIC {
        return Err(corrupt("not a yeongye v1 snapshot"));
    }
    loop {
        let mut len = [0u8; 8];
        match read_full(input, &mut len)? {
            0 => break,
            8 => {}
            _ => return Err(corrupt("truncated length")),
        }
        let len = usize::try_from(u64::from_be_bytes(len)).map_err(|_| corrupt("length"))?;
        if len > MAX_CHUNK_BYTES {
            return Err(corrupt(format!("a change set of {len} bytes")));
        }
        let mut bytes = vec![0; len];
        if read_full(input, &mut bytes)? != len {
            return Err(corrupt("truncated change set"));
        }
        store.commit(&decode_change_set(&bytes)?)?;
    }
    store.commit(&ChangeSet {
        state_seq: Some(position),
        ..Default::default()
    })
}

/// Reads until `buf` is full or the input ends; returns how much it read.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// [`restore_from`] of bytes in memory.
pub fn restore(store: &dyn Store, bytes: &[u8], position: u64) -> Result<()> {
    restore_from(store, &mut std::io::Cursor::new(bytes), position)
}

fn object_name(position: u64) -> String {
    format!("state-{position:020}")
}

fn position_of(name: &str) -> Option<u64> {
    name.strip_prefix("state-")?.parse().ok()
}

/// The bucket.
#[derive(Clone)]
pub struct Snapshots {
    os: object_store::ObjectStore,
}

impl Snapshots {
    /// Creates or updates the bucket.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Snapshots> {
        // The bucket's stream, made directly (as the object store client would, without its
        // own create's extra reads).
        let stream = format!("OBJ_{SNAPSHOT_BUCKET}");
        js.create_or_update_stream(jetstream::stream::Config {
            name: stream,
            subjects: vec![
                format!("$O.{SNAPSHOT_BUCKET}.C.>"),
                format!("$O.{SNAPSHOT_BUCKET}.M.>"),
            ],
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            discard: jetstream::stream::DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Nats(format!("bucket {SNAPSHOT_BUCKET}: {e}")))?;
        let os = js
            .get_object_store(SNAPSHOT_BUCKET)
            .await
            .map_err(|e| Error::Nats(format!("bucket {SNAPSHOT_BUCKET}: {e}")))?;
        Ok(Snapshots { os })
    }

    /// The positions of the snapshots stored, oldest first.
    pub async fn positions(&self) -> Result<Vec<u64>> {
        let mut list = self.os.list().await.map_err(Error::nats)?;
        let mut out = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(Error::nats)?;
            if !info.deleted
                && let Some(p) = position_of(&info.name)
            {
                out.push(p);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Uploads the snapshot in `file` (read from its start), at most `pace` bytes a second if
    /// given.
    async fn put(&self, position: u64, file: std::fs::File, pace: Option<u64>) -> Result<()> {
        let mut reader = Paced::new(tokio::fs::File::from_std(file), pace);
        self.os
            .put(object_name(position).as_str(), &mut reader)
            .await
            .map_err(|e| Error::Nats(format!("snapshot upload: {e}")))?;
        Ok(())
    }

    /// The newest snapshot's position, and the snapshot downloaded into a temporary file in
    /// `dir` (memory: the client's buffer).
    pub async fn latest(&self, dir: &std::path::Path) -> Result<Option<(u64, std::fs::File)>> {
        let Some(&position) = self.positions().await?.last() else {
            return Ok(None);
        };
        let mut object = self
            .os
            .get(object_name(position))
            .await
            .map_err(|e| Error::Nats(format!("snapshot {position}: {e}")))?;
        let file = tempfile::tempfile_in(dir)?;
        let mut copy = tokio::fs::File::from_std(file.try_clone()?);
        tokio::io::copy(&mut object, &mut copy)
            .await
            .map_err(|e| Error::Nats(format!("snapshot {position}: {e}")))?;
        tokio::io::AsyncWriteExt::flush(&mut copy).await?;
        let mut file = file;
        file.rewind()?;
        Ok(Some((position, file)))
    }

    /// Deletes every snapshot (those of a state log that no longer exists).
    pub async fn clear(&self) -> Result<()> {
        for p in self.positions().await? {
            self.os
                .delete(object_name(p))
                .await
                .map_err(|e| Error::Nats(format!("deleting snapshot {p}: {e}")))?;
        }
        Ok(())
    }

    /// Deletes all but the newest [`KEEP`]; returns the oldest kept position once [`KEEP`] are
    /// stored (with fewer, the log is not trimmed at all: a broker a little behind — one killed
    /// while it led, restarted — still finds the records after its position).
    async fn prune(&self) -> Result<Option<u64>> {
        let positions = self.positions().await?;
        if positions.len() < KEEP {
            return Ok(None);
        }
        let cut = positions.len() - KEEP;
        for p in &positions[..cut] {
            self.os
                .delete(object_name(*p))
                .await
                .map_err(|e| Error::Nats(format!("deleting snapshot {p}: {e}")))?;
        }
        Ok(positions.get(cut).copied())
    }
}

/// The leader's snapshot taker: when enough was appended since the last, a thread reads the
/// store into a temporary file while the event loop goes on, and a task uploads it, prunes and
/// trims.
pub struct Snapshotter {
    js: jetstream::Context,
    snapshots: Snapshots,
    ops: Arc<Ops>,
    store: Arc<dyn Store>,
    /// Where the temporary file goes (beside the store).
    dir: PathBuf,
    every: u64,
    /// The upload's pace, bytes a second.
    pace: u64,
    last: AtomicU64,
    /// No snapshot is stored yet: take one at the first commit (a store from before the state
    /// log, or a new group, is then in the bucket at once).
    first: AtomicBool,
    busy: Arc<AtomicBool>,
}

impl Snapshotter {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        js: jetstream::Context,
        snapshots: Snapshots,
        ops: Arc<Ops>,
        store: Arc<dyn Store>,
        dir: PathBuf,
        every: u64,
        pace: u64,
        last: Option<u64>,
    ) -> Snapshotter {
        Snapshotter {
            js,
            snapshots,
            ops,
            store,
            dir,
            every,
            pace,
            last: AtomicU64::new(last.unwrap_or(0)),
            first: AtomicBool::new(last.is_none()),
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Called by the event loop after its commit at `position`: if a snapshot is due and none
    /// is under way, starts one (at `position`: everything up to it is in the store now) and
    /// returns at once.
    pub fn maybe(&self, position: u64) {
        let due = self.first.load(Ordering::Relaxed)
            || position >= self.last.load(Ordering::Relaxed) + self.every;
        if !due || self.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        self.last.store(position, Ordering::Relaxed);
        self.first.store(false, Ordering::Relaxed);
        let pace = self.pace;
        let (js, snapshots, ops, busy, store, dir) = (
            self.js.clone(),
            self.snapshots.clone(),
            self.ops.clone(),
            self.busy.clone(),
            self.store.clone(),
            self.dir.clone(),
        );
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let read = read_to_file(store, dir).await;
            let done = match read {
                Ok((file, bytes)) => {
                    tracing::info!(
                        position,
                        bytes,
                        read_ms = started.elapsed().as_millis() as u64,
                        "snapshot read"
                    );
                    upload_and_trim(&js, &snapshots, position, file, pace).await
                }
                Err(e) => Err(e),
            };
            match done {
                Ok(trimmed) => {
                    ops.set_cluster(|c| c.snapshot = Some(position));
                    tracing::info!(position, trimmed_below = trimmed, "snapshot stored");
                }
                Err(e) => {
                    tracing::warn!(cause = %e, position, "snapshot not stored; the next one will be")
                }
            }
            busy.store(false, Ordering::SeqCst);
        });
    }
}

/// Reads `store` into a temporary file in `dir` on a blocking thread (the event loop goes on);
/// returns the file, rewound, and its size.
async fn read_to_file(store: Arc<dyn Store>, dir: PathBuf) -> Result<(std::fs::File, u64)> {
    tokio::task::spawn_blocking(move || -> Result<(std::fs::File, u64)> {
        // A read of the whole store: without this, the pages it frees stayed resident (+40-60
        // MB at a million referrals; `yeongye-alloc`).
        let _bulk = yeongye_alloc::purge_at_once();
        let mut file = tempfile::tempfile_in(&dir)?;
        let mut out = std::io::BufWriter::new(Streamed::new(&file));
        let bytes = capture_to(store.as_ref(), &mut out)?;
        out.flush()?;
        let synced = out.get_ref().synced;
        drop(out);
        tracing::debug!(
            bytes,
            synced_windows = synced,
            "snapshot written to its file"
        );
        file.rewind()?;
        Ok((file, bytes))
    })
    .await
    .map_err(|e| Error::Nats(format!("the snapshot reader failed: {e}")))?
}

/// The group's first snapshot, of a store that holds state from before the state log (a single
/// broker upgraded to a group): stored at position 0 by the first leader before it appends the
/// log's first record, so that no broker ever follows the log from an empty store while the
/// log's records assume that state. Returns the snapshot's size.
pub async fn store_before_the_log(
    snapshots: &Snapshots,
    store: Arc<dyn Store>,
    dir: PathBuf,
) -> Result<u64> {
    let (file, bytes) = read_to_file(store, dir.clone()).await?;
    snapshots.put(0, file, None).await?;
    settle_disk(dir).await;
    Ok(bytes)
}

/// Syncs the filesystem `dir` is on, so that what nats-server just wrote of the group's first
/// snapshot (when it shares the store's disk) goes out now, before this broker leads, rather than
/// in one lump ~30 s into its leading. Best effort: a failure is logged, nothing else.
async fn settle_disk(dir: PathBuf) {
    let started = std::time::Instant::now();
    let done = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        rustix::fs::syncfs(std::fs::File::open(&dir)?)?;
        #[cfg(not(target_os = "linux"))]
        let _ = dir;
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|synced| synced);
    match done {
        Ok(()) => tracing::info!(
            took_ms = crate::clock::ms(started.elapsed()),
            "the store's filesystem synced after the first snapshot"
        ),
        Err(e) => tracing::warn!(cause = %e, "syncing the store's filesystem failed"),
    }
}

async fn upload_and_trim(
    js: &jetstream::Context,
    snapshots: &Snapshots,
    position: u64,
    file: std::fs::File,
    pace: u64,
) -> Result<u64> {
    snapshots.put(position, file, Some(pace)).await?;
    let Some(oldest) = snapshots.prune().await? else {
        return Ok(0);
    };
    // Everything up to the oldest kept snapshot's position is in it (and in every newer one).
    let stream = js
        .get_stream(super::log::STATE_STREAM)
        .await
        .map_err(Error::nats)?;
    stream
        .purge()
        .sequence(oldest + 1)
        .await
        .map_err(|e| Error::Nats(format!("trimming the state log: {e}")))?;
    Ok(oldest + 1)
}

/// A file written through this goes to disk [`WINDOW`] at a time (its data synced each time a
/// window fills), instead of staying in memory for the kernel to write back later in one lump.
struct Streamed<'a> {
    file: &'a std::fs::File,
    unsynced: u64,
    /// Windows synced so far.
    synced: u64,
}

impl<'a> Streamed<'a> {
    fn new(file: &'a std::fs::File) -> Streamed<'a> {
        Streamed {
            file,
            unsynced: 0,
            synced: 0,
        }
    }
}

impl Write for Streamed<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = (&mut &*self.file).write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= WINDOW {
            self.file.sync_data()?;
            self.unsynced = 0;
            self.synced += 1;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&mut &*self.file).flush()
    }
}

/// Reads `inner` no faster than `rate` bytes a second on average (each read waits until the
/// bytes before it were due); unpaced without a rate.
struct Paced<R> {
    inner: R,
    rate: Option<u64>,
    started: Option<tokio::time::Instant>,
    read: u64,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<R> Paced<R> {
    fn new(inner: R, rate: Option<u64>) -> Paced<R> {
        Paced {
            inner,
            rate: rate.filter(|r| *r > 0),
            started: None,
            read: 0,
            wait: None,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Paced<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(rate) = this.rate {
            let started = *this.started.get_or_insert_with(tokio::time::Instant::now);
            let due = started + Duration::from_secs_f64(this.read as f64 / rate as f64);
            if due > tokio::time::Instant::now() {
                let wait = this
                    .wait
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                ready!(wait.as_mut().poll(cx));
            }
            this.wait = None;
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.read += (buf.filled().len() - before) as u64;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, OutboxEntry, SeenVisitor, digest};

    fn filled() -> MemoryStore {
        let s = MemoryStore::new();
        let referrals = (0..(PER_CHUNK + 3))
            .map(|i| {
                let mut r = crate::store::contract_referral(&format!("r{i:05}"));
                r.created_at = i as i64;
                r
            })
            .collect();
        s.commit(&ChangeSet {
            referrals,
            seen: vec![("a/m1".into(), 5, [7; 32]), ("a/m2".into(), 6, [8; 32])],
            outbox_put: vec![OutboxEntry {
                key: 9,
                subject: "yeongye.out.b.delivery".into(),
                message_id: "m9".into(),
                payload: vec![1, 2],
                confirms: None,
            }],
            checkpoint: Some(41),
            ..Default::default()
        })
        .expect("commit");
        s
    }

    #[test]
    fn a_snapshot_restored_to_an_empty_store_is_the_same_store_at_its_position() {
        let from = filled();
        let bytes = capture(&from).expect("capture");
        let to = MemoryStore::new();
        restore(&to, &bytes, 77).expect("restore");
        assert_eq!(digest(&to).unwrap(), digest(&from).unwrap());
        assert_eq!(to.state_position().unwrap(), 77);
        assert_eq!(to.checkpoint().unwrap(), 41);
        assert_eq!(to.seen_digest("a/m2").unwrap(), Some(vec![8; 32]));
        // Keys drawn after it stay above the restored outbox.
        assert!(to.next_outbox_key().unwrap() > 9);
    }

    /// A store whose reads commit the next of its pending change sets before each record they
    /// hand out: a snapshot read while the event loop writes, made deterministic.
    struct WrittenWhileRead {
        inner: crate::store::SledStore,
        pending: std::sync::Mutex<std::collections::VecDeque<ChangeSet>>,
    }

    impl WrittenWhileRead {
        fn step(&self) {
            let next = self.pending.lock().unwrap().pop_front();
            if let Some(c) = next {
                self.inner.commit(&c).unwrap();
            }
        }
    }

    impl Store for WrittenWhileRead {
        fn referral(&self, id: &str) -> Result<Option<crate::referral::Referral>> {
            self.inner.referral(id)
        }
        fn seen_digest(&self, key: &str) -> Result<Option<Vec<u8>>> {
            self.inner.seen_digest(key)
        }
        fn commit(&self, c: &ChangeSet) -> Result<()> {
            self.inner.commit(c)
        }
        fn next_outbox_key(&self) -> Result<u64> {
            self.inner.next_outbox_key()
        }
        fn outbox(&self) -> Result<Vec<OutboxEntry>> {
            self.step();
            self.inner.outbox()
        }
        fn due(&self, now: Millis, limit: usize) -> Result<Vec<crate::store::Deadline>> {
            self.step();
            self.inner.due(now, limit)
        }
        fn checkpoint(&self) -> Result<u64> {
            self.step();
            self.inner.checkpoint()
        }
        fn state_position(&self) -> Result<u64> {
            self.inner.state_position()
        }
        fn restart_state_position(&self) -> Result<()> {
            self.inner.restart_state_position()
        }
        fn prune_seen_step(
            &self,
            before: Millis,
            budget: usize,
        ) -> Result<crate::store::PruneStep> {
            self.inner.prune_seen_step(before, budget)
        }
        fn referrals(&self) -> Result<Vec<crate::referral::Referral>> {
            self.inner.referrals()
        }
        fn for_each_referral(
            &self,
            f: &mut dyn FnMut(crate::referral::Referral) -> Result<()>,
        ) -> Result<()> {
            self.inner.for_each_referral(&mut |r| {
                self.step();
                f(r)
            })
        }
        fn for_each_audit(&self, f: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>) -> Result<()> {
            self.inner.for_each_audit(&mut |n, b| {
                self.step();
                f(n, b)
            })
        }
        fn for_each_seen(&self, f: &mut SeenVisitor<'_>) -> Result<()> {
            self.inner.for_each_seen(&mut |k, at, d| {
                self.step();
                f(k, at, d)
            })
        }
        fn counts(&self) -> Result<crate::view::Counts> {
            self.step();
            self.inner.counts()
        }
        fn dead_letters(&self) -> Result<Vec<crate::store::DeadLetter>> {
            self.step();
            self.inner.dead_letters()
        }
        fn dead_letter(&self, seq: u64) -> Result<Option<crate::store::DeadLetter>> {
            self.inner.dead_letter(seq)
        }
        fn stats(&self) -> Result<crate::store::StoreStats> {
            self.inner.stats()
        }
        fn consent(&self, id: &str) -> Result<Option<crate::consent::Consent>> {
            self.inner.consent(id)
        }
        fn consents(&self) -> Result<Vec<crate::consent::Consent>> {
            self.step();
            self.inner.consents()
        }
        fn audit_head(&self) -> Result<(u64, audit::Hash)> {
            self.inner.audit_head()
        }
        fn audit_raw(&self) -> Result<Vec<audit::Stored>> {
            self.inner.audit_raw()
        }
    }

    /// The `n`th of a run of change sets a busy leader commits: referrals replaced, outbox
    /// entries put and later removed, deadlines, applied ids, one chained audit entry each.
    fn nth_change(n: u64) -> ChangeSet {
        let id = format!("r{:03}", n % 7);
        let mut r = crate::store::contract_referral(&id);
        r.created_at = n as i64;
        let entry = audit::Entry {
            seq: n,
            at: n as i64,
            event: "referral.state".into(),
            referral_id: id.clone(),
            prev_hash: vec![(n - 1) as u8; 32],
            hash: vec![n as u8; 32],
            ..Default::default()
        };
        ChangeSet {
            referrals: vec![r],
            seen: vec![(format!("a/m{n}"), n as i64, [n as u8; 32])],
            outbox_put: vec![OutboxEntry {
                key: n,
                subject: "yeongye.out.b.delivery".into(),
                message_id: format!("m{n}"),
                payload: vec![n as u8],
                confirms: None,
            }],
            outbox_remove: if n > 2 { vec![n - 2] } else { vec![] },
            deadlines_put: vec![crate::store::Deadline {
                at: n as i64,
                kind: crate::referral::DeadlineKind::Receipt,
                referral_id: id,
            }],
            checkpoint: Some(n),
            audit: vec![entry],
            state_seq: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_read_while_the_store_is_written_plus_the_log_after_its_position_is_exact() {
        // Up to position 20 committed; 21..=60 committed while the snapshot is being read.
        let store = WrittenWhileRead {
            inner: crate::store::SledStore::temporary().unwrap(),
            pending: std::sync::Mutex::new((21..=60).map(nth_change).collect()),
        };
        for n in 1..=20 {
            store.commit(&nth_change(n)).unwrap();
        }
        let position = store.state_position().unwrap();
        assert_eq!(position, 20);
        let bytes = capture(&store).unwrap();
        // Whatever the reads did not reach is committed now: the leader's final state.
        while !store.pending.lock().unwrap().is_empty() {
            store.step();
        }
        // A new broker: the snapshot, then the log from its position on.
        let restored = MemoryStore::new();
        restore(&restored, &bytes, position).unwrap();
        assert_eq!(restored.state_position().unwrap(), 20);
        for n in 21..=60 {
            restored.commit(&nth_change(n)).unwrap();
        }
        assert_eq!(digest(&restored).unwrap(), digest(&store).unwrap());
        assert_eq!(restored.audit_head().unwrap().0, 60);
        assert_eq!(restored.state_position().unwrap(), 60);
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_says_why() {
        let bytes = capture(&filled()).expect("capture");
        for (damaged, why) in [
            (b"not a snapshot".to_vec(), "not a yeongye v1 snapshot"),
            (bytes[..bytes.len() - 3].to_vec(), "truncated"),
            ([MAGIC, &[0, 0, 0]].concat(), "truncated length"),
            (
                [MAGIC, &5u64.to_be_bytes(), &[0xff; 5]].concat(),
                "state log change set",
            ),
        ] {
            let to = MemoryStore::new();
            let err = restore(&to, &damaged, 3).expect_err("refused").to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn snapshot_names_carry_their_position_and_nothing_else_parses() {
        assert_eq!(position_of(&object_name(42)), Some(42));
        for name in ["state-", "state-x", "other-42", "state--1", ""] {
            assert_eq!(position_of(name), None, "{name}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_upload_takes_its_size_over_its_rate_and_reads_every_byte() {
        use tokio::io::AsyncReadExt;
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        for (rate, least, most) in [
            (Some(1u64 << 20), 3.8, 4.2),
            (Some(4 << 20), 0.9, 1.1),
            (None, 0.0, 0.0),
        ] {
            let started = tokio::time::Instant::now();
            let mut paced = Paced::new(&data[..], rate);
            let mut out = Vec::new();
            let mut chunk = vec![0u8; 128 << 10];
            loop {
                let n = paced.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
            let took = started.elapsed().as_secs_f64();
            assert!(
                (least..=most).contains(&took),
                "{rate:?}: 4 MiB took {took} s (virtual)"
            );
            assert!(out == data, "{rate:?}: bytes differ");
        }
    }

    #[test]
    fn a_streamed_file_is_synced_a_window_at_a_time_and_holds_every_byte() {
        let file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(WINDOW * 5 / 2) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut out = std::io::BufWriter::new(Streamed::new(&file));
        // In pieces, as a snapshot is written (a change set at a time).
        for piece in data.chunks(64 << 10) {
            out.write_all(piece).unwrap();
        }
        out.flush().unwrap();
        assert_eq!(out.get_ref().synced, 2);
        drop(out);
        let mut back = Vec::new();
        let mut file = file;
        file.rewind().unwrap();
        file.read_to_end(&mut back).unwrap();
        assert!(back == data);
    }
}
