//! The event loop's bookkeeping of its outbox, as a pure struct: which committed entries wait
//! to be published, which are out in a flight awaiting their PubAck, which were acknowledged
//! by the stream (to remove from the store at the next commit), and which deliveries to
//! record as `DELIVERED`. No I/O: the loop does the publishing and the committing, and tells
//! this what came of it.
//!
//! The crash-correctness argument rests on these invariants (unit-tested below, and by a
//! randomized run of every operation in any order):
//! - an outbox key is in at most one place: waiting, in a flight, or acknowledged;
//! - the waiting entries are in key order (so a recipient sees one sender's messages in the
//!   order they were committed, repeats after a failure included);
//! - nothing leaves the bookkeeping until a commit removed it from the store
//!   ([`Pending::committed`]): a failed publish goes back to waiting, and the keys of a
//!   flight whose task was lost are handed back to be read again from the store — never
//!   dropped, so nothing stays "in flight" for ever;
//! - the store's outbox always holds every entry waiting or in a flight (they leave it only
//!   once acknowledged), so whatever this forgets in a crash is published again at start.

use std::collections::{HashMap, VecDeque};

use crate::referral::Millis;
use crate::store::OutboxEntry;

/// Names one turn's publishes while their PubAcks are awaited.
pub(super) type FlightId = u64;

#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Outbox entries not yet published, in key order.
    waiting: VecDeque<OutboxEntry>,
    /// Keys of outbox entries published and awaiting their PubAck, with their flight.
    in_flight: HashMap<u64, FlightId>,
    next_flight: FlightId,
    /// Outbox keys whose PubAck was seen: removed by the next commit.
    sent: Vec<u64>,
    /// Deliveries the stream acknowledged: `DELIVERED` in the next batch.
    confirmed: Vec<(String, Millis)>,
}

/// What to do with a landed flight's inbound messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Landing {
    /// Every publish was acknowledged: acknowledge the turn's inbound messages.
    Acknowledge,
    /// Something failed (it waits again): leave the inbound unacknowledged, to be redelivered
    /// and recognised as applied, and back off.
    Retry,
}

impl Pending {
    /// The bookkeeping at start: the store's outbox (in key order), all waiting.
    pub(super) fn new(outbox: Vec<OutboxEntry>) -> Pending {
        let mut waiting: Vec<OutboxEntry> = outbox;
        waiting.sort_by_key(|e| e.key);
        Pending {
            waiting: waiting.into(),
            ..Pending::default()
        }
    }

    /// Outbox entries not yet acknowledged by the stream: waiting, or in a flight.
    pub(super) fn depth(&self) -> u64 {
        (self.waiting.len() + self.in_flight.len()) as u64
    }

    /// Entries waiting to be published.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing acknowledged waits for a commit (so the loop may sleep a whole tick).
    pub(super) fn idle(&self) -> bool {
        self.sent.is_empty() && self.confirmed.is_empty()
    }

    /// Outbox keys acknowledged by the stream: the next commit removes them.
    pub(super) fn sent(&self) -> &[u64] {
        &self.sent
    }

