//! The `agency-adapter` binary against a real nats-server, with the test playing the broker.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use yeongye_adapter::{ids, v1};
use yeongye_proto::subject::{self, OutKind};

use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_agency-adapter");

fn write_config(dir: &Path, url: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("adapter.toml");
    let state = dir.join("state");
    std::fs::write(
        &path,
        format!(
            "agency = \"{ME}\"\nnats_urls = [\"{url}\"]\nstate_dir = \"{}\"\n",
            state.display()
        ),
    )
    .unwrap();
    path
}

fn cli(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("YEONGYE_AGENCY")
        .env_remove("YEONGYE_NATS_URLS")
        .env_remove("YEONGYE_STATE_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// Multi-threaded: the test blocks on child processes while its status responder runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_commands() {
    let server = NatsServer::start();
    let broker = Broker::setup(&server, Duration::from_secs(120), Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url());

    // Bad input: exit 2, a clear message, nothing sent.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"toAgency": "hope-support", "clientName": "x"}"#).unwrap();
    let out = cli(&config, &["send", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("unknown field `clientName`"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(
        &config,
        &["send", "-"],
        Some(
            r#"{"toAgency": "hope-support", "client": {"pseudonymId": "p"},
                "field": "FIELD_OF_NEED_HOUSING"}"#,
        ),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("urgency"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(
        &config,
        &["send", "-"],
        Some(
            r#"{"toAgency": "hope-support", "client": {"pseudonymId": "p"},
                "field": "FIELD_OF_NEED_HOUSING", "urgency": "URGENCY_CRISIS",
                "purpose": "PURPOSE_CASE_MANAGEMENT"}"#,
        ),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("legal_basis"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&config, &["send", "/nonexistent/x.json"], None);
    assert_eq!(out.status.code(), Some(2));
    let out = cli(&config, &["update", "r-1", "finished"], None);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(broker.inbound_count().await, 0);

    // send from stdin.
    let out = cli(
        &config,
        &["send", "-"],
        Some(
            r#"{"toAgency":"hope-support","client":{"pseudonymId":"p-1","name":"홍길동"},
                "field":"FIELD_OF_NEED_HOUSING","urgency":"URGENCY_CRISIS",
                "purpose":"PURPOSE_CASE_MANAGEMENT","consentId":"c-1",
                "dataCategories":["DATA_CATEGORY_IDENTITY"]}"#,
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let referral_id = line["referral_id"].as_str().unwrap().to_owned();
    let env = v1::Envelope::decode(broker.inbound_message(1).await.payload.as_ref()).unwrap();
    assert_eq!(
        v1::Referral::decode(env.payload.as_ref())
            .unwrap()
            .referral_id,
        referral_id
    );
    assert!(!text(&out.stderr).contains("홍길동"));

    // update.
    let out = cli(
        &config,
        &["update", &referral_id, "in-progress", "--note", "visited"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, update) = status_update_of(&broker.inbound_message(2).await);
    assert_eq!(line["message_id"].as_str(), Some(id.as_str()));
    assert_eq!(update.status, v1::Status::InProgress as i32);
    assert_eq!(update.note, "visited");

    // status: an answer, then an error answer (exit 1), then no broker at all (exit 1).
    let mut queries = broker.client.subscribe(subject::query(ME)).await.unwrap();
    let responder = broker.client.clone();
    tokio::spawn(async move {
        while let Some(q) = queries.next().await {
            let env = v1::Envelope::decode(q.payload.as_ref()).unwrap();
            let query = v1::StatusQuery::decode(env.payload.as_ref()).unwrap();
            let reply = if query.referral_id == "unknown" {
                v1::StatusReply {
                    error: Some(v1::Rejection {
                        code: v1::ReasonCode::UnknownReferral as i32,
                        detail: "no such referral".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            } else {
                v1::StatusReply {
                    referral_id: query.referral_id,
                    state: v1::ReferralState::Delivered as i32,
                    ..Default::default()
                }
            };
            let out = envelope(
                "broker",
                "x",
                v1::PayloadType::StatusReply,
                reply.encode_to_vec(),
            );
            responder
                .publish(q.reply.unwrap(), out.encode_to_vec().into())
                .await
                .unwrap();
        }
    });
    synced(&broker.client).await;
    let out = cli(&config, &["status", &referral_id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply: v1::StatusReply = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply.state, v1::ReferralState::Delivered as i32);
    let out = cli(&config, &["status", "unknown"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("REASON_CODE_UNKNOWN_REFERRAL"));

    let down = write_config(
        &dir.path().join("down"),
        &format!("nats://127.0.0.1:{}", free_port()),
    );
    let out = cli(&down, &["status", "r-1"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("could not connect"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_commands() {
    let server = NatsServer::start();
    let broker = Broker::setup(&server, Duration::from_secs(120), Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url());

    // Bad grants: exit 2, nothing sent.
    for (input, expect) in [
        (
            r#"{"clientPseudonymId": "p-1", "clientName": "홍길동"}"#,
            "unknown field `clientName`",
        ),
        (r#"{"clientPseudonymId": "p-1",}"#, "malformed JSON"),
        (r#"{"purposes": "PURPOSE_CASE_MANAGEMENT"}"#, "invalid type"),
        (
            r#"{"clientPseudonymId": "p-1", "recipientAgencies": ["hope-support"],
                "purposes": ["PURPOSE_CASE_MANAGEMENT"], "dataCategories": ["DATA_CATEGORY_IDENTITY"],
                "formReference": "f-1", "collectedBy": "hope-support"}"#,
            "collected_by",
        ),
        (r#"{"clientPseudonymId": "p-1"}"#, "recipient"),
    ] {
        let out = cli(&config, &["consent", "grant", "-"], Some(input));
        assert_eq!(out.status.code(), Some(2), "{input}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(expect),
            "{input}: {}",
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).contains("홍길동"));
    }
    let out = cli(&config, &["consent", "revoke", "bad id"], None);
    assert_eq!(out.status.code(), Some(2));
    let out = cli(
        &config,
        &["consent", "revoke", "c-1", "--at-ms", "-5"],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = cli(&config, &["purge-confirm", "r-1", ""], None);
    assert_eq!(out.status.code(), Some(2));
    let out = cli(&config, &["consent", "show", "bad id"], None);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(broker.inbound_count().await, 0);

    // grant, revoke, purge-confirm.
    let grant = dir.path().join("grant.json");
    std::fs::write(
        &grant,
        r#"{"clientPseudonymId": "p-1", "recipientAgencies": ["hope-support"],
            "purposes": ["PURPOSE_CASE_MANAGEMENT"], "dataCategories": ["DATA_CATEGORY_IDENTITY"],
            "formReference": "동의서-1"}"#,
    )
    .unwrap();
    let out = cli(
        &config,
        &["consent", "grant", grant.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let consent_id = line["consent_id"].as_str().unwrap().to_owned();
    let env = v1::Envelope::decode(broker.inbound_message(1).await.payload.as_ref()).unwrap();
    let g = v1::ConsentGrant::decode(env.payload.as_ref()).unwrap();
    assert_eq!(
        (g.consent_id.as_str(), g.collected_by.as_str()),
        (consent_id.as_str(), ME)
    );

    let out = cli(
        &config,
        &["consent", "revoke", &consent_id, "--at-ms", "1000"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = broker.inbound_message(2).await;
    assert_eq!(
        m.headers.get("Nats-Msg-Id").unwrap().as_str(),
        line["message_id"].as_str().unwrap()
    );
    let env = v1::Envelope::decode(m.payload.as_ref()).unwrap();
    let r = v1::ConsentRevocation::decode(env.payload.as_ref()).unwrap();
    assert_eq!(
        (r.consent_id.as_str(), r.revoked_at_ms),
        (consent_id.as_str(), 1000)
    );

    let out = cli(&config, &["purge-confirm", "r-1", &consent_id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m = broker.inbound_message(3).await;
    assert_eq!(m.subject.as_str(), "yeongye.in.cc-1.purge");

    // show: an answer, then an error answer (exit 1).
    let mut queries = broker.client.subscribe(subject::query(ME)).await.unwrap();
    let responder = broker.client.clone();
    tokio::spawn(async move {
        while let Some(q) = queries.next().await {
            let env = v1::Envelope::decode(q.payload.as_ref()).unwrap();
            let query = v1::ConsentQuery::decode(env.payload.as_ref()).unwrap();
            let reply = if query.consent_id == "unknown" {
                v1::ConsentReply {
                    error: Some(v1::Rejection {
                        code: v1::ReasonCode::ConsentUnknown as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            } else {
                v1::ConsentReply {
                    revoked: true,
                    withdrawn_referral_ids: vec!["r-1".into()],
                    purge_requested_referral_ids: vec!["r-1".into()],
                    ..Default::default()
                }
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
    let out = cli(&config, &["consent", "show", &consent_id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply: v1::ConsentReply = serde_json::from_slice(&out.stdout).unwrap();
    assert!(reply.revoked);
    let out = cli(&config, &["consent", "show", "unknown"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("REASON_CODE_CONSENT_UNKNOWN"));
}

#[test]
fn bad_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.toml");
    std::fs::write(
        &path,
        "agency = \"cc-1\"\nnats_urls = []\nstate_dir = \"/tmp/x\"\n",
    )
    .unwrap();
    let out = cli(&path, &["status", "r-1"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("nats_urls is empty"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(&path, "agency = \"cc-1\"\nbogus = 1\n").unwrap();
    let out = cli(&path, &["run"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown field `bogus`"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&dir.path().join("missing.toml"), &["run"], None);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn run_hands_over_prints_and_receipts() {
    let server = NatsServer::start();
    let broker = Broker::setup(&server, Duration::from_millis(100), Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url());
    let inbox = dir.path().join("inbox");
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();

    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["run", "--inbox"])
        .arg(&inbox)
        .env(
            "RUST_LOG",
            "info,yeongye_adapter=debug,agency_adapter=debug",
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .expect("no output line in time")
            .unwrap()
            .expect("stdout closed");
        serde_json::from_str(&line).unwrap()
    };

    broker
        .publish_out(OutKind::Delivery, delivery_bytes("d-1", "r-1"), Some("d-1"))
        .await;
    broker
        .publish_out(
            OutKind::Notification,
            notification_bytes("n-1", "r-1"),
            Some("n-1"),
        )
        .await;
    broker
        .publish_out(OutKind::Rejection, vec![0xff; 3], None)
        .await;

    let line = next_line().await;
    assert_eq!(
        line,
        serde_json::json!({"kind": "delivery", "message_id": "d-1", "referral_id": "r-1",
                           "from_agency": "hope-support"})
    );
    let line = next_line().await;
    assert_eq!(
        line,
        serde_json::json!({"kind": "notification", "message_id": "n-1", "referral_id": "r-1",
                           "state": "REFERRAL_STATE_DELIVERED", "by_agency": "broker", "at_ms": 42})
    );
    let handed: v1::Referral =
        serde_json::from_slice(&std::fs::read(inbox.join("referrals/r-1.json")).unwrap()).unwrap();
    assert_eq!(handed, referral("r-1"));
    assert!(inbox.join("notifications/n-1.json").exists());

    let (id, receipt) = status_update_of(&broker.inbound_message(1).await);
    assert_eq!(id, ids::receipt_message_id("d-1"));
    assert_eq!(receipt.status, v1::Status::Received as i32);

    // A repeat of d-1 (after the duplicate window) prints nothing, leaves the file alone and
    // sends the receipt again.
    std::fs::write(
        inbox.join("referrals/r-1.json"),
        b"changed by the agency system",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker
        .publish_out(OutKind::Delivery, delivery_bytes("d-1", "r-1"), None)
        .await;
    broker
        .publish_out(
            OutKind::Notification,
            notification_bytes("n-2", "r-1"),
            Some("n-2"),
        )
        .await;
    let line = next_line().await;
    assert_eq!(line["message_id"], "n-2");
    let (id, _) = status_update_of(&broker.inbound_message(2).await);
    assert_eq!(id, ids::receipt_message_id("d-1"));
    assert_eq!(
        std::fs::read(inbox.join("referrals/r-1.json")).unwrap(),
        b"changed by the agency system"
    );
    assert_eq!(
        std::fs::read(dir.path().join("state/undecodable/3.bin")).unwrap(),
        vec![0xff; 3]
    );

    // A withdrawal of r-1: its file is purged, the withdrawal (ids only) is written, the
    // purge is confirmed under the derived id, and a line is printed.
    broker
        .publish_out(
            OutKind::Withdrawal,
            withdrawal_bytes("w-1", "r-1", "c-1"),
            Some("w-1"),
        )
        .await;
    let line = next_line().await;
    assert_eq!(
        line,
        serde_json::json!({"kind": "withdrawal", "message_id": "w-1", "referral_id": "r-1",
                           "consent_id": "c-1", "at_ms": 77})
    );
    assert!(!inbox.join("referrals/r-1.json").exists());
    let w: v1::Withdrawal =
        serde_json::from_slice(&std::fs::read(inbox.join("withdrawals/w-1.json")).unwrap())
            .unwrap();
    assert_eq!(w.referral_id, "r-1");
    let m = broker.inbound_message(3).await;
    assert_eq!(m.subject.as_str(), "yeongye.in.cc-1.purge");
    assert_eq!(
        m.headers.get("Nats-Msg-Id").unwrap().as_str(),
        ids::purge_message_id("w-1")
    );

    // SIGTERM: a graceful stop.
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("no exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");

    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(log.contains("undecodable"), "{log}");
    for personal in ["홍길동", "010-1234-5678"] {
        assert!(!log.contains(personal), "personal data in the log");
    }
}
