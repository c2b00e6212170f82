//! NATS identity and isolation, against a real nats-server configured by `referral-broker init`
//! and `referral-broker agency add`: an agency can publish only as itself and read only its own
//! deliveries, creates and deletes nothing in JetStream, and subscribes only to its own inbox —
//! every other attempt is denied and reported to its connection; its own work goes through.
//! And TLS: only a client that trusts the CA gets in, and with it the whole lifecycle passes.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use futures::StreamExt as _;
use prost::Message as _;
use yeongye_proto::signing::PrivateKey;
use yeongye_proto::subject::{self, InKind};
use yeongye_tests::ops::OpsHttp;
use yeongye_tests::secure::{Conn, ConnectAs, Pki, SecureSystem};
use yeongye_tests::wire::{self, ReferralBuilder, envelope};
use yeongye_tests::{v1, wait_for};

use crate::{CENTRE, HOPE, SHORT};

/// Signs `env` with `agency`'s key from the system's secrets (as its adapter would).
pub(crate) fn signed(system: &SecureSystem, agency: &str, mut env: v1::Envelope) -> v1::Envelope {
    let key = PrivateKey::load(&system.ids.signing_key(agency)).expect("the agency's key");
    key.sign(&mut env);
    env
}

/// A JetStream publish of `env` on `subject` as `conn`: the PubAck, or the error.
pub(crate) async fn js_publish(
    conn: &Conn,
    subject: &str,
    env: &v1::Envelope,
) -> Result<(), String> {
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .payload(env.encode_to_vec().into())
        .message_id(&env.message_id);
    let ack = conn
        .jetstream()
        .send_publish(subject.to_owned(), msg)
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(|_| ()).map_err(|e| e.to_string())
}

/// Fetches from `agency`'s own consumer as `conn` until `want` messages came (acking each),
/// and returns their envelopes.
async fn read_own(conn: &Conn, agency: &str, want: usize) -> Vec<v1::Envelope> {
    let js = conn.jetstream();
    let consumer: consumer::PullConsumer = js
        .get_consumer_from_stream(subject::agency_consumer(agency), subject::OUT_STREAM)
        .await
        .unwrap_or_else(|e| panic!("{agency} binds its own consumer: {e}"));
    let mut got = Vec::new();
    let start = std::time::Instant::now();
    while got.len() < want {
        assert!(
            start.elapsed() < SHORT,
            "{agency} read {} of {want} messages from its consumer in {SHORT:?}",
            got.len()
        );
        let mut batch = consumer
            .fetch()
            .max_messages(want - got.len())
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap_or_else(|e| panic!("{agency} fetches from its own consumer: {e}"));
        while let Some(msg) = batch.next().await {
            let msg = msg.unwrap_or_else(|e| panic!("{agency} fetch: {e}"));
            got.push(v1::Envelope::decode(msg.payload.as_ref()).expect("an envelope"));
            msg.ack()
                .await
                .unwrap_or_else(|e| panic!("{agency} acks its own message: {e}"));
        }
    }
    conn.client.flush().await.expect("flush acks");
    got
}

