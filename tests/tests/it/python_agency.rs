//! A second-language agency in CI: `examples/python-agency/raw_agency.py`, written from
//! PROTOCOL.md with nats-py, protobuf and PyNaCl (no adapter), against the real broker on a
//! system secured by the real onboarding (NATS users, permissions, signing keys), with a Rust
//! adapter as the other agency. It checks the test vectors offline, then: consent grant,
//! referral out (the Rust adapter checks its relayed signature), referral in (the Python
//! agency checks the broker's and the relayed signature, keeps it, sends the receipt under the
//! derived id, recognises the redelivered copy as a repeat), status updates, a status query
//! whose signed reply it verifies, revocation, withdrawal, purge confirmation under the derived
//! id, and a consent query that shows every purge confirmed.
//!
//! The Python side is installed by `tests/install-python-agency.sh` (pinned packages, and the
//! protobuf modules generated from `proto/` every run).

use serde_json::Value;
use std::path::{Path, PathBuf};
use yeongye_tests::secure::SecureSystem;
use yeongye_tests::{ReferralBuilder, wait_for, wait_until};

use crate::test_vectors::vectors_path;
use crate::{CENTRE, HOPE, REDELIVERY, SHORT};

/// The agency the Python program is.
const PY: &str = CENTRE;

/// Runs tests/install-python-agency.sh and returns the python it prints, or panics saying why.
fn install() -> PathBuf {
    let script = yeongye_tests::repo_root().join("tests/install-python-agency.sh");
    let out = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.is_file(), "install-python-agency.sh printed {path:?}");
    path
}

