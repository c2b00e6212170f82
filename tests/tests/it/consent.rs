//! Consent enforced by the broker (docs/PROTOCOL.md, "Consent"), through real NATS, the real
//! broker and the real adapters:
//!
//! - every consent refusal reason reaches the sender as a rejection with its code, and the
//!   referral ends REFUSED; a statutory-basis referral passes and says so;
//! - a revocation withdraws referrals in every non-terminal state across a broker `kill -9`,
//!   every recipient purges and confirms, and a recipient that is down keeps its purge
//!   outstanding until it runs;
//! - the hash-chained audit log verifies after crashes, and altering, deleting or swapping one
//!   stored entry makes `audit verify` fail naming it;
//! - client names, phone numbers and addresses never reach a log line or the audit log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message as _;
use yeongye_proto::subject::{self, InKind};
use yeongye_tests::wire::{envelope, new_id};
use yeongye_tests::{ReferralBuilder, System, WireClient, now_ms, v1};

use crate::{CENTRE, HOPE, MENTAL, REDELIVERY, SHORT, WELFARE, barrier};

pub(crate) const HOUR_MS: i64 = 3_600_000;

/// A consent collected by `collected_by` for `client`: case management, identity and household,
/// valid from an hour ago without end, for the given recipient agencies.
pub(crate) fn grant(collected_by: &str, client: &str, recipients: &[&str]) -> v1::ConsentGrant {
    v1::ConsentGrant {
        consent_id: format!("consent-{}", new_id()),
        client_pseudonym_id: client.to_owned(),
        collected_by: collected_by.to_owned(),
        recipient_agencies: recipients.iter().map(|s| (*s).to_owned()).collect(),
        recipient_kinds: Vec::new(),
        purposes: vec![v1::Purpose::CaseManagement.into()],
        data_categories: vec![
            v1::DataCategory::Identity.into(),
            v1::DataCategory::Household.into(),
        ],
        valid_from_ms: now_ms() - HOUR_MS,
        valid_until_ms: 0,
        form_reference: "동의서 2026-0042 (test)".to_owned(),
    }
}

/// Publishes a grant as `wire`'s agency and waits until the broker answers a consent query
/// with it (so that a rejection of the grant fails here, not later).
pub(crate) async fn record_grant(system: &System, wire: &WireClient, g: &v1::ConsentGrant) {
    let e = envelope(
        wire.agency(),
        v1::PayloadType::ConsentGrant,
        g.encode_to_vec(),
    );
    wire.publish_envelope(InKind::Consent, &e).await;
    wait_consent(system, wire, &g.consent_id, "the grant recorded", |r| {
        r.grant.is_some()
    })
    .await;
}

/// Publishes the revocation of `consent_id` as `wire`'s agency; returns its message id.
pub(crate) async fn revoke(wire: &WireClient, consent_id: &str) -> String {
    let revocation = v1::ConsentRevocation {
        consent_id: consent_id.to_owned(),
        revoked_at_ms: 0,
        recorded_by: wire.agency().to_owned(),
    };
    let e = envelope(
        wire.agency(),
        v1::PayloadType::ConsentRevocation,
        revocation.encode_to_vec(),
    );
    wire.publish_envelope(InKind::Consent, &e).await;
    e.message_id
}

/// One consent query over NATS; `None` if no reply in 2 s or the reply carries an error.
pub(crate) async fn try_consent(wire: &WireClient, consent_id: &str) -> Option<v1::ConsentReply> {
    let query = v1::ConsentQuery {
        consent_id: consent_id.to_owned(),
    };
    let request = envelope(
        wire.agency(),
        v1::PayloadType::ConsentQuery,
        query.encode_to_vec(),
    );
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        wire.client().request(
            subject::query(wire.agency()),
            request.encode_to_vec().into(),
        ),
    )
    .await
    .ok()?
    .ok()?;
    let e = v1::Envelope::decode(reply.payload.as_ref()).expect("consent reply envelope");
    assert_eq!(e.payload_type(), v1::PayloadType::ConsentReply);
    let reply = v1::ConsentReply::decode(e.payload.as_slice()).expect("consent reply payload");
    reply.error.is_none().then_some(reply)
}

pub(crate) async fn wait_consent(
    system: &System,
    wire: &WireClient,
    consent_id: &str,
    what: &str,
    check: impl Fn(&v1::ConsentReply) -> bool,
) -> v1::ConsentReply {
    let check = &check;
    yeongye_tests::wait_for(
        &format!("consent {consent_id}: {what}"),
        REDELIVERY,
        move || async move { try_consent(wire, consent_id).await.filter(|r| check(r)) },
        || system.describe(),
    )
    .await
}

