//! Durable state behind a trait: referrals, applied message ids, the outbox, deadlines, dead
//! letters and the inbound checkpoint.
//!
//! [`Store::commit`] applies a whole [`ChangeSet`] atomically and returns only once it is
//! flushed: the event loop publishes and acknowledges nothing before that. `sled_store` is the
//! broker's implementation; `codec` is its on-disk encoding (private protobuf records, so domain
//! types stay free of serialization derives). `memory` is a second implementation for unit
//! tests, and `contract` the tests every implementation passes.

mod buckets;
mod change_codec;
mod codec;
#[cfg(test)]
mod contract;
mod memory;
mod segments;
mod sled_store;

/// A referral record for tests outside the store module.
#[cfg(test)]
pub(crate) fn contract_referral(id: &str) -> Referral {
    contract::referral(id, crate::referral::State::Received)
}

/// Opens a store directory in a test, waiting out the lock a just-dropped handle's threads
/// may still hold for a moment.
#[cfg(test)]
fn reopen<T, E: std::fmt::Display>(open: impl FnMut() -> std::result::Result<T, E>) -> T {
    sled_store::retry_while_locked(std::time::Duration::from_secs(10), open)
        .unwrap_or_else(|e| panic!("open store: {e}"))
}

pub use crate::dead_letter::{DeadLetter, DeadLetterStatus, OperatorAction};
pub use change_codec::{
    decode_change_set, decode_log_change, encode_change_set, encode_log_change,
};
pub use memory::MemoryStore;
pub use sled_store::SledStore;

use crate::audit;
use crate::consent::Consent;
use crate::error::Result;
use crate::referral::{DeadlineKind, Millis, Referral};
use crate::view::{Counts, Summary};

/// What one step of the event loop's prune reads at most (see [`Store::prune_seen_step`]): the
/// sled store's buckets of applied ids (~8 ids each in a million-referral store: ~4 sled
/// leaves, one batch of small rewrites, 1-5 ms), the memory store's ids. About one step in two
/// thousand still stalls 60-100 ms inside sled (a page from disk, its log's housekeeping),
/// at 256 buckets a step as at 64 (PERFORMANCE.md); 64 keeps the work a step can do small.
pub const PRUNE_STEP: usize = 64;

/// What one step of forgetting applied ids did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneStep {
    /// How many ids it forgot.
    pub forgotten: usize,
    /// Whether the prune is over (nothing older than its bound is left to look at); the next
    /// step starts a new one.
    pub done: bool,
}

/// A message the broker must publish: kept until its PubAck has been seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Orders the outbox: entries are published in key order.
    pub key: u64,
    pub subject: String,
    /// The envelope's message id and the `Nats-Msg-Id` header.
    pub message_id: String,
    /// The encoded envelope.
    pub payload: Vec<u8>,
    /// For a delivery: the referral whose `DELIVERED` follows the PubAck.
    pub confirms: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    pub at: Millis,
    pub kind: DeadlineKind,
    pub referral_id: String,
}

/// Everything one batch changes, written atomically.
#[derive(Debug, Default, Clone)]
pub struct ChangeSet {
    pub referrals: Vec<Referral>,
    /// Dedup keys of applied inbound messages, with the time they were applied.
    /// With the SHA-256 of the message's bytes, to tell a repeat from a reused id.
    pub seen: Vec<(String, Millis, [u8; 32])>,
    pub outbox_put: Vec<OutboxEntry>,
    pub outbox_remove: Vec<u64>,
    pub deadlines_put: Vec<Deadline>,
    pub deadlines_remove: Vec<Deadline>,
    /// New dead letters.
    pub dead_letters: Vec<DeadLetter>,
    /// Dead letters an operator acted on (replaced whole).
    pub dead_letter_updates: Vec<DeadLetter>,
    /// The highest inbound stream sequence applied by this batch.
    pub checkpoint: Option<u64>,
    /// Consents recorded or changed (replaced whole).
    pub consents: Vec<Consent>,
    /// Audit entries, already numbered and chained on the store's head.
    pub audit: Vec<audit::Entry>,
    /// The view's counters over every referral once this change set is applied (None: the
    /// referrals' counts did not change). Whoever writes `referrals` must say.
    pub counts: Option<Counts>,
    /// The state-log sequence this change set was appended at (`cluster`): the store's
    /// replication position once it is applied. Never moves backwards.
    pub state_seq: Option<u64>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.referrals.is_empty()
            && self.seen.is_empty()
            && self.outbox_put.is_empty()
            && self.outbox_remove.is_empty()
            && self.deadlines_put.is_empty()
            && self.deadlines_remove.is_empty()
            && self.dead_letters.is_empty()
            && self.dead_letter_updates.is_empty()
            && self.checkpoint.is_none()
            && self.consents.is_empty()
            && self.audit.is_empty()
            && self.counts.is_none()
            && self.state_seq.is_none()
    }
}

