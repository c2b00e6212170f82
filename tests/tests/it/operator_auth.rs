//! Who may use the broker's operator endpoint, on the real broker: operator actions (replay,
//! discard, registry reload) need an operator's bearer token, and are recorded with that
//! operator's name whatever the body says; the CLI refuses a token file others can read; a
//! foreign `Host` and a cross-origin state change are refused; binding beyond loopback without
//! `http_allow_remote` is refused at start.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yeongye_tests::broker::{TEST_OPERATOR, TEST_OPERATOR_TOKEN};
use yeongye_tests::ops::{self, OpsHttp, OpsResponse};
use yeongye_tests::{ReferralBuilder, System, v1};

use crate::{CENTRE, SHORT};

/// An agency no registry knows: a referral to it becomes a dead letter.
const NOBODY: &str = "dream-start";

/// A dead letter: a referral to an unregistered agency. Its referral id and stream sequence.
async fn dead_letter(system: &System, http: &OpsHttp) -> (String, u64) {
    let centre = system.wire(CENTRE).await;
    let referral = ReferralBuilder::new(CENTRE, NOBODY).build();
    let rid = referral.referral_id.clone();
    centre.send_referral(&referral).await;
    centre
        .wait_state(&rid, v1::ReferralState::Refused, SHORT, || {
            system.describe()
        })
        .await;
    let list = http.get_json("/api/v1/dead-letters").await;
    let seq = list
        .as_array()
        .expect("a list")
        .iter()
        .find(|d| d["referral_id"] == rid.as_str())
        .and_then(|d| d["seq"].as_u64())
        .unwrap_or_else(|| panic!("no dead letter for {rid}: {list:#}"));
    (rid, seq)
}

fn assert_unauthorized(r: &OpsResponse, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.body);
    assert_eq!(
        r.json()["type"],
        "urn:yeongye:problem:unauthorized",
        "{what}: {}",
        r.body
    );
    assert!(!r.body.contains(TEST_OPERATOR_TOKEN), "{}", r.body);
}

