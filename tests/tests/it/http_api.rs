//! The adapter's local HTTP/JSON API (`agency-adapter serve`) end to end, with a real
//! nats-server and broker: a referral's whole life driven only over HTTP between two adapters,
//! webhook delivery surviving an endpoint that is down and an adapter killed with -9,
//! `Idempotency-Key`, the problem documents of bad input (and that nothing is sent), the
//! OpenAPI document under schemathesis, and the Python example agency system.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use yeongye_proto::subject;
use yeongye_tests::http::{Delivery, Mode, ServeProcess, TOKEN, WEBHOOK_SECRET, WebhookReceiver};
use yeongye_tests::wire::ReferralBuilder;
use yeongye_tests::{System, v1, wait_for, wait_until};

use crate::{CENTRE, HOPE, REDELIVERY, SHORT};

/// A system with no `run` adapters (the serve adapters read the agencies' queues).
async fn system() -> System {
    System::builder().adapters(&[]).start().await
}

async fn serve(system: &System, agency: &str, delivery: Delivery) -> ServeProcess {
    serve_with(system, agency, delivery, &[]).await
}

async fn serve_with(
    system: &System,
    agency: &str,
    delivery: Delivery,
    extra: &[(&str, &str)],
) -> ServeProcess {
    let dir = system.dir().join("serve").join(agency);
    ServeProcess::start_with(&dir, agency, &[system.url()], delivery, extra).await
}

/// A valid referral as proto3 JSON (statutory basis, case management).
fn referral_json(from: &str, to: &str) -> (String, Value) {
    let referral = ReferralBuilder::new(from, to).build();
    let id = referral.referral_id.clone();
    (id, serde_json::to_value(&referral).expect("proto3 JSON"))
}

/// Pulls the inbox of `serve`, acknowledging every item, into `seen`, until `done(seen)`.
async fn pull_until(
    serve: &ServeProcess,
    seen: &mut Vec<Value>,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) {
    pull_within(serve, seen, what, SHORT, done).await;
}

