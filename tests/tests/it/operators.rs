//! What operators see and do (issue 5): `/metrics` and the JSON API agree with the broker's
//! store after referrals in every reachable state; the dashboard in headless Chromium shows the
//! API's numbers and the Korean names; an overdue referral is escalated once to the sender and
//! the coordinator, also across a kill -9; a dead letter refused for an unknown recipient is
//! replayed once after the recipient is registered; `/readyz` follows the NATS connection; the
//! Prometheus alert rules pass promtool.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use yeongye_proto::subject::{self, InKind};
use yeongye_tests::broker::TEST_OPERATOR;
use yeongye_tests::ops::{self, OpsHttp};
use yeongye_tests::registry::{self, DEFAULT_AGENCIES, UNREGISTERED};
use yeongye_tests::wire::new_id;
use yeongye_tests::{ReferralBuilder, System, WireClient, now_ms, repo_root, v1, wait_for};

use crate::{CENTRE, HOPE, MENTAL, SHORT, WELFARE, barrier};

use v1::ReferralState as S;

/// The per-agency columns of `/api/v1/queues` (and of the dashboard).
const COLUMNS: [&str; 6] = [
    "sent",
    "awaiting_receipt",
    "awaiting_acceptance",
    "in_progress",
    "overdue",
    "dead_letters",
];

fn http(system: &System) -> OpsHttp {
    OpsHttp::new(&system.broker.config().http_addr).operator()
}

/// `REFERRAL_STATE_DELIVERED` → `DELIVERED`.
/// Waits until the broker's event loop has turned `n` more times (an idle loop turns every
/// 250 ms tick, and fires what is due at each): `yeongye_turns_total` from `/metrics`.
async fn wait_turns(http: &OpsHttp, n: f64, system: &System) {
    let turns = || async { http.metrics().await.get("yeongye_turns_total", "") };
    let from = turns().await.expect("yeongye_turns_total in /metrics");
    wait_for(
        &format!("{n} more turns of the broker's loop"),
        SHORT,
        || async { (turns().await? >= from + n).then_some(()) },
        || system.describe(),
    )
    .await;
}

/// Waits until the adapters of `agencies` have taken (handed over and acknowledged) everything
/// published to them so far: their consumers have nothing pending or unacknowledged.
async fn wait_taken(system: &System, agencies: &[&str]) {
    let wire = system.wire(agencies[0]).await;
    let js = wire.jetstream().clone();
    wait_for(
        "the adapters to take everything sent to them",
        SHORT,
        || async {
            let out = js.get_stream(subject::OUT_STREAM).await.ok()?;
            for a in agencies {
                let info = out.consumer_info(subject::agency_consumer(a)).await.ok()?;
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    return None;
                }
            }
            Some(())
        },
        || system.describe(),
    )
    .await;
}

fn state_name(s: S) -> &'static str {
    s.as_str_name().trim_start_matches("REFERRAL_STATE_")
}

/// Sends a referral `from` → `to` and waits until the broker has it in `state`.
async fn send(wire: &WireClient, to: &str, state: S, system: &System) -> String {
    let referral = ReferralBuilder::new(wire.agency(), to).build();
    wire.send_referral(&referral).await;
    wire.wait_state(&referral.referral_id, state, SHORT, || system.describe())
        .await;
    referral.referral_id
}

/// The recipient moves a referral through `steps`, waiting for each state.
async fn walk(wire: &WireClient, id: &str, steps: &[(v1::Status, S)], system: &System) {
    for (status, state) in steps {
        wire.update_status(id, *status, "operators test").await;
        wire.wait_state(id, *state, SHORT, || system.describe())
            .await;
    }
}

/// One referral of the scripted run: who sent it, to whom, and where it must end.
struct Expect {
    id: String,
    from: &'static str,
    to: &'static str,
    state: S,
}

