//! The sled store's own tests: what survives a reopen, segments, older stores' layouts, the
//! snapshot reopen. What every store promises is in `store/contract.rs`.

use super::*;
use crate::referral::State;

fn referral(id: &str) -> Referral {
    crate::store::contract::referral(id, State::Submitted)
}

#[test]
fn commit_is_visible_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = crate::store::reopen(|| SledStore::open(dir.path()));
        let k = s.next_outbox_key().unwrap();
        let c = ChangeSet {
            referrals: vec![referral("r1")],
            seen: vec![("a/m1".into(), 5, [7; 32])],
            outbox_put: vec![OutboxEntry {
                key: k,
                subject: "yeongye.out.b.delivery".into(),
                message_id: "x".into(),
                payload: vec![9],
                confirms: Some("r1".into()),
            }],
            deadlines_put: vec![Deadline {
                at: 100,
                kind: DeadlineKind::Receipt,
                referral_id: "r1".into(),
            }],
            checkpoint: Some(7),
            ..Default::default()
        };
        s.commit(&c).unwrap();
    }
    let s = crate::store::reopen(|| SledStore::open(dir.path()));
    assert_eq!(s.referral("r1").unwrap(), Some(referral("r1")));
    assert!(s.seen("a/m1").unwrap());
    assert!(!s.seen("a/m2").unwrap());
    assert_eq!(s.seen_digest("a/m1").unwrap(), Some(vec![7; 32]));
    assert_eq!(s.outbox().unwrap().len(), 1);
    assert_eq!(s.checkpoint().unwrap(), 7);
    assert!(s.due(99, 10).unwrap().is_empty());
    assert_eq!(s.due(100, 10).unwrap()[0].referral_id, "r1");
    // A new outbox key is above every one handed out before the reopen.
    assert!(s.next_outbox_key().unwrap() > s.outbox().unwrap()[0].key);
}

