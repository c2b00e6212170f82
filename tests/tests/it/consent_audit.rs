//! The audit log and personal data, around consents, through real NATS, the real broker and
//! the real adapters:
//!
//! - the hash-chained audit log verifies after crashes, and altering, deleting or swapping one
//!   stored entry makes `audit verify` fail naming it;
//! - client names, phone numbers and addresses never reach a log line or the audit log.

use std::path::{Path, PathBuf};

use prost::Message as _;
use yeongye_tests::wire::new_id;
use yeongye_tests::{ReferralBuilder, System, v1};

use crate::consent::{grant, record_grant, revoke, send_and_reject, wait_consent};
use crate::{CENTRE, HOPE, REDELIVERY, SHORT, WELFARE, barrier};

/// `referral-broker <args>`: exit status and stdout + stderr.
async fn broker_cli(args: &[&std::ffi::OsStr]) -> (std::process::ExitStatus, String) {
    let out = tokio::process::Command::new(yeongye_tests::workspace_bin("referral-broker"))
        .args(args)
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run referral-broker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// The broker's audit segments in a stopped broker's store (`A/<segment number>`: up to 32
/// length-delimited entries each, in sequence order), as `(key, entries)`.
fn audit_segments(db: &sled::Db) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    db.scan_prefix(b"A/")
        .map(|kv| {
            let (k, v) = kv.expect("read audit segment");
            let mut rest = v.as_ref();
            let mut entries = Vec::new();
            while !rest.is_empty() {
                let len = prost::encoding::decode_varint(&mut rest).expect("entry length");
                let len = usize::try_from(len).expect("small entry");
                entries.push(rest[..len].to_vec());
                rest = &rest[len..];
            }
            (k.to_vec(), entries)
        })
        .collect()
}

fn write_audit_segment(db: &sled::Db, key: &[u8], entries: &[Vec<u8>]) {
    let mut v = Vec::new();
    for e in entries {
        prost::encoding::encode_varint(e.len() as u64, &mut v);
        v.extend_from_slice(e);
    }
    db.insert(key, v).expect("write audit segment");
}

/// Every audit entry in a stopped broker's store, in order.
fn audit_entries(store: &Path) -> Vec<Vec<u8>> {
    let db = sled::Config::new().path(store).open().expect("open store");
    audit_segments(&db)
        .into_iter()
        .flat_map(|(_, e)| e)
        .collect()
}

/// Rewrites the audit segments of `db` after `change` has had its way with them (entries are
/// found by sequence number with `place`).
fn tamper_segments(db: &sled::Db, change: impl FnOnce(&mut Vec<(Vec<u8>, Vec<Vec<u8>>)>)) {
    let mut segments = audit_segments(db);
    change(&mut segments);
    for (key, entries) in &segments {
        write_audit_segment(db, key, entries);
    }
}

/// Where entry `seq` (from 1) is: segment index, index in the segment.
fn place(segments: &[(Vec<u8>, Vec<Vec<u8>>)], seq: u64) -> (usize, usize) {
    let mut left = usize::try_from(seq - 1).expect("small");
    for (i, (_, entries)) in segments.iter().enumerate() {
        if left < entries.len() {
            return (i, left);
        }
        left -= entries.len();
    }
    panic!("no audit entry {seq}");
}

