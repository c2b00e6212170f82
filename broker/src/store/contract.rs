//! What every [`Store`] promises, as tests run on each implementation (sled and memory): a
//! new implementation (a replicated one, say) is added to `every_store!` and must pass them
//! all. What only one engine has (reopening, older on-disk layouts, sled's snapshot) is tested
//! beside it.

use super::*;
use crate::consent::{Basis, Consent};
use crate::dead_letter::{DeadLetter, DeadLetterStatus, OperatorAction};
use crate::referral::{HistoryEntry, State, Urgency};

/// Ids a prune step forgets per segment (both implementations).
const IDS_PER_SEGMENT: usize = 64;

/// A referral as the store tests use it (the sled store's own tests too).
pub(super) fn referral(id: &str, state: State) -> Referral {
    Referral {
        id: id.into(),
        from: "a".into(),
        to: "b".into(),
        urgency: Urgency::Crisis,
        state,
        created_at: 5,
        receive_by: 100,
        accept_within: 50,
        accept_by: 0,
        overdue: false,
        client: "p".into(),
        basis: Basis::Consent("c1".into()),
        purpose: 1,
        categories: vec![1, 2],
        envelope: vec![1, 2, 3],
        history: vec![HistoryEntry {
            state: State::Submitted,
            by: "a".into(),
            at: 5,
            note: "n".into(),
            cause: "m1".into(),
            sealed_note: Vec::new(),
            reason: 0,
        }],
    }
}

fn outbox(key: u64) -> OutboxEntry {
    OutboxEntry {
        key,
        subject: "yeongye.out.b.delivery".into(),
        message_id: format!("m{key}"),
        payload: vec![9, key as u8],
        confirms: Some(format!("r{key}")),
    }
}

fn deadline(at: Millis, id: &str) -> Deadline {
    Deadline {
        at,
        kind: DeadlineKind::Receipt,
        referral_id: id.into(),
    }
}

fn dead_letter(seq: u64) -> DeadLetter {
    DeadLetter {
        stream_seq: seq,
        subject: "yeongye.in.a.referral".into(),
        message_id: format!("m{seq}"),
        sender: "a".into(),
        referral_id: "r1".into(),
        code: 3,
        detail: "bad".into(),
        at: 7,
        raw: vec![1, 2],
        status: DeadLetterStatus::Open,
        actions: Vec::new(),
    }
}

fn consent(id: &str) -> Consent {
    Consent {
        id: id.into(),
        client: "p".into(),
        collected_by: "a".into(),
        recipient_agencies: vec!["b".into()],
        recipient_kinds: Vec::new(),
        purposes: vec![1],
        categories: vec![1],
        valid_from: 0,
        valid_until: None,
        form_reference: "f".into(),
        granted_at: 1,
        revoked: None,
        referrals: Vec::new(),
        purges: Vec::new(),
    }
}

fn applied(name: &str, at: Millis, n: usize) -> Vec<(String, Millis, [u8; 32])> {
    (0..n)
        .map(|i| (format!("{name}-{i}"), at, [i as u8; 32]))
        .collect()
}

