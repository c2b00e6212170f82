//! Exactly-once effect: a message published twice (the same `Nats-Msg-Id`, or the same envelope
//! under another `Nats-Msg-Id` that JetStream's window cannot catch) or redelivered after a
//! broker crash is applied once.

use futures::future::join_all;
use prost::Message as _;
use yeongye_proto::subject::{self, InKind};
use yeongye_tests::wire::{ReferralBuilder, new_id};
use yeongye_tests::{System, process, v1};

use crate::{CENTRE, HOPE, REDELIVERY, SHORT, assert_notified_once_each, barrier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_published_again_has_one_effect() {
    let system = System::builder().adapters(&[CENTRE, HOPE]).start().await;
    let centre = system.wire(CENTRE).await;
    let hope = system.wire(HOPE).await;
    let referral = ReferralBuilder::new(CENTRE, HOPE).build();
    let rid = referral.referral_id.clone();

    // A referral, four times: the same Nats-Msg-Id (JetStream drops it), the same envelope
    // bytes under a fresh Nats-Msg-Id and under none (the stream keeps both: the broker must
    // recognise the envelope's message id).
    let envelope = centre.referral_envelope(&referral);
    let bytes = envelope.encode_to_vec();
    let on = subject::inbound(CENTRE, InKind::Referral);
    let first = centre.publish_envelope(InKind::Referral, &envelope).await;
    let again = centre.publish_envelope(InKind::Referral, &envelope).await;
    assert!(!first.duplicate);
    assert!(
        again.duplicate,
        "JetStream drops a repeated Nats-Msg-Id in its window"
    );
    let other = centre.publish(&on, bytes.clone(), Some(&new_id())).await;
    let none = centre.publish(&on, bytes, None).await;
    assert!(!other.duplicate && !none.duplicate, "the stream keeps both");
    system
        .adapter(CENTRE)
        .wait_notified(&rid, "RECEIVED", SHORT)
        .await;

    // A status update, the same ways.
    let accept = hope.status_envelope(&rid, v1::Status::Accepted, "접수");
    let bytes = accept.encode_to_vec();
    let on = subject::inbound(HOPE, InKind::Status);
    hope.publish_envelope(InKind::Status, &accept).await;
    assert!(
        hope.publish_envelope(InKind::Status, &accept)
            .await
            .duplicate
    );
    hope.publish(&on, bytes.clone(), Some(&new_id())).await;
    hope.publish(&on, bytes, None).await;

    barrier(&system, CENTRE, HOPE).await;
    let (sender, recipient) = (system.adapter(CENTRE), system.adapter(HOPE));
    assert_eq!(
        sender.notified_states(&rid),
        ["DELIVERED", "RECEIVED", "ACCEPTED"],
        "{}",
        sender.describe()
    );
    assert_eq!(recipient.deliveries_of(&rid), 1, "{}", recipient.describe());
    // A repeat applied as a new message would have been refused (DUPLICATE_REFERRAL_ID,
    // ILLEGAL_TRANSITION): nobody got a rejection.
    assert!(sender.rejections().is_empty(), "{}", sender.describe());
    assert!(
        recipient.rejections().is_empty(),
        "{}",
        recipient.describe()
    );
    let reply = centre.query(&rid).await;
    assert_eq!(reply.state(), v1::ReferralState::Accepted);
    assert_eq!(reply.history.len(), 4, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_after_a_broker_crash_has_one_effect() {
    let mut system = System::builder().adapters(&[CENTRE, HOPE]).start().await;
    let centre = system.wire(CENTRE).await;
    let mut all = Vec::new();
    let mut unacked_at_kill = 0;
    // Kill the broker while it holds messages it has acted on (their deliveries are out) but
    // not yet acknowledged. It is frozen first (SIGSTOP) so that what the server says is
    // pending is still true when SIGKILL lands. Up to three tries to catch such a moment.
    for round in 0..3 {
        let batch: Vec<v1::Referral> = (0..100)
            .map(|_| ReferralBuilder::new(CENTRE, HOPE).build())
            .collect();
        let ids: Vec<String> = batch.iter().map(|r| r.referral_id.clone()).collect();
        join_all(batch.iter().map(|r| centre.send_referral(r))).await;
        system
            .adapter(HOPE)
            .wait_lines("a delivery of this round", SHORT, |lines| {
                lines.iter().any(|l| {
                    l.kind() == "delivery"
                        && l.referral_id()
                            .is_some_and(|id| ids.iter().any(|x| x == id))
                })
            })
            .await;
        let pid = system.broker.pid().expect("broker running");
        process::signal(pid, "STOP");
        let info = centre
            .jetstream()
            .get_stream(subject::IN_STREAM)
            .await
            .expect("inbound stream")
            .consumer_info(subject::BROKER_CONSUMER)
            .await
            .expect("broker consumer");
        eprintln!(
            "round {round}: broker frozen with {} unacknowledged, ack floor {}",
            info.num_ack_pending, info.ack_floor.stream_sequence
        );
        unacked_at_kill += info.num_ack_pending;
        system.broker.kill9();
        system.broker.start_again().await;
        all.extend(ids);
        if unacked_at_kill > 0 {
            break;
        }
    }
    assert!(
        unacked_at_kill > 0,
        "the broker had acknowledged everything each time it was killed: redelivery not exercised"
    );

    centre
        .wait_all_in_state(&all, v1::ReferralState::Received, REDELIVERY, || {
            system.describe()
        })
        .await;
    let last = barrier(&system, CENTRE, HOPE).await;
    let (sender, recipient) = (system.adapter(CENTRE), system.adapter(HOPE));
    for rid in &all {
        assert_eq!(recipient.deliveries_of(rid), 1, "deliveries of {rid}");
        assert_notified_once_each(&sender.notified_states(rid), "RECEIVED", rid);
    }
    let mut expected: Vec<String> = all.clone();
    expected.push(last);
    expected.sort();
    assert_eq!(recipient.inbox_files("referrals"), expected);
    assert!(sender.rejections().is_empty(), "{}", sender.describe());
    assert!(
        recipient.rejections().is_empty(),
        "{}",
        recipient.describe()
    );
    for (rid, reply) in all
        .iter()
        .zip(join_all(all.iter().map(|id| centre.query(id))).await)
    {
        let states: Vec<_> = reply.history.iter().map(|h| h.state()).collect();
        let distinct: std::collections::BTreeSet<_> = states.iter().collect();
        assert_eq!(
            distinct.len(),
            states.len(),
            "history of {rid} repeats a state: {states:?}"
        );
    }
}