/// Publishes the referral `builder` makes as its sender over `conn` (signed with the sender's
/// key; the PubAck awaited) and waits until its delivery is pending in the recipient's consumer,
/// as the server's monitoring endpoint reports it. Returns the referral.
pub(crate) async fn send_until_delivered(
    system: &SecureSystem,
    conn: &Conn,
    builder: ReferralBuilder,
) -> v1::Referral {
    let referral = wire::sealed_with(&builder.build(), &system.ids.registry);
    let from = referral.from_agency.clone();
    let env = signed(
        system,
        &from,
        envelope(&from, v1::PayloadType::Referral, referral.encode_to_vec()),
    );
    js_publish(conn, &subject::inbound(&from, InKind::Referral), &env)
        .await
        .expect("the sender publishes on its own inbound subject");
    let consumer = subject::agency_consumer(&referral.to_agency);
    wait_for(
        "the delivery in the recipient's consumer",
        SHORT,
        || async {
            let out = system.nats.stream(subject::OUT_STREAM).await;
            (out.consumer(&consumer)?.num_pending >= 1).then_some(())
        },
        || system.describe(),
    )
    .await;
    referral
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_acts_only_as_itself_and_reads_only_its_own() {
    let system = SecureSystem::start(&[CENTRE, HOPE], false).await;
    let url = system.url();
    let a = system.connect_as(CENTRE).connect(&url).await;

    // A's own work: a referral to B, stored (PubAck on A's inbox) and delivered to B.
    let referral = send_until_delivered(&system, &a, ReferralBuilder::new(CENTRE, HOPE)).await;
    let hope_consumer = subject::agency_consumer(HOPE);
    // A reads and acks its own notification (DELIVERED) through its consumer.
    let mine = read_own(&a, CENTRE, 1).await;
    assert!(
        mine.iter()
            .all(|e| e.payload_type() == v1::PayloadType::Notification),
        "{mine:?}"
    );
    // And asks about its referral (request/reply on its own inbox).
    let query = v1::StatusQuery {
        referral_id: referral.referral_id.clone(),
    };
    let q = signed(
        &system,
        CENTRE,
        envelope(CENTRE, v1::PayloadType::StatusQuery, query.encode_to_vec()),
    );
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        a.client
            .request(subject::query(CENTRE), q.encode_to_vec().into()),
    )
    .await
    .expect("a status reply in time")
    .expect("a status reply");
    let reply = v1::Envelope::decode(reply.payload.as_ref()).expect("reply envelope");
    let status = v1::StatusReply::decode(reply.payload.as_slice()).expect("status reply");
    assert_eq!(status.referral_id, referral.referral_id, "{status:?}");
    assert_eq!(status.error, None, "{status:?}");
    assert!(
        a.errors().is_empty(),
        "A's own work was refused: {:?}",
        a.errors()
    );

    // Publishing as B: denied; a JetStream publish just times out.
    let spoof = envelope(HOPE, v1::PayloadType::Referral, referral.encode_to_vec());
    let as_b = subject::inbound(HOPE, InKind::Referral);
    assert!(js_publish(&a, &as_b, &spoof).await.is_err());
    a.wait_violation(&as_b).await;

    // B's consumer: not its info, not its messages, not its acks.
    let js = a.jetstream();
    let info = format!(
        "$JS.API.CONSUMER.INFO.{}.{hope_consumer}",
        subject::OUT_STREAM
    );
    assert!(
        js.get_consumer_from_stream::<consumer::pull::Config, _, _>(
            &hope_consumer,
            subject::OUT_STREAM
        )
        .await
        .is_err()
    );
    a.wait_violation(&info).await;
    let inbox = a.client.new_inbox();
    let mut replies = a.client.subscribe(inbox.clone()).await.expect("own inbox");
    let next = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{hope_consumer}",
        subject::OUT_STREAM
    );
    a.client
        .publish_with_reply(next.clone(), inbox, "{\"batch\":1}".into())
        .await
        .expect("queued");
    a.wait_violation(&next).await;
    let ack = format!("$JS.ACK.{}.{hope_consumer}.1.1.1.0.0", subject::OUT_STREAM);
    a.client
        .publish(ack.clone(), "+ACK".into())
        .await
        .expect("queued");
    a.wait_violation(&ack).await;
    // Nor B's messages from the stream directly, nor its delivery subjects.
    for api in [
        format!("$JS.API.STREAM.MSG.GET.{}", subject::OUT_STREAM),
        format!("$JS.API.DIRECT.GET.{}", subject::OUT_STREAM),
        format!("$JS.API.STREAM.INFO.{}", subject::OUT_STREAM),
    ] {
        a.client
            .publish(api.clone(), "{\"seq\":1}".into())
            .await
            .expect("queued");
        a.wait_violation(&api).await;
    }

    // Creating or deleting a consumer or a stream: denied, its own consumer included.
    let spy = consumer::pull::Config {
        durable_name: Some("spy".into()),
        filter_subject: subject::outbound_filter(HOPE),
        ..Default::default()
    };
    assert!(
        js.create_consumer_on_stream(spy, subject::OUT_STREAM)
            .await
            .is_err()
    );
    a.wait_violation(&format!("$JS.API.CONSUMER.CREATE.{}", subject::OUT_STREAM))
        .await;
    let durable = format!(
        "$JS.API.CONSUMER.DURABLE.CREATE.{}.spy",
        subject::OUT_STREAM
    );
    a.client
        .publish(durable.clone(), "{}".into())
        .await
        .expect("queued");
    a.wait_violation(&durable).await;
    for victim in [hope_consumer.clone(), subject::agency_consumer(CENTRE)] {
        assert!(
            js.delete_consumer_from_stream(&victim, subject::OUT_STREAM)
                .await
                .is_err()
        );
        a.wait_violation(&format!(
            "$JS.API.CONSUMER.DELETE.{}.{victim}",
            subject::OUT_STREAM
        ))
        .await;
    }
    let copy = stream::Config {
        name: "SPY".into(),
        subjects: vec![subject::OUT_SUBJECTS.into()],
        ..Default::default()
    };
    assert!(js.create_stream(copy).await.is_err());
    a.wait_violation("$JS.API.STREAM.CREATE.SPY").await;
    for doomed in [subject::OUT_STREAM, subject::IN_STREAM] {
        assert!(js.delete_stream(doomed).await.is_err());
        a.wait_violation(&format!("$JS.API.STREAM.DELETE.{doomed}"))
            .await;
    }

    // The brokers' own replication: appending to the state log (a forged change set), taking
    // or overwriting the leader's lease, reading the log or a snapshot, trimming the log.
    for (publish, denied) in [
        ("yeongye.state", "yeongye.state"),
        ("$KV.YEONGYE_LEADER.leader", "$KV.YEONGYE_LEADER.leader"),
        ("$O.YEONGYE_SNAPSHOTS.M.x", "$O.YEONGYE_SNAPSHOTS.M.x"),
    ] {
        a.client
            .publish(publish, "forged".into())
            .await
            .expect("queued");
        a.wait_violation(denied).await;
    }
    for api in [
        "$JS.API.CONSUMER.CREATE.YEONGYE_STATE",
        "$JS.API.STREAM.PURGE.YEONGYE_STATE",
        "$JS.API.STREAM.INFO.KV_YEONGYE_LEADER",
        "$JS.API.DIRECT.GET.OBJ_YEONGYE_SNAPSHOTS.$O.YEONGYE_SNAPSHOTS.M.x",
    ] {
        a.client.publish(api, "{}".into()).await.expect("queued");
        a.wait_violation(api).await;
    }

    // Subscribing to everything, to B's deliveries, to B's inbox or the shared one: denied.
    for wide in [
        ">".to_owned(),
        subject::outbound_filter(HOPE),
        "_INBOX_hope-support.>".to_owned(),
        "_INBOX.>".to_owned(),
        "$JS.API.>".to_owned(),
    ] {
        let _sub = a.client.subscribe(wide.clone()).await.expect("queued");
        a.wait_violation(&wide).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), replies.next())
            .await
            .is_err(),
        "nothing reached A from B's consumer"
    );
    assert_eq!(
        a.client.connection_state(),
        async_nats::connection::State::Connected,
        "violations are reported, the connection stays"
    );

    // Nothing changed: no spoofed message stored, no consumer or stream made or lost, B's
    // delivery still waiting for B.
    // (Seen from the server's monitoring endpoint: no identity, the broker's included, may read
    // another's messages or list consumers.)
    let streams = system.nats.streams().await;
    let inbound = streams
        .iter()
        .find(|s| s.name == subject::IN_STREAM)
        .expect("YEONGYE_IN");
    assert_eq!(
        (inbound.messages, inbound.last_seq),
        (1, 1),
        "only A's own referral was stored (a message as B was stored?)"
    );
    let out = streams
        .iter()
        .find(|s| s.name == subject::OUT_STREAM)
        .expect("YEONGYE_OUT");
    let mut names: Vec<&str> = out.consumers.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [subject::agency_consumer(CENTRE), hope_consumer.clone()]
    );
    let mut stream_names: Vec<&str> = streams.iter().map(|s| s.name.as_str()).collect();
    stream_names.sort();
    assert_eq!(
        stream_names,
        [
            "KV_YEONGYE_LEADER",
            "OBJ_YEONGYE_SNAPSHOTS",
            subject::IN_STREAM,
            subject::OUT_STREAM,
            "YEONGYE_STATE"
        ],
        "no SPY stream"
    );
    assert_eq!(
        out.consumer(&hope_consumer)
            .expect("B's consumer")
            .num_pending,
        1
    );

    // B reads its delivery itself.
    let b = system.connect_as(HOPE).connect(&url).await;
    let theirs = read_own(&b, HOPE, 1).await;
    assert_eq!(theirs[0].payload_type(), v1::PayloadType::Delivery);
    let delivery = v1::Delivery::decode(theirs[0].payload.as_slice()).expect("delivery");
    assert_eq!(delivery.referral_id, referral.referral_id);
    assert!(b.errors().is_empty(), "{:?}", b.errors());
}

