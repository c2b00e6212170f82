//! The store alone: handled ids, pruning, reopening, the lock, and group commit.

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use super::*;

fn open(dir: &tempfile::TempDir, retention_days: u32) -> Storage {
    Storage::open(&dir.path().join("dedup"), retention_days).unwrap()
}

/// Many items completed at once: each records its ids and waits for the flush. With sled
/// 0.34's `flush_async` this hung for good (sled #1308), with the runtime's workers stuck, so
/// the work runs on a runtime of its own thread and the test waits for it with a plain
/// timeout, to fail with a message instead of hanging.
#[test]
fn concurrent_records_and_flushes_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 14);
    let (tx, rx) = std_mpsc::channel();
    let worker = store.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let result = rt.block_on(async move {
            let mut tasks = Vec::new();
            for task in 0..32 {
                let store = worker.clone();
                tasks.push(tokio::spawn(async move {
                    for n in 0..20 {
                        let id = format!("m-{task}-{n}");
                        store
                            .record_all(&[&id, &format!("{id}-receipt")], 1_000)
                            .await?;
                    }
                    Ok::<(), Error>(())
                }));
            }
            futures::future::join_all(tasks).await
        });
        let _ = tx.send(result);
    });
    let results = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("32 tasks recording and flushing at once did not finish within 60 s (hung?)");
    for r in results {
        r.unwrap().unwrap();
    }
    assert_eq!(store.handled_len(), 32 * 20 * 2);
    // They shared flushes: never more groups than commits.
    assert!(store.groups_committed() <= 32 * 20);
}

#[tokio::test]
async fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir, 14);
        assert!(!store.contains("m-1").unwrap());
        store.record_all(&["m-1"], 1_000).await.unwrap();
        store.record_all(&["m-1"], 2_000).await.unwrap();
    }
    // Dropping the last handle joined the writer; opening waits out sled's lock release.
    let store = open(&dir, 14);
    assert!(store.contains("m-1").unwrap());
    assert_eq!(store.recorded_at("m-1").unwrap(), Some(1_000));
    assert!(!store.contains("m-2").unwrap());
}

#[test]
fn second_open_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(&dir, 14);
    let e = Storage::open(&dir.path().join("dedup"), 14).err().unwrap();
    assert!(matches!(e, Error::StateDirInUse { .. }), "{e}");
}

#[tokio::test]
async fn records_several_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 14);
    store.record_all(&["a"], 5).await.unwrap();
    store.record_all(&["a", "b", "c"], 9).await.unwrap();
    assert_eq!(store.recorded_at("a").unwrap(), Some(5));
    assert_eq!(store.recorded_at("b").unwrap(), Some(9));
    assert_eq!(store.recorded_at("c").unwrap(), Some(9));
    assert_eq!(store.handled_len(), 3);
}

#[tokio::test]
async fn prunes_only_old_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 1);
    let now = 10 * DAY_MS;
    store
        .record_all(&["old-1"], now - 2 * DAY_MS)
        .await
        .unwrap();
    store
        .record_all(&["old-2"], now - DAY_MS - 1)
        .await
        .unwrap();
    store
        .record_all(&["new-1"], now - DAY_MS + 1)
        .await
        .unwrap();
    store.record_all(&["new-2"], now).await.unwrap();
    assert_eq!(store.prune_handled(now).await.unwrap(), 2);
    assert!(!store.contains("old-1").unwrap());
    assert!(!store.contains("old-2").unwrap());
    assert!(store.contains("new-1").unwrap());
    assert!(store.contains("new-2").unwrap());
    assert_eq!(store.handled_len(), 2);
    assert_eq!(store.prune_handled(now).await.unwrap(), 0);
}

#[test]
fn time_keys_sort_by_time() {
    assert!(time_key(1, b"z") < time_key(2, b"a"));
    assert_eq!(split_time_key(&time_key(42, b"id")), Some((42, &b"id"[..])));
    assert_eq!(time_key(-5, b""), time_key(0, b""));
}

/// Holds the writer inside a first group until released, so that what is submitted meanwhile
/// queues up and forms the next group, deterministically.
fn hold_writer(store: &Storage) -> (oneshot::Receiver<Result<()>>, std_mpsc::Sender<()>) {
    let (release, held) = std_mpsc::channel::<()>();
    let held = Mutex::new(held);
    let (entered_tx, entered) = std_mpsc::channel::<()>();
    let first = store
        .submit(move |_tx| {
            let _ = entered_tx.send(());
            let _ = lock(&held).recv_timeout(Duration::from_secs(30));
            Ok(())
        })
        .unwrap();
    entered
        .recv_timeout(Duration::from_secs(30))
        .expect("the writer took the first group");
    (first, release)
}