    /// Every key published so far and still in the store's outbox (acknowledged or in a
    /// flight): a consent revocation must not cancel these, they are out.
    pub(super) fn published(&self) -> impl Iterator<Item = u64> + '_ {
        self.sent.iter().chain(self.in_flight.keys()).copied()
    }

    /// Deliveries acknowledged by the stream, to record as `DELIVERED`.
    pub(super) fn confirmed(&self) -> &[(String, Millis)] {
        &self.confirmed
    }

    /// Takes every waiting entry, in key order, as a new flight (None: nothing waits).
    pub(super) fn start_flight(&mut self) -> Option<(FlightId, Vec<OutboxEntry>)> {
        if self.waiting.is_empty() {
            return None;
        }
        let id = self.next_flight;
        self.next_flight += 1;
        let entries: Vec<OutboxEntry> = self.waiting.drain(..).collect();
        for e in &entries {
            self.in_flight.insert(e.key, id);
        }
        Some((id, entries))
    }

    /// Takes every waiting entry, in key order, to publish outside a flight (at start, for an
    /// operator's action): what comes of each is told by [`Self::acked`] or [`Self::failed`].
    pub(super) fn take_waiting(&mut self) -> Vec<OutboxEntry> {
        self.waiting.drain(..).collect()
    }

    /// The stream acknowledged `entry` at `at`.
    pub(super) fn acked(&mut self, entry: &OutboxEntry, at: Millis) {
        self.in_flight.remove(&entry.key);
        self.sent.push(entry.key);
        if let Some(id) = &entry.confirms {
            self.confirmed.push((id.clone(), at));
        }
    }

    /// These entries were not acknowledged: they wait again, in key order among the others,
    /// to be sent with the same message ids.
    pub(super) fn failed(&mut self, entries: Vec<OutboxEntry>) {
        if entries.is_empty() {
            return;
        }
        for e in &entries {
            self.in_flight.remove(&e.key);
        }
        let mut back = entries;
        back.extend(self.waiting.drain(..));
        back.sort_by_key(|e| e.key);
        back.dedup_by_key(|e| e.key);
        self.waiting = back.into();
    }

    /// Takes in a landed flight: what was acknowledged, and what failed.
    pub(super) fn landed(
        &mut self,
        acked: &[(OutboxEntry, Millis)],
        failed: Vec<OutboxEntry>,
    ) -> Landing {
        for (e, at) in acked {
            self.acked(e, *at);
        }
        if failed.is_empty() {
            Landing::Acknowledge
        } else {
            self.failed(failed);
            Landing::Retry
        }
    }

    /// A flight's task was lost (it never said what came of its publishes): the keys it still
    /// held, no longer in flight. The loop reads them again from the store and hands them to
    /// [`Self::failed`], so they are sent again with the same ids.
    pub(super) fn lost(&mut self, flight: FlightId) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| **f == flight)
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.in_flight.remove(k);
        }
        keys.sort_unstable();
        keys
    }

    /// A commit succeeded: what was acknowledged is gone from the store, entries it removed
    /// (deliveries a revocation cancelled) must not go out after all, and its new entries
    /// wait (their keys are above every key before them).
    pub(super) fn committed(&mut self, removed: &[u64], put: Vec<OutboxEntry>) {
        self.sent.clear();
        self.confirmed.clear();
        if !removed.is_empty() {
            let removed: std::collections::HashSet<u64> = removed.iter().copied().collect();
            self.waiting.retain(|e| !removed.contains(&e.key));
        }
        let ordered = self
            .waiting
            .back()
            .zip(put.first())
            .is_none_or(|(last, first)| last.key < first.key);
        self.waiting.extend(put);
        if !ordered {
            // Not expected (outbox keys only grow), but order is what recipients rely on.
            self.waiting.make_contiguous().sort_by_key(|e| e.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn entry(key: u64) -> OutboxEntry {
        OutboxEntry {
            key,
            subject: format!("yeongye.out.b.delivery.{key}"),
            message_id: format!("m{key}"),
            payload: vec![key as u8],
            confirms: key.is_multiple_of(2).then(|| format!("r{key}")),
        }
    }

    fn keys(v: &[OutboxEntry]) -> Vec<u64> {
        v.iter().map(|e| e.key).collect()
    }

    fn waiting_keys(p: &Pending) -> Vec<u64> {
        p.waiting.iter().map(|e| e.key).collect()
    }

    /// The invariants of the module's doc, checked on any state.
    fn check(p: &Pending) {
        let waiting = waiting_keys(p);
        assert!(
            waiting.windows(2).all(|w| w[0] < w[1]),
            "waiting in key order: {waiting:?}"
        );
        let mut seen = BTreeSet::new();
        for k in waiting
            .iter()
            .chain(p.in_flight.keys())
            .chain(p.sent.iter())
        {
            assert!(seen.insert(*k), "key {k} in two places: {p:?}");
        }
        assert_eq!(p.depth(), (p.waiting.len() + p.in_flight.len()) as u64);
    }

    #[test]
    fn the_outbox_at_start_waits_in_key_order() {
        let p = Pending::new(vec![entry(3), entry(1), entry(2)]);
        assert_eq!(waiting_keys(&p), vec![1, 2, 3]);
        assert_eq!(p.depth(), 3);
        assert!(p.idle());
        check(&p);
    }

    #[test]
    fn a_flight_takes_everything_waiting_and_an_ack_makes_it_sent_until_the_commit() {
        let mut p = Pending::new(vec![entry(1), entry(2)]);
        let (id, out) = p.start_flight().expect("a flight");
        assert_eq!(keys(&out), vec![1, 2]);
        assert_eq!(p.waiting(), 0);
        assert_eq!(p.depth(), 2, "in flight still counts");
        assert!(p.start_flight().is_none(), "nothing left to fly");
        let landing = p.landed(&[(entry(1), 10), (entry(2), 11)], Vec::new());
        assert_eq!(landing, Landing::Acknowledge);
        assert_eq!(p.depth(), 0);
        assert_eq!(p.sent(), &[1, 2]);
        assert_eq!(p.confirmed(), &[("r2".to_owned(), 11)]);
        assert!(!p.idle());
        assert!(p.lost(id).is_empty(), "nothing of a landed flight is lost");
        p.committed(&[1, 2], vec![entry(3)]);
        assert!(p.idle(), "a commit clears what it removed and recorded");
        assert_eq!(waiting_keys(&p), vec![3]);
        check(&p);
    }

    #[test]
    fn failed_entries_wait_again_in_key_order_before_newer_ones() {
        let mut p = Pending::new(vec![entry(1), entry(2), entry(3)]);
        let (_, out) = p.start_flight().expect("a flight");
        p.committed(&[], vec![entry(4), entry(5)]);
        let landing = p.landed(&[(out[1].clone(), 7)], vec![out[2].clone(), out[0].clone()]);
        assert_eq!(
            landing,
            Landing::Retry,
            "the turn's inbound stays unacknowledged"
        );
        assert_eq!(waiting_keys(&p), vec![1, 3, 4, 5]);
        assert_eq!(p.sent(), &[2]);
        assert_eq!(p.depth(), 4);
        check(&p);
    }

    #[test]
    fn a_lost_flight_hands_back_only_the_keys_it_still_held() {
        let mut p = Pending::new(vec![entry(1), entry(2)]);
        let (first, _) = p.start_flight().expect("first flight");
        p.committed(&[], vec![entry(3)]);
        let (second, _) = p.start_flight().expect("second flight");
        // The second flight landed in part before the first was found lost.
        p.acked(&entry(3), 5);
        assert_eq!(p.lost(first), vec![1, 2]);
        assert_eq!(p.depth(), 0, "nothing stays in flight for ever");
        assert!(p.lost(second).is_empty());
        // The loop reads them again from the store: they wait, to be sent again.
        p.failed(vec![entry(2), entry(1)]);
        assert_eq!(waiting_keys(&p), vec![1, 2]);
        check(&p);
    }

    #[test]
    fn a_commit_cancels_waiting_entries_but_not_published_ones() {
        let mut p = Pending::new(vec![entry(1)]);
        let _ = p.start_flight();
        p.committed(&[], vec![entry(2), entry(3)]);
        assert_eq!(p.published().collect::<Vec<_>>(), vec![1]);
        // A revocation removed 1 (out already) and 3 (still waiting).
        p.committed(&[1, 3], Vec::new());
        assert_eq!(waiting_keys(&p), vec![2]);
        assert_eq!(p.depth(), 2, "1 is still in flight: its PubAck decides");
        check(&p);
    }

    #[test]
    fn publishing_outside_a_flight_reports_each_entry() {
        let mut p = Pending::new(vec![entry(1), entry(2), entry(3)]);
        let out = p.take_waiting();
        assert_eq!(keys(&out), vec![1, 2, 3]);
        p.acked(&out[0], 1);
        p.failed(out[1..].to_vec());
        assert_eq!(p.sent(), &[1]);
        assert_eq!(waiting_keys(&p), vec![2, 3]);
        check(&p);
    }

    /// xorshift64*, replayable from its printed seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Every operation of the loop in a random order, as a model of the store's outbox: the
    /// invariants hold after each, and once everything lands, every entry ever committed was
    /// acknowledged and removed, or cancelled while still waiting — none is forgotten.
    #[test]
    fn random_runs_keep_the_invariants_and_lose_no_entry() {
        let seed = std::env::var("PENDING_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
                    | 1
            });
        println!("PENDING_SEED={seed}");
        let mut rng = Rng(seed);
        for _run in 0..200 {
            let mut store: std::collections::BTreeMap<u64, OutboxEntry> = Default::default();
            let mut next_key = 1u64;
            let mut p = Pending::new(Vec::new());
            // Flights out: their entries, not yet landed.
            let mut flights: Vec<(FlightId, Vec<OutboxEntry>)> = Vec::new();
            let mut cancelled = BTreeSet::new();
            let mut removed = BTreeSet::new();
            for _step in 0..60 {
                match rng.below(6) {
                    0 => {
                        // A commit: removes what was acknowledged, maybe cancels a waiting
                        // entry, puts new ones.
                        let mut remove: Vec<u64> = p.sent().to_vec();
                        if let Some(e) = p.waiting.front()
                            && rng.below(3) == 0
                        {
                            remove.push(e.key);
                            cancelled.insert(e.key);
                        }
                        let put: Vec<OutboxEntry> = (0..rng.below(4))
                            .map(|_| {
                                next_key += 1;
                                entry(next_key)
                            })
                            .collect();
                        for k in &remove {
                            store.remove(k);
                            removed.insert(*k);
                        }
                        for e in &put {
                            store.insert(e.key, e.clone());
                        }
                        p.committed(&remove, put);
                    }
                    1 => {
                        if let Some(f) = p.start_flight() {
                            flights.push(f);
                        }
                    }
                    2 | 3 if !flights.is_empty() => {
                        let (_, entries) = flights.remove(rng.below(flights.len() as u64) as usize);
                        let (mut acked, mut failed) = (Vec::new(), Vec::new());
                        for e in entries {
                            if rng.below(4) == 0 {
                                failed.push(e);
                            } else {
                                acked.push((e, 1));
                            }
                        }
                        p.landed(&acked, failed);
                    }
                    4 if !flights.is_empty() => {
                        let (id, _) = flights.remove(rng.below(flights.len() as u64) as usize);
                        let again: Vec<OutboxEntry> = p
                            .lost(id)
                            .iter()
                            .filter_map(|k| store.get(k).cloned())
                            .collect();
                        p.failed(again);
                    }
                    _ => {}
                }
                check(&p);
                // Everything the bookkeeping holds but the acknowledged is in the store.
                for k in waiting_keys(&p).iter().chain(p.in_flight.keys()) {
                    assert!(
                        store.contains_key(k),
                        "seed {seed}: key {k} not in the store"
                    );
                }
            }
            // Land everything, publishing until nothing waits.
            loop {
                for (_, entries) in flights.drain(..) {
                    let acked: Vec<_> = entries.into_iter().map(|e| (e, 2)).collect();
                    p.landed(&acked, Vec::new());
                }
                let sent = p.sent().to_vec();
                for k in &sent {
                    store.remove(k);
                    removed.insert(*k);
                }
                p.committed(&sent, Vec::new());
                match p.start_flight() {
                    Some(f) => flights.push(f),
                    None => break,
                }
            }
            assert_eq!(p.depth(), 0, "seed {seed}");
            assert!(
                store.is_empty(),
                "seed {seed}: left in the store: {:?}",
                store.keys()
            );
            let all: BTreeSet<u64> = (2..=next_key).collect();
            assert_eq!(
                removed, all,
                "seed {seed}: every entry removed exactly by a commit"
            );
            assert!(cancelled.is_subset(&removed));
        }
    }
}
