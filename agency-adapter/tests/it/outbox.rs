//! The outbox against a real nats-server that goes away: sends are answered "queued" at once,
//! survive the adapter being dropped and opened again, and reach the stream in the order they
//! were accepted, once each, under the message ids they were given.

use std::time::{Duration, Instant};

use prost::Message as _;
use yeongye_adapter::{Adapter, AdapterConfig, Sent, v1};

use crate::harness::*;

fn config(server: &NatsServer, state: &std::path::Path) -> AdapterConfig {
    let mut cfg = AdapterConfig::new(ME, [server.url()], state);
    cfg.outbox.queue_after_ms = 300;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_while_the_server_is_down_then_forwarded_in_order() {
    let mut server = NatsServer::start();
    Broker::setup(&server, Duration::from_secs(120), Duration::from_secs(30)).await;
    let state = tempfile::tempdir().unwrap();
    let mut accepted = Vec::new();
    {
        let adapter = Adapter::connect(config(&server, state.path()))
            .await
            .unwrap();
        // Online, the outbox empty: stored directly.
        let out = adapter.prepare_referral(outgoing_referral("p-0")).unwrap();
        assert_eq!(adapter.submit(&out).await.unwrap(), Sent::Stored);
        accepted.push(out.message_id().to_owned());

        server.kill();
        let started = Instant::now();
        for n in 1..=20 {
            let out = adapter
                .prepare_referral(outgoing_referral(&format!("p-{n}")))
                .unwrap();
            assert_eq!(adapter.submit(&out).await.unwrap(), Sent::Queued, "#{n}");
            accepted.push(out.message_id().to_owned());
        }
        // Only the first one or two wait for `queue_after`; then the hub is known down.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let status = adapter.outbox_status().await.unwrap().unwrap();
        assert_eq!(status.depth, 20, "{status:?}");
        assert_eq!(status.hub, "unreachable", "{status:?}");
        assert!(status.oldest_age_ms.is_some());
    }
    // The adapter is gone (as after a crash: nothing was forwarded); a new one on the same
    // state directory, started while the hub is still down, forwards once it is back.
    let adapter = Adapter::builder(config(&server, state.path()))
        .retry_on_initial_connect(true)
        .connect()
        .await
        .unwrap();
    assert_eq!(adapter.outbox_status().await.unwrap().unwrap().depth, 20);
    server.start_again();
    let broker = Broker::reconnect(&server).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while adapter.outbox_status().await.unwrap().unwrap().depth > 0 {
        assert!(Instant::now() < deadline, "the outbox did not empty");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(broker.inbound_count().await, 21);
    let mut stored = Vec::new();
    for seq in 1..=21 {
        let m = broker.inbound_message(seq).await;
        let env = v1::Envelope::decode(m.payload.as_ref()).unwrap();
        assert_eq!(
            m.headers.get("Nats-Msg-Id").unwrap().as_str(),
            env.message_id
        );
        stored.push(env.message_id);
    }
    assert_eq!(stored, accepted, "stored in the order accepted, once each");
    let status = adapter.outbox_status().await.unwrap().unwrap();
    assert_eq!(status.hub, "ok");
    assert_eq!(status.forwarded_total, 20);
}
