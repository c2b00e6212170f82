//! The confused deputy (issue 12): an onboarded agency asks the broker a question and names,
//! as the reply subject, a JetStream API subject (purge a stream, delete a consumer, ack
//! another's delivery) or another agency's subjects. The broker must never publish there. Two
//! layers each stop it on their own, and each is tested alone:
//! - the broker answers only on the asker's own inbox (`_INBOX_<agency>.…`): shown on a server
//!   without authorization, where the broker's connection may publish anywhere;
//! - the broker's NATS user may publish only what the broker publishes: shown by publishing
//!   to every target as the broker's own identity, as a broker without the check would.
//!
//! And on a system configured by the real onboarding, both together: nothing happens to the
//! streams, the waiting crisis referral is still delivered, and operators see every attempt
//! (a dead letter each, `REPLY_SUBJECT_FORBIDDEN`, and a metric).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::stream;
use prost::Message as _;
use yeongye_proto::signing::KeyRing;
use yeongye_proto::subject::{self, InKind, OutKind};
use yeongye_tests::ops::OpsHttp;
use yeongye_tests::secure::{ConnectAs, SecureSystem, StreamState};
use yeongye_tests::wire::{ReferralBuilder, envelope};
use yeongye_tests::{System, v1, wait_for};

use crate::security::{send_until_delivered, signed};
use crate::{CENTRE, HOPE, SHORT};

/// The reason code of a refused query, as operators see it.
const FORBIDDEN: &str = "REASON_CODE_REPLY_SUBJECT_FORBIDDEN";

/// Every place a hostile asker could point the broker's reply at: each destructive or
/// state-changing JetStream API subject of each stream and consumer, another agency's inbound,
/// outbound, query and inbox subjects, and the shared inbox.
fn targets(attacker: &str, victim: &str) -> Vec<String> {
    let mut t = Vec::new();
    for stream in [subject::IN_STREAM, subject::OUT_STREAM] {
        for api in [
            "STREAM.PURGE",
            "STREAM.DELETE",
            "STREAM.MSG.DELETE",
            "STREAM.UPDATE",
            "STREAM.CREATE",
            "STREAM.LEADER.STEPDOWN",
            "CONSUMER.CREATE",
        ] {
            t.push(format!("$JS.API.{api}.{stream}"));
        }
    }
    let out = subject::OUT_STREAM;
    for consumer in [
        subject::agency_consumer(victim),
        subject::agency_consumer(attacker),
    ] {
        t.push(format!("$JS.API.CONSUMER.DELETE.{out}.{consumer}"));
        // An ack of the first delivery to that consumer: the victim would never see it.
        t.push(format!("$JS.ACK.{out}.{consumer}.1.1.1.0.0"));
    }
    t.push(format!(
        "$JS.API.CONSUMER.DELETE.{}.{}",
        subject::IN_STREAM,
        subject::BROKER_CONSUMER
    ));
    t.push("$JS.API.INFO".to_owned());
    // The brokers' replication: subjects the broker's identity may itself publish (appending to
    // its state log, trimming it, its lease, its snapshots) and the ones it may not.
    for replication in [
        "yeongye.state",
        "$JS.API.STREAM.PURGE.YEONGYE_STATE",
        "$JS.API.STREAM.DELETE.YEONGYE_STATE",
        "$KV.YEONGYE_LEADER.leader",
        "$JS.API.STREAM.PURGE.KV_YEONGYE_LEADER",
        "$O.YEONGYE_SNAPSHOTS.M.c3RhdGUtMDAwMDAwMDAwMDAwMDAwMDAwMDE=",
    ] {
        t.push(replication.to_owned());
    }
    for kind in [
        InKind::Referral,
        InKind::Status,
        InKind::Consent,
        InKind::Purge,
    ] {
        t.push(subject::inbound(victim, kind));
    }
    for kind in [
        OutKind::Delivery,
        OutKind::Notification,
        OutKind::Rejection,
        OutKind::Escalation,
        OutKind::Withdrawal,
    ] {
        t.push(subject::outbound(victim, kind));
    }
    t.push(subject::query(victim));
    t.push(format!("{}.stolen", subject::inbox_prefix(victim)));
    t.push("_INBOX.shared".to_owned());
    // Its own prefix, but not below it, or with a wildcard: not an inbox either.
    t.push(subject::inbox_prefix(attacker));
    t.push(format!("{}.>", subject::inbox_prefix(attacker)));
    t
}