#[test]
fn pruning_forgets_ids_once_their_whole_segment_is_past_retention() {
    let s = SledStore::temporary().unwrap();
    let ids = |name: &str, at: Millis, n: usize| -> Vec<(String, Millis, [u8; 32])> {
        (0..n)
            .map(|i| (format!("{name}-{i}"), at, [0; 32]))
            .collect()
    };
    // One full segment of old ids, then a segment of old ids and one new id.
    s.commit(&ChangeSet {
        seen: ids("old", 1, APPLIED_PER_SEGMENT),
        ..Default::default()
    })
    .unwrap();
    let mut mixed = ids("older", 2, 3);
    mixed.extend(ids("new", 50, 1));
    s.commit(&ChangeSet {
        seen: mixed,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.prune_seen(10).unwrap(), APPLIED_PER_SEGMENT);
    assert!(!s.seen("old-0").unwrap());
    assert!(!s.seen(&format!("old-{}", APPLIED_PER_SEGMENT - 1)).unwrap());
    // Retention is a minimum: old ids sharing a segment with a young one stay with it.
    assert!(s.seen("older-0").unwrap());
    assert!(s.seen("new-0").unwrap());
    assert_eq!(s.prune_seen(51).unwrap(), 4);
    assert!(!s.seen("new-0").unwrap());
    assert_eq!(s.stats().unwrap().seen, 0);
    // Ids applied after the last segment went are kept and pruned like the first.
    s.commit(&ChangeSet {
        seen: ids("later", 60, 2),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.prune_seen(61).unwrap(), 2);
    assert_eq!(s.stats().unwrap().seen, 0);
}

#[test]
fn pruning_weeks_of_ids_goes_a_batch_at_a_time_and_forgets_them_all() {
    let s = SledStore::temporary().unwrap();
    let n = crate::store::PRUNE_STEP_SEGMENTS * APPLIED_PER_SEGMENT * 2 + 10;
    let seen = (0..n).map(|i| (format!("id-{i}"), 1, [0; 32])).collect();
    s.commit(&ChangeSet {
        seen,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.prune_seen(10).unwrap(), n);
    assert_eq!(s.stats().unwrap().seen, 0);
    assert_eq!(s.prune_seen(10).unwrap(), 0);
}

#[test]
fn a_prune_step_forgets_at_most_its_segments() {
    let s = SledStore::temporary().unwrap();
    let n = APPLIED_PER_SEGMENT * 5 + 3;
    let seen = (0..n).map(|i| (format!("id-{i}"), 1, [0; 32])).collect();
    s.commit(&ChangeSet {
        seen,
        ..Default::default()
    })
    .unwrap();
    let mut steps = Vec::new();
    loop {
        match s.prune_seen_step(10, 2).unwrap() {
            0 => break,
            k => steps.push(k),
        }
    }
    let two = 2 * APPLIED_PER_SEGMENT;
    assert_eq!(steps, [two, two, APPLIED_PER_SEGMENT + 3]);
    assert_eq!(s.stats().unwrap().seen, 0);
}

#[test]
fn a_store_from_before_segments_keeps_its_ids_and_audit_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (first, head) = audit::chain(
        (0, audit::GENESIS),
        vec![audit::Entry::draft("a", 1), audit::Entry::draft("b", 2)],
    );
    {
        // Written the way stores were before segments: a key per id and per entry.
        let db = crate::store::reopen(|| sled::open(dir.path()));
        for (k, at) in [("legacy-old", 1), ("legacy-new", 50)] {
            db.insert(key(b"s/", k.as_bytes()), time_be(at).to_vec())
                .unwrap();
            let mut by_time = key(b"S/", &time_be(at));
            by_time.extend_from_slice(k.as_bytes());
            db.insert(by_time, &[]).unwrap();
        }
        for e in &first {
            db.insert(
                key(b"a/", &e.seq.to_be_bytes()),
                prost::Message::encode_to_vec(e),
            )
            .unwrap();
        }
        let mut h = head.0.to_be_bytes().to_vec();
        h.extend_from_slice(&head.1);
        db.insert(AUDIT_HEAD, h).unwrap();
        db.flush().unwrap();
    }
    let s = crate::store::reopen(|| SledStore::open(dir.path()));
    let (more, head) = audit::chain(s.audit_head().unwrap(), vec![audit::Entry::draft("c", 3)]);
    s.commit(&ChangeSet {
        audit: more,
        seen: vec![("fresh".into(), 5, [0; 32])],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(audit::verify(s.audit_raw().unwrap(), head), Ok(3));
    assert_eq!(s.prune_seen(10).unwrap(), 2, "legacy-old and fresh");
    assert!(!s.seen("legacy-old").unwrap());
    assert!(s.seen("legacy-new").unwrap());
    assert!(!s.seen("fresh").unwrap());
}

/// Commits referrals as the event loop does: with the counters after the change.
fn commit_referrals(s: &SledStore, counts: &mut Counts, rs: &[(Option<&Referral>, &Referral)]) {
    for (old, new) in rs {
        counts.change(old.map(Summary::of).as_ref(), &Summary::of(new));
    }
    s.commit(&ChangeSet {
        referrals: rs.iter().map(|(_, r)| (*r).clone()).collect(),
        counts: Some(counts.clone()),
        ..Default::default()
    })
    .unwrap();
}

#[test]
fn only_watched_referrals_keep_a_summary_and_counts_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (referral("r1"), referral("r2"));
    let mut received = r1.clone();
    received.state = State::Received;
    let mut overdue = r2.clone();
    overdue.state = State::Received;
    overdue.overdue = true;
    let mut counts = Counts::default();
    {
        let s = crate::store::reopen(|| SledStore::open(dir.path()));
        commit_referrals(&s, &mut counts, &[(None, &r1), (None, &r2)]);
        assert_eq!(
            s.watched().unwrap(),
            vec![Summary::of(&r1), Summary::of(&r2)]
        );
        commit_referrals(
            &s,
            &mut counts,
            &[(Some(&r1), &received), (Some(&r2), &overdue)],
        );
        // RECEIVED and on time: counted, not watched.
        assert_eq!(s.watched().unwrap(), vec![Summary::of(&overdue)]);
        assert_eq!(s.db().unwrap().scan_prefix(b"v/").count(), 1);
    }
    let s = crate::store::reopen(|| SledStore::open(dir.path()));
    assert_eq!(s.counts().unwrap(), counts);
    assert_eq!(s.counts().unwrap().by_state[&State::Received], 2);
    assert_eq!(s.counts().unwrap().agencies["b"].overdue, 1);
    assert_eq!(s.watched().unwrap(), vec![Summary::of(&overdue)]);
}

#[test]
fn an_older_store_gets_its_counts_at_open_from_summaries_or_referrals() {
    let mut received = referral("r1");
    received.state = State::Received;
    let submitted = referral("r2");
    let expected = {
        let mut c = Counts::default();
        c.change(None, &Summary::of(&received));
        c.change(None, &Summary::of(&submitted));
        c
    };
    for with_summaries in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        {
            // Written the way older stores were: every referral, with (or, older still,
            // without) a summary each, and no counts.
            let db = crate::store::reopen(|| sled::open(dir.path()));
            for r in [&received, &submitted] {
                db.insert(key(b"r/", r.id.as_bytes()), codec::encode_referral(r))
                    .unwrap();
                if with_summaries {
                    db.insert(
                        key(b"v/", r.id.as_bytes()),
                        codec::encode_summary(&Summary::of(r)),
                    )
                    .unwrap();
                }
            }
            if with_summaries {
                db.insert(SUMMARIES, &[1u8]).unwrap();
            }
            db.flush().unwrap();
        }
        let s = crate::store::reopen(|| SledStore::open(dir.path()));
        assert_eq!(s.counts().unwrap(), expected, "summaries: {with_summaries}");
        assert_eq!(s.watched().unwrap(), vec![Summary::of(&submitted)]);
        assert_eq!(s.db().unwrap().scan_prefix(b"v/").count(), 1);
        assert!(!s.db().unwrap().contains_key(SUMMARIES).unwrap());
    }
}

#[test]
fn a_reopen_for_the_snapshot_keeps_everything_and_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut counts = Counts::default();
    let (a1, head) = audit::chain((0, audit::GENESIS), vec![audit::Entry::draft("a", 1)]);
    {
        let mut s = crate::store::reopen(|| SledStore::open(dir.path()));
        s.snapshot_after = 1;
        assert!(!s.snapshot_if_due().unwrap(), "nothing written yet");
        commit_referrals(&s, &mut counts, &[(None, &referral("r1"))]);
        s.commit(&ChangeSet {
            audit: a1,
            seen: vec![("m1".into(), 5, [0; 32])],
            ..Default::default()
        })
        .unwrap();
        assert!(s.snapshot_if_due().unwrap());
        assert!(!s.snapshot_if_due().unwrap(), "nothing written since");
        assert_eq!(s.referral("r1").unwrap(), Some(referral("r1")));
        let (a2, head) = audit::chain(head, vec![audit::Entry::draft("b", 2)]);
        s.commit(&ChangeSet {
            audit: a2,
            seen: vec![("m2".into(), 6, [0; 32])],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(audit::verify(s.audit_raw().unwrap(), head), Ok(2));
    }
    let s = crate::store::reopen(|| SledStore::open(dir.path()));
    assert_eq!(s.counts().unwrap(), counts);
    assert!(s.seen("m1").unwrap() && s.seen("m2").unwrap());
    assert_eq!(
        audit::verify(s.audit_raw().unwrap(), s.audit_head().unwrap()),
        Ok(2)
    );
    assert!(!SledStore::temporary().unwrap().snapshot_if_due().unwrap());
}
