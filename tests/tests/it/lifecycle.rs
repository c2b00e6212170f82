//! A referral's whole life, sender to recipient and back, through the adapter's command line
//! and its `run` loop: SUBMITTED, DELIVERED (the sender's first notification), RECEIVED (the
//! recipient's adapter sends it by itself), ACCEPTED, IN_PROGRESS, COMPLETED. And who may look
//! a referral up.

use yeongye_tests::wire::{ReferralBuilder, receipt_message_id};
use yeongye_tests::{System, v1};

use crate::{CENTRE, HOPE, LIFE, SHORT, WELFARE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_sender_to_recipient_and_back() {
    // The recipient's adapter starts only once the referral is DELIVERED, so that the receipt
    // cannot overtake the broker's own DELIVERED and the order of states is fixed.
    let mut system = System::builder().adapters(&[CENTRE, WELFARE]).start().await;
    let referral = ReferralBuilder::new(CENTRE, HOPE)
        .urgency(v1::Urgency::Crisis)
        .field(v1::FieldOfNeed::Housing)
        .reason("단전 3개월, 주거 위기")
        .build();
    let rid = referral.referral_id.clone();

    // Send with the command line, as an agency system without the SDK would.
    let file = system.dir().join("referral.json");
    std::fs::write(&file, serde_json::to_vec(&referral).expect("JSON")).expect("write");
    let sent = system
        .adapter(CENTRE)
        .cli(&["send", file.to_str().expect("utf-8 path")])
        .await;
    sent.assert_success();
    assert_eq!(
        sent.json()["referral_id"],
        rid,
        "send prints the referral id"
    );

    let sender = system.adapter(CENTRE);
    sender.wait_notified(&rid, "DELIVERED", SHORT).await;

    // The recipient's adapter takes the delivery into its inbox and acknowledges by itself.
    system.start_adapter(HOPE);
    let recipient = system.adapter(HOPE);
    recipient
        .wait_lines("the delivery", SHORT, |lines| {
            lines
                .iter()
                .any(|l| l.kind() == "delivery" && l.referral_id() == Some(rid.as_str()))
        })
        .await;
    assert_eq!(recipient.inbox_files("referrals"), vec![rid.clone()]);
    let handed = recipient.inbox_json("referrals", &rid).to_string();
    assert!(
        handed.contains("단전 3개월, 주거 위기"),
        "the inbox file holds the referral: {handed}"
    );
    let sender = system.adapter(CENTRE);
    sender.wait_notified(&rid, "RECEIVED", SHORT).await;

    // The recipient's case worker moves it on, one step at a time.
    for (status, state, note) in [
        ("accepted", "ACCEPTED", "담당자 배정"),
        ("in-progress", "IN_PROGRESS", "가정 방문 완료"),
        ("completed", "COMPLETED", "긴급 주거지원 연계 완료"),
    ] {
        let out = recipient
            .cli(&["update", &rid, status, "--note", note])
            .await;
        out.assert_success();
        sender.wait_notified(&rid, state, SHORT).await;
    }

    // The sender saw every state exactly once, in order, from DELIVERED on (the broker tells
    // the sender once the delivery is in the recipient's stream).
    assert_eq!(
        sender.notified_states(&rid),
        LIFE[1..],
        "{}",
        sender.describe()
    );
    // Each note reached the sender's inbox opened (it was sealed to the sender's key).
    let notes: Vec<String> = sender
        .lines_of("notification")
        .iter()
        .filter(|l| l.referral_id() == Some(rid.as_str()))
        .filter_map(|l| sender.item_file(l))
        .filter_map(|n| n["note"].as_str().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .collect();
    assert_eq!(
        notes,
        ["담당자 배정", "가정 방문 완료", "긴급 주거지원 연계 완료"],
        "{}",
        sender.describe()
    );
    // The recipient was told of nothing (it made every change after delivery itself).
    assert_eq!(recipient.notified_states(&rid), Vec::<String>::new());
    assert_eq!(recipient.deliveries_of(&rid), 1);
    assert!(sender.rejections().is_empty(), "{}", sender.describe());
    assert!(
        recipient.rejections().is_empty(),
        "{}",
        recipient.describe()
    );

    // The status lookup tells the same story, by the right parties, in time order.
    let wire = system.wire(CENTRE).await;
    let reply = wire.query(&rid).await;
    assert_eq!(reply.error, None);
    assert_eq!(reply.state(), v1::ReferralState::Completed);
    assert_eq!(
        (reply.from_agency.as_str(), reply.to_agency.as_str()),
        (CENTRE, HOPE)
    );
    assert!(
        reply.receive_by_ms > 0,
        "a crisis referral has a receipt deadline"
    );
    let states: Vec<&str> = reply
        .history
        .iter()
        .map(|h| {
            h.state()
                .as_str_name()
                .trim_start_matches("REFERRAL_STATE_")
        })
        .collect();
    assert_eq!(states, LIFE);
    let by: Vec<&str> = reply.history.iter().map(|h| h.by_agency.as_str()).collect();
    assert_eq!(by, [CENTRE, "broker", HOPE, HOPE, HOPE, HOPE]);
    assert!(
        reply.history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "history in time order: {reply:?}"
    );
    // The note went sealed to the sender: the broker's history holds it, unreadable.
    assert_eq!(reply.history[4].note, "");
    let sealed = reply.history[4]
        .sealed_note
        .as_ref()
        .expect("a sealed note");
    assert!(
        !sealed
            .ciphertext
            .windows("가정 방문 완료".len())
            .any(|w| w == "가정 방문 완료".as_bytes())
    );
    // The receipt is the one the adapter derives from the delivery's message id.
    let delivery = recipient
        .lines_of("delivery")
        .into_iter()
        .find(|l| l.referral_id() == Some(rid.as_str()))
        .expect("delivery line");
    let delivery_id = delivery.message_id().expect("delivery message id");
    assert_eq!(
        reply.history[2].cause_message_id,
        receipt_message_id(delivery_id)
    );

    // The command line's lookup agrees.
    let out = sender.cli(&["status", &rid]).await;
    out.assert_success();
    let json = out.json().to_string();
    assert!(json.contains("REFERRAL_STATE_COMPLETED"), "{json}");

    // The recipient may look it up too; a third agency cannot tell it from an unknown id.
    let hope = system.wire(HOPE).await;
    assert_eq!(hope.query(&rid).await.state(), v1::ReferralState::Completed);
    let third = system.wire(WELFARE).await;
    for id in [rid.as_str(), "0190f0e4-0000-7000-8000-00000000dead"] {
        let reply = third.query(id).await;
        let error = reply
            .error
            .clone()
            .unwrap_or_else(|| panic!("a third agency's lookup of {id} must fail: {reply:?}"));
        assert_eq!(error.code(), v1::ReasonCode::UnknownReferral, "{reply:?}");
        assert_eq!(reply.history, vec![], "nothing leaks: {reply:?}");
        assert_eq!(
            reply.state(),
            v1::ReferralState::Unspecified,
            "nothing leaks: {reply:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_is_told_to_both_sides() {
    let system = System::builder().adapters(&[CENTRE, HOPE]).start().await;
    let wire = system.wire(CENTRE).await;
    let referral = ReferralBuilder::new(CENTRE, HOPE).build();
    let rid = referral.referral_id.clone();
    wire.send_referral(&referral).await;
    system
        .adapter(CENTRE)
        .wait_notified(&rid, "RECEIVED", SHORT)
        .await;

    wire.update_status(&rid, v1::Status::Cancelled, "가구 전출")
        .await;
    system
        .adapter(CENTRE)
        .wait_notified(&rid, "CANCELLED", SHORT)
        .await;
    system
        .adapter(HOPE)
        .wait_notified(&rid, "CANCELLED", SHORT)
        .await;
    assert_eq!(
        system.adapter(HOPE).notified_states(&rid),
        ["CANCELLED"],
        "the recipient hears of the cancellation only"
    );

    // Ended: the recipient can no longer accept it.
    let hope = system.wire(HOPE).await;
    let update = hope.update_status(&rid, v1::Status::Accepted, "").await;
    system
        .adapter(HOPE)
        .wait_rejected(&update, "TERMINAL_STATE", SHORT)
        .await;
    assert_eq!(wire.state(&rid).await, Some(v1::ReferralState::Cancelled));
}