#[tokio::test]
async fn waiters_ready_together_share_one_flush() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 14);
    let (first, release) = hold_writer(&store);
    let waiters: Vec<_> = (0..5)
        .map(|n| {
            store
                .submit(move |tx| tx.record(&format!("m-{n}"), 7).map(|new| (n, new)))
                .unwrap()
        })
        .collect();
    release.send(()).unwrap();
    first.await.unwrap().unwrap();
    for (n, waiter) in waiters.into_iter().enumerate() {
        assert_eq!(waiter.await.unwrap().unwrap(), (n, true));
        assert!(store.contains(&format!("m-{n}")).unwrap());
    }
    // The held group and the five together: two flushes, not six.
    assert_eq!(store.groups_committed(), 2);
}

#[tokio::test]
async fn a_failed_group_fails_every_waiter_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 14);
    let (first, release) = hold_writer(&store);
    let before = tx_ok(store.submit(|tx| tx.record("a", 1)).unwrap());
    let failing = store.submit(|tx| tx.fail("disk trouble")).unwrap();
    let after = tx_ok(store.submit(|tx| tx.record("b", 1)).unwrap());
    release.send(()).unwrap();
    first.await.unwrap().unwrap();
    for waiter in [
        before.await,
        failing.await.unwrap().map(|()| true),
        after.await,
    ] {
        let e = waiter.unwrap_err();
        assert!(matches!(e, Error::Store { .. }), "{e}");
    }
    // The group's transaction was rolled back: neither record was made.
    assert!(!store.contains("a").unwrap());
    assert!(!store.contains("b").unwrap());
    assert_eq!(store.groups_committed(), 1);
    // The store goes on: the next group commits.
    store.record_all(&["a"], 1).await.unwrap();
    assert!(store.contains("a").unwrap());
}

async fn tx_ok(waiter: oneshot::Receiver<Result<bool>>) -> Result<bool> {
    waiter.await.unwrap()
}

#[tokio::test]
async fn queue_and_idempotency_trees_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 14);
    let seq = store
        .commit(|tx| {
            assert!(tx.record("m-1", 3)?);
            tx.queue_push("m-1", b"entry")
        })
        .await
        .unwrap();
    assert_eq!(store.queue_index("m-1").unwrap(), Some(seq));
    assert_eq!(
        store.queue_pending(10).await.unwrap(),
        [(seq, b"entry".to_vec())]
    );
    assert_eq!(store.queue_pending_len(), 1);
    store
        .commit(move |tx| {
            let bytes = tx.pending_remove(seq)?.unwrap_or_default();
            tx.finishing_put(seq, &bytes)?;
            tx.idempotency_put("k", b"old")
        })
        .await
        .unwrap();
    assert!(store.queue_pending(10).await.unwrap().is_empty());
    assert_eq!(
        store.queue_finishing().await.unwrap(),
        [(seq, b"entry".to_vec())]
    );
    assert_eq!(
        store.idempotency_record("k").unwrap(),
        Some(b"old".to_vec())
    );
    assert_eq!(store.prune_idempotency(|v| v == b"old").await.unwrap(), 1);
    assert_eq!(store.idempotency_record("k").unwrap(), None);
}

/// A store written before this module (the same trees, written by hand here as the old
/// `DedupStore` and queue wrote them, queue seqs from sled's `generate_id`) opens with its
/// data, and new queue entries sort after the old ones.
#[tokio::test]
async fn a_store_written_before_opens_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dedup");
    let old_seq = {
        let db = sled::open(&path).unwrap();
        let handled = db.open_tree(HANDLED).unwrap();
        handled.insert("m-old", &5i64.to_be_bytes()).unwrap();
        db.open_tree(BY_TIME)
            .unwrap()
            .insert(time_key(5, b"m-old"), &[])
            .unwrap();
        let seq = db.generate_id().unwrap() + 1000;
        db.open_tree(PENDING)
            .unwrap()
            .insert(seq.to_be_bytes(), b"old entry".as_slice())
            .unwrap();
        db.open_tree(INDEX)
            .unwrap()
            .insert("m-old", &seq.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
        seq
    };
    let store = Storage::open(&path, 14).unwrap();
    assert_eq!(store.recorded_at("m-old").unwrap(), Some(5));
    assert_eq!(store.queue_index("m-old").unwrap(), Some(old_seq));
    let new_seq = store
        .commit(|tx| tx.queue_push("m-new", b"new entry"))
        .await
        .unwrap();
    assert!(new_seq > old_seq);
    let pending = store.queue_pending(10).await.unwrap();
    assert_eq!(
        pending,
        [
            (old_seq, b"old entry".to_vec()),
            (new_seq, b"new entry".to_vec())
        ]
    );
    // Pruning reads the old index lines too.
    assert_eq!(store.prune_handled(20 * DAY_MS).await.unwrap(), 1);
    assert!(!store.contains("m-old").unwrap());
}