/// [`pull_until`] with a timeout.
async fn pull_within(
    serve: &ServeProcess,
    seen: &mut Vec<Value>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Value]) -> bool,
) {
    let client = serve.client();
    let start = std::time::Instant::now();
    while !done(seen) {
        for item in serve.inbox().await {
            let id = item["message_id"].as_str().expect("message_id").to_owned();
            let r = client
                .post_raw(
                    &format!("/v1/inbox/{id}/ack"),
                    b"",
                    "application/json",
                    None,
                )
                .await;
            assert_eq!(r.status, 200, "ack {id}: {}", r.text());
            seen.push(item);
        }
        assert!(
            start.elapsed() < timeout,
            "{}: timed out waiting for {what}; seen {seen:#?}\n{}",
            serve.agency(),
            serve.describe()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The states notified for `referral_id` among pulled items.
fn notified(items: &[Value], referral_id: &str) -> Vec<String> {
    items
        .iter()
        .filter(|i| i["kind"] == "notification" && i["referral_id"] == referral_id)
        .filter_map(|i| i["item"]["state"].as_str())
        .map(|s| s.trim_start_matches("REFERRAL_STATE_").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referral_lifecycle_over_http_only() {
    let system = system().await;
    let hook = WebhookReceiver::start(Mode::Up).await;
    let mut centre = serve(&system, CENTRE, Delivery::Pull).await;
    let mut hope = serve(&system, HOPE, Delivery::Webhook(hook.url())).await;

    // The sender posts a referral.
    let (rid, body) = referral_json(CENTRE, HOPE);
    let r = centre
        .client()
        .post_json("/v1/referrals", &body, Some("lifecycle-1"))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["referral_id"], rid.as_str());

    // The recipient's system gets it by webhook, signed.
    wait_until(
        "the delivery at the recipient's webhook",
        SHORT,
        || hook.received().iter().any(|i| i.kind == "delivery"),
        || hope.describe(),
    )
    .await;
    let delivery = hook
        .received()
        .into_iter()
        .find(|i| i.kind == "delivery")
        .expect("delivery");
    assert!(delivery.signature_ok, "bad signature");
    assert_eq!(
        delivery.header_message_id.as_deref(),
        Some(delivery.message_id.as_str())
    );
    assert_eq!(delivery.body["referral_id"], rid.as_str());
    assert_eq!(delivery.body["item"]["reason"], body["reason"]);
    assert_eq!(delivery.body["item"]["client"], body["client"]);

    // The sender sees DELIVERED, RECEIVED (sent once the webhook said 2xx).
    let mut seen = Vec::new();
    pull_until(&centre, &mut seen, "RECEIVED", |s| {
        notified(s, &rid).contains(&"RECEIVED".to_owned())
    })
    .await;

    // The recipient's case worker moves it on; the sender sees each step.
    for (status, state) in [
        ("STATUS_ACCEPTED", "ACCEPTED"),
        ("STATUS_IN_PROGRESS", "IN_PROGRESS"),
        ("STATUS_COMPLETED", "COMPLETED"),
    ] {
        let r = hope
            .client()
            .post_json(
                &format!("/v1/referrals/{rid}/status"),
                &json!({"status": status, "note": "진행"}),
                None,
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        pull_until(&centre, &mut seen, state, |s| {
            notified(s, &rid).contains(&state.to_owned())
        })
        .await;
    }
    assert_eq!(
        notified(&seen, &rid),
        [
            "DELIVERED",
            "RECEIVED",
            "ACCEPTED",
            "IN_PROGRESS",
            "COMPLETED"
        ],
        "each state once, in order"
    );

    // Both sides can look it up.
    for side in [&centre, &hope] {
        let r = side.client().get(&format!("/v1/referrals/{rid}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let reply = r.json();
        assert_eq!(reply["state"], "REFERRAL_STATE_COMPLETED");
        assert_eq!(
            reply["history"].as_array().map(Vec::len),
            Some(6),
            "{reply}"
        );
    }
    // Each webhook item came once.
    let ids: Vec<_> = hook.received().into_iter().map(|i| i.message_id).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(ids.len(), unique.len(), "{ids:?}");

    centre.stop().await;
    hope.stop().await;
    drop(system);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_then_up_delivers_every_item_once_across_kill9() {
    const N: usize = 6;
    let system = system().await;
    let hook = WebhookReceiver::start(Mode::Failing).await;
    let mut hope = serve(&system, HOPE, Delivery::Webhook(hook.url())).await;
    let wire = system.wire(CENTRE).await;
    let mut rids = Vec::new();
    for i in 0..N {
        let referral = ReferralBuilder::new(CENTRE, HOPE)
            .reason(&format!("queued {i}"))
            .build();
        rids.push(referral.referral_id.clone());
        wire.send_referral(&referral).await;
    }

    // Everything is queued durably while the endpoint fails; nothing is RECEIVED yet.
    wait_for(
        "all deliveries queued at the adapter",
        SHORT,
        || async { (hope.inbox().await.len() == N && hook.refused() > 0).then_some(()) },
        || hope.describe(),
    )
    .await;
    for state in wire.states(&rids).await {
        assert_eq!(state, Some(v1::ReferralState::Delivered));
    }

    // kill -9 with items queued; the endpoint hangs up for a while, then comes back.
    hope.kill9();
    hook.set_mode(Mode::Hangup);
    let refused_before = hook.refused();
    hope.start_again().await;
    // The restarted adapter tries its queue again (and is hung up on): waited for, so that the
    // check below is made after the adapter did try, not merely after some time.
    wait_until(
        "the restarted adapter pushing to the webhook again",
        REDELIVERY,
        || hook.refused() > refused_before,
        || hope.describe(),
    )
    .await;
    assert!(hook.received().is_empty());
    assert_eq!(hope.inbox().await.len(), N, "the queue survived kill -9");
    hook.set_mode(Mode::Up);

    wait_until(
        "every delivery at the webhook",
        REDELIVERY,
        || hook.received().len() >= N,
        || hope.describe(),
    )
    .await;
    wire.wait_all_in_state(&rids, v1::ReferralState::Received, SHORT, || {
        hope.describe()
    })
    .await;

    // One more (a barrier: items arrive in order), then nothing came twice.
    let last = ReferralBuilder::new(CENTRE, HOPE).reason("barrier").build();
    wire.send_referral(&last).await;
    wait_until(
        "the barrier delivery",
        SHORT,
        || {
            hook.received()
                .iter()
                .any(|i| i.body["referral_id"] == last.referral_id.as_str())
        },
        || hope.describe(),
    )
    .await;
    let received = hook.received();
    let mut per_message: BTreeMap<String, usize> = BTreeMap::new();
    for item in &received {
        assert!(item.signature_ok, "bad signature on {}", item.message_id);
        *per_message.entry(item.message_id.clone()).or_default() += 1;
    }
    assert!(per_message.values().all(|n| *n == 1), "{per_message:?}");
    let delivered: Vec<_> = received
        .iter()
        .filter(|i| i.kind == "delivery")
        .filter_map(|i| i.body["referral_id"].as_str())
        .collect();
    let mut expected: Vec<&str> = rids.iter().map(String::as_str).collect();
    expected.push(&last.referral_id);
    assert_eq!(delivered, expected, "every delivery once, in order");
    assert!(hope.inbox().await.is_empty());
    hope.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_post_with_the_same_idempotency_key_creates_one_referral() {
    let system = system().await;
    let mut centre = serve(&system, CENTRE, Delivery::Pull).await;
    let hope = serve(&system, HOPE, Delivery::Pull).await;
    let (_, mut body) = referral_json(CENTRE, HOPE);
    // No referralId: the adapter makes one, and a retry must not make another.
    body.as_object_mut().expect("object").remove("referralId");

    let first = centre
        .client()
        .post_json("/v1/referrals", &body, Some("order-42"))
        .await;
    assert_eq!(first.status, 202, "{}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = centre
        .client()
        .post_json("/v1/referrals", &body, Some("order-42"))
        .await;
    assert_eq!(again.status, 202);
    assert_eq!(again.json(), first.json());
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // Across a kill -9 of the adapter too.
    centre.kill9();
    centre.start_again().await;
    let after = centre
        .client()
        .post_json("/v1/referrals", &body, Some("order-42"))
        .await;
    assert_eq!(after.status, 202);
    assert_eq!(after.json(), first.json());
    // The same key with another request is refused.
    let mut other = body.clone();
    other["reason"] = json!("another referral");
    let conflict = centre
        .client()
        .post_json("/v1/referrals", &other, Some("order-42"))
        .await;
    assert_eq!(conflict.status, 422, "{}", conflict.text());
    assert_eq!(
        conflict.json()["type"],
        "urn:yeongye:problem:idempotency-key-reused"
    );

    // One referral: one delivery at the recipient, one DELIVERED at the sender.
    let rid = first.json()["referral_id"].as_str().expect("id").to_owned();
    let (_, barrier) = referral_json(CENTRE, HOPE);
    let barrier_id = barrier["referralId"].as_str().expect("id").to_owned();
    let r = centre
        .client()
        .post_json("/v1/referrals", &barrier, None)
        .await;
    assert_eq!(r.status, 202);
    let mut at_hope = Vec::new();
    pull_until(&hope, &mut at_hope, "the barrier delivery", |s| {
        s.iter()
            .any(|i| i["kind"] == "delivery" && i["referral_id"] == barrier_id.as_str())
    })
    .await;
    let deliveries: Vec<_> = at_hope
        .iter()
        .filter(|i| i["kind"] == "delivery")
        .map(|i| i["referral_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(deliveries, [rid.as_str(), barrier_id.as_str()]);
    // The adapter was killed while the first notifications were on their way: one may come
    // only after the consumer's ack wait.
    let mut at_centre = Vec::new();
    pull_within(
        &centre,
        &mut at_centre,
        "DELIVERED of the referral and RECEIVED of the barrier",
        REDELIVERY,
        |s| {
            notified(s, &rid).contains(&"DELIVERED".to_owned())
                && notified(s, &barrier_id).contains(&"RECEIVED".to_owned())
        },
    )
    .await;
    assert_eq!(
        notified(&at_centre, &rid)
            .iter()
            .filter(|s| *s == "DELIVERED")
            .count(),
        1
    );
    let inbound = inbound_referrals(&system, CENTRE).await;
    assert_eq!(inbound, 2, "two referral messages in the inbound stream");
}

/// How many referral messages `agency` has in the inbound stream.
async fn inbound_referrals(system: &System, agency: &str) -> u64 {
    let wire = system.wire(agency).await;
    let stream = wire
        .jetstream()
        .get_stream(subject::IN_STREAM)
        .await
        .expect("inbound stream");
    let mut subjects = stream
        .info_with_subjects(subject::inbound(agency, subject::InKind::Referral))
        .await
        .expect("stream info");
    let mut total = 0u64;
    while let Some(entry) = subjects.next().await {
        let (_, count) = entry.expect("stream subjects");
        total += u64::try_from(count).expect("count");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_problem_document_and_sends_nothing() {
    let system = system().await;
    let centre = serve_with(
        &system,
        CENTRE,
        Delivery::Pull,
        &[("body_limit_bytes", "4096")],
    )
    .await;
    let client = centre.client();
    let (_, good) = referral_json(CENTRE, HOPE);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).expect("JSON")
    };
    /// What, the body, and the status, problem type and field expected.
    type Case<'a> = (&'a str, Vec<u8>, u16, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            br#"{"toAgency": "hope-support",}"#.to_vec(),
            400,
            "malformed-json",
            None,
        ),
        (
            "not UTF-8",
            b"{\"reason\": \"\xff\"}".to_vec(),
            400,
            "malformed-json",
            None,
        ),
        ("empty body", Vec::new(), 400, "malformed-json", None),
        (
            "unknown field",
            with(&|v| v["clientName"] = json!("x")),
            422,
            "unknown-field",
            Some("clientName"),
        ),
        (
            "unknown nested field",
            with(&|v| v["client"]["ssn"] = json!("x")),
            422,
            "unknown-field",
            Some("client.ssn"),
        ),
        (
            "wrong type",
            with(&|v| v["urgency"] = json!(["URGENCY_CRISIS"])),
            422,
            "wrong-type",
            Some("urgency"),
        ),
        ("not an object", b"[1, 2]".to_vec(), 422, "wrong-type", None),
        (
            "unknown enum value",
            with(&|v| v["purpose"] = json!("PURPOSE_GOSSIP")),
            422,
            "invalid-field",
            Some("purpose"),
        ),
        (
            "missing recipient",
            with(&|v| {
                v.as_object_mut().map(|o| o.remove("toAgency"));
            }),
            422,
            "missing-field",
            Some("toAgency"),
        ),
        (
            "missing legal basis",
            with(&|v| {
                v.as_object_mut().map(|o| o.remove("statutoryBasis"));
            }),
            422,
            "missing-field",
            Some("legalBasis"),
        ),
        (
            "missing purpose",
            with(&|v| {
                v.as_object_mut().map(|o| o.remove("purpose"));
            }),
            422,
            "missing-field",
            Some("purpose"),
        ),
        (
            "malformed agency id",
            with(&|v| v["toAgency"] = json!("Hope Support")),
            422,
            "invalid-field",
            Some("toAgency"),
        ),
        (
            "too large",
            with(&|v| v["reason"] = json!("x".repeat(8000))),
            413,
            "payload-too-large",
            None,
        ),
    ];
    for (what, body, status, kind, field) in cases {
        let r = client
            .post_raw("/v1/referrals", &body, "application/json", None)
            .await;
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
        let p = r.json();
        assert_eq!(
            p["type"],
            format!("urn:yeongye:problem:{kind}"),
            "{what}: {p}"
        );
        assert_eq!(p["status"], status, "{what}: {p}");
        assert!(
            p["title"].is_string() && p["detail"].is_string(),
            "{what}: {p}"
        );
        assert_eq!(p["field"].as_str(), field, "{what}: {p}");
    }
    let r = client
        .post_raw(
            "/v1/referrals",
            &serde_json::to_vec(&good).expect("JSON"),
            "text/plain",
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json()["type"].as_str()),
        (415, Some("urn:yeongye:problem:unsupported-media-type"))
    );
    let r = client
        .with_token(None)
        .post_json("/v1/referrals", &good, None)
        .await;
    assert_eq!(
        (r.status, r.json()["type"].as_str()),
        (401, Some("urn:yeongye:problem:unauthorized"))
    );
    let r = client
        .with_token(Some("not-the-token-at-all"))
        .post_json("/v1/referrals", &good, None)
        .await;
    assert_eq!(r.status, 401);
    let r = client
        .post_json(
            &format!("/v1/referrals/{}/status", "a%20b"),
            &json!({"status": "STATUS_ACCEPTED"}),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json()["field"].as_str()),
        (400, Some("referral_id"))
    );
    let r = client
        .post_json("/v1/referrals", &good, Some("two words"))
        .await;
    assert_eq!(
        (r.status, r.json()["field"].as_str()),
        (400, Some("Idempotency-Key"))
    );
    assert_eq!(
        inbound_referrals(&system, CENTRE).await,
        0,
        "bad input sent something"
    );

    // An agency id of the right form that is not in the registry: it has no sealing key, so
    // the client's data cannot be sealed to it, and nothing is sent (the broker would refuse it
    // as UNKNOWN_RECIPIENT; the raw-wire tests show that).
    let mut unknown = good.clone();
    unknown["toAgency"] = json!(yeongye_tests::registry::UNREGISTERED);
    let r = client.post_json("/v1/referrals", &unknown, None).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["field"], "toAgency", "{}", r.text());
    assert!(r.text().contains("no sealing key"), "{}", r.text());
    assert_eq!(
        inbound_referrals(&system, CENTRE).await,
        0,
        "a referral that cannot be sealed was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let st = install_schemathesis();
    let system = system().await;
    let centre = serve(&system, CENTRE, Delivery::Pull).await;
    // Something in the inbox, so that its responses are exercised too.
    let wire = system.wire(HOPE).await;
    wire.send_referral(&ReferralBuilder::new(HOPE, CENTRE).build())
        .await;
    let report = system.dir().join("schemathesis");
    let output = tokio::process::Command::new(&st)
        .arg("run")
        .arg(format!("http://{}/openapi.json", centre.client().addr()))
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
        ])
        .args(["--max-examples", "40", "--request-timeout", "30", "--workers", "1"])
        .args(["--suppress-health-check", "all"])
        .arg("--report-dir")
        .arg(&report)
        // Its cache (.schemathesis/) goes to the test's directory, not the repository.
        .current_dir(system.dir())
        .env_remove("SCHEMATHESIS_HOOKS")
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        centre.describe()
    );
    drop(system);
}

/// Runs tests/install-schemathesis.sh and returns the `st` it prints, or panics saying why.
fn install_schemathesis() -> PathBuf {
    let script = yeongye_tests::repo_root().join("tests/install-schemathesis.sh");
    let output = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "could not install schemathesis with {} (it needs python3 with venv and access to PyPI):\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        path.is_file(),
        "install-schemathesis.sh printed {path:?}, not a file"
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_sends_and_receives_through_the_api() {
    let system = system().await;
    let dir = system.dir().join("python");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let port = yeongye_tests::process::free_port();
    let webhook = format!("http://127.0.0.1:{port}/yeongye");
    let centre = serve(&system, CENTRE, Delivery::Pull).await;
    let hope = serve(&system, HOPE, Delivery::Webhook(webhook)).await;
    let token = system.dir().join("serve").join(CENTRE).join("token");
    let secret = dir.join("secret");
    std::fs::write(&secret, WEBHOOK_SECRET).expect("secret");
    let script = yeongye_tests::repo_root().join("examples/python-agency/agency.py");
    let store = dir.join("hope-store");

    // The recipient's system: the example's webhook endpoint, accepting what it gets.
    let log = yeongye_tests::process::append_log(&dir.join("receiver.log"));
    let mut receiver = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--adapter", &format!("http://{}", hope.client().addr())])
        .arg("--token-file")
        .arg(&token)
        .args([
            "receive",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--auto-accept",
        ])
        .arg("--secret-file")
        .arg(&secret)
        .arg("--store")
        .arg(&store)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("python3 examples/python-agency/agency.py receive");

    // The sender's system: the example's `send`.
    let sent = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--adapter", &format!("http://{}", centre.client().addr())])
        .arg("--token-file")
        .arg(&token)
        .args([
            "send",
            "--to",
            HOPE,
            "--pseudonym",
            "p-python-1",
            "--household",
            "2인 가구",
            "--urgency",
            "URGENCY_PRIORITY",
        ])
        .output()
        .await
        .expect("python3 agency.py send");
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let line: Value = serde_json::from_slice(&sent.stdout).expect("send prints JSON");
    let rid = line["referral_id"]
        .as_str()
        .expect("referral_id")
        .to_owned();

    // The receiver kept the referral and accepted it; the broker agrees.
    let file = store.join("referrals").join(format!("{rid}.json"));
    let context = || {
        format!(
            "{}\n{}\n{}",
            std::fs::read_to_string(dir.join("receiver.log")).unwrap_or_default(),
            hope.describe(),
            centre.describe()
        )
    };
    wait_until(
        "the referral in the python store",
        SHORT,
        || file.is_file(),
        context,
    )
    .await;
    let kept: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("JSON");
    assert_eq!(kept["client"]["household"], "2인 가구");
    let wire = system.wire(CENTRE).await;
    wire.wait_state(&rid, v1::ReferralState::Accepted, SHORT, context)
        .await;

    // The sender's system sees it with the example's `status`.
    let status = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--adapter", &format!("http://{}", centre.client().addr())])
        .arg("--token-file")
        .arg(&token)
        .args(["status", &rid])
        .output()
        .await
        .expect("python3 agency.py status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let reply: Value = serde_json::from_slice(&status.stdout).expect("status prints JSON");
    assert_eq!(reply["state"], "REFERRAL_STATE_ACCEPTED");
    assert!(hope.inbox().await.is_empty());

    let _ = receiver.start_kill();
    let _ = receiver.wait().await;
}