/// Leaves referrals in every state the protocol can reach, plus a dead letter from garbage.
/// The mental health centre's adapter must not be running (its referrals stay DELIVERED).
async fn scripted_run(system: &System) -> Vec<Expect> {
    let centre = system.wire(CENTRE).await;
    let hope = system.wire(HOPE).await;
    let welfare = system.wire(WELFARE).await;
    let mut out = Vec::new();
    let mut push = |id: String, from, to, state| {
        out.push(Expect {
            id,
            from,
            to,
            state,
        });
    };

    // DELIVERED: nobody runs the recipient's adapter.
    let id = send(&centre, MENTAL, S::Delivered, system).await;
    push(id, CENTRE, MENTAL, S::Delivered);

    // EXPIRED: not received by a deadline 1.5 s away.
    let expiring = ReferralBuilder::new(CENTRE, MENTAL)
        .receive_by_ms(now_ms() + 1500)
        .build();
    centre.send_referral(&expiring).await;

    // RECEIVED: the recipient's adapter acknowledges by itself.
    let id = send(&centre, HOPE, S::Received, system).await;
    push(id, CENTRE, HOPE, S::Received);

    // ACCEPTED.
    let id = send(&centre, HOPE, S::Received, system).await;
    walk(&hope, &id, &[(v1::Status::Accepted, S::Accepted)], system).await;
    push(id, CENTRE, HOPE, S::Accepted);

    // IN_PROGRESS.
    let id = send(&centre, WELFARE, S::Received, system).await;
    walk(
        &welfare,
        &id,
        &[
            (v1::Status::Accepted, S::Accepted),
            (v1::Status::InProgress, S::InProgress),
        ],
        system,
    )
    .await;
    push(id, CENTRE, WELFARE, S::InProgress);

    // COMPLETED.
    let id = send(&hope, WELFARE, S::Received, system).await;
    walk(
        &welfare,
        &id,
        &[
            (v1::Status::Accepted, S::Accepted),
            (v1::Status::InProgress, S::InProgress),
            (v1::Status::Completed, S::Completed),
        ],
        system,
    )
    .await;
    push(id, HOPE, WELFARE, S::Completed);

    // DECLINED.
    let id = send(&centre, WELFARE, S::Received, system).await;
    walk(
        &welfare,
        &id,
        &[(v1::Status::Declined, S::Declined)],
        system,
    )
    .await;
    push(id, CENTRE, WELFARE, S::Declined);

    // CANCELLED by its sender.
    let id = send(&hope, CENTRE, S::Received, system).await;
    walk(&hope, &id, &[(v1::Status::Cancelled, S::Cancelled)], system).await;
    push(id, HOPE, CENTRE, S::Cancelled);

    // REFUSED: an unknown recipient.
    let id = send(&centre, UNREGISTERED, S::Refused, system).await;
    push(id, CENTRE, UNREGISTERED, S::Refused);

    centre
        .wait_state(&expiring.referral_id, S::Expired, SHORT, || {
            system.describe()
        })
        .await;
    push(expiring.referral_id, CENTRE, MENTAL, S::Expired);

    // A dead letter: bytes that are no envelope at all, on the centre's subject.
    centre
        .publish(
            &subject::inbound(CENTRE, InKind::Referral),
            b"\x00\xffnot an envelope".to_vec(),
            Some(&new_id()),
        )
        .await;
    // Everything published before has been applied once the barrier is RECEIVED; the
    // barrier's own referral stays RECEIVED.
    let id = barrier(system, CENTRE, HOPE).await;
    push(id, CENTRE, HOPE, S::Received);
    out
}

/// What `/api/v1/queues` must say, computed from the expected referrals alone.
fn expected_columns(expect: &[Expect], agency: &str) -> BTreeMap<&'static str, u64> {
    let mut c: BTreeMap<&'static str, u64> = COLUMNS.iter().map(|c| (*c, 0)).collect();
    for e in expect {
        if e.from == agency {
            *c.get_mut("sent").expect("column") += 1;
        }
        if e.to == agency {
            let col = match e.state {
                S::Submitted | S::Delivered => Some("awaiting_receipt"),
                S::Received => Some("awaiting_acceptance"),
                S::Accepted | S::InProgress => Some("in_progress"),
                _ => None,
            };
            if let Some(col) = col {
                *c.get_mut(col).expect("column") += 1;
            }
        }
    }
    c
}

