//! Snapshots of a broker's store in the JetStream Object Store bucket `YEONGYE_SNAPSHOTS`, so
//! that the state log can be trimmed and a broker on an empty disk can start from the newest
//! snapshot plus the log after it.
//!
//! A snapshot is everything the store holds at one state-log position, as a series of change
//! sets (the state log's own encoding) that, committed in order to an empty store, rebuild it:
//! the object `state-<position, 20 digits>`. The leader takes one between two turns every
//! `snapshot_every_records` records (the read is consistent: the event loop is the only
//! writer), uploads it on a task of its own, keeps the newest [`KEEP`], and trims the log up to
//! the oldest kept one's position — never further.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_nats::jetstream::{self, object_store};
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::audit;
use crate::error::{Error, Result};
use crate::ops::Ops;
use crate::referral::Millis;
use crate::store::{ChangeSet, Store, decode_change_set, encode_change_set};

pub const SNAPSHOT_BUCKET: &str = "YEONGYE_SNAPSHOTS";
/// Snapshots kept: the log is trimmed up to the oldest of them.
pub const KEEP: usize = 2;
const MAGIC: &[u8] = b"yeongye-snapshot-v1\n";
/// Records of each kind per change set of a snapshot.
const PER_CHUNK: usize = 2000;

fn corrupt(message: impl Into<String>) -> Error {
    Error::CorruptRecord {
        key: "snapshot".into(),
        message: message.into(),
    }
}

/// Everything `store` holds, as a snapshot's bytes. The caller must be the store's only
/// writer for the time it takes (or the snapshot is not of one moment).
pub fn capture(store: &dyn Store) -> Result<Vec<u8>> {
    let mut out = MAGIC.to_vec();
    let mut push = |c: &ChangeSet| {
        let bytes = encode_change_set(c);
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(&bytes);
    };
    for chunk in store.referrals()?.chunks(PER_CHUNK) {
        push(&ChangeSet {
            referrals: chunk.to_vec(),
            ..Default::default()
        });
    }
    let mut seen: Vec<(String, Millis, [u8; 32])> = Vec::new();
    store.for_each_seen(&mut |k, at, digest| {
        // An id applied before digests were kept: restored with a zero digest.
        let d: [u8; 32] = digest.try_into().unwrap_or([0; 32]);
        seen.push((k.to_owned(), at, d));
    })?;
    for chunk in seen.chunks(PER_CHUNK) {
        push(&ChangeSet {
            seen: chunk.to_vec(),
            ..Default::default()
        });
    }
    let mut audit = Vec::new();
    for (seq, bytes) in store.audit_raw()? {
        let entry = <audit::Entry as prost::Message>::decode(bytes.as_slice())
            .map_err(|e| corrupt(format!("audit entry {seq}: {e}")))?;
        audit.push(entry);
    }
    for chunk in audit.chunks(PER_CHUNK) {
        push(&ChangeSet {
            audit: chunk.to_vec(),
            ..Default::default()
        });
    }
    push(&ChangeSet {
        outbox_put: store.outbox()?,
        deadlines_put: store.due(Millis::MAX, usize::MAX)?,
        dead_letters: store.dead_letters()?,
        consents: store.consents()?,
        checkpoint: Some(store.checkpoint()?),
        counts: Some(store.counts()?),
        ..Default::default()
    });
    Ok(out)
}