/// A SHA-256 over everything `store` holds that a change set can change — referrals, outbox,
/// deadlines, dead letters, consents, the audit log, the checkpoint, the view's counters, and
/// how many applied ids it keeps — in its logical form (the same records whatever the engine
/// or its on-disk layout): two brokers of a group that applied the same state log have the
/// same digest. Reads every record, one at a time: for operators and tests, not for the
/// event loop.
pub fn digest(store: &dyn Store) -> Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut part = |tag: &str, bytes: &[u8]| {
        h.update(tag.as_bytes());
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    store.for_each_referral(&mut |r| {
        part("r", &codec::encode_referral(&r));
        Ok(())
    })?;
    for e in store.outbox()? {
        part("o", &e.key.to_be_bytes());
        part("O", &codec::encode_outbox(&e));
    }
    store.for_each_deadline(&mut |d| {
        part(
            "t",
            format!("{}/{:?}/{}", d.at, d.kind, d.referral_id).as_bytes(),
        );
        Ok(())
    })?;
    for d in store.dead_letters()? {
        part("x", &codec::encode_dead_letter(&d));
    }
    store.for_each_consent(&mut |c| {
        part("c", &codec::encode_consent(&c));
        Ok(())
    })?;
    store.for_each_audit(&mut |seq, bytes| {
        part("a", &seq.to_be_bytes());
        part("A", &bytes);
        Ok(())
    })?;
    part("k", &store.checkpoint()?.to_be_bytes());
    part("m", &codec::encode_counts(&store.counts()?));
    part("s", &store.stats()?.seen.to_be_bytes());
    Ok(h.finalize().into())
}

/// What [`Store::for_each_seen`] calls with each applied id: its dedup key, when it was
/// applied, its digest.
pub type SeenVisitor<'a> = dyn FnMut(&str, Millis, &[u8]) -> Result<()> + 'a;

/// Counts for operators and readiness.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoreStats {
    pub referrals: u64,
    pub outbox: u64,
    pub deadlines: u64,
    pub dead_letters: u64,
    pub seen: u64,
}

