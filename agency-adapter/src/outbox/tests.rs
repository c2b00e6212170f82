//! The outbox on a real sled store: the record's encoding and its checks, order across a
//! reopen, corrupt records set aside without losing the others, and the bound. (Forwarding
//! against a real nats-server: `tests/it/outbox.rs` of this crate and of `yeongye-tests`.)

#![allow(clippy::unwrap_used)]

use super::*;

fn record(n: u32) -> Record {
    let message_id = format!("m-{n:04}");
    let envelope = v1::Envelope {
        message_id: message_id.clone(),
        sender: "cc-1".into(),
        ..Default::default()
    };
    Record {
        enqueued_at_ms: 1_700_000_000_000 + i64::from(n),
        message_id,
        subject: "yeongye.in.cc-1.referral".into(),
        referral_id: format!("r-{n}"),
        consent_id: String::new(),
        payload: prost::Message::encode_to_vec(&envelope),
    }
}

fn outgoing(n: u32) -> (Outgoing, Bytes) {
    let r = record(n);
    let envelope: v1::Envelope = prost::Message::decode(r.payload.as_slice()).unwrap();
    let out = Outgoing::from_parts(r.subject, r.referral_id, String::new(), envelope);
    (out, Bytes::from(r.payload))
}

fn limits(max_entries: u64, max_bytes: u64) -> OutboxConfig {
    OutboxConfig {
        max_entries,
        max_bytes,
        queue_after_ms: 100,
    }
}

fn open(dir: &std::path::Path) -> Storage {
    Storage::open(&dir.join("dedup"), 14).unwrap()
}

#[test]
fn record_round_trip() {
    let r = record(7);
    assert_eq!(Record::decode(&r.encode()).unwrap(), r);
}

#[test]
fn damaged_records_are_named_not_trusted() {
    let good = record(1).encode();
    // Every truncation and every flipped byte is refused, with a reason.
    for len in 0..good.len() {
        let why = Record::decode(&good[..len]).unwrap_err();
        assert!(!why.is_empty());
    }
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x40;
        assert!(
            Record::decode(&bad).is_err(),
            "byte {i} flipped was accepted"
        );
    }
    // Well-formed and checksummed, but breaking the rules: still refused.
    let mut r = record(2);
    r.subject = "yeongye.out.cc-1.delivery".into();
    assert!(Record::decode(&r.encode()).unwrap_err().contains("subject"));
    let mut r = record(3);
    r.message_id = "m-other".into();
    assert!(
        Record::decode(&r.encode())
            .unwrap_err()
            .contains("message id")
    );
    let mut r = record(4);
    r.message_id = "not an id!".into();
    assert!(
        Record::decode(&r.encode())
            .unwrap_err()
            .contains("message_id")
    );
    assert!(Record::decode(b"garbage that is long enough").is_err());
}

#[tokio::test]
async fn entries_keep_their_order_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut seqs = Vec::new();
    {
        let outbox = Outbox::load(open(dir.path()), limits(100, 1 << 20), None)
            .await
            .unwrap();
        for n in 0..20 {
            let (out, payload) = outgoing(n);
            seqs.push(outbox.enqueue(&out, payload).await.unwrap().0);
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let status = outbox.status();
        assert_eq!(status.depth, 20);
        assert!(outbox.holds("m-0000"));
        // As if forwarded: the first five acknowledged.
        for seq in &seqs[..5] {
            outbox.acknowledged(*seq);
        }
        assert_eq!(outbox.status().depth, 15);
        assert!(!outbox.holds("m-0000"));
    }
    // Reopened (the store was closed with the last handle): the other 15, in order, whole.
    let store = open(dir.path());
    let outbox = Outbox::load(store.clone(), limits(100, 1 << 20), None)
        .await
        .unwrap();
    let status = outbox.status();
    assert_eq!(status.depth, 15);
    assert!(status.oldest_queued_at_ms.is_some() && status.oldest_age_ms.is_some());
    let kept = store.outbox_after(0, usize::MAX).await.unwrap();
    let ids: Vec<String> = kept
        .iter()
        .map(|(_, b)| Record::decode(b).unwrap().message_id)
        .collect();
    let expected: Vec<String> = (5..20).map(|n| format!("m-{n:04}")).collect();
    assert_eq!(ids, expected);
    // A new entry goes behind them.
    let (out, payload) = outgoing(99);
    let (seq, _) = outbox.enqueue(&out, payload).await.unwrap();
    assert!(seq > *seqs.last().unwrap());
}