/// `agency-adapter consent show <id>` run as `agency`, parsed.
async fn consent_show(system: &System, agency: &str, consent_id: &str) -> serde_json::Value {
    let config = system.adapter_dir(agency).join("adapter.toml");
    let out = yeongye_tests::adapter::cli(&config, &["consent", "show", consent_id]).await;
    out.assert_success();
    out.json()
}

/// Runs `consent show` until its pending purges are `expected`; panics after `timeout` with
/// the last answer.
async fn wait_pending_purges(
    system: &System,
    consent_id: &str,
    expected: &BTreeSet<(String, String)>,
    timeout: Duration,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let show = consent_show(system, CENTRE, consent_id).await;
        if pending_purges(&show) == *expected {
            return show;
        }
        assert!(
            start.elapsed() < timeout,
            "consent {consent_id}: pending purges not {expected:?} after {timeout:?}: {show:#}\n{}",
            system.describe()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `(referral id, agency)` of the pending purges in `agency-adapter consent show` output.
fn pending_purges(show: &serde_json::Value) -> BTreeSet<(String, String)> {
    show.get("pendingPurges")
        .or_else(|| show.get("pending_purges"))
        .and_then(serde_json::Value::as_array)
        .map(|rows| {
            rows.iter()
                .map(|p| {
                    let s = |k: &str, k2: &str| {
                        p.get(k)
                            .or_else(|| p.get(k2))
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("")
                            .to_owned()
                    };
                    (s("referralId", "referral_id"), s("agency", "agency"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `referral` as its sender and waits for the broker's rejection at the sender's adapter;
/// returns the rejection line.
pub(crate) async fn send_and_reject(
    system: &System,
    referral: &v1::Referral,
) -> yeongye_tests::Line {
    let wire = system.wire(&referral.from_agency).await;
    let message_id = wire.send_referral(referral).await;
    system
        .adapter(&referral.from_agency)
        .wait_rejection_of(&message_id, SHORT)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consent_refusal_reason_refuses_and_statute_passes() {
    let system = System::start().await;
    let centre = system.wire(CENTRE).await;
    let client = format!("client-{}", &new_id()[24..]);

    // The consent the refusals are measured against: CENTRE may send client's identity and
    // household to WELFARE for case management.
    let base = grant(CENTRE, &client, &[WELFARE]);
    record_grant(&system, &centre, &base).await;
    let mut expired = grant(CENTRE, &client, &[WELFARE]);
    expired.valid_from_ms = now_ms() - 2 * HOUR_MS;
    expired.valid_until_ms = now_ms() - HOUR_MS;
    record_grant(&system, &centre, &expired).await;
    let revoked = grant(CENTRE, &client, &[WELFARE]);
    record_grant(&system, &centre, &revoked).await;
    revoke(&centre, &revoked.consent_id).await;
    wait_consent(&system, &centre, &revoked.consent_id, "revoked", |r| {
        r.revoked
    })
    .await;

    let referral = |to: &str, consent: &str| {
        let mut r = ReferralBuilder::new(CENTRE, to).consent(consent).build();
        r.client.as_mut().expect("client").pseudonym_id = client.clone();
        r
    };
    let mut cases: Vec<(&str, v1::Referral)> = vec![
        (
            "CONSENT_UNKNOWN",
            referral(WELFARE, "consent-nobody-recorded"),
        ),
        (
            "CONSENT_RECIPIENT_NOT_COVERED",
            referral(HOPE, &base.consent_id),
        ),
        ("CONSENT_EXPIRED", referral(WELFARE, &expired.consent_id)),
        ("CONSENT_REVOKED", referral(WELFARE, &revoked.consent_id)),
    ];
    let mut other_client = referral(WELFARE, &base.consent_id);
    other_client.client.as_mut().expect("client").pseudonym_id = "client-someone-else".into();
    cases.push(("CONSENT_OTHER_CLIENT", other_client));
    let mut purpose = referral(WELFARE, &base.consent_id);
    purpose.purpose = v1::Purpose::BenefitApplication.into();
    cases.push(("CONSENT_PURPOSE_NOT_COVERED", purpose));
    let mut category = referral(WELFARE, &base.consent_id);
    category
        .data_categories
        .push(v1::DataCategory::Health.into());
    cases.push(("CONSENT_CATEGORY_NOT_COVERED", category));

    for (code, r) in &cases {
        let line = send_and_reject(&system, r).await;
        assert_eq!(
            line.code().as_deref(),
            Some(*code),
            "the rejection of {} ({code}): {}",
            r.referral_id,
            line.raw
        );
        if *code == "CONSENT_CATEGORY_NOT_COVERED" {
            // PROTOCOL.md: "the detail names the first one missing" (by name or by number).
            let detail = line.str_field("detail").unwrap_or("");
            let health = v1::DataCategory::Health as i32;
            assert!(
                detail.contains("HEALTH")
                    || detail
                        .split(|c: char| !c.is_ascii_digit())
                        .any(|n| n == health.to_string()),
                "the detail names the missing category: {}",
                line.raw
            );
        }
        centre
            .wait_state(&r.referral_id, v1::ReferralState::Refused, SHORT, || {
                system.describe()
            })
            .await;
    }

    // The same consent passes when everything is covered, and a statutory basis passes
    // without one; both say what allowed them.
    let covered = referral(WELFARE, &base.consent_id);
    centre.send_referral(&covered).await;
    let reply = centre
        .wait_state(
            &covered.referral_id,
            v1::ReferralState::Received,
            SHORT,
            || system.describe(),
        )
        .await;
    assert_eq!(reply.legal_basis, format!("consent:{}", base.consent_id));
    let statute = ReferralBuilder::new(CENTRE, HOPE)
        .field(v1::FieldOfNeed::ChildProtection)
        .build();
    let mut statute = statute;
    statute.legal_basis = Some(v1::referral::LegalBasis::StatutoryBasis(
        v1::StatutoryBasis {
            statute: v1::Statute::ChildWelfareAct.into(),
            justification: "아동학대 의심 신고 (test)".into(),
        },
    ));
    centre.send_referral(&statute).await;
    let reply = centre
        .wait_state(
            &statute.referral_id,
            v1::ReferralState::Received,
            SHORT,
            || system.describe(),
        )
        .await;
    assert_eq!(reply.legal_basis, "statute:STATUTE_CHILD_WELFARE_ACT");

    // No refused referral reached a recipient (everything published before the barrier has
    // reached the adapters once it returns).
    barrier(&system, CENTRE, WELFARE).await;
    barrier(&system, CENTRE, HOPE).await;
    for (code, r) in &cases {
        assert_eq!(
            system.adapter(&r.to_agency).deliveries_of(&r.referral_id),
            0,
            "{code}: the refused referral {} was delivered",
            r.referral_id
        );
    }
    assert_eq!(
        system.adapter(WELFARE).deliveries_of(&covered.referral_id),
        1
    );
    assert_eq!(system.adapter(HOPE).deliveries_of(&statute.referral_id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_withdraws_every_open_referral_across_a_broker_kill() {
    // HOPE's adapter is down: its referral stays DELIVERED, and its purge outstanding.
    let mut system = System::builder()
        .adapters(&[CENTRE, WELFARE, MENTAL])
        .start()
        .await;
    let centre = system.wire(CENTRE).await;
    let welfare = system.wire(WELFARE).await;
    let mental = system.wire(MENTAL).await;
    let client = format!("client-{}", &new_id()[24..]);
    let consent = grant(CENTRE, &client, &[WELFARE, MENTAL, HOPE]);
    record_grant(&system, &centre, &consent).await;
    let cid = consent.consent_id.clone();

    let referral = |to: &str| {
        let mut r = ReferralBuilder::new(CENTRE, to).consent(&cid).build();
        r.client.as_mut().expect("client").pseudonym_id = client.clone();
        r
    };
    let delivered = referral(HOPE);
    let received = referral(WELFARE);
    let accepted = referral(MENTAL);
    let in_progress = referral(WELFARE);
    let completed = referral(MENTAL);
    // Not under the consent: must be left alone.
    let bystander = ReferralBuilder::new(CENTRE, WELFARE).build();
    for r in [
        &delivered,
        &received,
        &accepted,
        &in_progress,
        &completed,
        &bystander,
    ] {
        centre.send_referral(r).await;
    }
    let ctx = || system.describe();
    centre
        .wait_state(
            &delivered.referral_id,
            v1::ReferralState::Delivered,
            SHORT,
            ctx,
        )
        .await;
    for r in [&received, &accepted, &in_progress, &completed, &bystander] {
        centre
            .wait_state(&r.referral_id, v1::ReferralState::Received, SHORT, ctx)
            .await;
    }
    let steps: [(&WireClient, &v1::Referral, &[v1::Status]); 3] = [
        (&mental, &accepted, &[v1::Status::Accepted]),
        (
            &welfare,
            &in_progress,
            &[v1::Status::Accepted, v1::Status::InProgress],
        ),
        (
            &mental,
            &completed,
            &[v1::Status::Accepted, v1::Status::Completed],
        ),
    ];
    for (wire, r, statuses) in steps {
        for s in statuses {
            wire.update_status(&r.referral_id, *s, "test").await;
        }
    }
    for (r, state) in [
        (&accepted, v1::ReferralState::Accepted),
        (&in_progress, v1::ReferralState::InProgress),
        (&completed, v1::ReferralState::Completed),
    ] {
        centre.wait_state(&r.referral_id, state, SHORT, ctx).await;
    }
    for (agency, r) in [
        (WELFARE, &received),
        (WELFARE, &in_progress),
        (MENTAL, &accepted),
        (MENTAL, &completed),
    ] {
        assert!(
            system
                .adapter(agency)
                .inbox_files("referrals")
                .contains(&r.referral_id),
            "{agency} has {} in its inbox before the revocation",
            r.referral_id
        );
    }

    // Revoke, and kill the broker as soon as the stream has the revocation.
    revoke(&centre, &cid).await;
    system.broker.kill9();
    system.broker.start_again().await;

    let open: Vec<String> = [&delivered, &received, &accepted, &in_progress]
        .iter()
        .map(|r| r.referral_id.clone())
        .collect();
    centre
        .wait_all_in_state(&open, v1::ReferralState::Withdrawn, REDELIVERY, || {
            system.describe()
        })
        .await;
    for id in &open {
        system
            .adapter(CENTRE)
            .wait_notified(id, "WITHDRAWN", REDELIVERY)
            .await;
    }
    assert_eq!(
        centre.state(&completed.referral_id).await,
        Some(v1::ReferralState::Completed),
        "an ended referral stays as it ended"
    );
    assert_eq!(
        centre.state(&bystander.referral_id).await,
        Some(v1::ReferralState::Received),
        "a referral under another basis is untouched"
    );

    // The running recipients are told, purge their files and confirm; HOPE's purge stays
    // outstanding while its adapter is down.
    let had_data = [
        (WELFARE, &received),
        (WELFARE, &in_progress),
        (MENTAL, &accepted),
        (MENTAL, &completed),
    ];
    for (agency, r) in had_data {
        let adapter = system.adapter(agency);
        adapter
            .wait_lines(
                &format!("the withdrawal of {}", r.referral_id),
                REDELIVERY,
                |lines| {
                    lines.iter().any(|l| {
                        l.kind() == "withdrawal" && l.referral_id() == Some(r.referral_id.as_str())
                    })
                },
            )
            .await;
        assert!(
            !adapter.inbox_files("referrals").contains(&r.referral_id),
            "{agency} still holds the withdrawn {} in its inbox",
            r.referral_id
        );
    }
    assert!(
        system
            .adapter(WELFARE)
            .inbox_files("referrals")
            .contains(&bystander.referral_id),
        "the bystander referral was purged"
    );
    let hope_pending: BTreeSet<(String, String)> =
        [(delivered.referral_id.clone(), HOPE.to_owned())].into();
    wait_pending_purges(&system, &cid, &hope_pending, REDELIVERY).await;
    let reply = try_consent(&centre, &cid).await.expect("consent reply");
    assert!(reply.revoked);
    let withdrawn: BTreeSet<&str> = reply
        .withdrawn_referral_ids
        .iter()
        .map(String::as_str)
        .collect();
    let purge_requested: BTreeSet<&str> = reply
        .purge_requested_referral_ids
        .iter()
        .map(String::as_str)
        .collect();
    for r in [&delivered, &received, &accepted, &in_progress] {
        assert!(
            withdrawn.contains(r.referral_id.as_str()),
            "{} is not among the consent's withdrawn referrals: {reply:?}",
            r.referral_id
        );
    }
    // The completed referral stays COMPLETED: not withdrawn, but its recipient was asked to
    // purge, like the withdrawn ones'.
    assert!(
        !withdrawn.contains(completed.referral_id.as_str()),
        "the completed referral is listed as withdrawn: {reply:?}"
    );
    for r in [&delivered, &received, &accepted, &in_progress, &completed] {
        assert!(
            purge_requested.contains(r.referral_id.as_str()),
            "{} is not among the referrals asked to purge: {reply:?}",
            r.referral_id
        );
    }

    // HOPE's adapter comes up: it purges (whatever it got) and confirms; nothing is pending.
    system.start_adapter(HOPE);
    let hope = system.adapter(HOPE);
    hope.wait_lines("the withdrawal", REDELIVERY, |lines| {
        lines.iter().any(|l| {
            l.kind() == "withdrawal" && l.referral_id() == Some(delivered.referral_id.as_str())
        })
    })
    .await;
    let show = wait_pending_purges(&system, &cid, &BTreeSet::new(), REDELIVERY).await;
    assert_eq!(show["revoked"], true, "consent show: {show:#}");
    // Whatever HOPE's adapter handled after the withdrawal, the withdrawn referral's data is not
    // in its inbox.
    barrier(&system, CENTRE, HOPE).await;
    assert!(
        !system
            .adapter(HOPE)
            .inbox_files("referrals")
            .contains(&delivered.referral_id),
        "HOPE holds the withdrawn {} in its inbox",
        delivered.referral_id
    );
}

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