fn commit_is_visible_at_once(s: &dyn Store) {
    let k = s.next_outbox_key().unwrap();
    s.commit(&ChangeSet {
        referrals: vec![referral("r1", State::Submitted)],
        seen: vec![("a/m1".into(), 5, [7; 32])],
        outbox_put: vec![outbox(k)],
        deadlines_put: vec![deadline(100, "r1")],
        checkpoint: Some(7),
        consents: vec![consent("c1")],
        dead_letters: vec![dead_letter(3)],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.referral("r1").unwrap(),
        Some(referral("r1", State::Submitted))
    );
    assert_eq!(s.referral("r2").unwrap(), None);
    assert!(s.seen("a/m1").unwrap());
    assert!(!s.seen("a/m2").unwrap());
    assert_eq!(s.seen_digest("a/m1").unwrap(), Some(vec![7; 32]));
    assert_eq!(s.outbox().unwrap(), vec![outbox(k)]);
    assert_eq!(s.checkpoint().unwrap(), 7);
    assert!(s.due(99, 10).unwrap().is_empty());
    assert_eq!(s.due(100, 10).unwrap(), vec![deadline(100, "r1")]);
    assert_eq!(s.consent("c1").unwrap(), Some(consent("c1")));
    assert_eq!(s.consents().unwrap(), vec![consent("c1")]);
    assert_eq!(s.dead_letter(3).unwrap(), Some(dead_letter(3)));
    assert_eq!(s.dead_letter(4).unwrap(), None);
    assert_eq!(
        s.stats().unwrap(),
        StoreStats {
            referrals: 1,
            outbox: 1,
            deadlines: 1,
            dead_letters: 1,
            seen: 1,
        }
    );
}

/// A commit of a change the state log holds (not waited on to reach the disk) is the same
/// commit: everything the plain one stores, read back at once.
fn a_logged_commit_stores_what_a_commit_stores(s: &dyn Store) {
    let plain = MemoryStore::new();
    for (n, state) in [(1, State::Submitted), (2, State::Received)] {
        let change = ChangeSet {
            referrals: vec![
                referral("r1", state),
                referral(&format!("r{}", n + 1), state),
            ],
            seen: vec![(format!("a/m{n}"), 5, [n as u8; 32])],
            outbox_put: vec![outbox(n)],
            deadlines_put: vec![deadline(100 + n as i64, "r1")],
            checkpoint: Some(7 + n),
            consents: vec![consent(&format!("c{n}"))],
            dead_letters: vec![dead_letter(3 + n)],
            state_seq: Some(n),
            ..Default::default()
        };
        s.commit_logged(&change).unwrap();
        plain.commit(&change).unwrap();
    }
    assert_eq!(s.state_position().unwrap(), 2);
    assert_eq!(
        crate::store::digest(s).unwrap(),
        crate::store::digest(&plain).unwrap()
    );
}

fn an_empty_commit_changes_nothing(s: &dyn Store) {
    assert!(ChangeSet::default().is_empty());
    s.commit(&ChangeSet::default()).unwrap();
    assert_eq!(s.stats().unwrap(), StoreStats::default());
    assert_eq!(s.checkpoint().unwrap(), 0);
    assert_eq!(s.audit_head().unwrap(), (0, audit::GENESIS));
    assert_eq!(s.counts().unwrap(), Counts::default());
}

fn checkpoint_never_goes_back(s: &dyn Store) {
    for (seq, expected) in [(10, 10), (3, 10), (11, 11)] {
        s.commit(&ChangeSet {
            checkpoint: Some(seq),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.checkpoint().unwrap(), expected);
    }
}

fn outbox_keys_grow_and_the_outbox_is_in_key_order(s: &dyn Store) {
    let keys: Vec<u64> = (0..5).map(|_| s.next_outbox_key().unwrap()).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    // Put out of order, in two commits.
    s.commit(&ChangeSet {
        outbox_put: vec![outbox(keys[3]), outbox(keys[0])],
        ..Default::default()
    })
    .unwrap();
    s.commit(&ChangeSet {
        outbox_put: vec![outbox(keys[4]), outbox(keys[1])],
        outbox_remove: vec![keys[0]],
        ..Default::default()
    })
    .unwrap();
    let got: Vec<u64> = s.outbox().unwrap().iter().map(|e| e.key).collect();
    assert_eq!(got, vec![keys[1], keys[3], keys[4]]);
    assert_eq!(s.outbox().unwrap()[0], outbox(keys[1]), "stored whole");
    assert!(s.next_outbox_key().unwrap() > keys[4]);
}

fn deadlines_order_by_time_and_remove(s: &dyn Store) {
    s.commit(&ChangeSet {
        deadlines_put: vec![deadline(300, "c"), deadline(100, "a"), deadline(200, "b")],
        ..Default::default()
    })
    .unwrap();
    let ids = |v: Vec<Deadline>| v.into_iter().map(|d| d.referral_id).collect::<Vec<_>>();
    assert_eq!(ids(s.due(250, 10).unwrap()), ["a", "b"]);
    assert_eq!(
        ids(s.due(1000, 2).unwrap()),
        ["a", "b"],
        "at most the limit"
    );
    s.commit(&ChangeSet {
        deadlines_remove: vec![deadline(100, "a")],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ids(s.due(1000, 1).unwrap()), ["b"]);
    assert_eq!(s.stats().unwrap().deadlines, 2);
}

/// What a one-at-a-time read hands its visitor, in order.
fn collected<T>(read: impl FnOnce(&mut dyn FnMut(T) -> Result<()>) -> Result<()>) -> Vec<T> {
    let mut out = Vec::new();
    read(&mut |item| {
        out.push(item);
        Ok(())
    })
    .unwrap();
    out
}

/// The one-at-a-time reads a snapshot makes hold what the whole reads hold, in their order
/// (checked against what was committed too: a store may derive one read from the other).
fn reads_one_at_a_time_are_the_whole_reads(s: &dyn Store) {
    s.commit(&ChangeSet {
        deadlines_put: vec![deadline(300, "c"), deadline(100, "a"), deadline(200, "b")],
        consents: vec![consent("k2"), consent("k1")],
        referrals: vec![
            referral("r2", State::Received),
            referral("r1", State::Submitted),
        ],
        ..Default::default()
    })
    .unwrap();
    let deadlines = collected(|f| s.for_each_deadline(f));
    assert_eq!(deadlines, s.due(Millis::MAX, usize::MAX).unwrap());
    let deadline_ids: Vec<_> = deadlines.iter().map(|d| d.referral_id.as_str()).collect();
    assert_eq!(deadline_ids, ["a", "b", "c"], "earliest first");
    let consents = collected(|f| s.for_each_consent(f));
    assert_eq!(consents, s.consents().unwrap());
    let consent_ids: Vec<_> = consents.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(consent_ids, ["k1", "k2"]);
    let referrals = collected(|f| s.for_each_referral(f));
    assert_eq!(referrals, s.referrals().unwrap());
    let referral_ids: Vec<_> = referrals.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(referral_ids, ["r1", "r2"], "in id order");
    // A visitor's failure ends the read with it.
    let mut calls = 0;
    let failed = s.for_each_deadline(&mut |_| {
        calls += 1;
        Err(crate::error::Error::InvalidConfig("stop".into()))
    });
    assert!(failed.is_err());
    assert_eq!(calls, 1);
}

fn records_are_replaced_whole(s: &dyn Store) {
    s.commit(&ChangeSet {
        referrals: vec![referral("r1", State::Submitted)],
        consents: vec![consent("c1")],
        dead_letters: vec![dead_letter(9), dead_letter(4)],
        ..Default::default()
    })
    .unwrap();
    let mut resolved = dead_letter(9);
    resolved.status = DeadLetterStatus::Discarded;
    resolved.actions.push(OperatorAction {
        action: "discard".into(),
        who: "op".into(),
        why: "test".into(),
        at: 8,
        outcome: "ok".into(),
    });
    let mut revoked = consent("c1");
    revoked.referrals.push("r1".into());
    let received = referral("r1", State::Received);
    s.commit(&ChangeSet {
        referrals: vec![received.clone()],
        consents: vec![revoked.clone()],
        dead_letter_updates: vec![resolved.clone()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.referral("r1").unwrap(), Some(received.clone()));
    assert_eq!(s.referrals().unwrap(), vec![received]);
    assert_eq!(s.consent("c1").unwrap(), Some(revoked));
    assert_eq!(s.dead_letter(9).unwrap(), Some(resolved.clone()));
    assert_eq!(
        s.dead_letters().unwrap(),
        vec![dead_letter(4), resolved],
        "in stream order"
    );
}

fn the_audit_chain_appends_across_commits(s: &dyn Store) {
    let (first, head) = audit::chain(
        s.audit_head().unwrap(),
        vec![audit::Entry::draft("a", 1), audit::Entry::draft("b", 2)],
    );
    s.commit(&ChangeSet {
        audit: first,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.audit_head().unwrap(), head);
    let (more, head) = audit::chain(head, vec![audit::Entry::draft("c", 3)]);
    s.commit(&ChangeSet {
        audit: more,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.audit_head().unwrap(), head);
    assert_eq!(audit::verify(s.audit_raw().unwrap(), head), Ok(3));
}

fn counts_are_as_committed_and_only_watched_referrals_are_listed(s: &dyn Store) {
    let (r1, r2) = (
        referral("r1", State::Submitted),
        referral("r2", State::Submitted),
    );
    let received = referral("r1", State::Received);
    let mut counts = Counts::default();
    counts.change(None, &Summary::of(&r1));
    counts.change(None, &Summary::of(&r2));
    s.commit(&ChangeSet {
        referrals: vec![r1.clone(), r2.clone()],
        counts: Some(counts.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.watched().unwrap(),
        vec![Summary::of(&r1), Summary::of(&r2)]
    );
    counts.change(Some(&Summary::of(&r1)), &Summary::of(&received));
    s.commit(&ChangeSet {
        referrals: vec![received],
        counts: Some(counts.clone()),
        ..Default::default()
    })
    .unwrap();
    // RECEIVED and on time: counted, not watched.
    assert_eq!(s.watched().unwrap(), vec![Summary::of(&r2)]);
    assert_eq!(s.counts().unwrap(), counts);
    assert_eq!(s.counts().unwrap().by_state[&State::Received], 1);
}

fn pruning_goes_in_bounded_steps_and_keeps_what_is_young(s: &dyn Store) {
    // Old ids, then young ones in a commit of their own; one id applied again later.
    let old = IDS_PER_SEGMENT * 5;
    s.commit(&ChangeSet {
        seen: applied("old", 1, old),
        ..Default::default()
    })
    .unwrap();
    s.commit(&ChangeSet {
        seen: applied("young", 50, 3),
        ..Default::default()
    })
    .unwrap();
    s.commit(&ChangeSet {
        seen: vec![("old-7".into(), 60, [7; 32])],
        ..Default::default()
    })
    .unwrap();
    let mut steps = Vec::new();
    loop {
        let step = s.prune_seen_step(10, 2).unwrap();
        steps.push(step.forgotten);
        if step.done {
            break;
        }
        assert!(steps.len() <= old, "a prune that never ends: {steps:?}");
    }
    assert!(
        steps.len() > 10,
        "a step reads a bounded part of the index, not all of it: {steps:?}"
    );
    assert_eq!(steps.iter().sum::<usize>(), old - 1, "{steps:?}");
    assert!(!s.seen("old-0").unwrap());
    assert!(!s.seen(&format!("old-{}", old - 1)).unwrap());
    assert_eq!(
        s.seen_digest("old-7").unwrap(),
        Some(vec![7; 32]),
        "applied again: young"
    );
    for i in 0..3 {
        assert!(s.seen(&format!("young-{i}")).unwrap(), "young-{i} kept");
    }
    assert_eq!(s.stats().unwrap().seen, 4);
    assert_eq!(s.prune_seen(51).unwrap(), 3);
    assert_eq!(s.stats().unwrap().seen, 1);
    assert_eq!(s.prune_seen(61).unwrap(), 1);
    assert_eq!(s.prune_seen(61).unwrap(), 0, "nothing left");
}

fn the_state_position_is_the_last_change_sets_and_never_goes_back(s: &dyn Store) {
    assert_eq!(s.state_position().unwrap(), 0);
    for (seq, expected) in [(4, 4), (2, 4), (9, 9)] {
        s.commit(&ChangeSet {
            state_seq: Some(seq),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.state_position().unwrap(), expected);
    }
    // A log started again: back to 0 on purpose, the records kept, and on from there.
    s.commit(&ChangeSet {
        referrals: vec![referral("r-kept", State::Received)],
        ..Default::default()
    })
    .unwrap();
    s.restart_state_position().unwrap();
    assert_eq!(s.state_position().unwrap(), 0);
    assert!(s.contains_referral("r-kept").unwrap());
    s.commit(&ChangeSet {
        state_seq: Some(1),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.state_position().unwrap(), 1);
}

fn outbox_keys_stay_above_keys_another_broker_put(s: &dyn Store) {
    let mine = s.next_outbox_key().unwrap();
    // A change set from the state log, its keys drawn by another broker's store.
    s.commit(&ChangeSet {
        outbox_put: vec![outbox(mine + 1000)],
        ..Default::default()
    })
    .unwrap();
    let next = s.next_outbox_key().unwrap();
    assert!(
        next > mine + 1000,
        "{next} after a replicated key {}",
        mine + 1000
    );
    assert!(s.next_outbox_key().unwrap() > next);
}

/// A change set through the state log's encoding, applied to a second store, leaves what
/// committing it directly leaves.
fn a_change_set_through_the_log_encoding_is_the_same_change(s: &dyn Store) {
    let c = ChangeSet {
        referrals: vec![referral("r1", State::Submitted)],
        seen: vec![("a/m1".into(), 5, [7; 32])],
        outbox_put: vec![outbox(3), outbox(4)],
        outbox_remove: vec![1],
        deadlines_put: vec![
            deadline(100, "r1"),
            Deadline {
                at: 7,
                kind: DeadlineKind::Acceptance,
                referral_id: "r1".into(),
            },
        ],
        deadlines_remove: vec![deadline(50, "r0")],
        checkpoint: Some(7),
        consents: vec![consent("c1")],
        dead_letters: vec![dead_letter(3)],
        dead_letter_updates: vec![dead_letter(2)],
        audit: vec![audit::Entry {
            seq: 1,
            at: 5,
            event: "referral.submitted".into(),
            referral_id: "r1".into(),
            prev_hash: vec![0; 32],
            hash: vec![1; 32],
            ..Default::default()
        }],
        counts: Some(Counts::default()),
        state_seq: None,
    };
    let back = decode_change_set(&encode_change_set(&c)).unwrap();
    s.commit(&back).unwrap();
    let direct = MemoryStore::new();
    direct.commit(&c).unwrap();
    assert_eq!(s.referrals().unwrap(), direct.referrals().unwrap());
    assert_eq!(s.outbox().unwrap(), direct.outbox().unwrap());
    assert_eq!(
        s.due(i64::MAX, 10).unwrap(),
        direct.due(i64::MAX, 10).unwrap()
    );
    assert_eq!(s.dead_letters().unwrap(), direct.dead_letters().unwrap());
    assert_eq!(s.consents().unwrap(), direct.consents().unwrap());
    assert_eq!(s.audit_raw().unwrap(), direct.audit_raw().unwrap());
    assert_eq!(s.seen_digest("a/m1").unwrap(), Some(vec![7; 32]));
    assert_eq!(s.checkpoint().unwrap(), 7);
    assert!(
        decode_change_set(b"\xff\xff not a change set").is_err(),
        "garbage is refused"
    );
}

/// A change set applied again (replayed over a snapshot read while it was written) leaves
/// what applying it once leaves: whole records replaced, audit entries not appended twice.
fn a_change_set_applied_twice_is_applied_once(s: &dyn Store) {
    let entry = |seq: u64| audit::Entry {
        seq,
        at: 5,
        event: "referral.submitted".into(),
        referral_id: "r1".into(),
        prev_hash: vec![seq as u8; 32],
        hash: vec![seq as u8 + 1; 32],
        ..Default::default()
    };
    let first = ChangeSet {
        referrals: vec![referral("r1", State::Submitted)],
        seen: vec![("a/m1".into(), 5, [7; 32])],
        outbox_put: vec![outbox(3)],
        audit: vec![entry(1), entry(2)],
        ..Default::default()
    };
    let second = ChangeSet {
        referrals: vec![referral("r1", State::Received)],
        outbox_remove: vec![3],
        audit: vec![entry(3)],
        ..Default::default()
    };
    for c in [&first, &second, &first, &second] {
        s.commit(c).unwrap();
    }
    let once = MemoryStore::new();
    for c in [&first, &second] {
        once.commit(c).unwrap();
    }
    assert_eq!(digest(s).unwrap(), digest(&once).unwrap());
    assert_eq!(
        s.audit_raw()
            .unwrap()
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(s.audit_head().unwrap().0, 3);
}

/// A state-log record leaves out the envelope of a referral its reader already stores, and
/// the reader puts it back from its store: what is committed is the whole referral.
fn a_log_record_leaves_out_a_stored_envelope_and_the_reader_puts_it_back(s: &dyn Store) {
    let first = referral("r1", State::Submitted);
    assert!(!first.envelope.is_empty());
    s.commit(&ChangeSet {
        referrals: vec![first.clone()],
        ..Default::default()
    })
    .unwrap();
    let later = referral("r1", State::Received);
    let new = referral("r2", State::Submitted);
    let change = ChangeSet {
        referrals: vec![later.clone(), new.clone()],
        ..Default::default()
    };
    let stored = |id: &str| s.contains_referral(id).unwrap();
    let bytes = encode_log_change(&change, &stored);
    assert!(
        bytes.len() < encode_change_set(&change).len(),
        "the stored referral's envelope travels again"
    );
    let (mut read, kept) = decode_log_change(&bytes).unwrap();
    assert!(kept);
    assert!(read.referrals[0].envelope.is_empty());
    assert_eq!(read.referrals[1], new, "a new referral's envelope travels");
    crate::cluster::log::fill_envelopes(&mut read, s).unwrap();
    assert_eq!(read.referrals, vec![later, new]);
    // A snapshot's reader refuses such a record: it has no store to fill it from.
    assert!(decode_change_set(&bytes).is_err());
    // Nothing stored: nothing left out.
    let fresh = MemoryStore::new();
    let whole = encode_log_change(&change, &|id| fresh.contains_referral(id).unwrap());
    assert!(!decode_log_change(&whole).unwrap().1);
}

/// Each contract test, once for every implementation.
macro_rules! every_store {
    ($($name:ident),* $(,)?) => {
        mod sled {
            $(#[test]
            fn $name() {
                let s = crate::store::SledStore::temporary().unwrap();
                super::$name(&s);
            })*
        }
        mod memory {
            $(#[test]
            fn $name() {
                super::$name(&crate::store::MemoryStore::new());
            })*
        }
    };
}

every_store!(
    commit_is_visible_at_once,
    a_logged_commit_stores_what_a_commit_stores,
    an_empty_commit_changes_nothing,
    checkpoint_never_goes_back,
    outbox_keys_grow_and_the_outbox_is_in_key_order,
    deadlines_order_by_time_and_remove,
    reads_one_at_a_time_are_the_whole_reads,
    records_are_replaced_whole,
    the_audit_chain_appends_across_commits,
    counts_are_as_committed_and_only_watched_referrals_are_listed,
    pruning_goes_in_bounded_steps_and_keeps_what_is_young,
    the_state_position_is_the_last_change_sets_and_never_goes_back,
    outbox_keys_stay_above_keys_another_broker_put,
    a_change_set_through_the_log_encoding_is_the_same_change,
    a_change_set_applied_twice_is_applied_once,
    a_log_record_leaves_out_a_stored_envelope_and_the_reader_puts_it_back,
);
