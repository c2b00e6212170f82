//! The SDK against a real nats-server, with the test playing the broker.

use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use yeongye_adapter::{Adapter, AdapterConfig, ErrorKind, ItemKind, Sent, ids, v1};
use yeongye_proto::subject::{self, OutKind};

use crate::harness::*;

fn config(server: &NatsServer, state: &std::path::Path) -> AdapterConfig {
    AdapterConfig::new(ME, [server.url()], state)
}

#[tokio::test]
async fn send_and_update_are_stored_with_their_message_ids() {
    let server = NatsServer::start();
    let broker = Broker::setup(&server, Duration::from_secs(120), Duration::from_secs(30)).await;
    let state = tempfile::tempdir().unwrap();
    let adapter = Adapter::connect(config(&server, state.path()))
        .await
        .unwrap();

    let referral_id = adapter.send(outgoing_referral("p-1")).await.unwrap();
    let m = broker.inbound_message(1).await;
    assert_eq!(m.subject.as_str(), "yeongye.in.cc-1.referral");
    let env = v1::Envelope::decode(m.payload.as_ref()).unwrap();
    assert_eq!(
        m.headers.get("Nats-Msg-Id").unwrap().as_str(),
        env.message_id
    );
    assert_eq!(env.sender, ME);
    let r = v1::Referral::decode(env.payload.as_ref()).unwrap();
    assert_eq!(
        (r.referral_id.as_str(), r.from_agency.as_str()),
        (referral_id.as_str(), ME)
    );

    // Publishing the same prepared message twice stores it once.
    let out = adapter.prepare_referral(outgoing_referral("p-2")).unwrap();
    adapter.publish(&out).await.unwrap();
    adapter.publish(&out).await.unwrap();
    assert_eq!(broker.inbound_count().await, 2);

    let message_id = adapter
        .update_status(&referral_id, v1::Status::Cancelled, "duplicate")
        .await
        .unwrap();
    let m = broker.inbound_message(3).await;
    assert_eq!(m.subject.as_str(), "yeongye.in.cc-1.status");
    let (id, update) = status_update_of(&m);
    assert_eq!(id, message_id);
    assert_eq!(update.status, v1::Status::Cancelled as i32);

    // Invalid input is refused before anything is sent: an empty referral, one without a
    // legal basis, one without a purpose.
    let e = adapter.send(v1::Referral::default()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let mut no_basis = outgoing_referral("p-3");
    no_basis.legal_basis = None;
    let e = adapter.send(no_basis).await.unwrap_err();
    assert!(e.to_string().contains("legal_basis"), "{e}");
    let mut no_purpose = outgoing_referral("p-3");
    no_purpose.purpose = 0;
    let e = adapter.send(no_purpose).await.unwrap_err();
    assert!(e.to_string().contains("purpose"), "{e}");
    assert_eq!(broker.inbound_count().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_messages_are_stored_with_their_message_ids() {
    let server = NatsServer::start();
    let broker = Broker::setup(&server, Duration::from_secs(120), Duration::from_secs(30)).await;
    let state = tempfile::tempdir().unwrap();
    let adapter = Adapter::connect(config(&server, state.path()))
        .await
        .unwrap();
    let grant = v1::ConsentGrant {
        client_pseudonym_id: "p-1".into(),
        recipient_agencies: vec!["hope-support".into()],
        purposes: vec![v1::Purpose::CaseManagement as i32],
        data_categories: vec![v1::DataCategory::Identity as i32],
        form_reference: "form-1".into(),
        ..Default::default()
    };
    let consent_id = adapter.grant_consent(grant.clone()).await.unwrap();
    let (_, env) = inbound_envelope(&broker.inbound_message(1).await);
    assert_eq!(env.payload_type, v1::PayloadType::ConsentGrant as i32);
    let g = v1::ConsentGrant::decode(env.payload.as_ref()).unwrap();
    assert_eq!(
        (g.consent_id.as_str(), g.collected_by.as_str()),
        (consent_id.as_str(), ME)
    );

    let message_id = adapter.revoke_consent(&consent_id, Some(5)).await.unwrap();
    let m = broker.inbound_message(2).await;
    assert_eq!(m.subject.as_str(), "yeongye.in.cc-1.consent");
    let (id, env) = inbound_envelope(&m);
    assert_eq!(id, message_id);
    let r = v1::ConsentRevocation::decode(env.payload.as_ref()).unwrap();
    assert_eq!((r.revoked_at_ms, r.recorded_by.as_str()), (5, ME));

    let fresh = adapter.confirm_purge("r-1", &consent_id).await.unwrap();
    let derived = adapter
        .confirm_purge_of("w-1", "r-1", &consent_id)
        .await
        .unwrap();
    assert_eq!(derived, ids::purge_message_id("w-1"));
    let m = broker.inbound_message(3).await;
    assert_eq!(m.subject.as_str(), "yeongye.in.cc-1.purge");
    assert_eq!(inbound_envelope(&m).0, fresh);
    assert_eq!(
        inbound_envelope(&broker.inbound_message(4).await).0,
        derived
    );

    // A grant naming another collector, a bad id: refused, nothing sent.
    let mut other = grant.clone();
    other.collected_by = "hope-support".into();
    let e = adapter.grant_consent(other).await.unwrap_err();
    assert!(e.to_string().contains("collected_by"), "{e}");
    assert!(adapter.revoke_consent("a b", None).await.is_err());
    assert!(adapter.confirm_purge("", "c").await.is_err());
    assert_eq!(broker.inbound_count().await, 4);

    // The consent query, answered by the test as the broker.
    let mut queries = broker.client.subscribe(subject::query(ME)).await.unwrap();
    let responder = broker.client.clone();
    tokio::spawn(async move {
        while let Some(q) = queries.next().await {
            let env = v1::Envelope::decode(q.payload.as_ref()).unwrap();
            assert_eq!(env.payload_type, v1::PayloadType::ConsentQuery as i32);
            let query = v1::ConsentQuery::decode(env.payload.as_ref()).unwrap();
            let reply = v1::ConsentReply {
                grant: Some(v1::ConsentGrant {
                    consent_id: query.consent_id,
                    ..Default::default()
                }),
                revoked: true,
                pending_purges: vec![v1::PendingPurge {
                    referral_id: "r-1".into(),
                    agency: "hope-support".into(),
                }],
                ..Default::default()
            };
            let out = envelope(
                "broker",
                "x",
                v1::PayloadType::ConsentReply,
                reply.encode_to_vec(),
            );
            responder
                .publish(q.reply.unwrap(), out.encode_to_vec().into())
                .await
                .unwrap();
        }
    });
    synced(&broker.client).await;
    let reply = adapter.consent(&consent_id).await.unwrap();
    assert!(reply.revoked);
    assert_eq!(reply.grant.unwrap().consent_id, consent_id);
    assert_eq!(reply.pending_purges.len(), 1);
}

#[tokio::test]
async fn withdrawals_are_confirmed_once_purged() {
    let server = NatsServer::start();
    let broker = Broker::setup(&server, Duration::from_millis(100), Duration::from_secs(30)).await;
    let state = tempfile::tempdir().unwrap();
    let adapter = Adapter::connect(config(&server, state.path()))
        .await
        .unwrap();
    let mut incoming = adapter.incoming().await.unwrap();

    broker
        .publish_out(OutKind::Delivery, delivery_bytes("d-1", "r-1"), Some("d-1"))
        .await;
    incoming
        .next()
        .await
        .unwrap()
        .unwrap()
        .done()
        .await
        .unwrap();
    assert_eq!(
        inbound_envelope(&broker.inbound_message(1).await).0,
        ids::receipt_message_id("d-1")
    );

    // The withdrawal: purge (the test's part), confirm, done.
    broker
        .publish_out(
            OutKind::Withdrawal,
            withdrawal_bytes("w-1", "r-1", "c-1"),
            Some("w-1"),
        )
        .await;
    let item = incoming.next().await.unwrap().unwrap();
    let ItemKind::Withdrawal(w) = item.kind() else {
        panic!("not a withdrawal: {item:?}");
    };
    assert_eq!(
        (w.referral_id.as_str(), w.consent_id.as_str()),
        ("r-1", "c-1")
    );
    let confirmation = item.confirm_purge().await.unwrap();
    assert_eq!(confirmation, ids::purge_message_id("w-1"));
    item.done().await.unwrap();
    let m = broker.inbound_message(2).await;
    assert_eq!(m.subject.as_str(), "yeongye.in.cc-1.purge");
    let (id, env) = inbound_envelope(&m);
    assert_eq!(id, confirmation);
    let p = v1::PurgeConfirmation::decode(env.payload.as_ref()).unwrap();
    assert_eq!(
        (p.referral_id.as_str(), p.consent_id.as_str()),
        ("r-1", "c-1")
    );

    // confirm_purge on anything else is an input error.
    broker
        .publish_out(
            OutKind::Notification,
            notification_bytes("n-1", "r-1"),
            Some("n-1"),
        )
        .await;
    let item = incoming.next().await.unwrap().unwrap();
    assert_eq!(
        item.confirm_purge().await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    item.done().await.unwrap();

    // A withdrawal handled without confirming (its system has not purged yet) gets no
    // confirmation when it comes again; a confirmed one gets its confirmation again; a late
    // delivery of a withdrawn referral is dropped without a receipt.
    broker
        .publish_out(
            OutKind::Withdrawal,
            withdrawal_bytes("w-2", "r-2", "c-1"),
            Some("w-2"),
        )
        .await;
    incoming
        .next()
        .await
        .unwrap()
        .unwrap()
        .done()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker
        .publish_out(
            OutKind::Withdrawal,
            withdrawal_bytes("w-2", "r-2", "c-1"),
            None,
        )
        .await;
    broker
        .publish_out(
            OutKind::Withdrawal,
            withdrawal_bytes("w-1", "r-1", "c-1"),
            None,
        )
        .await;
    broker
        .publish_out(
            OutKind::Delivery,
            delivery_bytes("d-late", "r-2"),
            Some("d-late"),
        )
        .await;
    broker
        .publish_out(
            OutKind::Notification,
            notification_bytes("n-2", "r-1"),
            Some("n-2"),
        )
        .await;
    let item = incoming.next().await.unwrap().unwrap();
    assert_eq!(item.message_id(), "n-2", "{item:?}");
    item.done().await.unwrap();
    let m = broker.inbound_message(3).await;
    assert_eq!(inbound_envelope(&m).0, ids::purge_message_id("w-1"));
    // No waiting needed: the reader deals with the late delivery and w-2 (follow-ups awaited
    // to their PubAck) before it hands out n-2, so anything they sent is stored by now.
    assert_eq!(
        broker.inbound_count().await,
        3,
        "no receipt for the late delivery, no confirmation for w-2"
    );
}

/// No stream (the hub cannot store anything): the message is queued in the outbox within
/// `queue_after`; a second adapter on the same state directory (whose store the first holds)
/// has no outbox and gives up within its publish budget, as before the outbox.
#[tokio::test]
async fn without_a_stream_a_send_is_queued_or_without_an_outbox_gives_up_within_its_budget() {
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&server, state.path());
    cfg.outbox.queue_after_ms = 300;
    let adapter = Adapter::connect(cfg.clone()).await.unwrap();
    let out = adapter
        .prepare_status_update("r-1", v1::Status::Accepted, "")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(adapter.submit(&out).await.unwrap(), Sent::Queued);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let outbox = adapter.outbox_status().await.unwrap().unwrap();
    assert_eq!(outbox.depth, 1, "{outbox:?}");

    let other = Adapter::builder(cfg)
        .publish_retry_budget(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let e = other
        .update_status("r-1", v1::Status::Accepted, "")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Publish);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("attempt"), "{e}");
    assert!(other.outbox_status().await.unwrap().is_none());
}

#[tokio::test]
async fn status_query_uses_the_private_inbox() {
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let broker = async_nats::connect(server.url()).await.unwrap();
    let mut queries = broker.subscribe(subject::query(ME)).await.unwrap();
    let responder = broker.clone();
    tokio::spawn(async move {
        while let Some(q) = queries.next().await {
            let reply_to = q.reply.clone().unwrap();
            assert!(reply_to.as_str().starts_with("_INBOX_cc-1."), "{reply_to}");
            let env = v1::Envelope::decode(q.payload.as_ref()).unwrap();
            assert_eq!(env.payload_type, v1::PayloadType::StatusQuery as i32);
            let query = v1::StatusQuery::decode(env.payload.as_ref()).unwrap();
            let reply = v1::StatusReply {
                referral_id: query.referral_id,
                state: v1::ReferralState::Received as i32,
                ..Default::default()
            };
            let out = envelope(
                "broker",
                "x",
                v1::PayloadType::StatusReply,
                reply.encode_to_vec(),
            );
            responder
                .publish(reply_to, out.encode_to_vec().into())
                .await
                .unwrap();
        }
    });
    synced(&broker).await;

    let adapter = Adapter::connect(config(&server, state.path()))
        .await
        .unwrap();
    let reply = adapter.status("r-9").await.unwrap();
    assert_eq!(reply.referral_id, "r-9");
    assert_eq!(reply.state, v1::ReferralState::Received as i32);
}

#[tokio::test]
async fn status_query_without_a_broker_fails_clearly() {
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let adapter = Adapter::connect(config(&server, state.path()))
        .await
        .unwrap();
    let e = adapter.status("r-1").await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Request | ErrorKind::Timeout),
        "{e}"
    );
}

