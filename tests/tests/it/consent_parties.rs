//! Who may cite a consent (docs/PROTOCOL.md, "Consent"), through real NATS, the real broker and
//! the real adapters: the collecting agency, and an agency the consent covers referring on to
//! another it covers (the district's chain). Anyone else gets exactly what an unknown consent
//! gets — the same code and the same detail — whatever else is right or wrong about its
//! referral, revocation or query: no oracle for consent ids, client pseudonyms or coverage.

use prost::Message as _;
use yeongye_proto::subject::InKind;
use yeongye_tests::wire::{envelope, new_id};
use yeongye_tests::{ReferralBuilder, System, v1};

use crate::consent::{grant, record_grant, revoke, send_and_reject, try_consent, wait_consent};
use crate::{CENTRE, HOPE, MENTAL, SHORT, WELFARE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_is_cited_only_by_its_parties_and_tells_others_nothing() {
    let system = System::start().await;
    let (centre, hope, welfare) = (
        system.wire(CENTRE).await,
        system.wire(HOPE).await,
        system.wire(WELFARE).await,
    );
    let client = format!("client-{}", &new_id()[24..]);
    // The community centre collects the client's consent to share with the Hope Welfare
    // Support Group and the mental-health centre.
    let chain = grant(CENTRE, &client, &[HOPE, MENTAL]);
    record_grant(&system, &centre, &chain).await;
    let revoked = grant(CENTRE, &client, &[HOPE, MENTAL]);
    record_grant(&system, &centre, &revoked).await;
    revoke(&centre, &revoked.consent_id).await;
    wait_consent(&system, &centre, &revoked.consent_id, "revoked", |r| {
        r.revoked
    })
    .await;
    let referral = |from: &str, to: &str, consent: &str| {
        let mut r = ReferralBuilder::new(from, to).consent(consent).build();
        r.client.as_mut().expect("client").pseudonym_id = client.clone();
        r
    };

    // The chain: centre → Hope, then Hope → mental health, both under the centre's consent.
    for (from, wire, to) in [(CENTRE, &centre, HOPE), (HOPE, &hope, MENTAL)] {
        let r = referral(from, to, &chain.consent_id);
        wire.send_referral(&r).await;
        let reply = wire
            .wait_state(&r.referral_id, v1::ReferralState::Received, SHORT, || {
                system.describe()
            })
            .await;
        assert_eq!(reply.legal_basis, format!("consent:{}", chain.consent_id));
    }

    // A non-party citing it — with everything else right, with another client, with a purpose
    // it does not cover, or citing a revoked one — is told what an unknown id is told.
    let mut cases = vec![
        (
            "an id nobody recorded",
            referral(WELFARE, MENTAL, "consent-nobody-recorded"),
        ),
        (
            "everything else right",
            referral(WELFARE, MENTAL, &chain.consent_id),
        ),
        (
            "a revoked consent",
            referral(WELFARE, MENTAL, &revoked.consent_id),
        ),
    ];
    let mut other_client = referral(WELFARE, MENTAL, &chain.consent_id);
    other_client.client.as_mut().expect("client").pseudonym_id = "client-someone-else".into();
    cases.push(("another client", other_client));
    let mut purpose = referral(WELFARE, MENTAL, &chain.consent_id);
    purpose.purpose = v1::Purpose::BenefitApplication.into();
    cases.push(("a purpose not covered", purpose));
    let mut answers = Vec::new();
    for (what, r) in &cases {
        let line = send_and_reject(&system, r).await;
        answers.push((
            line.code().unwrap_or_default(),
            line.str_field("detail").unwrap_or_default().to_owned(),
        ));
        assert_eq!(
            line.code().as_deref(),
            Some("CONSENT_UNKNOWN"),
            "{what}: {}",
            line.raw
        );
        welfare
            .wait_state(&r.referral_id, v1::ReferralState::Refused, SHORT, || {
                system.describe()
            })
            .await;
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "a non-party can tell the cases apart: {answers:?}"
    );

    // Revoking it, or asking about it, is no different.
    let revocation = v1::ConsentRevocation {
        consent_id: chain.consent_id.clone(),
        revoked_at_ms: 0,
        recorded_by: WELFARE.to_owned(),
    };
    let e = envelope(
        WELFARE,
        v1::PayloadType::ConsentRevocation,
        revocation.encode_to_vec(),
    );
    welfare.publish_envelope(InKind::Consent, &e).await;
    let line = system
        .adapter(WELFARE)
        .wait_rejection_of(&e.message_id, SHORT)
        .await;
    assert_eq!(
        line.code().as_deref(),
        Some("CONSENT_UNKNOWN"),
        "{}",
        line.raw
    );
    let nobody = v1::ConsentRevocation {
        consent_id: "consent-nobody-recorded".into(),
        ..revocation
    };
    let e2 = envelope(
        WELFARE,
        v1::PayloadType::ConsentRevocation,
        nobody.encode_to_vec(),
    );
    welfare.publish_envelope(InKind::Consent, &e2).await;
    let unknown = system
        .adapter(WELFARE)
        .wait_rejection_of(&e2.message_id, SHORT)
        .await;
    assert_eq!(
        (line.code(), line.str_field("detail")),
        (unknown.code(), unknown.str_field("detail")),
        "a non-party's revocation is answered as one of an unknown consent"
    );
    assert!(try_consent(&welfare, &chain.consent_id).await.is_none());
    let still = try_consent(&centre, &chain.consent_id)
        .await
        .expect("the collector sees its consent");
    assert!(!still.revoked, "a non-party revoked the consent");
}
