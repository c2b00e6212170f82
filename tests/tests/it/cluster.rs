//! On a three-node JetStream cluster (issue #14, its first promise): the broker's streams are
//! R3 (`stream_replicas = 3`), the broker, the sender and the recipient's adapter are given all
//! three servers, and each node in turn is killed (-9) under traffic — stream leaders included,
//! whoever they are at the moment — and started again. Nothing acknowledged is lost and nothing is
//! applied twice: every referral the sender's SDK stored reaches RECEIVED, with one SUBMITTED and
//! one RECEIVED in its history, and one delivery in the outbound stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use yeongye_tests::adapter::AdapterConfig;
use yeongye_tests::ops::OpsHttp;
use yeongye_tests::{
    AdapterProcess, BrokerConfig, BrokerProcess, NatsCluster, ReferralBuilder, WireClient,
    registry, sdk, v1,
};

use crate::{CENTRE, HOPE, REDELIVERY, SHORT};

/// Referrals sent while each node is down (and before and after).
const PER_PHASE: usize = 8;

/// Waits until `sent` has grown by `more` (the sender goes on while nodes die and return).
pub(crate) async fn wait_sent(sent: &AtomicUsize, target: usize, what: &str) {
    let start = Instant::now();
    while sent.load(Ordering::SeqCst) < target {
        assert!(
            start.elapsed() < REDELIVERY,
            "{what}: only {} of {target} referrals stored",
            sent.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends one referral CENTRE → HOPE through the SDK (retried, same message id, until stored),
/// counts it in `sent`, and returns its id.
pub(crate) async fn send_one(sender: &yeongye_adapter::Adapter, sent: &AtomicUsize) -> String {
    let id = sender
        .send(ReferralBuilder::new(CENTRE, HOPE).build())
        .await
        .expect("stored within the budget");
    sent.fetch_add(1, Ordering::SeqCst);
    id
}

/// Waits until the broker's metrics say `current` replicas of the inbound stream are up to date
/// (and it has a leader when any is).
async fn wait_replicas_current(ops: &OpsHttp, current: f64, what: &str) {
    let start = Instant::now();
    loop {
        let m = ops.metrics().await;
        let labels = "stream=\"YEONGYE_IN\"";
        let now = m.get("yeongye_stream_replicas_current", labels);
        let leader = m.get("yeongye_stream_leader", labels);
        if now == Some(current) && leader == Some(1.0) {
            assert_eq!(m.get("yeongye_stream_replicas", labels), Some(3.0));
            return;
        }
        assert!(
            start.elapsed() < REDELIVERY,
            "{what}: the metrics say {now:?} current, leader {leader:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// HOPE's `agency-adapter run`, given every server, in `<dir>/hope`.
pub(crate) fn recipient(
    urls: &[String],
    dir: &std::path::Path,
    registry: &std::path::Path,
) -> AdapterProcess {
    let mut config = AdapterConfig {
        agency: HOPE.to_owned(),
        nats_urls: urls.to_vec(),
        state_dir: dir.join("hope/state"),
        extra: toml::Table::new(),
    };
    config.extra.insert(
        "registry".into(),
        toml::Value::String(registry.display().to_string()),
    );
    AdapterProcess::start_with(&dir.join("hope"), config)
}

/// Deliveries in the outbound stream for `agency`, counted by an ephemeral consumer.
pub(crate) async fn deliveries_in_stream(js: &jetstream::Context, agency: &str) -> u64 {
    let stream = js
        .get_stream(yeongye_proto::subject::OUT_STREAM)
        .await
        .expect("the outbound stream");
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: format!("yeongye.out.{agency}.delivery"),
            ..Default::default()
        })
        .await
        .expect("an ephemeral consumer");
    consumer.info().await.expect("consumer info").num_pending
}

/// Every id (sent by CENTRE to HOPE) RECEIVED, with one SUBMITTED and one RECEIVED in its
/// history, handed to the recipient once, and one delivery each in the outbound stream.
pub(crate) async fn assert_each_once(
    cluster: &NatsCluster,
    recipient: &AdapterProcess,
    ids: &[String],
    context: impl Fn() -> String,
) {
    let urls = cluster.urls();
    let wire = WireClient::connect(&urls[urls.len() - 1], CENTRE).await;
    wire.wait_all_in_state(ids, v1::ReferralState::Received, REDELIVERY, &context)
        .await;
    for id in ids {
        let reply = wire.query(id).await;
        let count = |s: v1::ReferralState| reply.history.iter().filter(|h| h.state() == s).count();
        assert_eq!(
            (
                count(v1::ReferralState::Submitted),
                count(v1::ReferralState::Received)
            ),
            (1, 1),
            "{reply:?}"
        );
    }
    recipient
        .wait_lines("every delivery", SHORT, |lines| {
            ids.iter().all(|id| {
                lines
                    .iter()
                    .any(|l| l.kind() == "delivery" && l.referral_id() == Some(id.as_str()))
            })
        })
        .await;
    for id in ids {
        assert_eq!(recipient.deliveries_of(id), 1, "{id} handed over twice");
    }
    let js = jetstream::new(cluster.nodes[0].connect().await);
    assert_eq!(
        deliveries_in_stream(&js, HOPE).await,
        ids.len() as u64,
        "one delivery per referral in the outbound stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_nats_node_killed_in_turn_under_traffic_loses_and_doubles_nothing() {
    let mut cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    let dir = tempfile::Builder::new()
        .prefix("yeongye-cluster-")
        .tempdir()
        .expect("tempdir");
    let registry_path = dir.path().join("registry.toml");
    registry::write(&registry_path, &[CENTRE, HOPE]);

    let mut config = BrokerConfig::new(&urls[0], &dir.path().join("broker/store"), &registry_path);
    config.nats_urls = urls.clone();
    config
        .extra
        .insert("stream_replicas".into(), toml::Value::Integer(3));
    let broker = BrokerProcess::start(&dir.path().join("broker"), config).await;

    let recipient = recipient(&urls, dir.path(), &registry_path);
    let sender = sdk::connect_to_all(&urls, CENTRE, &dir.path().join("sdk/centre")).await;

    // The sender: one referral after another, each retried by the SDK (same message id) until
    // stored, up to the number `allowed` (so that each phase's referrals are sent while that
    // phase's node is down, not before); the ids of those stored.
    let sent = Arc::new(AtomicUsize::new(0));
    let allowed = Arc::new(AtomicUsize::new(PER_PHASE));
    let total = PER_PHASE * 7;
    let traffic = {
        let sent = sent.clone();
        let allowed = allowed.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..total {
                while n >= allowed.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                ids.push(send_one(&sender, &sent).await);
            }
            ids
        })
    };

    // Each node in turn: killed while referrals flow, started again, caught up. The broker's
    // metrics follow: 3 replicas current, 2 while a node is down, 3 again once it caught up.
    let ops = OpsHttp::new(&broker.config().http_addr);
    wait_replicas_current(&ops, 3.0, "at start").await;
    let mut target = PER_PHASE;
    wait_sent(&sent, target, "before any kill").await;
    for i in 0..cluster.nodes.len() {
        let started = Instant::now();
        cluster.nodes[i].kill9();
        target += PER_PHASE;
        allowed.store(target, Ordering::SeqCst);
        wait_sent(&sent, target, &format!("with node {} down", i + 1)).await;
        eprintln!(
            "node {} down: {PER_PHASE} referrals stored in {:?}",
            i + 1,
            started.elapsed()
        );
        wait_replicas_current(&ops, 2.0, &format!("node {} down", i + 1)).await;
        cluster.nodes[i].start_again().await;
        cluster.wait_jetstream().await;
        wait_replicas_current(&ops, 3.0, &format!("node {} back", i + 1)).await;
        target += PER_PHASE;
        allowed.store(target, Ordering::SeqCst);
        wait_sent(&sent, target, &format!("after node {} returned", i + 1)).await;
    }
    let ids = traffic.await.expect("the sender");
    assert_eq!(ids.len(), total);

    // Everything the sender stored reaches RECEIVED, once, and is delivered once.
    assert_each_once(&cluster, &recipient, &ids, || {
        format!("{}\n{}", broker.log_tail(), recipient.describe())
    })
    .await;
    assert_eq!(ids.len(), total);
    let js = jetstream::new(cluster.nodes[0].connect().await);
    // The streams really are replicated (the test would prove nothing on R1).
    let info = js
        .get_stream(yeongye_proto::subject::IN_STREAM)
        .await
        .expect("the inbound stream")
        .info()
        .await
        .expect("stream info")
        .clone();
    assert_eq!(info.config.num_replicas, 3);
}