/// Copies the store to `<dir>/<name>`, changes it with `tamper`, and returns the copy.
fn tampered_copy(store: &Path, dir: &Path, name: &str, tamper: impl FnOnce(&sled::Db)) -> PathBuf {
    let copy = dir.join(name);
    copy_dir(store, &copy);
    let db = sled::Config::new().path(&copy).open().expect("open copy");
    tamper(&db);
    db.flush().expect("flush copy");
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_verifies_after_crashes_and_names_a_tampered_entry() {
    let mut system = System::start().await;
    let centre = system.wire(CENTRE).await;
    let welfare = system.wire(WELFARE).await;
    let client = format!("client-{}", &new_id()[24..]);
    let consent = grant(CENTRE, &client, &[WELFARE]);
    record_grant(&system, &centre, &consent).await;

    // Referrals, updates, a refusal and a revocation, with the broker killed twice in between.
    let mut ids = Vec::new();
    for round in 0..2 {
        for _ in 0..3 {
            let mut r = ReferralBuilder::new(CENTRE, WELFARE)
                .consent(&consent.consent_id)
                .build();
            r.client.as_mut().expect("client").pseudonym_id = client.clone();
            centre.send_referral(&r).await;
            ids.push(r.referral_id);
        }
        let statute = ReferralBuilder::new(CENTRE, WELFARE).build();
        centre.send_referral(&statute).await;
        welfare
            .update_status(&statute.referral_id, v1::Status::Accepted, "")
            .await;
        let refused = ReferralBuilder::new(CENTRE, HOPE)
            .consent(&consent.consent_id)
            .build();
        centre.send_referral(&refused).await;
        eprintln!("audit: kill -9 #{}", round + 1);
        system.broker.kill9();
        system.broker.start_again().await;
    }
    centre
        .wait_all_in_state(&ids, v1::ReferralState::Received, REDELIVERY, || {
            system.describe()
        })
        .await;
    revoke(&centre, &consent.consent_id).await;
    centre
        .wait_all_in_state(&ids, v1::ReferralState::Withdrawn, REDELIVERY, || {
            system.describe()
        })
        .await;
    wait_consent(
        &system,
        &centre,
        &consent.consent_id,
        "every purge confirmed",
        |r| r.revoked && r.pending_purges.is_empty(),
    )
    .await;
    system.broker.stop().await;

    let config = system.broker.config_path();
    let (status, out) = broker_cli(&[
        "--config".as_ref(),
        config.as_os_str(),
        "audit".as_ref(),
        "verify".as_ref(),
    ])
    .await;
    assert!(
        status.success(),
        "audit verify after crashes: {status}\n{out}"
    );

    let store = system.broker.config().store_dir.clone();
    let entries = audit_entries(&store);
    let n = entries.len() as u64;
    assert!(n >= 20, "only {n} audit entries after the run");
    let seqs: Vec<u64> = entries
        .iter()
        .map(|b| {
            yeongye_broker::audit::Entry::decode(b.as_slice())
                .expect("decode entry")
                .seq
        })
        .collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "audit entries are numbered 1..={n} in order"
    );

    let scratch = tempfile::tempdir().expect("tempdir");
    let altered_seq = n / 2;
    let deleted_seq = n / 3;
    let (swap_a, swap_b) = (n / 4, n / 4 + 2);
    let cases: Vec<(&str, u64, PathBuf)> = vec![
        (
            "altered",
            altered_seq,
            tampered_copy(&store, scratch.path(), "altered", |db| {
                tamper_segments(db, |segs| {
                    let (i, j) = place(segs, altered_seq);
                    let mut e = yeongye_broker::audit::Entry::decode(segs[i].1[j].as_slice())
                        .expect("decode entry");
                    e.actor = format!("{}-x", e.actor);
                    segs[i].1[j] = e.encode_to_vec();
                });
            }),
        ),
        (
            "deleted",
            deleted_seq,
            tampered_copy(&store, scratch.path(), "deleted", |db| {
                tamper_segments(db, |segs| {
                    let (i, j) = place(segs, deleted_seq);
                    segs[i].1.remove(j);
                });
            }),
        ),
        (
            "swapped",
            swap_a,
            tampered_copy(&store, scratch.path(), "swapped", |db| {
                tamper_segments(db, |segs| {
                    let ((ia, ja), (ib, jb)) = (place(segs, swap_a), place(segs, swap_b));
                    let a = std::mem::take(&mut segs[ia].1[ja]);
                    segs[ia].1[ja] = std::mem::replace(&mut segs[ib].1[jb], a);
                });
            }),
        ),
    ];
    for (what, seq, copy) in &cases {
        let (status, out) = broker_cli(&[
            "--config".as_ref(),
            config.as_os_str(),
            "audit".as_ref(),
            "--store".as_ref(),
            copy.as_os_str(),
            "verify".as_ref(),
        ])
        .await;
        assert_eq!(
            status.code(),
            Some(1),
            "audit verify of the {what} store (entry {seq} of {n}): {out}"
        );
        assert!(
            out.contains(&format!("entry {seq}:")),
            "audit verify of the {what} store names entry {seq}: {out}"
        );
    }
    // The original is untouched and still verifies.
    let (status, out) = broker_cli(&[
        "--config".as_ref(),
        config.as_os_str(),
        "audit".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "verify".as_ref(),
    ])
    .await;
    assert!(status.success(), "the original store: {out}");
}