/// The operator actions in the audit entries of `rid`: (event, actor).
async fn operator_entries(http: &OpsHttp, rid: &str) -> Vec<(String, String)> {
    let entries = http
        .get_json(&format!("/api/v1/audit/referrals/{rid}"))
        .await;
    entries
        .as_array()
        .expect("a list")
        .iter()
        .filter(|e| {
            e["event"]
                .as_str()
                .is_some_and(|s| s.starts_with("operator."))
        })
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default().to_owned(),
                e["actor"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// One raw request with the given `Host` and extra header lines; the status and body.
async fn raw(addr: SocketAddr, method: &str, path: &str, host: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let body = if method == "POST" { "{}" } else { "" };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_need_an_operator_token_and_record_that_operator() {
    let system = System::builder().adapters(&[]).start().await;
    let config = system.broker.config_path();
    let anonymous = OpsHttp::new(&system.broker.config().http_addr);
    let wrong = anonymous.with_token(Some("yop_not-a-token-of-anyone-0123456789abcdefghij"));
    let operator = anonymous.operator();
    let (rid, seq) = dead_letter(&system, &anonymous).await;
    let (other_rid, other_seq) = dead_letter(&system, &anonymous).await;

    // No token, a wrong token: 401 problem documents, for each action.
    for client in [&anonymous, &wrong] {
        for path in [
            format!("/api/v1/dead-letters/{seq}/replay"),
            format!("/api/v1/dead-letters/{seq}/discard"),
        ] {
            let r = client.post_json(&path, json!({"why": "test"})).await;
            assert_unauthorized(&r, &path);
        }
        let r = client.post_json("/api/v1/registry/reload", json!({})).await;
        assert_unauthorized(&r, "reload");
        let r = client.post_json("/api/v1/step-down", json!({})).await;
        assert_unauthorized(&r, "step-down");
        // The digest reads the whole store: an operator's, even on loopback.
        let r = client.get("/api/v1/digest").await;
        assert_unauthorized(&r, "digest");
    }
    let digest = operator.get_json("/api/v1/digest").await;
    assert_eq!(
        digest["digest"].as_str().map(str::len),
        Some(64),
        "{digest}"
    );
    // The command line without a token, and with a token file others can read.
    let no_token = ops::broker_cli_with(
        &config,
        &["dead-letters", "discard", &seq.to_string(), "--why", "x"],
        None,
    )
    .await;
    assert!(!no_token.status.success(), "{no_token:#?}");
    assert!(no_token.stderr.contains("401"), "{no_token:#?}");
    let shared = system.dir().join("shared.token");
    std::fs::write(&shared, format!("{TEST_OPERATOR_TOKEN}\n")).expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let readable = ops::broker_cli_with(&config, &["registry", "reload"], Some(&shared)).await;
    assert!(!readable.status.success(), "{readable:#?}");
    assert!(
        readable
            .stderr
            .contains(&format!("chmod 600 {}", shared.display())),
        "{readable:#?}"
    );
    assert!(
        !readable.stderr.contains(TEST_OPERATOR_TOKEN),
        "{readable:#?}"
    );

    // An operator naming someone else in the body: refused (403), nothing recorded.
    let forged = operator
        .post_json(
            &format!("/api/v1/dead-letters/{seq}/replay"),
            json!({"who": "mallory", "why": "forged"}),
        )
        .await;
    assert_eq!(forged.status, 403, "{}", forged.body);

    // Nothing changed by any of that.
    for s in [seq, other_seq] {
        let d = anonymous
            .get_json(&format!("/api/v1/dead-letters/{s}"))
            .await;
        assert_eq!(d["status"], "open", "{d:#}");
        assert_eq!(d["actions"], json!([]), "{d:#}");
    }
    assert_eq!(operator_entries(&anonymous, &rid).await, vec![]);

    // The operator's own replay through the command line (token from the harness's 0600 file):
    // the recipient is still unknown, so it fails (409), but it is recorded, and audited, as
    // that operator's.
    let replay = ops::broker_cli(
        &config,
        &[
            "--json",
            "dead-letters",
            "replay",
            &seq.to_string(),
            "--why",
            "retry",
        ],
    )
    .await;
    assert!(replay.stderr.contains("409"), "{replay:#?}");
    let shown = anonymous
        .get_json(&format!("/api/v1/dead-letters/{seq}"))
        .await;
    assert_eq!(shown["actions"][0]["who"], TEST_OPERATOR, "{shown:#}");
    assert_eq!(shown["actions"][0]["why"], "retry", "{shown:#}");
    assert_eq!(
        operator_entries(&anonymous, &rid).await,
        vec![("operator.replay".to_owned(), TEST_OPERATOR.to_owned())]
    );
    let everything = anonymous
        .get_json(&format!("/api/v1/audit/referrals/{rid}"))
        .await;
    assert!(
        !everything.to_string().contains("mallory"),
        "{everything:#}"
    );

    // Its own name in the body is accepted; the discard is recorded with it.
    let discard = operator
        .post_json(
            &format!("/api/v1/dead-letters/{other_seq}/discard"),
            json!({"who": TEST_OPERATOR, "why": "duplicate"}),
        )
        .await;
    assert_eq!(discard.status, 200, "{}", discard.body);
    let d: Value = discard.json();
    assert_eq!(d["status"], "discarded", "{d:#}");
    assert_eq!(d["actions"][0]["who"], TEST_OPERATOR, "{d:#}");
    assert!(!other_rid.is_empty());
    assert_eq!(
        operator_entries(&anonymous, &other_rid).await,
        vec![("operator.discard".to_owned(), TEST_OPERATOR.to_owned())],
        "the discard is in the hash-chained audit log"
    );
    // The reload too: one more entry in the chain, which still verifies.
    let entries = |v: Value| v["entries"].as_u64().expect("an entry count");
    let before = entries(anonymous.get_json("/api/v1/audit/verify").await);
    let reload = operator
        .post_json("/api/v1/registry/reload", json!({}))
        .await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    assert_eq!(
        entries(anonymous.get_json("/api/v1/audit/verify").await),
        before + 1,
        "the reload is audited"
    );
    // The token never reaches the log.
    let log = std::fs::read_to_string(system.broker.log_path()).expect("broker log");
    assert!(!log.contains(TEST_OPERATOR_TOKEN));
    assert!(!log.contains("yop_not-a-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_and_cross_origin_changes_are_refused() {
    let mut system = System::builder().adapters(&[]).start().await;
    let addr: SocketAddr = system.broker.config().http_addr.parse().expect("http_addr");
    let port = addr.port();
    let auth = format!("Authorization: Bearer {TEST_OPERATOR_TOKEN}\r\n");

    for host in [
        format!("localhost:{port}"),
        "localhost".into(),
        addr.to_string(),
    ] {
        let (status, text) = raw(addr, "GET", "/api/v1/queues", &host, "").await;
        assert_eq!(status, 200, "Host {host}: {text}");
    }
    // DNS rebinding: the page's own name, on the broker's address.
    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("localhost:{}", port.wrapping_add(1)),
    ] {
        for (method, path) in [
            ("GET", "/api/v1/queues"),
            ("GET", "/metrics"),
            ("GET", "/api/v1/digest"),
            ("POST", "/api/v1/registry/reload"),
            ("POST", "/api/v1/step-down"),
        ] {
            let (status, text) = raw(addr, method, path, &host, &auth).await;
            assert_eq!(status, 421, "{method} {path} Host {host}: {text}");
            assert!(text.contains("application/problem+json"), "{text}");
        }
    }
    // A page on another origin posting with a (stolen or guessed) token: refused; from the
    // endpoint's own origin: allowed.
    let host = addr.to_string();
    for origin in [
        "http://evil.example",
        "null",
        &format!("http://localhost:{}", port.wrapping_add(1)),
    ] {
        for path in ["/api/v1/registry/reload", "/api/v1/step-down"] {
            let (status, text) = raw(
                addr,
                "POST",
                path,
                &host,
                &format!("{auth}Origin: {origin}\r\n"),
            )
            .await;
            assert_eq!(status, 403, "{path} Origin {origin}: {text}");
            assert!(
                text.contains("urn:yeongye:problem:forbidden-origin"),
                "{text}"
            );
        }
    }
    let (status, text) = raw(
        addr,
        "POST",
        "/api/v1/registry/reload",
        &host,
        &format!("{auth}Origin: http://{host}\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // A read from another origin is not a change: the Host check is what guards it.
    let (status, _) = raw(
        addr,
        "GET",
        "/api/v1/queues",
        &host,
        "Origin: http://evil.example\r\n",
    )
    .await;
    assert_eq!(status, 200);

    // Graceful shutdown does not wait out the header timeout (10 s by default) of a connection
    // whose head is still arriving, nor keep an idle keep-alive connection.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut answer = [0u8; 512];
    let n = idle.read(&mut answer).await.expect("an answer");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    let mut half = TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /heal").await.expect("write");
    let started = std::time::Instant::now();
    system.broker.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the broker took {:?} to stop",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_beyond_loopback_needs_the_opt_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "http_addr = \"0.0.0.0:{}\"\nstore_dir = {:?}\n",
            yeongye_tests::process::free_port(),
            dir.path().join("store").display().to_string()
        ),
    )
    .expect("write config");
    let bin = yeongye_tests::workspace_bin("referral-broker");
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the broker exits at once")
    .expect("run the broker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("http_addr 0.0.0.0") && stderr.contains("http_allow_remote = true"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("store").exists(),
        "it opened its store anyway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_the_reads_need_a_token_too() {
    let port = yeongye_tests::process::free_port();
    let system = System::builder()
        .adapters(&[])
        .broker_config(move |c| {
            c.http_addr = format!("0.0.0.0:{port}");
            c.extra
                .insert("http_allow_remote".into(), toml::Value::Boolean(true));
        })
        .start()
        .await;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let host = addr.to_string();
    let auth = format!("Authorization: Bearer {TEST_OPERATOR_TOKEN}\r\n");
    for path in ["/api/v1/queues", "/api/v1/dead-letters", "/api/v1/purges"] {
        let (status, text) = raw(addr, "GET", path, &host, "").await;
        assert_eq!(status, 401, "{path}: {text}");
        let (status, text) = raw(addr, "GET", path, &host, &auth).await;
        assert_eq!(status, 200, "{path}: {text}");
    }
    // Probes, metrics and the page itself stay open (the page asks for a token when it needs one).
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let (status, text) = raw(addr, "GET", path, &host, "").await;
        // Readiness may still be 503 just after the start: answered, not refused, is the point.
        let answered = status == 200 || (path == "/readyz" && status == 503);
        assert!(answered, "{path}: {text}");
    }
    let log = std::fs::read_to_string(system.broker.log_path()).expect("broker log");
    assert!(
        log.contains("listens beyond loopback") && log.contains("terminate TLS in a reverse proxy"),
        "{log}"
    );
}