/// Commits a snapshot to `store` (which should be empty), the last change set at `position`.
pub fn restore(store: &dyn Store, bytes: &[u8], position: u64) -> Result<()> {
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| corrupt("not a yeongye v1 snapshot"))?;
    let mut changes = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| corrupt("truncated length"))?;
        let len = usize::try_from(u64::from_be_bytes(*len)).map_err(|_| corrupt("length"))?;
        if tail.len() < len {
            return Err(corrupt("truncated change set"));
        }
        changes.push(decode_change_set(&tail[..len])?);
        rest = &tail[len..];
    }
    let last = changes.len().saturating_sub(1);
    for (i, mut c) in changes.into_iter().enumerate() {
        if i == last {
            c.state_seq = Some(position);
        }
        store.commit(&c)?;
    }
    Ok(())
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

    pub async fn put(&self, position: u64, bytes: Vec<u8>) -> Result<()> {
        let mut reader = std::io::Cursor::new(bytes);
        self.os
            .put(object_name(position).as_str(), &mut reader)
            .await
            .map_err(|e| Error::Nats(format!("snapshot upload: {e}")))?;
        Ok(())
    }

    /// The newest snapshot: its position and bytes.
    pub async fn latest(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(&position) = self.positions().await?.last() else {
            return Ok(None);
        };
        let mut object = self
            .os
            .get(object_name(position))
            .await
            .map_err(|e| Error::Nats(format!("snapshot {position}: {e}")))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| Error::Nats(format!("snapshot {position}: {e}")))?;
        Ok(Some((position, bytes)))
    }

    /// Deletes all but the newest [`KEEP`]; returns the oldest kept position.
    async fn prune(&self) -> Result<Option<u64>> {
        let positions = self.positions().await?;
        let cut = positions.len().saturating_sub(KEEP);
        for p in &positions[..cut] {
            self.os
                .delete(object_name(*p))
                .await
                .map_err(|e| Error::Nats(format!("deleting snapshot {p}: {e}")))?;
        }
        Ok(positions.get(cut).copied())
    }
}

/// The leader's snapshot taker: between turns, when enough was appended since the last.
pub struct Snapshotter {
    js: jetstream::Context,
    snapshots: Snapshots,
    ops: Arc<Ops>,
    every: u64,
    last: AtomicU64,
    /// No snapshot is stored yet: take one at the first commit (a store from before the state
    /// log, or a new group, is then in the bucket at once).
    first: AtomicBool,
    busy: Arc<AtomicBool>,
}

impl Snapshotter {
    pub fn new(
        js: jetstream::Context,
        snapshots: Snapshots,
        ops: Arc<Ops>,
        every: u64,
        last: u64,
    ) -> Snapshotter {
        Snapshotter {
            js,
            snapshots,
            ops,
            every,
            last: AtomicU64::new(last),
            first: AtomicBool::new(last == 0),
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Called by the event loop after a commit at `position`: if due, reads the store (now, in
    /// this thread: a consistent read) and uploads it, prunes and trims on a task of its own.
    pub fn maybe(&self, store: &dyn Store, position: u64) -> Result<()> {
        let due = self.first.load(Ordering::Relaxed)
            || position >= self.last.load(Ordering::Relaxed) + self.every;
        if !due || self.busy.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let bytes = match capture(store) {
            Ok(b) => b,
            Err(e) => {
                self.busy.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        self.last.store(position, Ordering::Relaxed);
        self.first.store(false, Ordering::Relaxed);
        tracing::info!(
            position,
            bytes = bytes.len(),
            read_ms = started.elapsed().as_millis() as u64,
            "snapshot taken"
        );
        let (js, snapshots, ops, busy) = (
            self.js.clone(),
            self.snapshots.clone(),
            self.ops.clone(),
            self.busy.clone(),
        );
        tokio::spawn(async move {
            match upload_and_trim(&js, &snapshots, position, bytes).await {
                Ok(trimmed) => {
                    ops.set_cluster(|c| c.snapshot = position);
                    tracing::info!(position, trimmed_below = trimmed, "snapshot stored");
                }
                Err(e) => {
                    tracing::warn!(cause = %e, position, "snapshot not stored; the next one will be")
                }
            }
            busy.store(false, Ordering::SeqCst);
        });
        Ok(())
    }
}

async fn upload_and_trim(
    js: &jetstream::Context,
    snapshots: &Snapshots,
    position: u64,
    bytes: Vec<u8>,
) -> Result<u64> {
    snapshots.put(position, bytes).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, OutboxEntry, digest};

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
}