fn row<'a>(queues: &'a Value, agency: &str) -> &'a Value {
    queues["agencies"]
        .as_array()
        .expect("agencies")
        .iter()
        .find(|a| a["id"] == agency)
        .unwrap_or_else(|| panic!("no row for {agency} in {queues:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_api_agree_with_the_store() {
    let mut system = System::builder()
        .adapters(&[CENTRE, HOPE, WELFARE])
        .start()
        .await;
    let http = http(&system);
    let expect = scripted_run(&system).await;

    // Every referral's state, as its sender's status query tells it (the store), is the one
    // scripted, and the API's one-referral view says the same.
    for e in &expect {
        let wire = system.wire(e.from).await;
        let reply = wire.query(&e.id).await;
        assert_eq!(reply.error, None, "status query of {}", e.id);
        assert_eq!(reply.state(), e.state, "state of {} (status query)", e.id);
        let view = http.get_json(&format!("/api/v1/referrals/{}", e.id)).await;
        assert_eq!(
            view["state"],
            state_name(e.state),
            "state of {} (API): {view:#}",
            e.id
        );
        assert_eq!(
            (view["from"].as_str(), view["to"].as_str()),
            (Some(e.from), Some(e.to))
        );
    }

    // States.
    let queues = http.get_json("/api/v1/queues").await;
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for e in &expect {
        *by_state.entry(state_name(e.state).to_owned()).or_default() += 1;
    }
    let api_states: BTreeMap<String, u64> = queues["states"]
        .as_object()
        .expect("states")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(api_states, by_state, "/api/v1/queues states: {queues:#}");
    for s in [
        "DELIVERED",
        "RECEIVED",
        "ACCEPTED",
        "IN_PROGRESS",
        "COMPLETED",
        "DECLINED",
        "CANCELLED",
        "EXPIRED",
        "REFUSED",
    ] {
        assert!(by_state.contains_key(s), "the script reached no {s}");
    }

    // Dead letters as the store lists them: the garbage and the refusal, both open.
    let dead = http.get_json("/api/v1/dead-letters").await;
    let dead = dead.as_array().expect("a list");
    let open: Vec<&Value> = dead.iter().filter(|d| d["status"] == "open").collect();
    assert!(
        open.iter()
            .any(|d| d["reason"] == "REASON_CODE_MALFORMED_ENVELOPE"
                || d["size"].as_u64() == Some(17)),
        "the garbage is a dead letter: {dead:#?}"
    );
    let mut open_by_sender: BTreeMap<String, u64> = BTreeMap::new();
    for d in &open {
        *open_by_sender
            .entry(d["sender"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    assert_eq!(queues["dead_letters"], open.len(), "{queues:#}");
    let mut refusals_by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for d in dead {
        *refusals_by_reason
            .entry(d["reason"].as_str().expect("reason").to_owned())
            .or_default() += 1;
    }
    let api_refusals: BTreeMap<String, u64> = queues["refusals"]
        .as_object()
        .expect("refusals")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
        .collect();
    assert_eq!(api_refusals, refusals_by_reason, "refusals: {queues:#}");
    assert_eq!(queues["overdue"], 0, "{queues:#}");

    // Per agency.
    for agency in DEFAULT_AGENCIES {
        let r = row(&queues, agency);
        let mut want = expected_columns(&expect, agency);
        want.insert(
            "dead_letters",
            open_by_sender.get(agency).copied().unwrap_or(0),
        );
        let got: BTreeMap<&'static str, u64> = COLUMNS
            .iter()
            .map(|c| (*c, r[*c].as_u64().unwrap_or_else(|| panic!("{c} of {r}"))))
            .collect();
        assert_eq!(got, want, "{agency}'s queue: {r:#}");
    }

    // /metrics says what the API says.
    let metrics = http.metrics().await;
    for (s, n) in queues["states"].as_object().expect("states") {
        assert_eq!(
            metrics.get("yeongye_referrals", &format!("state=\"{s}\"")),
            Some(n.as_f64().expect("a count")),
            "yeongye_referrals{{state={s}}}\n{}",
            metrics.text
        );
    }
    for agency in DEFAULT_AGENCIES {
        let r = row(&queues, agency);
        for col in COLUMNS {
            let name = format!("yeongye_agency_{col}");
            assert_eq!(
                metrics.get(&name, &format!("agency=\"{agency}\"")),
                r[col].as_f64(),
                "{name}{{agency={agency}}}\n{}",
                metrics.text
            );
        }
    }
    // Only the mental health centre has an unacknowledged referral (the DELIVERED one).
    let oldest = metrics.by_label("yeongye_agency_oldest_unacknowledged_seconds", "agency");
    assert_eq!(oldest.get(HOPE), Some(&0.0), "{oldest:?}");
    assert!(row(&queues, MENTAL)["oldest_unacknowledged_age_ms"].is_u64());
    assert!(row(&queues, HOPE)["oldest_unacknowledged_age_ms"].is_null());
    for (name, key) in [
        ("yeongye_overdue_referrals", "overdue"),
        ("yeongye_dead_letters", "dead_letters"),
        ("yeongye_outbox_depth", "outbox"),
    ] {
        assert_eq!(
            metrics.get(name, ""),
            queues[key].as_f64(),
            "{name}\n{}",
            metrics.text
        );
    }
    assert_eq!(
        metrics.by_label("yeongye_refusals", "reason"),
        api_refusals
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64))
            .collect::<BTreeMap<_, _>>(),
        "{}",
        metrics.text
    );
    assert_eq!(metrics.get("yeongye_nats_connected", ""), Some(1.0));
    assert_eq!(metrics.get("yeongye_ready", ""), Some(1.0));

    // After a kill -9 the view is rebuilt from the counters the store kept with each commit
    // and the summaries of the referrals still watched: it must say the same.
    system.broker.kill9();
    system.broker.start_again().await;
    let after = http.get_json("/api/v1/queues").await;
    let counters = |q: &Value| -> Vec<(String, Value)> {
        let mut out: Vec<(String, Value)> = ["states", "refusals", "dead_letters", "overdue"]
            .iter()
            .map(|k| ((*k).to_owned(), q[*k].clone()))
            .collect();
        for agency in DEFAULT_AGENCIES {
            for col in COLUMNS {
                out.push((format!("{agency}.{col}"), row(q, agency)[col].clone()));
            }
            let unacked = &row(q, agency)["oldest_unacknowledged_age_ms"];
            out.push((format!("{agency}.unacked"), Value::Bool(unacked.is_u64())));
        }
        out
    };
    assert_eq!(
        counters(&after),
        counters(&queues),
        "/api/v1/queues after a kill -9: {after:#}"
    );
}

/// Where test artifacts that outlive the test go (`target/test-artifacts/operators`).
fn artifacts_dir() -> PathBuf {
    let dir = repo_root()
        .join("target")
        .join("test-artifacts")
        .join("operators");
    std::fs::create_dir_all(&dir).expect("create artifacts dir");
    dir
}

/// Runs headless Chromium on `url` with `args` (at most 60 s); returns stdout.
async fn chromium(
    bin: &std::path::Path,
    profile: &std::path::Path,
    url: &str,
    args: &[&str],
) -> String {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--lang=ko-KR",
        "--virtual-time-budget=10000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .env("HOME", profile)
    .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("chromium {args:?} ran for over 60 s"))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    assert!(
        output.status.success(),
        "chromium {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("chromium's DOM dump is UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium_shows_the_api_numbers() {
    let bin = ops::find_or_install(
        "chromium",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
        "install-chromium.sh",
    );
    if !ops::korean_font_installed() {
        ops::run_install_script("install-chromium.sh");
        assert!(
            ops::korean_font_installed(),
            "no Korean font (fc-list :lang=ko): the screenshot would show boxes for Hangul"
        );
    }
    let system = System::builder()
        .adapters(&[CENTRE, HOPE, WELFARE])
        .start()
        .await;
    let http = http(&system);
    // Known traffic: one awaiting receipt, one awaiting acceptance, one in progress, one
    // refused (a dead letter), one garbage message (a dead letter).
    let centre = system.wire(CENTRE).await;
    let hope = system.wire(HOPE).await;
    let welfare = system.wire(WELFARE).await;
    send(&centre, MENTAL, S::Delivered, &system).await;
    send(&centre, HOPE, S::Received, &system).await;
    let id = send(&hope, WELFARE, S::Received, &system).await;
    walk(
        &welfare,
        &id,
        &[(v1::Status::Accepted, S::Accepted)],
        &system,
    )
    .await;
    send(&centre, UNREGISTERED, S::Refused, &system).await;
    hope.publish(
        &subject::inbound(HOPE, InKind::Status),
        b"garbage".to_vec(),
        Some(&new_id()),
    )
    .await;
    wait_taken(&system, &[CENTRE, HOPE]).await;
    let columns = |q: &Value| -> Vec<Vec<Value>> {
        q["agencies"]
            .as_array()
            .expect("agencies")
            .iter()
            .map(|a| COLUMNS.iter().map(|c| a[*c].clone()).collect())
            .collect()
    };
    // Taken is not yet applied: on a loaded machine the last message's turn can land after
    // this point. The page is compared with the queues once two reads apart agree.
    let start = std::time::Instant::now();
    let queues = loop {
        let first = http.get_json("/api/v1/queues").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = http.get_json("/api/v1/queues").await;
        if columns(&first) == columns(&second) {
            break second;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the queues never settled: {first} then {second}"
        );
    };
    let url = format!("{}/", http.base());
    let profile = tempfile::tempdir().expect("tempdir");
    let dom = chromium(&bin, profile.path(), &url, &["--dump-dom"]).await;
    // The page is still what the API says (nothing moved while Chromium ran).
    let after = http.get_json("/api/v1/queues").await;
    assert_eq!(
        columns(&queues),
        columns(&after),
        "the queues moved during the test"
    );

    let artifacts = artifacts_dir();
    let dom_file = artifacts.join("dashboard.html");
    std::fs::write(&dom_file, &dom).expect("write DOM");
    eprintln!("dashboard DOM saved to {}", dom_file.display());
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the dashboard never finished a refresh (body[data-loaded]): see {}",
        dom_file.display()
    );
    assert!(dom.contains("연계 Yeongye"), "the Korean title is garbled");

    let cells = ops::dashboard_cells(&dom);
    let agencies = queues["agencies"].as_array().expect("agencies");
    assert_eq!(
        cells.keys().collect::<Vec<_>>(),
        {
            let mut ids: Vec<&str> = agencies
                .iter()
                .map(|a| a["id"].as_str().expect("id"))
                .collect();
            ids.sort_unstable();
            ids
        },
        "the dashboard's rows"
    );
    for a in agencies {
        let id = a["id"].as_str().expect("id");
        let row = &cells[id];
        for col in COLUMNS {
            assert_eq!(
                row.get(col).map(String::as_str),
                Some(a[col].to_string().as_str()),
                "{id} {col}: the page says {row:?}, the API {a}"
            );
        }
        let name = a["name"].as_str().expect("name");
        let shown = if name.is_empty() { id } else { name };
        assert_eq!(
            row.get("name").map(String::as_str),
            Some(shown),
            "{id}'s name"
        );
        assert_eq!(row.get("id").map(String::as_str), Some(id));
    }
    // The Korean names, byte for byte.
    for (id, name) in [
        (HOPE, "한빛구 희망복지지원단"),
        (MENTAL, "한빛구 정신건강복지센터"),
        (WELFARE, "한빛종합사회복지관"),
        (CENTRE, "한빛구 cc-haengbok1 행정복지센터"),
    ] {
        assert_eq!(
            cells[id].get("name").map(String::as_str),
            Some(name),
            "{id}"
        );
    }
    // Something is actually shown in the columns (the traffic above).
    assert_eq!(cells[MENTAL]["awaiting_receipt"], "1");
    assert_eq!(cells[WELFARE]["in_progress"], "1");
    let dead: u64 = agencies
        .iter()
        .map(|a| a["dead_letters"].as_u64().expect("count"))
        .sum();
    assert!(dead >= 1, "no dead letter on the page: {queues:#}");
    // Totals.
    for (key, want) in [
        ("overdue", queues["overdue"].to_string()),
        ("dead_letters", queues["dead_letters"].to_string()),
    ] {
        let needle = format!("data-total=\"{key}\">{want}<");
        assert!(
            dom.contains(&needle),
            "total {key} is not {want} on the page"
        );
    }

    // The cluster: this broker leads (a group of one), and each stream's row is there.
    let broker = queues["cluster"]["broker"].as_str().expect("broker name");
    assert!(
        dom.contains(&format!("{broker} (리더 · leader)")),
        "the page does not say {broker} leads: see {}",
        dom_file.display()
    );
    for st in queues["streams"].as_array().expect("streams") {
        let name = st["name"].as_str().expect("name");
        assert!(
            dom.contains(&format!("<tr data-stream=\"{name}\">")),
            "no row for stream {name}: see {}",
            dom_file.display()
        );
    }

    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &bin,
        profile.path(),
        &url,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1400,1000",
            "--hide-scrollbars",
        ],
    )
    .await;
    eprintln!("dashboard screenshot saved to {}", png.display());
    println!("dashboard screenshot: {}", png.display());
    let (w, h, size) =
        ops::png_dimensions(&png).unwrap_or_else(|| panic!("{} is not a PNG", png.display()));
    assert_eq!((w, h), (1400, 1000), "screenshot size");
    assert!(
        size > 20_000,
        "the screenshot is suspiciously small ({size} bytes): blank page?"
    );
}

