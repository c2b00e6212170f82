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

/// A step's budget here: buckets of applied ids.
const BUDGET: usize = 256;
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
    // Weeks away: ids applied long before the retention, in ~10 steps' worth of buckets.
    let backlog = 10 * BUDGET;
    for chunk in ids("old", 1, backlog).chunks(500) {
        store
            .commit(&ChangeSet {
                seen: chunk.to_vec(),
                ..Default::default()
            })
            .unwrap();
    }
    let mut bg = Background::new(Duration::from_secs(3600), BUDGET, Duration::ZERO);
    assert!(!bg.busy());
    let mut steps = 0;
    let mut turns = 0;
    loop {
        let before = store.stats().unwrap().seen;
        bg.step(store.as_ref(), &ops, RETENTION);
        steps += 1;
        let forgotten = before - store.stats().unwrap().seen;
        // 2,560 ids in 262,144 buckets: rarely more than 2 in one.
        assert!(
            forgotten <= 3 * BUDGET as u64,
            "step {steps} forgot {forgotten} ids: more than its {BUDGET} buckets hold"
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
    // About 10 steps of 256 buckets (a few ids share one, the turns' ids add some), and the
    // one that read fewer than its budget.
    assert!((9..=12).contains(&steps), "{steps} steps");
    assert_eq!(turns, steps - 1);
    assert_eq!(ops.background.steps(Task::Prune), steps as u64);
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
    assert_eq!(ops.background.steps(Task::Prune), steps as u64);
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
            seen: ids("old", 1, 512),
            ..Default::default()
        })
        .unwrap();
    let pause = Duration::from_secs(3600);
    let mut bg = Background::new(Duration::from_secs(3600), 1, pause);
    assert_eq!(bg.wait(), Duration::ZERO);
    bg.step(store.as_ref(), &ops, RETENTION);
    // One bucket: one id, or the few that share it.
    let left = store.stats().unwrap().seen;
    assert!((508..=511).contains(&left), "{left} left");
    // Turns after turns: no step before the pause has passed.
    for _ in 0..100 {
        bg.step(store.as_ref(), &ops, RETENTION);
    }
    assert_eq!(ops.background.steps(Task::Prune), 1);
    assert_eq!(store.stats().unwrap().seen, left);
    assert!(bg.busy());
    assert!(bg.wait() > Duration::from_secs(3500));
}
