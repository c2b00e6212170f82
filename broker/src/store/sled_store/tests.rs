//! The sled store's own tests: what survives a reopen, segments, older stores' layouts, the
//! snapshot reopen. What every store promises is in `store/contract.rs`.

use super::*;
use crate::referral::State;
use std::sync::Arc;

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

fn ids(name: &str, at: Millis, n: usize) -> Vec<(String, Millis, [u8; 32])> {
    (0..n)
        .map(|i| (format!("{name}-{i}"), at, [0; 32]))
        .collect()
}

/// Two dedup keys that fall into the same bucket of `s`.
fn same_bucket(s: &SledStore) -> (String, String) {
    let mut by_bucket = std::collections::HashMap::new();
    for i in 0.. {
        let k = format!("k-{i}");
        if let Some(other) = by_bucket.insert(buckets::bucket_key(&s.secret, &k), k.clone()) {
            return (other, k);
        }
    }
    unreachable!()
}

#[test]
fn pruning_forgets_each_id_past_retention_and_keeps_its_young_neighbours() {
    let s = SledStore::temporary().unwrap();
    let (old, young) = same_bucket(&s);
    s.commit(&ChangeSet {
        seen: vec![(old.clone(), 1, [1; 32]), (young.clone(), 50, [2; 32])],
        ..Default::default()
    })
    .unwrap();
    s.commit(&ChangeSet {
        seen: ids("old", 2, 300),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.stats().unwrap().seen, 302);
    assert_eq!(s.prune_seen(10).unwrap(), 301);
    assert!(!s.seen(&old).unwrap());
    assert_eq!(
        s.seen_digest(&young).unwrap(),
        Some(vec![2; 32]),
        "kept, in the same bucket"
    );
    assert!(!s.seen("old-299").unwrap());
    assert_eq!(s.prune_seen(51).unwrap(), 1);
    assert_eq!(s.stats().unwrap().seen, 0);
    assert_eq!(
        s.db().unwrap().scan_prefix(buckets::PREFIX).count(),
        0,
        "empty buckets go"
    );
    // Ids applied after a prune are kept and pruned like the first.
    s.commit(&ChangeSet {
        seen: ids("later", 60, 2),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.prune_seen(61).unwrap(), 2);
    assert_eq!(s.stats().unwrap().seen, 0);
}

#[test]
fn pruning_weeks_of_ids_goes_a_step_at_a_time_and_forgets_them_all() {
    let s = SledStore::temporary().unwrap();
    let n = crate::store::PRUNE_STEP * 4 + 10;
    s.commit(&ChangeSet {
        seen: ids("id", 1, n),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.prune_seen(10).unwrap(), n);
    assert_eq!(s.stats().unwrap().seen, 0);
    assert_eq!(s.prune_seen(10).unwrap(), 0);
}

#[test]
fn a_prune_step_reads_at_most_its_budget_of_buckets_and_goes_on_where_it_stopped() {
    let s = SledStore::temporary().unwrap();
    let n = 101;
    s.commit(&ChangeSet {
        seen: ids("id", 1, n),
        ..Default::default()
    })
    .unwrap();
    let buckets = s.db().unwrap().scan_prefix(buckets::PREFIX).count();
    let mut steps = Vec::new();
    loop {
        let step = s.prune_seen_step(10, 2).unwrap();
        steps.push(step.forgotten);
        if step.done {
            break;
        }
    }
    // Two buckets a step; the step that reads fewer than two says the sweep is done.
    assert_eq!(steps.len(), buckets / 2 + 1, "{buckets} buckets: {steps:?}");
    assert_eq!(steps.iter().sum::<usize>(), n, "{steps:?}");
    assert_eq!(s.stats().unwrap().seen, 0);
    // A new prune starts at the first bucket again.
    s.commit(&ChangeSet {
        seen: ids("again", 1, 3),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.prune_seen(10).unwrap(), 3);
}

#[test]
fn the_longest_dedup_key_an_agency_can_cause_is_kept_and_found() {
    let s = SledStore::temporary().unwrap();
    // The agency token, then the longest message id the ingest accepts.
    let longest = format!(
        "{}/{}",
        "a".repeat(64),
        "m".repeat(yeongye_proto::rules::MAX_ID_LEN)
    );
    s.commit(&ChangeSet {
        seen: vec![(longest.clone(), 1, [9; 32])],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.seen_digest(&longest).unwrap(), Some(vec![9; 32]));
    assert!(!s.seen(&longest[..longest.len() - 1]).unwrap());
}

#[test]
fn a_store_whose_bucket_secret_is_damaged_refuses_to_open_and_says_which_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = crate::store::reopen(|| sled::open(dir.path()));
        db.insert(buckets::SECRET_KEY, &[1, 2, 3][..]).unwrap();
        db.flush().unwrap();
    }
    let e = crate::store::reopen(|| match SledStore::open(dir.path()) {
        Ok(_) => Err("opened".to_owned()),
        Err(e) if e.to_string().contains("lock") => Err(e.to_string()),
        Err(e) => Ok(e.to_string()),
    });
    assert!(e.contains("m/bucket-key") && e.contains("16 bytes"), "{e}");
}

#[test]
fn a_damaged_bucket_is_skipped_by_the_prune_and_the_others_are_pruned() {
    let s = SledStore::temporary().unwrap();
    s.commit(&ChangeSet {
        seen: ids("old", 1, 50),
        ..Default::default()
    })
    .unwrap();
    // A bucket key before every other, holding bytes that are not records.
    let damaged = [buckets::PREFIX, &[0, 0, 0, 0]].concat();
    s.db()
        .unwrap()
        .insert(&damaged, &[0xff, 0xff, 1][..])
        .unwrap();
    assert_eq!(
        s.prune_seen(10).unwrap(),
        50,
        "every readable bucket pruned"
    );
    assert!(!s.seen("old-0").unwrap());
    assert_eq!(
        s.db().unwrap().get(&damaged).unwrap().as_deref(),
        Some(&[0xff, 0xff, 1][..]),
        "the damaged bucket left as it was"
    );
}

#[test]
fn a_store_from_before_buckets_keeps_its_ids_until_they_are_past_retention() {
    let dir = tempfile::tempdir().unwrap();
    {
        // Written the way stores were before buckets: a key per id, indexed by time in segments.
        let db = crate::store::reopen(|| sled::open(dir.path()));
        let index = Segments::open(&db, b"d/", APPLIED_PER_SEGMENT).unwrap();
        let mut b = sled::Batch::default();
        let mut records = Vec::new();
        for (k, at) in (0..APPLIED_PER_SEGMENT)
            .map(|i| (format!("legacy-old-{i}"), 1))
            .chain([("legacy-new".to_owned(), 50)])
        {
            let mut value = time_be(at).to_vec();
            value.extend_from_slice(&[3; 32]);
            b.insert(key(b"s/", k.as_bytes()), value);
            let mut record = time_be(at).to_vec();
            record.extend_from_slice(k.as_bytes());
            records.push(record);
        }
        let staged = index.stage(&mut b, records.iter().map(Vec::as_slice));
        db.apply_batch(b).unwrap();
        index.install(staged);
        db.flush().unwrap();
    }
    let s = crate::store::reopen(|| SledStore::open(dir.path()));
    assert_eq!(s.seen_digest("legacy-new").unwrap(), Some(vec![3; 32]));
    assert!(s.seen("legacy-old-0").unwrap());
    s.commit(&ChangeSet {
        seen: vec![("fresh".into(), 5, [0; 32])],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.stats().unwrap().seen, APPLIED_PER_SEGMENT as u64 + 2);
    let mut listed = 0;
    s.for_each_seen(&mut |_, _, _| {
        listed += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        listed,
        APPLIED_PER_SEGMENT + 2,
        "older and new ids, for a snapshot"
    );
    assert_eq!(
        s.prune_seen(10).unwrap(),
        APPLIED_PER_SEGMENT + 1,
        "the old segment and fresh"
    );
    assert!(!s.seen("legacy-old-0").unwrap());
    assert!(!s.seen("fresh").unwrap());
    assert!(s.seen("legacy-new").unwrap(), "young: kept where it is");
    assert!(s.legacy.load(Ordering::Relaxed));
    // Its segment goes once all of it is past retention; then the older index is gone.
    assert_eq!(s.prune_seen(51).unwrap(), 1);
    assert!(!s.seen("legacy-new").unwrap());
    assert!(!s.legacy.load(Ordering::Relaxed));
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

/// A reopen waits for the write lock while operators read (a digest, the stats): no reader
/// may take the read lock twice, or it waits behind the reopen that waits for it. Run in a
/// thread with a deadline, so that a deadlock fails the test instead of hanging it.
#[test]
fn reopens_while_operators_read_do_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(crate::store::reopen(|| SledStore::open(dir.path())).reopen_after(1));
    let mut counts = Counts::default();
    commit_referrals(&s, &mut counts, &[(None, &referral("r0"))]);
    s.commit(&ChangeSet {
        seen: vec![("m0".into(), 5, [0; 32])],
        ..Default::default()
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                crate::store::digest(s.as_ref()).unwrap();
                assert_eq!(s.stats().unwrap().seen, 1);
                reads += 1;
            }
            reads
        })
    };
    let (done, finished) = std::sync::mpsc::channel();
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut counts = counts;
            let mut reopens = 0;
            for i in 1..=30 {
                commit_referrals(&s, &mut counts, &[(None, &referral(&format!("r{i}")))]);
                if s.snapshot_if_due().unwrap() {
                    reopens += 1;
                }
            }
            let _ = done.send(reopens);
        })
    };
    let reopens = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("reopens and reads deadlocked (nothing finished in 60 s)");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let reads = reader.join().unwrap();
    assert_eq!(reopens, 30);
    assert!(reads > 0);
    assert_eq!(s.referrals().unwrap().len(), 31);
}