/// Escalation lines an adapter printed for `referral_id`.
fn escalations(system: &System, agency: &str, referral_id: &str) -> usize {
    system
        .adapter(agency)
        .lines_of("escalation")
        .iter()
        .filter(|l| l.referral_id() == Some(referral_id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_referral_is_escalated_once_to_sender_and_coordinator() {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    let mut system = System::builder()
        .broker_config(|c| {
            c.with_test_clock();
            c.extra.insert("coordinator".into(), HOPE.into());
            // The clock jumps days ahead of the agencies': keep their later messages (and the
            // harness's status queries) within the accepted age.
            c.extra
                .insert("max_message_age_secs".into(), (60 * 24 * 3600_i64).into());
        })
        .start()
        .await;
    system.broker.set_clock_offset(0);
    let http = http(&system);
    let centre = system.wire(CENTRE).await;

    // A routine referral: 10 days to accept once RECEIVED.
    let rid = send(&centre, MENTAL, S::Received, &system).await;
    let view = http.get_json(&format!("/api/v1/referrals/{rid}")).await;
    let accept_by = view["accept_by_ms"].as_i64().expect("accept_by_ms");
    assert!(accept_by > now_ms() + 9 * DAY_MS, "{view:#}");
    assert_eq!(http.get_json("/api/v1/overdue").await, json!([]));
    assert_eq!(
        http.metrics().await.get("yeongye_overdue_referrals", ""),
        Some(0.0)
    );

    // Eleven days later.
    system.broker.set_clock_offset(11 * DAY_MS);
    for agency in [CENTRE, HOPE] {
        system
            .adapter(agency)
            .wait_lines("an escalation", SHORT, |lines| {
                lines
                    .iter()
                    .any(|l| l.kind() == "escalation" && l.referral_id() == Some(rid.as_str()))
            })
            .await;
    }
    // Many ticks (250 ms each) later, and a further day on: still one each. Waited by the
    // broker's turn counter, then until the sender's and the coordinator's adapters have taken
    // everything those turns sent.
    wait_turns(&http, 8.0, &system).await;
    system.broker.set_clock_offset(12 * DAY_MS);
    wait_turns(&http, 8.0, &system).await;
    wait_taken(&system, &[CENTRE, HOPE]).await;
    let count = |system: &System| {
        [CENTRE, HOPE, MENTAL, WELFARE].map(|a| (a, escalations(system, a, &rid)))
    };
    assert_eq!(
        count(&system),
        [(CENTRE, 1), (HOPE, 1), (MENTAL, 0), (WELFARE, 0)],
        "escalations (sender, coordinator, recipient, other)\n{}",
        system.describe()
    );
    let line = system
        .adapter(HOPE)
        .lines_of("escalation")
        .into_iter()
        .find(|l| l.referral_id() == Some(rid.as_str()))
        .expect("the coordinator's escalation");
    assert!(
        line.raw.contains("ACCEPTANCE"),
        "an acceptance-deadline escalation: {}",
        line.raw
    );
    assert!(
        system.adapter(HOPE).inbox_files("escalations").len() == 1,
        "the coordinator's inbox escalations/: {:?}",
        system.adapter(HOPE).inbox_files("escalations")
    );

    let check_overdue = |overdue: Value, metrics: ops::Metrics, when: &str| {
        let list = overdue.as_array().expect("a list");
        assert_eq!(list.len(), 1, "{when}: /api/v1/overdue {overdue:#}");
        assert_eq!(list[0]["referral_id"], rid.as_str());
        assert_eq!(
            (list[0]["from"].as_str(), list[0]["to"].as_str()),
            (Some(CENTRE), Some(MENTAL))
        );
        assert_eq!(list[0]["state"], "RECEIVED");
        assert!(
            list[0]["age_ms"].as_i64().expect("age") >= 11 * DAY_MS,
            "{when}: {overdue:#}"
        );
        assert_eq!(
            metrics.get("yeongye_overdue_referrals", ""),
            Some(1.0),
            "{when}\n{}",
            metrics.text
        );
        assert_eq!(
            metrics.get("yeongye_agency_overdue", &format!("agency=\"{MENTAL}\"")),
            Some(1.0),
            "{when}\n{}",
            metrics.text
        );
    };
    check_overdue(
        http.get_json("/api/v1/overdue").await,
        http.metrics().await,
        "before the restart",
    );

    // kill -9 and start again: the deadline is not fired a second time.
    system.broker.restart().await;
    wait_turns(&http, 8.0, &system).await;
    system.broker.set_clock_offset(13 * DAY_MS);
    wait_turns(&http, 8.0, &system).await;
    wait_taken(&system, &[CENTRE, HOPE]).await;
    assert_eq!(
        count(&system),
        [(CENTRE, 1), (HOPE, 1), (MENTAL, 0), (WELFARE, 0)],
        "escalations after a kill -9 and restart\n{}",
        system.describe()
    );
    check_overdue(
        http.get_json("/api/v1/overdue").await,
        http.metrics().await,
        "after the restart",
    );
    let view = http.get_json(&format!("/api/v1/referrals/{rid}")).await;
    assert_eq!(view["overdue"], true, "{view:#}");
    assert_eq!(view["state"], "RECEIVED", "{view:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_for_an_unknown_recipient_is_replayed_once_after_registration() {
    const NEWCOMER: &str = "dream-start";
    let mut system = System::start().await;
    let http = http(&system);
    let config = system.broker.config_path();
    let centre = system.wire(CENTRE).await;

    // Refused: the recipient is in no registry yet.
    let referral = ReferralBuilder::new(CENTRE, NEWCOMER).build();
    let rid = referral.referral_id.clone();
    let message_id = centre.send_referral(&referral).await;
    centre
        .wait_state(&rid, S::Refused, SHORT, || system.describe())
        .await;
    system
        .adapter(CENTRE)
        .wait_rejected(&message_id, "UNKNOWN_RECIPIENT", SHORT)
        .await;

    let list = ops::broker_cli(&config, &["--json", "dead-letters", "list"]).await;
    list.assert_success();
    let list = list.json();
    let entry = list
        .as_array()
        .expect("a list")
        .iter()
        .find(|d| d["referral_id"] == rid.as_str())
        .unwrap_or_else(|| panic!("no dead letter for {rid}: {list:#}"))
        .clone();
    assert_eq!(entry["status"], "open", "{entry:#}");
    assert_eq!(
        entry["reason"], "REASON_CODE_UNKNOWN_RECIPIENT",
        "{entry:#}"
    );
    assert_eq!(entry["sender"], CENTRE, "{entry:#}");
    let seq = entry["seq"].as_u64().expect("seq").to_string();

    // Fix the cause: register the agency (with its test key) and reload the registry.
    let mut agencies: Vec<&str> = DEFAULT_AGENCIES.to_vec();
    agencies.push(NEWCOMER);
    registry::write(&system.registry, &agencies);
    let reload = ops::broker_cli(&config, &["--json", "registry", "reload"]).await;
    reload.assert_success();
    assert_eq!(reload.json()["agencies"], 5, "{reload:#?}");
    system.start_adapter(NEWCOMER);

    let replay = ops::broker_cli(
        &config,
        &["--json", "dead-letters", "replay", &seq, "--why", "fixed"],
    )
    .await;
    replay.assert_success();
    let replayed = replay.json();
    assert_eq!(replayed["status"], "replayed", "{replayed:#}");

    centre
        .wait_state(&rid, S::Received, SHORT, || system.describe())
        .await;
    let newcomer = system.adapter(NEWCOMER);
    newcomer
        .wait_lines("the replayed delivery", SHORT, |lines| {
            lines
                .iter()
                .any(|l| l.kind() == "delivery" && l.referral_id() == Some(rid.as_str()))
        })
        .await;
    // Once a later referral has gone the same way, nothing more of the replayed one can come.
    barrier(&system, CENTRE, NEWCOMER).await;
    assert_eq!(
        system.adapter(NEWCOMER).deliveries_of(&rid),
        1,
        "{}",
        system.describe()
    );
    assert_eq!(
        system
            .adapter(NEWCOMER)
            .inbox_files("referrals")
            .iter()
            .filter(|f| **f == rid)
            .count(),
        1
    );
    let reply = centre.query(&rid).await;
    assert_eq!(reply.state(), S::Received);
    assert_eq!(reply.to_agency, NEWCOMER);

    // The record: who, why, and the new status.
    let show = ops::broker_cli(&config, &["--json", "dead-letters", "show", &seq]).await;
    show.assert_success();
    let shown = show.json();
    assert_eq!(shown["status"], "replayed", "{shown:#}");
    let actions = shown["actions"].as_array().expect("actions");
    assert_eq!(actions.len(), 1, "{shown:#}");
    assert_eq!(actions[0]["action"], "replay", "{shown:#}");
    assert_eq!(
        (actions[0]["who"].as_str(), actions[0]["why"].as_str()),
        (Some(TEST_OPERATOR), Some("fixed"))
    );

    // A second replay is refused and changes nothing.
    let again = ops::broker_cli(
        &config,
        &["--json", "dead-letters", "replay", &seq, "--why", "again"],
    )
    .await;
    assert!(
        !again.status.success(),
        "a second replay succeeded: {again:#?}"
    );
    let via_api = http
        .post_json(
            &format!("/api/v1/dead-letters/{seq}/replay"),
            json!({"why": "again"}),
        )
        .await;
    assert_eq!(via_api.status, 409, "{}", via_api.body);
    barrier(&system, CENTRE, NEWCOMER).await;
    assert_eq!(system.adapter(NEWCOMER).deliveries_of(&rid), 1);
    let shown = http.get_json(&format!("/api/v1/dead-letters/{seq}")).await;
    assert_eq!(shown["status"], "replayed");
    let queues = http.get_json("/api/v1/queues").await;
    assert_eq!(
        queues["dead_letters"], 0,
        "no open dead letter is left: {queues:#}"
    );
    assert_eq!(row(&queues, CENTRE)["dead_letters"], 0, "{queues:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_nats_connection() {
    let mut system = System::builder().adapters(&[]).start().await;
    let http = http(&system);
    let ready = |want: u16| {
        let http = http.clone();
        move || {
            let http = http.clone();
            async move {
                match http.try_request("GET", "/readyz", None).await {
                    Ok(r) if r.status == want => Some(r),
                    _ => None,
                }
            }
        }
    };
    // Ready once the event loop has turned (within a tick or two of start-up).
    let up = wait_for(
        "/readyz to answer 200 at start",
        Duration::from_secs(10),
        ready(200),
        || system.broker.log_tail(),
    )
    .await;
    assert_eq!(up.json()["nats_connected"], true, "{}", up.body);

    system.nats.kill9();
    let down = wait_for(
        "/readyz to answer 503 with NATS down",
        Duration::from_secs(20),
        ready(503),
        || system.broker.log_tail(),
    )
    .await;
    let body = down.json();
    assert_eq!(
        (body["ready"].as_bool(), body["nats_connected"].as_bool()),
        (Some(false), Some(false)),
        "{body}"
    );
    assert_eq!(http.metrics().await.get("yeongye_ready", ""), Some(0.0));
    // /healthz: alive all the same.
    assert_eq!(http.get("/healthz").await.status, 200);

    system.nats.start_again().await;
    let back = wait_for(
        "/readyz to answer 200 once NATS is back",
        Duration::from_secs(30),
        ready(200),
        || system.broker.log_tail(),
    )
    .await;
    assert_eq!(back.json()["ready"], true, "{}", back.body);
    // And the broker works again, not only says so.
    let centre = system.wire(CENTRE).await;
    send(&centre, HOPE, S::Delivered, &system).await;
}

#[test]
fn alert_rules_pass_promtool() {
    let promtool = ops::find_or_install("promtool", &["/usr/bin/promtool"], "install-promtool.sh");
    let dir = repo_root().join("deploy").join("prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let output = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("promtool {}:\n{text}", args.join(" "));
        assert!(
            output.status.success(),
            "promtool {} failed:\n{text}",
            args.join(" ")
        );
    }
}