pub trait Store: Send + Sync + 'static {
    fn referral(&self, id: &str) -> Result<Option<Referral>>;
    /// Whether a referral with this id is stored (without reading it).
    fn contains_referral(&self, id: &str) -> Result<bool> {
        Ok(self.referral(id)?.is_some())
    }
    /// Whether an inbound message with this dedup key was already applied.
    fn seen(&self, key: &str) -> Result<bool> {
        Ok(self.seen_digest(key)?.is_some())
    }
    /// The digest recorded when the inbound message with this dedup key was applied (empty if
    /// recorded without one), or None if it was never applied.
    fn seen_digest(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Applies all of `changes` atomically; on return they survive a crash of the process.
    fn commit(&self, changes: &ChangeSet) -> Result<()>;
    /// [`commit`](Self::commit) of a change the state log already holds (a leader's turn once
    /// its append landed, a record a follower applies): atomic, and read back at once, but not
    /// waited on to reach the disk. The log makes it durable: a store that loses it in a crash
    /// is at an earlier `state_position`, and its broker reads it back from the log before it
    /// follows or leads.
    fn commit_logged(&self, changes: &ChangeSet) -> Result<()> {
        self.commit(changes)
    }
    /// A fresh, monotonically increasing outbox key: above every key committed, also those a
    /// change set from another broker (through the state log) put.
    fn next_outbox_key(&self) -> Result<u64>;
    /// The outbox, in key order.
    fn outbox(&self) -> Result<Vec<OutboxEntry>>;
    /// Deadlines due at or before `now`, earliest first, at most `limit`.
    fn due(&self, now: Millis, limit: usize) -> Result<Vec<Deadline>>;
    /// The highest inbound stream sequence applied (0: none).
    fn checkpoint(&self) -> Result<u64>;
    /// The state-log sequence of the last change set applied (0: none): where this store's
    /// replication resumes (`cluster`).
    fn state_position(&self) -> Result<u64>;
    /// Puts the state-log position back to 0, the one way it moves backwards: for the group's
    /// first leader when the log is empty but this store was at a position of a log since
    /// deleted (`cluster::Member::take_over`); the store's other records stay.
    fn restart_state_position(&self) -> Result<()>;
    /// One bounded step of forgetting applied message ids older than `before`: it reads at
    /// most `budget` units of the store's index of them (the sled store's buckets, the memory
    /// store's ids) and forgets the old ids it finds there, in one write. Each step goes on
    /// where the last stopped, until one says `done`. The event loop calls it between turns,
    /// with the same `before` until done, so that neither the time it holds the loop nor the
    /// memory one write costs grows with how much is waiting. Not to be called while a
    /// commit is under way (the event loop does both, one after the other).
    fn prune_seen_step(&self, before: Millis, budget: usize) -> Result<PruneStep>;
    /// Forgets every applied message id older than `before`, [`PRUNE_STEP`] at a time;
    /// returns how many. For whoever owns the store outright (the bench's fill, tests).
    fn prune_seen(&self, before: Millis) -> Result<usize> {
        let mut total = 0;
        loop {
            let step = self.prune_seen_step(before, PRUNE_STEP)?;
            total += step.forgotten;
            if step.done {
                return Ok(total);
            }
        }
    }
    /// Every referral, in id order.
    fn referrals(&self) -> Result<Vec<Referral>>;
    /// Every referral, in id order, one at a time (memory: one referral).
    fn for_each_referral(&self, f: &mut dyn FnMut(Referral) -> Result<()>) -> Result<()> {
        for r in self.referrals()? {
            f(r)?;
        }
        Ok(())
    }
    /// [`Store::audit_raw`], one entry at a time.
    fn for_each_audit(&self, f: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>) -> Result<()> {
        for (seq, bytes) in self.audit_raw()? {
            f(seq, bytes)?;
        }
        Ok(())
    }
    /// Every applied inbound message's dedup key, with when it was applied and its digest
    /// (empty if recorded without one), in an order of the store's own (for a snapshot).
    fn for_each_seen(&self, f: &mut SeenVisitor<'_>) -> Result<()>;
    /// The view's counters over every referral, as last committed.
    fn counts(&self) -> Result<Counts> {
        let mut c = Counts::default();
        for r in self.referrals()? {
            c.change(None, &Summary::of(&r));
        }
        Ok(c)
    }
    /// The summary of every referral the view keeps by id ([`Summary::watched`]), in id
    /// order, one at a time: with [`Store::counts`], all that is read at start, so it must
    /// stay cheap with millions stored (the sled store keeps a small summary record of each
    /// watched referral rather than decoding referrals).
    fn for_each_watched(&self, f: &mut dyn FnMut(Summary)) -> Result<()> {
        self.referrals()?
            .iter()
            .map(Summary::of)
            .filter(Summary::watched)
            .for_each(f);
        Ok(())
    }
    /// [`Store::for_each_watched`], collected (for tests).
    fn watched(&self) -> Result<Vec<Summary>> {
        let mut out = Vec::new();
        self.for_each_watched(&mut |s| out.push(s))?;
        Ok(out)
    }
    fn dead_letters(&self) -> Result<Vec<DeadLetter>>;
    fn dead_letter(&self, stream_seq: u64) -> Result<Option<DeadLetter>>;
    fn stats(&self) -> Result<StoreStats>;
    fn consent(&self, id: &str) -> Result<Option<Consent>>;
    fn consents(&self) -> Result<Vec<Consent>>;
    /// Every consent, one at a time (memory: one consent).
    fn for_each_consent(&self, f: &mut dyn FnMut(Consent) -> Result<()>) -> Result<()> {
        for c in self.consents()? {
            f(c)?;
        }
        Ok(())
    }
    /// Every deadline, earliest first, one at a time (memory: one deadline).
    fn for_each_deadline(&self, f: &mut dyn FnMut(Deadline) -> Result<()>) -> Result<()> {
        for d in self.due(Millis::MAX, usize::MAX)? {
            f(d)?;
        }
        Ok(())
    }
    /// The audit log's last sequence number and hash ((0, GENESIS) when empty).
    fn audit_head(&self) -> Result<(u64, audit::Hash)>;
    /// Lets the storage engine write its recovery snapshot if enough was written since the
    /// last (so that a start replays little); the caller is the one writer, between commits.
    /// Returns whether it did. May stall for as long as opening the store takes.
    fn snapshot_if_due(&self) -> Result<bool> {
        Ok(false)
    }
    /// Every stored audit entry as `(key sequence, bytes)`, in order: what `audit::verify`
    /// reads. Undecoded on purpose, so that verification sees exactly what is stored.
    fn audit_raw(&self) -> Result<Vec<audit::Stored>>;
}
