//! A [`Store`] in memory, for unit tests: the second implementation that shows the trait is the
//! seam it claims to be. It keeps the same promises as the sled store within one process (a
//! commit is atomic: applied whole under one lock, or not at all), and is run through the same
//! contract tests (`store/contract.rs`). Nothing survives the process: never for a broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use super::{ChangeSet, Deadline, OutboxEntry, PruneStep, SeenVisitor, Store, StoreStats};
use crate::audit;
use crate::consent::Consent;
use crate::dead_letter::DeadLetter;
use crate::error::Result;
use crate::referral::{Millis, Referral};
use crate::view::{Counts, Summary};

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    referrals: BTreeMap<String, Referral>,
    /// Dedup key → (applied at, digest).
    seen: HashMap<String, (Millis, Vec<u8>)>,
    /// Applied ids in the order they were applied (the order a prune goes in).
    applied: BTreeMap<u64, (Millis, String)>,
    next_applied: u64,
    outbox: BTreeMap<u64, OutboxEntry>,
    next_outbox_key: u64,
    deadlines: std::collections::BTreeSet<Deadline>,
    dead_letters: BTreeMap<u64, DeadLetter>,
    consents: BTreeMap<String, Consent>,
    checkpoint: u64,
    state_seq: u64,
    audit: Vec<audit::Stored>,
    audit_head: Option<(u64, audit::Hash)>,
    counts: Option<Counts>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a whole commit or none (see `commit`).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn referral(&self, id: &str) -> Result<Option<Referral>> {
        Ok(self.state().referrals.get(id).cloned())
    }

    fn seen_digest(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.state().seen.get(key).map(|(_, d)| d.clone()))
    }

    fn commit(&self, c: &ChangeSet) -> Result<()> {
        if c.is_empty() {
            return Ok(());
        }
        // Checked first, then applied under one lock by steps that cannot fail: a commit is
        // whole or not at all.
        let head = match c.audit.last() {
            Some(last) => Some((
                last.seq,
                audit::Hash::try_from(last.hash.as_slice()).map_err(|_| {
                    crate::error::Error::CorruptRecord {
                        key: format!("audit {}", last.seq),
                        message: "hash not 32 bytes".into(),
                    }
                })?,
            )),
            None => None,
        };
        let mut guard = self.state();
        let s = &mut *guard;
        for r in &c.referrals {
            s.referrals.insert(r.id.clone(), r.clone());
        }
        for (k, at, digest) in &c.seen {
            s.seen.insert(k.clone(), (*at, digest.to_vec()));
            s.applied.insert(s.next_applied, (*at, k.clone()));
            s.next_applied += 1;
        }
        for e in &c.outbox_put {
            s.outbox.insert(e.key, e.clone());
        }
        for k in &c.outbox_remove {
            s.outbox.remove(k);
        }
        for d in &c.deadlines_remove {
            s.deadlines.remove(d);
        }
        for d in &c.deadlines_put {
            s.deadlines.insert(d.clone());
        }
        for d in c.dead_letters.iter().chain(&c.dead_letter_updates) {
            s.dead_letters.insert(d.stream_seq, d.clone());
        }
        for consent in &c.consents {
            s.consents.insert(consent.id.clone(), consent.clone());
        }
        if let Some(counts) = &c.counts {
            s.counts = Some(counts.clone());
        }
        // Entries at or below the head are there already (a change set applied again over a
        // snapshot read while it was being written).
        let above = s.audit_head.map_or(0, |(seq, _)| seq);
        for e in c.audit.iter().filter(|e| e.seq > above) {
            s.audit.push((e.seq, prost::Message::encode_to_vec(e)));
        }
        if head.is_some_and(|(seq, _)| seq > above) {
            s.audit_head = head;
        }
        if let Some(seq) = c.checkpoint {
            s.checkpoint = s.checkpoint.max(seq);
        }
        if let Some(seq) = c.state_seq {
            s.state_seq = s.state_seq.max(seq);
        }
        if let Some(last) = c.outbox_put.iter().map(|e| e.key).max() {
            s.next_outbox_key = s.next_outbox_key.max(last);
        }
        Ok(())
    }

    fn next_outbox_key(&self) -> Result<u64> {
        let mut s = self.state();
        s.next_outbox_key += 1;
        Ok(s.next_outbox_key)
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        Ok(self.state().outbox.values().cloned().collect())
    }

    fn due(&self, now: Millis, limit: usize) -> Result<Vec<Deadline>> {
        Ok(self
            .state()
            .deadlines
            .iter()
            .take_while(|d| d.at <= now)
            .take(limit)
            .cloned()
            .collect())
    }

    fn for_each_seen(&self, f: &mut SeenVisitor<'_>) -> Result<()> {
        let s = self.state();
        let mut keys: Vec<&String> = s.seen.keys().collect();
        keys.sort();
        for k in keys {
            let (at, digest) = &s.seen[k];
            f(k, *at, digest)?;
        }
        Ok(())
    }

    fn state_position(&self) -> Result<u64> {
        Ok(self.state().state_seq)
    }

    fn restart_state_position(&self) -> Result<()> {
        self.state().state_seq = 0;
        Ok(())
    }

    fn checkpoint(&self) -> Result<u64> {
        Ok(self.state().checkpoint)
    }

    fn prune_seen_step(&self, before: Millis, budget: usize) -> Result<PruneStep> {
        let mut guard = self.state();
        let s = &mut *guard;
        let (mut read, mut forgotten) = (0, 0);
        while read < budget.max(1) {
            let Some(entry) = s.applied.first_entry() else {
                return Ok(PruneStep {
                    forgotten,
                    done: true,
                });
            };
            if entry.get().0 >= before {
                return Ok(PruneStep {
                    forgotten,
                    done: true,
                });
            }
            let (_, key) = entry.remove();
            read += 1;
            // Unless it was applied again since (a younger record of it is further on).
            if s.seen.get(&key).is_some_and(|(at, _)| *at < before) {
                s.seen.remove(&key);
                forgotten += 1;
            }
        }
        Ok(PruneStep {
            forgotten,
            done: false,
        })
    }

    fn referrals(&self) -> Result<Vec<Referral>> {
        Ok(self.state().referrals.values().cloned().collect())
    }

    fn counts(&self) -> Result<Counts> {
        Ok(self.state().counts.clone().unwrap_or_default())
    }

    fn for_each_watched(&self, f: &mut dyn FnMut(Summary)) -> Result<()> {
        let watched: Vec<Summary> = self
            .state()
            .referrals
            .values()
            .map(Summary::of)
            .filter(Summary::watched)
            .collect();
        watched.into_iter().for_each(f);
        Ok(())
    }

    fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        Ok(self.state().dead_letters.values().cloned().collect())
    }

    fn dead_letter(&self, stream_seq: u64) -> Result<Option<DeadLetter>> {
        Ok(self.state().dead_letters.get(&stream_seq).cloned())
    }

    fn stats(&self) -> Result<StoreStats> {
        let s = self.state();
        Ok(StoreStats {
            referrals: s.referrals.len() as u64,
            outbox: s.outbox.len() as u64,
            deadlines: s.deadlines.len() as u64,
            dead_letters: s.dead_letters.len() as u64,
            seen: s.seen.len() as u64,
        })
    }

    fn consent(&self, id: &str) -> Result<Option<Consent>> {
        Ok(self.state().consents.get(id).cloned())
    }

    fn consents(&self) -> Result<Vec<Consent>> {
        Ok(self.state().consents.values().cloned().collect())
    }

    fn audit_head(&self) -> Result<(u64, audit::Hash)> {
        Ok(self.state().audit_head.unwrap_or((0, audit::GENESIS)))
    }

    fn audit_raw(&self) -> Result<Vec<audit::Stored>> {
        Ok(self.state().audit.clone())
    }
}