#[tokio::test]
async fn incoming_is_exactly_once_in_effect() {
    let server = NatsServer::start();
    let broker = Broker::setup(&server, Duration::from_millis(100), Duration::from_secs(1)).await;
    let state = tempfile::tempdir().unwrap();

    broker
        .publish_out(OutKind::Delivery, delivery_bytes("d-1", "r-1"), Some("d-1"))
        .await;
    broker
        .publish_out(OutKind::Delivery, b"garbage".to_vec(), None)
        .await;
    {
        let adapter = Adapter::connect(config(&server, state.path()))
            .await
            .unwrap();
        let mut incoming = adapter.incoming().await.unwrap();
        let item = incoming.next().await.unwrap().unwrap();
        assert_eq!(item.message_id(), "d-1");
        assert_eq!(item.referral_id(), Some("r-1"));
        let ItemKind::Delivery { referral, original } = item.kind() else {
            panic!("not a delivery: {item:?}");
        };
        assert_eq!(referral.from_agency, "hope-support");
        assert_eq!(original.message_id, "orig");
        // Debug output carries no personal data.
        assert!(!format!("{item:?}").contains("홍길동"));
        item.done().await.unwrap();

        let (id, receipt) = status_update_of(&broker.inbound_message(1).await);
        assert_eq!(id, ids::receipt_message_id("d-1"));
        assert_eq!(receipt.status, v1::Status::Received as i32);
        assert_eq!(receipt.referral_id, "r-1");

        // The garbage (stream sequence 2) was saved and skipped; a repeat of d-1 is not
        // yielded but gets its receipt again; the next new message comes through.
        tokio::time::sleep(Duration::from_millis(200)).await;
        broker
            .publish_out(OutKind::Delivery, delivery_bytes("d-1", "r-1"), None)
            .await;
        broker
            .publish_out(
                OutKind::Notification,
                notification_bytes("n-1", "r-1"),
                Some("n-1"),
            )
            .await;
        let item = incoming.next().await.unwrap().unwrap();
        assert_eq!(item.message_id(), "n-1");
        assert!(matches!(item.kind(), ItemKind::Notification(_)));
        let (id, _) = status_update_of(&broker.inbound_message(2).await);
        assert_eq!(id, ids::receipt_message_id("d-1"));
        assert_eq!(
            std::fs::read(state.path().join("undecodable/2.bin")).unwrap(),
            b"garbage"
        );
        // Not done: it comes again after the ack wait, to this or the next reader.
        drop(item);
        drop(incoming);
        adapter.drain().await.unwrap();
    }

    // After a restart the dedup record is still there.
    broker
        .publish_out(OutKind::Delivery, delivery_bytes("d-1", "r-1"), None)
        .await;
    let adapter = Adapter::connect(config(&server, state.path()))
        .await
        .unwrap();
    // The drained adapter's store closes in the background: open once its lock is released.
    let started = std::time::Instant::now();
    let mut incoming = loop {
        match adapter.incoming().await {
            Err(yeongye_adapter::Error::StateDirInUse { .. })
                if started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.unwrap(),
        }
    };
    let item = incoming.next().await.unwrap().unwrap();
    assert_eq!(item.message_id(), "n-1", "{item:?}");
    item.done().await.unwrap();
}