/// The broker's own NATS identity, as `referral-broker init` generates it, is given what
/// replication needs and no more: under it the broker appends to its state log, takes its lease,
/// stores snapshots and trims the log behind them, and a broker on an empty store restores from
/// the newest snapshot — with no permission refused along the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_identity_may_replicate_snapshot_trim_and_restore_and_nothing_more_is_needed() {
    let mut system = SecureSystem::start(&[CENTRE, HOPE], false).await;
    let a = system.connect_as(CENTRE).connect(&system.url()).await;
    let mut sent = 0;
    // One referral at a time: each is a turn or two, a state-log record each; snapshots every
    // 10 records (the secure broker's configuration), the log trimmed behind the older of two.
    while sent < 30 {
        send_until_delivered(&system, &a, ReferralBuilder::new(CENTRE, HOPE)).await;
        sent += 1;
        if system.nats.stream("YEONGYE_STATE").await.first_seq > 1 {
            break;
        }
    }
    wait_for(
        "the state log trimmed behind a snapshot",
        SHORT,
        || async { (system.nats.stream("YEONGYE_STATE").await.first_seq > 1).then_some(()) },
        || system.describe(),
    )
    .await;
    system.restart_broker_on_an_empty_store().await;
    let log = std::fs::read_to_string(system.broker.log_path()).unwrap_or_default();
    assert!(
        log.contains("restored from the newest snapshot"),
        "{}",
        system.broker.log_tail()
    );
    // What was restored is what was sent: every referral, in the operators' counters, once the
    // broker has applied the log after the snapshot (the snapshot alone may hold fewer).
    let ops = OpsHttp::new(&system.broker.http_addr);
    let start = std::time::Instant::now();
    loop {
        let states = ops.get_json("/api/v1/queues").await["states"].clone();
        let total: u64 = states
            .as_object()
            .expect("states")
            .values()
            .filter_map(serde_json::Value::as_u64)
            .sum();
        if total == sent || start.elapsed() > SHORT {
            assert_eq!(total, sent, "{states}\n{}", system.broker.log_tail());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let dir = system.dir().join("broker");
    for entry in std::fs::read_dir(&dir).expect("the broker's dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("broker.log") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            assert!(
                !text.to_lowercase().contains("permissions violation"),
                "{name}: the broker was refused something replication needs\n{text}"
            );
            assert!(!text.contains("snapshot not stored"), "{name}\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_registered_users_log_in_and_the_shared_inbox_is_closed() {
    let system = SecureSystem::start(&[CENTRE, HOPE], false).await;
    let url = system.url();

    // No credentials, or another agency's password under one's own name: refused.
    let anonymous = ConnectAs::default().try_connect(&url).await;
    assert!(anonymous.is_err(), "an anonymous client got in");
    let wrong = system.dir().join("wrong.creds");
    let hope_password = std::fs::read_to_string(system.ids.creds(HOPE))
        .expect("creds")
        .replace(
            &format!("user = \"{HOPE}\""),
            &format!("user = \"{CENTRE}\""),
        );
    std::fs::write(&wrong, hope_password).expect("write");
    let impostor = ConnectAs {
        creds: Some(wrong),
        inbox_prefix: Some(format!("_INBOX_{CENTRE}")),
        ca: None,
    }
    .try_connect(&url)
    .await;
    assert!(impostor.is_err(), "a password opened another user");

    // The monitoring port answers on loopback (and is configured nowhere else).
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", system.nats.http_port())).is_ok(),
        "monitoring on loopback"
    );

    // With the shared `_INBOX` prefix an agency gets no replies at all: its PubAcks are
    // denied to it, so the publish times out.
    let shared = ConnectAs {
        inbox_prefix: None,
        ..system.connect_as(CENTRE)
    }
    .connect(&url)
    .await;
    let referral = wire::sealed_with(
        &ReferralBuilder::new(CENTRE, HOPE).build(),
        &system.ids.registry,
    );
    let env = signed(
        &system,
        CENTRE,
        envelope(CENTRE, v1::PayloadType::Referral, referral.encode_to_vec()),
    );
    assert!(
        js_publish(&shared, &subject::inbound(CENTRE, InKind::Referral), &env)
            .await
            .is_err()
    );
    shared.wait_violation("_INBOX.").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_the_trusted_ca_gets_in_and_the_lifecycle_passes() {
    let mut system = SecureSystem::start(&[CENTRE, HOPE], true).await;
    let url = system.url();
    let ca = system.ca().expect("TLS system");

    // Without the CA (the system's roots), or trusting another CA: no connection.
    let untrusting = ConnectAs::agency(&system.ids, CENTRE)
        .try_connect(&url)
        .await;
    assert!(untrusting.is_err(), "a client without the CA connected");
    let other = Pki::generate(&system.dir().join("other-pki"));
    let wrong_ca = ConnectAs::agency(&system.ids, CENTRE)
        .with_ca(&other.ca_cert)
        .try_connect(&url)
        .await;
    assert!(wrong_ca.is_err(), "a client trusting another CA connected");
    // Nor the SDK without `tls_ca_file`.
    let mut cfg =
        yeongye_adapter::AdapterConfig::from_toml_str(&system.adapter_config(CENTRE).to_toml())
            .expect("adapter config");
    cfg.tls_ca_file = None;
    assert!(
        yeongye_adapter::Adapter::connect(cfg.clone())
            .await
            .is_err(),
        "the SDK connected without the CA"
    );
    // With it: in (the broker already is: it became ready over TLS).
    cfg.tls_ca_file = Some(ca.clone());
    let sdk = yeongye_adapter::Adapter::connect(cfg)
        .await
        .expect("the SDK connects with the CA");
    sdk.drain().await.expect("drain");

    // The whole lifecycle through the adapters' command line and run loops, over TLS.
    system.start_adapter(CENTRE);
    let referral = ReferralBuilder::new(CENTRE, HOPE)
        .reason("TLS lifecycle")
        .build();
    let rid = referral.referral_id.clone();
    let file = system.dir().join("referral.json");
    std::fs::write(&file, serde_json::to_vec(&referral).expect("JSON")).expect("write");
    let sent = system
        .adapter(CENTRE)
        .cli(&["send", file.to_str().expect("utf-8 path")])
        .await;
    sent.assert_success();
    system
        .adapter(CENTRE)
        .wait_notified(&rid, "DELIVERED", SHORT)
        .await;
    system.start_adapter(HOPE);
    system
        .adapter(CENTRE)
        .wait_notified(&rid, "RECEIVED", SHORT)
        .await;
    for (status, state) in [
        ("accepted", "ACCEPTED"),
        ("in-progress", "IN_PROGRESS"),
        ("completed", "COMPLETED"),
    ] {
        system
            .adapter(HOPE)
            .cli(&["update", &rid, status])
            .await
            .assert_success();
        system
            .adapter(CENTRE)
            .wait_notified(&rid, state, SHORT)
            .await;
    }
    assert_eq!(
        system.adapter(CENTRE).notified_states(&rid),
        [
            "DELIVERED",
            "RECEIVED",
            "ACCEPTED",
            "IN_PROGRESS",
            "COMPLETED"
        ],
        "{}",
        system.describe()
    );
    assert_eq!(system.adapter(HOPE).deliveries_of(&rid), 1);
    assert!(system.broker.is_running());
}