/// How to run raw_agency.py as agency [`PY`] of `system`.
struct Python {
    python: PathBuf,
    script: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Python {
    fn new(system: &SecureSystem, python: PathBuf) -> Python {
        let dir = system.dir().join("python");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let s = |p: &Path| p.display().to_string();
        Python {
            python,
            script: yeongye_tests::repo_root().join("examples/python-agency/raw_agency.py"),
            args: vec![
                "--nats".into(),
                system.url(),
                "--agency".into(),
                PY.into(),
                "--creds".into(),
                s(&system.ids.creds(PY)),
                "--key".into(),
                s(&system.ids.signing_key(PY)),
                "--registry".into(),
                s(&system.ids.registry),
                "--sealing-key".into(),
                s(&system.ids.sealing_key(PY)),
                "--state".into(),
                s(&dir.join("state")),
            ],
            log: dir.join("run.log"),
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.python);
        c.arg(&self.script).args(&self.args).args(args);
        c
    }

    /// Runs one command to its end; its JSON output.
    async fn run(&self, args: &[&str]) -> Value {
        let out = tokio::time::timeout(SHORT, self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("raw_agency.py {args:?} did not finish in {SHORT:?}"))
            .unwrap_or_else(|e| panic!("raw_agency.py {args:?}: {e}"));
        assert!(
            out.status.success(),
            "raw_agency.py {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "raw_agency.py {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Starts `run` (reading the consumer) in the background, its output in [`Self::log`].
    fn start_run(&self) -> tokio::process::Child {
        let log = yeongye_tests::process::append_log(&self.log);
        self.command(&["run", "--redeliver-once"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("raw_agency.py run")
    }

    /// The JSON lines `run` printed so far.
    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_line(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        // Up to a redelivery: a message the server handed to a nats-py fetch just as it timed out
        // on a loaded machine is seen by the agency only once the consumer's ack wait (30 s) has
        // passed (seen once in CI-like load: the withdrawal came after SHORT).
        wait_until(
            what,
            REDELIVERY,
            || {
                found = self.lines().into_iter().find(|l| check(l));
                found.is_some()
            },
            || format!("raw_agency.py run:\n{}", self.log_text()),
        )
        .await;
        found.expect("found")
    }
}

fn is(line: &Value, kind: &str, referral_id: &str) -> bool {
    line["kind"] == kind && line["referral_id"] == referral_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_agency_written_from_the_protocol_works_end_to_end() {
    let python = install();
    let mut system = SecureSystem::start(&[HOPE, PY], false).await;
    system.start_adapter(HOPE);
    let py = Python::new(&system, python);

    // Offline first: the Python implementation of signing and ids meets the test vectors.
    let checked = py
        .run(&["vectors", &vectors_path().display().to_string()])
        .await;
    assert_eq!(checked["checked"], "ok");

    let _run = py.start_run();

    // A consent collected by the Python agency, covering both agencies.
    let granted = py
        .run(&[
            "grant",
            "--client",
            "p-python-raw",
            "--recipients",
            &format!("{HOPE},{PY}"),
        ])
        .await;
    let cid = granted["consent_id"]
        .as_str()
        .expect("consent_id")
        .to_owned();

    // Python -> Rust: the adapter takes it (its relayed signature verified) and receipts it.
    let sent = py
        .run(&[
            "send",
            "--seal",
            "--to",
            HOPE,
            "--client",
            "p-python-raw",
            "--consent",
            &cid,
        ])
        .await;
    let out_id = sent["referral_id"]
        .as_str()
        .expect("referral_id")
        .to_owned();
    let hope = system.adapter(HOPE);
    hope.wait_lines("the Python agency's referral", SHORT, |lines| {
        lines
            .iter()
            .any(|l| l.kind() == "delivery" && l.referral_id() == Some(out_id.as_str()))
    })
    .await;
    py.wait_line("RECEIVED notified to the Python agency", |l| {
        is(l, "notification", &out_id) && l["state"] == "RECEIVED"
    })
    .await;

    // Rust -> Python, under the same consent (the adapter is covered; so is the recipient).
    let mut referral = ReferralBuilder::new(HOPE, PY)
        .consent(&cid)
        .reason("정신건강 상담 연계")
        .build();
    if let Some(client) = referral.client.as_mut() {
        "p-python-raw".clone_into(&mut client.pseudonym_id);
    }
    let in_id = referral.referral_id.clone();
    let file = system.dir().join("referral.json");
    std::fs::write(&file, serde_json::to_vec(&referral).expect("JSON")).expect("write");
    hope.cli(&["send", file.to_str().expect("utf-8 path")])
        .await
        .assert_success();
    let first = py
        .wait_line("the delivery to the Python agency", |l| {
            is(l, "delivery", &in_id) && l["repeat"] == false
        })
        .await;
    let delivery_id = first["message_id"].as_str().expect("message_id");
    assert_eq!(
        first["receipt_message_id"],
        yeongye_adapter::ids::receipt_message_id(delivery_id),
        "the receipt's id is derived from the delivery's"
    );
    // The copy it asked for again is a repeat: not kept twice, its receipt sent again under
    // the same id (inside the stream's duplicate window: a duplicate PubAck).
    let again = py
        .wait_line("the redelivered copy, recognised as a repeat", |l| {
            is(l, "delivery", &in_id) && l["repeat"] == true
        })
        .await;
    assert_eq!(again["message_id"], first["message_id"]);
    assert_eq!(again["receipt_message_id"], first["receipt_message_id"]);
    assert_eq!(again["receipt_duplicate"], true, "{again}");
    let kept = system
        .dir()
        .join("python/state/referrals")
        .join(format!("{in_id}.json"));
    assert!(kept.is_file(), "the delivery is kept in {}", kept.display());
    hope.wait_notified(&in_id, "RECEIVED", SHORT).await;

    py.run(&[
        "update",
        &in_id,
        "STATUS_ACCEPTED",
        "--note",
        "담당자 배정",
        "--seal",
    ])
    .await;
    hope.wait_notified(&in_id, "ACCEPTED", SHORT).await;
    // The note went sealed to the sender (Python sealed, Rust opened it).
    let opened: Vec<String> = hope
        .lines_of("notification")
        .iter()
        .filter(|l| l.referral_id() == Some(in_id.as_str()))
        .filter_map(|l| hope.item_file(l))
        .filter_map(|n| n["note"].as_str().map(str::to_owned))
        .collect();
    assert!(
        opened.iter().any(|n| n == "담당자 배정"),
        "{opened:?}\n{}",
        hope.describe()
    );
    let status = py.run(&["status", &in_id]).await;
    assert_eq!(status["verified"], true);
    assert_eq!(status["state"], "REFERRAL_STATE_ACCEPTED", "{status}");
    assert_eq!(status["from_agency"], HOPE);

    // The client withdraws the consent: both referrals are withdrawn, both recipients purge.
    py.run(&["revoke", &cid]).await;
    let withdrawal = py
        .wait_line(
            "the withdrawal of the referral the Python agency got",
            |l| is(l, "withdrawal", &in_id) && l["repeat"] == false,
        )
        .await;
    assert_eq!(
        withdrawal["purge_message_id"],
        yeongye_adapter::ids::purge_message_id(withdrawal["message_id"].as_str().expect("id")),
        "the purge confirmation's id is derived from the withdrawal's"
    );
    assert!(!kept.exists(), "the withdrawn referral's data is purged");
    py.wait_line("WITHDRAWN notified for the referral it sent", |l| {
        is(l, "notification", &out_id) && l["state"] == "WITHDRAWN"
    })
    .await;
    let ids = |v: &Value, key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let reply = wait_for(
        "every purge confirmed",
        REDELIVERY,
        || {
            let (py, cid) = (&py, &cid);
            async move {
                let reply = py.run(&["consent", cid]).await;
                let pending = reply["pending_purges"].as_array().map_or(0, Vec::len);
                let requested = ids(&reply, "purge_requested_referral_ids").len();
                (pending == 0 && requested == 2).then_some(reply)
            }
        },
        || system.describe(),
    )
    .await;
    assert_eq!(reply["verified"], true);
    assert_eq!(reply["revoked"], true);
    let mut withdrawn = ids(&reply, "withdrawn_referral_ids");
    withdrawn.sort();
    let mut both = vec![out_id.clone(), in_id.clone()];
    both.sort();
    assert_eq!(withdrawn, both, "{reply}");

    // Everything it read was signed by the broker and handled: nothing refused or rejected.
    let bad: Vec<Value> = py
        .lines()
        .into_iter()
        .filter(|l| l["kind"] == "refused" || l["kind"] == "rejection" || l["kind"] == "unknown")
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}