#[tokio::test]
async fn a_corrupt_record_is_set_aside_and_the_others_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let outbox = Outbox::load(store.clone(), limits(100, 1 << 20), None)
            .await
            .unwrap();
        for n in 0..3 {
            let (out, payload) = outgoing(n);
            outbox.enqueue(&out, payload).await.unwrap();
        }
        // The middle one damaged on disk (seqs start at 1), and one garbage record after them.
        let mut bytes = store.outbox_get(2).unwrap().unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        store.outbox_put_raw(2, &bytes).unwrap();
        store.outbox_put_raw(9, b"\x00\x01").unwrap();
    }
    let store = open(dir.path());
    let outbox = Outbox::load(store.clone(), limits(100, 1 << 20), None)
        .await
        .unwrap();
    let status = outbox.status();
    assert_eq!(status.depth, 2, "{status:?}");
    let corrupt: Vec<u64> = status.corrupt.iter().map(|c| c.seq).collect();
    assert_eq!(corrupt, vec![2, 9]);
    assert!(status.corrupt[0].error.contains("checksum"), "{status:?}");
    assert!(status.corrupt[1].error.contains("shorter"), "{status:?}");
    assert!(outbox.holds("m-0000") && outbox.holds("m-0002"));
    // Set aside, not deleted; and a later start still names them.
    assert_eq!(store.outbox_corrupt_seqs().await.unwrap(), vec![2, 9]);
    drop((outbox, store));
    let outbox = Outbox::load(open(dir.path()), limits(100, 1 << 20), None)
        .await
        .unwrap();
    let status = outbox.status();
    assert_eq!(status.depth, 2);
    assert_eq!(status.corrupt.len(), 2);
    // New seqs never reuse a set-aside one.
    let (out, payload) = outgoing(5);
    assert!(outbox.enqueue(&out, payload).await.unwrap().0 > 9);
}

#[tokio::test]
async fn past_its_bound_the_outbox_refuses_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::load(open(dir.path()), limits(3, 1 << 20), None)
        .await
        .unwrap();
    for n in 0..3 {
        let (out, payload) = outgoing(n);
        outbox.enqueue(&out, payload).await.unwrap();
    }
    let (out, payload) = outgoing(3);
    let err = outbox.enqueue(&out, payload).await.unwrap_err();
    assert!(matches!(err, Error::OutboxFull { entries: 3, .. }), "{err}");
    assert!(err.to_string().contains("outbox is full"), "{err}");
    assert_eq!(outbox.status().depth, 3);
    assert!(!outbox.holds("m-0003"));

    // By bytes too.
    let dir = tempfile::tempdir().unwrap();
    let (out, payload) = outgoing(0);
    let size = payload.len() as u64;
    let outbox = Outbox::load(open(dir.path()), limits(100, size * 2), None)
        .await
        .unwrap();
    outbox.enqueue(&out, payload.clone()).await.unwrap();
    let (out1, payload1) = outgoing(1);
    outbox.enqueue(&out1, payload1).await.unwrap();
    let (out2, payload2) = outgoing(2);
    assert!(matches!(
        outbox.enqueue(&out2, payload2).await,
        Err(Error::OutboxFull { .. })
    ));
    assert_eq!(outbox.status().bytes, size * 2);
}

#[tokio::test]
async fn the_status_file_is_written_for_another_process_to_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(STATUS_FILE);
    let outbox = Outbox::load(open(dir.path()), limits(100, 1 << 20), Some(file.clone()))
        .await
        .unwrap();
    let (out, payload) = outgoing(0);
    outbox.enqueue(&out, payload).await.unwrap();
    let cancel = CancellationToken::new();
    let writer = tokio::spawn(outbox.clone().write_status(cancel.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read(&file) {
            let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
            if v["outbox"]["depth"] == 1 {
                assert_eq!(v["pid"], std::process::id());
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no status file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    writer.await.unwrap();
}

#[test]
fn a_status_file_that_is_not_an_outbox_status_is_a_clear_error() {
    let file = std::path::Path::new("/state/outbox-status.json");
    for (text, why) in [
        (&b"not json"[..], "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"\"outbox\"", "not a JSON object"),
        (b"{}", "no outbox object"),
        (b"{\"outbox\": 7}", "no outbox object"),
        (b"{\"outbox\": [1]}", "no outbox object"),
    ] {
        let err = status_from_file(text, file, 1_000).unwrap_err().to_string();
        assert!(
            err.contains(why) && err.contains("outbox-status.json"),
            "{err}"
        );
    }
    // Times from anywhere: never an overflow, never a negative age.
    for (at, age) in [(i64::MIN, i64::MAX as u64), (i64::MAX, 0), (400, 600)] {
        let text = format!("{{\"outbox\": {{\"depth\": 1, \"oldest_queued_at_ms\": {at}}}}}");
        let v = status_from_file(text.as_bytes(), file, 1_000).unwrap();
        assert_eq!(v["outbox"]["oldest_age_ms"], age, "{at}");
        assert_eq!(v["source"], "status file");
    }
}