const MARKER: &str = "ZZMARKERZZ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_reaches_the_recipient_but_no_log_or_audit_entry() {
    let mut system = System::start().await;
    let centre = system.wire(CENTRE).await;
    let welfare = system.wire(WELFARE).await;
    let client = format!("client-{}", &new_id()[24..]);
    let mut consent = grant(CENTRE, &client, &[WELFARE]);
    consent
        .data_categories
        .push(v1::DataCategory::Contact.into());
    record_grant(&system, &centre, &consent).await;

    let with_pii = |r: &mut v1::Referral, n: usize| {
        let c = r.client.as_mut().expect("client");
        c.pseudonym_id = client.clone();
        c.name = format!("홍{MARKER}길동{n}");
        c.phone = format!("010-{MARKER}-{n:04}");
        c.address = format!("서울특별시 한빛구 {MARKER}로 {n}");
        c.birth_date = "1970-01-01".into();
        r.data_categories.push(v1::DataCategory::Contact.into());
    };
    // Under the consent, sent raw; under a statute, sent with the adapter's command line;
    // refused (the consent does not cover HOPE); invalid (no urgency).
    let mut under_consent = ReferralBuilder::new(CENTRE, WELFARE)
        .consent(&consent.consent_id)
        .build();
    with_pii(&mut under_consent, 1);
    let mut by_cli = ReferralBuilder::new(CENTRE, WELFARE).build();
    with_pii(&mut by_cli, 2);
    let mut refused = ReferralBuilder::new(CENTRE, HOPE)
        .consent(&consent.consent_id)
        .build();
    with_pii(&mut refused, 3);
    let mut invalid = ReferralBuilder::new(CENTRE, WELFARE).build();
    with_pii(&mut invalid, 4);
    invalid.urgency = 0;

    centre.send_referral(&under_consent).await;
    let file = system.dir().join("referral.json");
    std::fs::write(&file, serde_json::to_vec(&by_cli).expect("JSON")).expect("write");
    let sent = system
        .adapter(CENTRE)
        .cli(&["send", file.to_str().expect("utf-8 path")])
        .await;
    sent.assert_success();
    let refused_line = send_and_reject(&system, &refused).await;
    assert_eq!(
        refused_line.code().as_deref(),
        Some("CONSENT_RECIPIENT_NOT_COVERED")
    );
    let invalid_line = send_and_reject(&system, &invalid).await;
    assert_eq!(invalid_line.code().as_deref(), Some("INVALID_FIELD"));

    for r in [&under_consent, &by_cli] {
        centre
            .wait_state(&r.referral_id, v1::ReferralState::Received, SHORT, || {
                system.describe()
            })
            .await;
        welfare
            .update_status(&r.referral_id, v1::Status::Accepted, "상담 예정")
            .await;
        centre
            .wait_state(&r.referral_id, v1::ReferralState::Accepted, SHORT, || {
                system.describe()
            })
            .await;
    }
    // The handoff carries the personal data: the recipient's inbox has it.
    let handed = system
        .adapter(WELFARE)
        .inbox_json("referrals", &by_cli.referral_id)
        .to_string();
    assert!(
        handed.contains(MARKER),
        "the recipient's inbox file carries the client's details: {handed}"
    );
    // The consent is revoked, so the consented referral is withdrawn and purged as well.
    revoke(&centre, &consent.consent_id).await;
    wait_consent(
        &system,
        &centre,
        &consent.consent_id,
        "purge confirmed",
        |r| r.revoked && !r.withdrawn_referral_ids.is_empty() && r.pending_purges.is_empty(),
    )
    .await;
    barrier(&system, CENTRE, WELFARE).await;
    let audit_show_ids: Vec<String> = [&under_consent, &by_cli, &refused, &invalid]
        .iter()
        .map(|r| r.referral_id.clone())
        .collect();

    system.broker.stop().await;
    let agencies: Vec<String> = system.agencies.clone();
    for agency in &agencies {
        system.adapter_mut(agency).stop().await;
    }

    let mut leaks = Vec::new();
    let mut scan = |what: &str, text: &str| {
        for line in text.lines().filter(|l| l.contains(MARKER)) {
            leaks.push(format!("{what}: {line}"));
        }
    };
    let broker_log = std::fs::read_to_string(system.broker.log_path()).expect("broker log");
    assert!(!broker_log.is_empty(), "the broker logged nothing");
    scan("broker log", &broker_log);
    scan("agency-adapter send stdout", &sent.stdout);
    scan("agency-adapter send stderr", &sent.stderr);
    for agency in &agencies {
        let adapter = system.adapter(agency);
        let log = std::fs::read_to_string(adapter.log_path()).unwrap_or_default();
        scan(&format!("{agency} adapter log"), &log);
        for line in adapter.lines() {
            scan(&format!("{agency} adapter stdout"), &line.raw);
        }
    }
    let store = system.broker.config().store_dir.clone();
    let entries = audit_entries(&store);
    assert!(!entries.is_empty(), "no audit entries");
    for (seq, bytes) in (1..).zip(&entries) {
        let e = yeongye_broker::audit::Entry::decode(bytes.as_slice())
            .unwrap_or_else(|err| panic!("audit entry {seq} does not decode: {err}"));
        scan(&format!("audit entry {seq}"), &format!("{e:?}"));
        scan(
            &format!("audit entry {seq} bytes"),
            &String::from_utf8_lossy(bytes),
        );
    }
    let config = system.broker.config_path();
    for id in &audit_show_ids {
        let (status, out) = broker_cli(&[
            "--config".as_ref(),
            config.as_os_str(),
            "audit".as_ref(),
            "show".as_ref(),
            id.as_ref(),
        ])
        .await;
        assert!(status.success(), "audit show {id}: {out}");
        scan(&format!("audit show {id}"), &out);
    }
    assert!(
        leaks.is_empty(),
        "the marker leaked in {} places:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}
