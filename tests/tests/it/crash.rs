//! Nothing lost, nothing doubled, while the broker is killed: 1,000 referrals between four
//! agencies (each sends to the other three) while the broker is `kill -9`ed at random moments at
//! least five times and started again. Every referral must end RECEIVED and reach its
//! recipient's inbox exactly once.
//!
//! The random moments come from [`Rng`]; a failing run prints `YEONGYE_TEST_SEED=<n>` to replay.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use yeongye_tests::{ReferralBuilder, Rng, System, v1};

use crate::{REDELIVERY, assert_notified_once_each};

const REFERRALS: usize = 1000;
const KILLS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_repeatedly_under_load_loses_and_doubles_nothing() {
    let mut rng = Rng::from_env("crash");
    let mut system = System::start().await;
    let agencies = system.agencies.clone();

    // Who sends what to whom, fixed up front.
    let mut plan: BTreeMap<String, Vec<v1::Referral>> = BTreeMap::new();
    for i in 0..REFERRALS {
        let from = &agencies[i % agencies.len()];
        let to = &agencies[(i / agencies.len() + i + 1) % agencies.len()];
        let to = if to == from {
            &agencies[(i + 1) % agencies.len()]
        } else {
            to
        };
        plan.entry(from.clone())
            .or_default()
            .push(ReferralBuilder::new(from, to).build());
    }
    let referrals: Vec<v1::Referral> = plan.values().flatten().cloned().collect();

    // Senders publish at a steady pace (about 5 s in all) while the broker is being killed.
    let sent = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for (from, batch) in plan {
        let wire = system.wire(&from).await;
        let sent = Arc::clone(&sent);
        senders.push(tokio::spawn(async move {
            for referral in batch {
                wire.send_referral(&referral).await;
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }

    let started = Instant::now();
    let mut kills = 0;
    while kills < KILLS || sent.load(Ordering::Relaxed) < REFERRALS {
        tokio::time::sleep(Duration::from_millis(rng.range(100, 1200))).await;
        system.broker.kill9();
        kills += 1;
        eprintln!(
            "crash: kill #{kills} at {:?}, {} referrals sent",
            started.elapsed(),
            sent.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(rng.range(0, 400))).await;
        system.broker.start_again().await;
    }
    for sender in senders {
        sender.await.expect("sender task");
    }
    eprintln!("crash: {kills} kills in all");

    // Lookups are allowed to the sender or recipient only: ask as each sender.
    let mut by_sender: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in &referrals {
        by_sender
            .entry(r.from_agency.as_str())
            .or_default()
            .push(r.referral_id.clone());
    }
    for (from, ids) in &by_sender {
        let wire = system.wire(from).await;
        wire.wait_all_in_state(ids, v1::ReferralState::Received, REDELIVERY, || {
            system.broker.log_tail()
        })
        .await;
    }
    eprintln!(
        "crash: all {REFERRALS} RECEIVED after {:?}",
        started.elapsed()
    );

    // Each recipient's adapter printed one delivery line per referral and has one file each.
    let mut inbox: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in &referrals {
        let adapter = system.adapter(&r.to_agency);
        assert_eq!(
            adapter.deliveries_of(&r.referral_id),
            1,
            "deliveries of {} at {}",
            r.referral_id,
            r.to_agency
        );
        inbox
            .entry(r.to_agency.as_str())
            .or_default()
            .push(r.referral_id.clone());
    }
    for (to, mut expected) in inbox {
        expected.sort();
        let adapter = system.adapter(to);
        assert_eq!(adapter.inbox_files("referrals"), expected, "inbox of {to}");
        assert_eq!(
            adapter.lines_of("delivery").len(),
            expected.len(),
            "delivery lines at {to}"
        );
    }
    // Every sender is told of every receipt, each state once; nobody was refused anything.
    for (from, ids) in &by_sender {
        system
            .adapter(from)
            .wait_lines(
                "RECEIVED notifications for all it sent",
                REDELIVERY,
                |lines| {
                    let received: std::collections::BTreeSet<&str> = lines
                        .iter()
                        .filter(|l| {
                            l.kind() == "notification" && l.state().as_deref() == Some("RECEIVED")
                        })
                        .filter_map(|l| l.referral_id())
                        .collect();
                    ids.iter().all(|id| received.contains(id.as_str()))
                },
            )
            .await;
    }
    for r in &referrals {
        let states = system
            .adapter(&r.from_agency)
            .notified_states(&r.referral_id);
        assert_notified_once_each(&states, "RECEIVED", &r.referral_id);
    }
    for adapter in system.adapters() {
        assert!(adapter.rejections().is_empty(), "{}", adapter.describe());
    }
}

/// A leader does not wait for its store to reach the disk (the state log holds every turn): a
/// broker killed before its store wrote anything reads its turns back from the log when it
/// starts again, and nothing is lost or doubled. sled's own flusher is off here (a testing
/// key), so every turn since the start is still only in memory when the kill lands: without
/// the log the restarted broker would have forgotten all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_before_its_store_reached_the_disk_reads_its_turns_back_from_the_log() {
    let mut system = System::builder()
        .adapters(&[crate::CENTRE, crate::HOPE])
        .broker_config(|c| {
            c.extra
                .insert("testing_store_without_background_flush".into(), true.into());
        })
        .start()
        .await;
    let wire = system.wire(crate::CENTRE).await;
    let first: Vec<v1::Referral> = (0..30)
        .map(|_| ReferralBuilder::new(crate::CENTRE, crate::HOPE).build())
        .collect();
    for r in &first {
        wire.send_referral(r).await;
    }
    let ids: Vec<String> = first.iter().map(|r| r.referral_id.clone()).collect();
    wire.wait_all_in_state(&ids, v1::ReferralState::Received, REDELIVERY, || {
        system.broker.log_tail()
    })
    .await;

    system.broker.kill9();
    system.broker.start_again().await;
    let log = std::fs::read_to_string(system.broker.log_path()).unwrap_or_default();
    let this_run = log.rsplit("broker start #2").next().unwrap_or_default();
    assert!(
        this_run.contains("the store is behind the state log"),
        "the restarted broker's store should have lost its unflushed turns:\n{}",
        system.broker.log_tail()
    );

    // What it had done is all there, and it goes on.
    let second: Vec<v1::Referral> = (0..10)
        .map(|_| ReferralBuilder::new(crate::CENTRE, crate::HOPE).build())
        .collect();
    for r in &second {
        wire.send_referral(r).await;
    }
    let all: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|r| r.referral_id.clone())
        .collect();
    wire.wait_all_in_state(&all, v1::ReferralState::Received, REDELIVERY, || {
        system.broker.log_tail()
    })
    .await;
    let hope = system.adapter(crate::HOPE);
    for id in &all {
        assert_eq!(hope.deliveries_of(id), 1, "deliveries of {id}");
    }
    let mut inbox = all.clone();
    inbox.sort();
    assert_eq!(hope.inbox_files("referrals"), inbox);
    // The sender hears of each receipt (its adapter may still be reading when the broker's
    // state already says RECEIVED), each state once.
    for id in &all {
        system
            .adapter(crate::CENTRE)
            .wait_notified(id, "RECEIVED", REDELIVERY)
            .await;
        let states = system.adapter(crate::CENTRE).notified_states(id);
        assert_notified_once_each(&states, "RECEIVED", id);
    }
}