/// How many of `targets` the server passes on to the broker as a reply subject at all:
/// nats-server 2.12 and 2.15 do not deliver a core message whose reply subject is a JetStream ack
/// subject (`$JS.ACK.…`) to an ordinary subscriber — measured: those queries never reach the
/// broker, so they are neither answered nor counted.
fn reaching_the_broker(targets: &[String]) -> usize {
    targets
        .iter()
        .filter(|t| !t.starts_with("$JS.ACK."))
        .count()
}

/// A signed status query from `agency` about `referral_id`.
fn status_query(system: &SecureSystem, agency: &str, referral_id: &str) -> v1::Envelope {
    let q = v1::StatusQuery {
        referral_id: referral_id.to_owned(),
    };
    signed(
        system,
        agency,
        envelope(agency, v1::PayloadType::StatusQuery, q.encode_to_vec()),
    )
}

/// A stream's messages, last sequence, and each consumer with what it has not yet had acked.
type Shape = (u64, u64, Vec<(String, u64)>);

/// What must not change: each stream's messages and sequence, and its consumers (with how
/// many messages each still has to deliver).
/// What agencies could see of the streams. The broker's own state log, lease and snapshot
/// buckets are left out: recording a refused query as a dead letter appends to its state log
/// (and may take a snapshot), as it should.
fn shape(streams: &[StreamState]) -> BTreeMap<String, Shape> {
    streams
        .iter()
        .filter(|s| {
            ![
                "YEONGYE_STATE",
                "KV_YEONGYE_LEADER",
                "OBJ_YEONGYE_SNAPSHOTS",
            ]
            .contains(&s.name.as_str())
        })
        .map(|s| {
            let consumers = s
                .consumers
                .iter()
                .map(|c| (c.name.clone(), c.num_pending + c.ack_pending))
                .collect();
            (s.name.clone(), (s.messages, s.last_seq, consumers))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_is_answered_only_on_the_askers_own_inbox() {
    let system = SecureSystem::start(&[CENTRE, HOPE], false).await;
    let url = system.url();
    let a = system.connect_as(CENTRE).connect(&url).await;
    let ops = OpsHttp::new(&system.broker.http_addr);

    // A crisis referral to B, whose adapter is down: its delivery waits in B's consumer, and
    // A's DELIVERED notification in A's.
    let referral = send_until_delivered(
        &system,
        &a,
        ReferralBuilder::new(CENTRE, HOPE).urgency(v1::Urgency::Crisis),
    )
    .await;
    let (hope_consumer, own_consumer) = (
        subject::agency_consumer(HOPE),
        subject::agency_consumer(CENTRE),
    );
    wait_for(
        "the delivery and the notification waiting in the consumers",
        SHORT,
        || async {
            let out = system.nats.stream(subject::OUT_STREAM).await;
            (out.consumer(&hope_consumer)?.num_pending == 1
                && out.consumer(&own_consumer)?.num_pending == 1)
                .then_some(())
        },
        || system.describe(),
    )
    .await;
    let before = shape(&system.nats.streams().await);

    // The attack: every target as the reply subject of a well-formed, signed query.
    let targets = targets(CENTRE, HOPE);
    for target in &targets {
        let q = status_query(&system, CENTRE, &referral.referral_id);
        a.client
            .publish_with_reply(
                subject::query(CENTRE),
                target.clone(),
                q.encode_to_vec().into(),
            )
            .await
            .expect("queued");
    }
    a.client.flush().await.expect("flush");

    // Operators see every attempt: counted, and a dead letter each with the new reason code.
    let n = reaching_the_broker(&targets) as f64;
    wait_for(
        "every refused query counted and kept as a dead letter",
        SHORT,
        || async {
            let m = ops.metrics().await;
            let counted = m.get("yeongye_queries_refused_total", "")?;
            let kept = m
                .by_label("yeongye_refusals", "reason")
                .get(FORBIDDEN)
                .copied()?;
            (counted == n && kept == n).then_some(())
        },
        || system.describe(),
    )
    .await;
    let dead = ops.get_json("/api/v1/dead-letters").await;
    let rows: Vec<&serde_json::Value> = dead
        .as_array()
        .expect("a list")
        .iter()
        .filter(|d| d["reason"] == FORBIDDEN)
        .collect();
    assert_eq!(rows.len(), reaching_the_broker(&targets), "{dead:#}");
    for d in &rows {
        assert_eq!(d["sender"], CENTRE, "{d:#}");
        assert_eq!(d["subject"], subject::query(CENTRE), "{d:#}");
    }
    // No one was answered, and nothing changed anywhere.
    assert_eq!(shape(&system.nats.streams().await), before);
    let log = std::fs::read_to_string(system.broker.log_path()).unwrap_or_default();
    assert!(
        !log.to_lowercase().contains("permissions violation"),
        "the broker tried to publish somewhere it may not: the reply check should have stopped it first\n{log}"
    );

    // A's own question on its own inbox is answered, signed by the broker's key.
    let q = status_query(&system, CENTRE, &referral.referral_id);
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        a.client
            .request(subject::query(CENTRE), q.encode_to_vec().into()),
    )
    .await
    .expect("a reply in time")
    .expect("a reply");
    let reply = v1::Envelope::decode(reply.payload.as_ref()).expect("an envelope");
    let keys = KeyRing::load(&system.ids.registry).expect("the registry's keys");
    keys.verify(yeongye_proto::BROKER_ID, &reply, reply.sent_at_ms)
        .expect("the reply is signed by the broker");
    let status = v1::StatusReply::decode(reply.payload.as_slice()).expect("a status reply");
    assert_eq!(status.referral_id, referral.referral_id, "{status:?}");
    assert_eq!(status.state(), v1::ReferralState::Delivered, "{status:?}");

    // B, back, still gets its crisis referral.
    let b = system.connect_as(HOPE).connect(&url).await;
    let js = b.jetstream();
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(hope_consumer.clone(), subject::OUT_STREAM)
        .await
        .expect("B's consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("fetch");
    let msg = futures::StreamExt::next(&mut batch)
        .await
        .expect("B's delivery is there")
        .expect("a message");
    let delivery = v1::Envelope::decode(msg.payload.as_ref()).expect("an envelope");
    let delivery = v1::Delivery::decode(delivery.payload.as_slice()).expect("a delivery");
    assert_eq!(delivery.referral_id, referral.referral_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_check_alone_stops_the_attack_where_the_broker_may_publish_anywhere() {
    // No NATS authorization at all: only the broker's own check stands in the way.
    let system = System::builder()
        .agencies(&[CENTRE, HOPE])
        .adapters(&[])
        .start()
        .await;
    let attacker = system.wire(CENTRE).await;
    let referral = ReferralBuilder::new(CENTRE, HOPE).build();
    attacker.send_referral(&referral).await;
    let id = referral.referral_id.clone();
    let js = attacker.jetstream();
    let count = |name: &'static str| {
        let js = js.clone();
        async move {
            let mut s: stream::Stream = js.get_stream(name).await.expect("the stream");
            let info = s.info().await.expect("stream info");
            (info.state.messages, info.state.last_sequence)
        }
    };
    wait_for(
        "the delivery stored",
        SHORT,
        || async { (count(subject::OUT_STREAM).await.0 == 2).then_some(()) },
        || system.describe(),
    )
    .await;
    let before = (
        count(subject::IN_STREAM).await,
        count(subject::OUT_STREAM).await,
    );
    let targets = targets(CENTRE, HOPE);
    for target in &targets {
        let q = v1::StatusQuery {
            referral_id: id.clone(),
        };
        let mut env = envelope(CENTRE, v1::PayloadType::StatusQuery, q.encode_to_vec());
        yeongye_tests::wire::sign(&mut env);
        attacker
            .client()
            .publish_with_reply(
                subject::query(CENTRE),
                target.clone(),
                env.encode_to_vec().into(),
            )
            .await
            .expect("queued");
    }
    attacker.client().flush().await.expect("flush");
    let ops = OpsHttp::new(&system.broker.config().http_addr);
    let n = reaching_the_broker(&targets) as f64;
    wait_for(
        "every refused query counted",
        SHORT,
        || async {
            let m = ops.metrics().await;
            (m.get("yeongye_queries_refused_total", "")? == n).then_some(())
        },
        || system.describe(),
    )
    .await;
    assert_eq!(
        (
            count(subject::IN_STREAM).await,
            count(subject::OUT_STREAM).await
        ),
        before,
        "a stream changed"
    );
    // And the streams still exist with their consumers (nothing deleted).
    let out: stream::Stream = js
        .get_stream(subject::OUT_STREAM)
        .await
        .expect("YEONGYE_OUT");
    for consumer in [
        subject::agency_consumer(CENTRE),
        subject::agency_consumer(HOPE),
    ] {
        out.consumer_info(&consumer)
            .await
            .unwrap_or_else(|e| panic!("{consumer}: {e}"));
    }
    // The attacker still gets answers where it should.
    assert_eq!(
        attacker.query(&id).await.state(),
        v1::ReferralState::Delivered
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_nats_identity_alone_cannot_do_what_the_attack_asks() {
    // As a broker without the reply check would: publish the reply to each target, as the
    // broker's own NATS user (its credentials and inbox prefix from the real onboarding).
    let system = SecureSystem::start(&[CENTRE, HOPE], false).await;
    let url = system.url();
    let a = system.connect_as(CENTRE).connect(&url).await;
    send_until_delivered(&system, &a, ReferralBuilder::new(CENTRE, HOPE)).await;
    let before = shape(&system.nats.streams().await);

    let broker = ConnectAs {
        creds: Some(system.ids.creds("broker")),
        inbox_prefix: Some(subject::inbox_prefix(yeongye_proto::BROKER_ID)),
        ca: None,
    }
    .connect(&url)
    .await;
    let reply = v1::Envelope::default().encode_to_vec();
    // Replies to the agencies' own inboxes and the outbound subjects are the broker's job.
    // And one destructive right it keeps: deleting its own inbound consumer, which it does at
    // start when its store is behind the consumer (to replay from its checkpoint). The inbound
    // stream keeps every message, so that loses nothing; the reply check stands in front of it.
    let own_consumer = format!(
        "$JS.API.CONSUMER.DELETE.{}.{}",
        subject::IN_STREAM,
        subject::BROKER_CONSUMER
    );
    // Creating or updating its two streams is the broker's too; a reply (protobuf, not a JSON
    // stream configuration) sent there is refused by the server, as shown below.
    let allowed = |t: &str| {
        t == own_consumer
            || t.starts_with("$JS.API.STREAM.CREATE.YEONGYE_")
            || t.starts_with("$JS.API.STREAM.UPDATE.YEONGYE_")
            || t.starts_with("yeongye.out.")
            || t == "yeongye.state"
            || t == "$JS.API.STREAM.PURGE.YEONGYE_STATE"
            || t.starts_with("$KV.YEONGYE_LEADER.")
            || t.starts_with("$O.YEONGYE_SNAPSHOTS.")
            || subject::is_own_inbox(HOPE, t)
            || t.starts_with(&format!("{}.", subject::inbox_prefix(CENTRE)))
            || t == format!("{}.>", subject::inbox_prefix(CENTRE))
    };
    let denied: Vec<String> = targets(CENTRE, HOPE)
        .into_iter()
        .filter(|t| !allowed(t))
        .collect();
    assert!(denied.len() > 20, "{denied:?}");
    for target in &denied {
        broker
            .client
            .publish(target.clone(), reply.clone().into())
            .await
            .expect("queued");
        broker.wait_violation(target).await;
    }
    // The same with a reply subject of the broker's own, as a JetStream API request would be.
    let purge = format!("$JS.API.STREAM.PURGE.{}", subject::IN_STREAM);
    let answer = broker.client.request(purge.clone(), "".into()).await;
    assert!(answer.is_err(), "{answer:?}");
    for stream in [subject::IN_STREAM, subject::OUT_STREAM] {
        for op in ["CREATE", "UPDATE"] {
            let api = format!("$JS.API.STREAM.{op}.{stream}");
            let answer = broker
                .client
                .request(api.clone(), reply.clone().into())
                .await
                .unwrap_or_else(|e| panic!("{api}: {e}"));
            let text = String::from_utf8_lossy(&answer.payload);
            assert!(text.contains("\"error\""), "{api}: {text}");
        }
    }
    // Nothing changed; the delivery still waits for B.
    assert_eq!(shape(&system.nats.streams().await), before);
}
