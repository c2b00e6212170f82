//! The adapter's outbox (issue #14): with every NATS node stopped, referrals accepted by an
//! adapter over HTTP, the SDK and the CLI are answered "queued", survive a kill -9 of the
//! adapter, and arrive at the recipient once each, in the order accepted, with the ids the
//! adapter returned, once the node is back.

use serde_json::Value;
use yeongye_adapter::{Adapter, AdapterConfig, Sent};
use yeongye_proto::subject;
use yeongye_tests::http::{Delivery, ServeProcess};
use yeongye_tests::wire::ReferralBuilder;
use yeongye_tests::{System, wait_for};

use crate::{CENTRE, HOPE, REDELIVERY, SHORT};

const OVER_HTTP: usize = 50;
const OVER_SDK: usize = 40;
const OVER_CLI: usize = 10;

/// A referral from the sending agency, as proto3 JSON.
fn referral_json(n: usize) -> Value {
    let referral = ReferralBuilder::new(CENTRE, HOPE)
        .reason(&format!("outbox {n}"))
        .build();
    serde_json::to_value(&referral).expect("proto3 JSON")
}

/// `(referral_id, message_id)` from an answer, asserting it says `status`.
fn ids_of(body: &Value, status: &str, what: &str) -> (String, String) {
    assert_eq!(body["status"], status, "{what}: {body}");
    (
        body["referral_id"]
            .as_str()
            .expect("referral_id")
            .to_owned(),
        body["message_id"].as_str().expect("message_id").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrals_accepted_while_the_hub_is_down_arrive_in_order_once_each() {
    let mut system = System::builder().adapters(&[HOPE]).start().await;
    let dir = system.dir().join("serve").join(CENTRE);
    let mut serve = ServeProcess::start(&dir, CENTRE, &[system.url()], Delivery::Pull).await;
    let http = serve.client();
    // (referral id, message id) in the order the adapter accepted them.
    let mut accepted: Vec<(String, String)> = Vec::new();

    // Online: stored at once, and through to the recipient (everything is up).
    let r = http
        .post_json("/v1/referrals", &referral_json(0), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    accepted.push(ids_of(&r.json(), "stored", "online"));
    let recipient = system.adapter(HOPE);
    recipient
        .wait_lines("the first delivery", SHORT, |lines| {
            lines.iter().any(|l| l.kind() == "delivery")
        })
        .await;

    // Every node stopped.
    system.nats.stop().await;

    // Over HTTP: 202 "queued", flushed before the answer.
    let mut first_body = Value::Null;
    for n in 1..=OVER_HTTP {
        let key = format!("outbox-{n}");
        let body = referral_json(n);
        if n == 1 {
            first_body = body.clone();
        }
        let r = http.post_json("/v1/referrals", &body, Some(&key)).await;
        assert_eq!(r.status, 202, "#{n}: {}", r.text());
        accepted.push(ids_of(&r.json(), "queued", "over HTTP"));
    }
    // A retry with the same key answers the same ids, still queued, and queues nothing more.
    let r = http
        .post_json("/v1/referrals", &first_body, Some("outbox-1"))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(ids_of(&r.json(), "queued", "replay"), accepted[1]);
    // A status update queues too (the sender cancels the first referral of the outage); one
    // with a note cannot: the note is sealed to the other party, whom only the broker names.
    let cancelled = accepted[1].0.clone();
    let path = format!("/v1/referrals/{cancelled}/status");
    let r = http
        .post_json(
            &path,
            &serde_json::json!({"status": "STATUS_CANCELLED", "note": "sent twice"}),
            None,
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["field"], "note", "{}", r.text());
    let r = http
        .post_json(
            &path,
            &serde_json::json!({"status": "STATUS_CANCELLED"}),
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["status"], "queued", "{}", r.text());
    let queued = OVER_HTTP + 1;
    let health = http.get("/healthz").await.json();
    assert_eq!(health["outbox"]["depth"], queued, "{health}");
    assert_eq!(health["outbox"]["hub"], "unreachable", "{health}");
    assert!(health["outbox"]["oldest_age_ms"].is_u64(), "{health}");
    let metrics = http.get("/metrics").await.text();
    assert!(
        metrics.contains(&format!(
            "yeongye_adapter_outbox_depth{{agency=\"{CENTRE}\"}} {queued}\n"
        )),
        "{metrics}"
    );
    // `agency-adapter status` beside the running adapter: from the status file it keeps.
    let config = serve.config_path();
    wait_for(
        "agency-adapter status to show the queue",
        SHORT,
        || {
            let config = config.clone();
            async move {
                let out = yeongye_tests::adapter::cli(&config, &["status"]).await;
                let v = out.assert_success().json();
                (v["source"] == "status file" && v["outbox"]["depth"] == queued).then_some(())
            }
        },
        || serve.log_tail(),
    )
    .await;

    // The adapter dies with everything still queued.
    serve.kill9();
    let status = yeongye_tests::adapter::cli(&serve.config_path(), &["status"]).await;
    status.assert_success();
    assert_eq!(status.json()["source"], "store", "{status:?}");
    assert_eq!(status.json()["outbox"]["depth"], queued, "{status:?}");

    // Over the SDK, on the same state directory (nothing runs there now).
    {
        let cfg = AdapterConfig::load(&serve.config_path()).expect("config");
        let sdk = Adapter::builder(cfg)
            .retry_on_initial_connect(true)
            .connect()
            .await
            .expect("connect without a server");
        for n in 0..OVER_SDK {
            let referral = ReferralBuilder::new(CENTRE, HOPE)
                .reason(&format!("outbox sdk {n}"))
                .build();
            let out = sdk.prepare_referral(referral).expect("valid referral");
            assert_eq!(sdk.submit(&out).await.expect("accepted"), Sent::Queued);
            accepted.push((out.referral_id().to_owned(), out.message_id().to_owned()));
        }
        let status = sdk.outbox_status().await.expect("store").expect("outbox");
        assert_eq!(status.depth as usize, queued + OVER_SDK, "{status:?}");
    }

    // Over the CLI: exit 0, "queued".
    for n in 0..OVER_CLI {
        let file = dir.join(format!("cli-{n}.json"));
        std::fs::write(&file, referral_json(1000 + n).to_string()).expect("write referral");
        let out = yeongye_tests::adapter::cli(
            &serve.config_path(),
            &["send", file.to_str().expect("utf-8 path")],
        )
        .await;
        out.assert_success();
        accepted.push(ids_of(&out.json(), "queued", "CLI"));
        assert!(out.stderr.contains("queued"), "{out:?}");
    }

    // The adapter starts again while the hub is still down, then the hub returns.
    serve.start_again().await;
    let health = http.get("/healthz").await.json();
    assert_eq!(
        health["outbox"]["depth"],
        queued + OVER_SDK + OVER_CLI,
        "{health}"
    );
    system.nats.start_again().await;

    // All of them arrive at the recipient, once each, in the order accepted.
    let expected: Vec<&str> = accepted.iter().map(|(r, _)| r.as_str()).collect();
    let recipient = system.adapter(HOPE);
    recipient
        .wait_lines("every referral delivered", REDELIVERY, |lines| {
            lines.iter().filter(|l| l.kind() == "delivery").count() >= expected.len()
        })
        .await;
    let delivered: Vec<String> = recipient
        .lines_of("delivery")
        .iter()
        .map(|l| l.referral_id().expect("referral_id").to_owned())
        .collect();
    assert_eq!(
        delivered, expected,
        "delivered once each, in the order accepted"
    );

    // JetStream stored them in that order under the message ids the adapter returned.
    let client = system.nats.connect().await;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(subject::IN_STREAM)
        .await
        .expect("inbound stream");
    let referral_subject = format!("yeongye.in.{CENTRE}.referral");
    let mut stored = Vec::new();
    let mut seq = 1;
    while stored.len() < accepted.len() {
        let m = wait_for(
            "the inbound stream's next message",
            SHORT,
            || {
                let stream = stream.clone();
                async move { stream.get_raw_message(seq).await.ok() }
            },
            || format!("seq {seq}"),
        )
        .await;
        if m.subject.as_str() == referral_subject {
            let id = m.headers.get("Nats-Msg-Id").expect("Nats-Msg-Id");
            stored.push(id.as_str().to_owned());
        }
        seq += 1;
    }
    let expected_ids: Vec<&str> = accepted.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(
        stored, expected_ids,
        "stored in the order accepted, once each"
    );
    // The queued cancellation reached the recipient too.
    system
        .adapter(HOPE)
        .wait_notified(&cancelled, "CANCELLED", SHORT)
        .await;

    // And the outbox is empty again.
    let health = wait_for(
        "the outbox empty",
        SHORT,
        || {
            let http = http.clone();
            async move {
                let h = http.get("/healthz").await.json();
                (h["outbox"]["depth"] == 0).then_some(h)
            }
        },
        || serve.log_tail(),
    )
    .await;
    assert_eq!(health["outbox"]["hub"], "ok", "{health}");
}
