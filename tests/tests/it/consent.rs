//! Consent enforced by the broker (docs/PROTOCOL.md, "Consent"), through real NATS, the real
//! broker and the real adapters:
//!
//! - every consent refusal reason reaches the sender as a rejection with its code, and the
//!   referral ends REFUSED; a statutory-basis referral passes and says so;
//! - a revocation withdraws referrals in every non-terminal state across a broker `kill -9`,
//!   every recipient purges and confirms, and a recipient that is down keeps its purge
//!   outstanding until it runs.
//!
//! The audit log and personal data, around consents: `consent_audit.rs`. The helpers here
//! (grants, revocations, consent queries) serve both, and `consent_parties.rs`.

use std::collections::BTreeSet;
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
