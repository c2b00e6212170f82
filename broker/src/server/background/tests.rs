//! The prune as the event loop runs it: a backlog of applied ids forgotten across many bounded
//! steps, with commits (the turns of referrals) going on between them.

use std::sync::Arc;
use std::time::Duration;

use super::Background;
use crate::clock;
use crate::ops::{Ops, Task};
use crate::registry::Registry;
use crate::store::{ChangeSet, SledStore, Store};
use crate::view::View;

const SEGMENT: usize = 64;
const RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

fn ids(prefix: &str, at: i64, n: usize) -> Vec<(String, i64, [u8; 32])> {
    (0..n)
        .map(|i| (format!("{prefix}-{i}"), at, [0; 32]))
        .collect()
}

#[test]
fn a_backlog_is_pruned_across_many_steps_while_turns_go_on() {
    let store: Arc<dyn Store> = Arc::new(SledStore::temporary().unwrap());
    let ops = Ops::new(
        store.clone(),
        View::default(),
        Arc::new(Registry::default()),
    );
    // Weeks away: 40 segments of ids applied long before the retention.
    let backlog = 40 * SEGMENT;
    for chunk in ids("old", 1, backlog).chunks(500) {
        store
            .commit(&ChangeSet {
                seen: chunk.to_vec(),
                ..Default::default()
            })
            .unwrap();
    }
    let mut bg = Background::new(Duration::from_secs(3600), 4, Duration::ZERO);
    assert!(!bg.busy());
    let mut steps = 0;
    let mut turns = 0;
    loop {
        let before = store.stats().unwrap().seen;
        bg.step(store.as_ref(), &ops, RETENTION);
        steps += 1;
        let forgotten = before - store.stats().unwrap().seen;
        assert!(
            forgotten <= 4 * SEGMENT as u64,
            "step {steps} forgot {forgotten} ids: more than its 4 segments"
        );
        if !bg.busy() {
            break;
        }
        assert!(
            ops.background
                .pruning
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        // A turn between two steps: a referral's message applied and committed.
        turns += 1;
        store
            .commit(&ChangeSet {
                seen: ids(&format!("turn-{turns}"), clock::now_ms(), 1),
                ..Default::default()
            })
            .unwrap();
        assert!(store.seen(&format!("turn-{turns}-0")).unwrap());
        assert!(steps < 1000, "the prune never finishes");
    }
    // 10 steps of 4 segments, and the one that found nothing left.
    assert_eq!(steps, 11);
    assert_eq!(turns, 10);
    assert_eq!(ops.background.steps(Task::Prune), 11);
    assert!(
        !ops.background
            .pruning
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(!store.seen("old-0").unwrap());
    assert!(!store.seen(&format!("old-{}", backlog - 1)).unwrap());
    // The turns' ids are within retention: kept.
    assert_eq!(store.stats().unwrap().seen, turns as u64);
    assert!(ops.background.longest(Task::Prune) > Duration::ZERO);

    // The next prune is an hour away: a step now does nothing.
    bg.step(store.as_ref(), &ops, RETENTION);
    assert!(!bg.busy());
    assert_eq!(ops.background.steps(Task::Prune), 11);
}

#[test]
fn steps_are_paced_in_time_however_often_the_loop_turns() {
    let store: Arc<dyn Store> = Arc::new(SledStore::temporary().unwrap());
    let ops = Ops::new(
        store.clone(),
        View::default(),
        Arc::new(Registry::default()),
    );
    store
        .commit(&ChangeSet {
            seen: ids("old", 1, 8 * SEGMENT),
            ..Default::default()
        })
        .unwrap();
    let pause = Duration::from_secs(3600);
    let mut bg = Background::new(Duration::from_secs(3600), 1, pause);
    assert_eq!(bg.wait(), Duration::ZERO);
    bg.step(store.as_ref(), &ops, RETENTION);
    assert_eq!(store.stats().unwrap().seen, 7 * SEGMENT as u64);
    // Turns after turns: no step before the pause has passed.
    for _ in 0..100 {
        bg.step(store.as_ref(), &ops, RETENTION);
    }
    assert_eq!(ops.background.steps(Task::Prune), 1);
    assert_eq!(store.stats().unwrap().seen, 7 * SEGMENT as u64);
    assert!(bg.busy());
    assert!(bg.wait() > Duration::from_secs(3500));
}