#[tokio::test]
async fn incoming_waits_for_the_broker_to_create_the_consumer() {
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    // Watches the reader's attempts to bind its consumer (core NATS sees the API requests).
    let watcher = async_nats::connect(server.url()).await.unwrap();
    let mut binds = watcher
        .subscribe(format!("$JS.API.CONSUMER.INFO.{}.>", subject::OUT_STREAM))
        .await
        .unwrap();
    synced(&watcher).await;
    let adapter = Adapter::connect(config(&server, state.path()))
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut incoming = adapter.incoming().await.unwrap();
        let item = incoming.next().await.unwrap().unwrap();
        let id = item.message_id().to_owned();
        item.done().await.unwrap();
        id
    });
    // It tried twice (the consumer does not exist) and is still waiting, not failing.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(15), binds.next())
            .await
            .expect("the reader tries to bind its consumer")
            .expect("a bind request");
    }
    assert!(!reader.is_finished());
    let broker = Broker::setup(&server, Duration::from_secs(120), Duration::from_secs(30)).await;
    broker
        .publish_out(
            OutKind::Notification,
            notification_bytes("n-1", "r-1"),
            Some("n-1"),
        )
        .await;
    let id = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .expect("the reader never bound")
        .unwrap();
    assert_eq!(id, "n-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_survives_a_server_restart() {
    let mut server = NatsServer::start();
    let broker = Broker::setup(&server, Duration::from_secs(120), Duration::from_secs(30)).await;
    let state = tempfile::tempdir().unwrap();
    let adapter = Adapter::builder(config(&server, state.path()))
        .retry_on_initial_connect(true)
        .connect()
        .await
        .unwrap();
    let mut incoming = adapter.incoming().await.unwrap();
    broker
        .publish_out(
            OutKind::Notification,
            notification_bytes("n-1", "r-1"),
            Some("n-1"),
        )
        .await;
    incoming
        .next()
        .await
        .unwrap()
        .unwrap()
        .done()
        .await
        .unwrap();
    drop(broker);

    server.restart();
    let broker = Broker::reconnect(&server).await;
    broker
        .publish_out(
            OutKind::Notification,
            notification_bytes("n-2", "r-1"),
            Some("n-2"),
        )
        .await;
    let item = tokio::time::timeout(Duration::from_secs(40), incoming.next())
        .await
        .expect("nothing received after the restart")
        .unwrap()
        .unwrap();
    assert_eq!(item.message_id(), "n-2");
    tokio::time::timeout(Duration::from_secs(40), item.done())
        .await
        .unwrap()
        .unwrap();
}
