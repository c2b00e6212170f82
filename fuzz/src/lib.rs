//! The fuzz targets' bodies, shared by the libFuzzer targets (`fuzz_targets/`, run with
//! `cargo fuzz` on nightly) and the stable-toolchain runner (`examples/fuzz-stable.rs`).
//! See `docs/FUZZING.md`.
//!
//! - [`envelope`]: arbitrary bytes as an inbound message, through the broker's pure reader
//!   `yeongye_broker::ingest::read` (a small registry, permissive limits). It must never panic,
//!   and what it lets through must hold what the rest of the broker relies on.
//! - [`state_machine`]: arbitrary bytes as a sequence of [`Event`]s applied with
//!   `yeongye_broker::referral::apply` to a submitted (or refused) referral. It must never
//!   panic, a terminal state must stay terminal, and a referral never goes back to SUBMITTED.

use std::sync::OnceLock;

use prost::Message as _;
use yeongye_broker::consent::Basis;
use yeongye_broker::ingest::{self, Limits, Request};
use yeongye_broker::referral::{
    self, DeadlineKind, Event, Millis, NewReferral, State, Status, TransitionError, Urgency,
};
use yeongye_broker::registry::Registry;
use yeongye_proto::signing::{PrivateKey, SigningKey};
use yeongye_proto::v1;

/// The arrival time every input is read at.
pub const NOW: Millis = 1_800_000_000_000;

/// The registered agencies. The first is the sender of the structured inputs.
pub const AGENCIES: [&str; 2] = ["cc-haengbok1", "hope-support"];

/// The subjects an input may arrive on (chosen by its first byte): each kind of one registered
/// agency, another's, an unknown kind, an unregistered agency, and not an inbound subject.
pub const SUBJECTS: [&str; 8] = [
    "yeongye.in.cc-haengbok1.referral",
    "yeongye.in.cc-haengbok1.status",
    "yeongye.in.cc-haengbok1.consent",
    "yeongye.in.cc-haengbok1.purge",
    "yeongye.in.hope-support.referral",
    "yeongye.in.cc-haengbok1.gossip",
    "yeongye.in.not-registered.referral",
    "yeongye.query.cc-haengbok1",
];

/// The first byte's flags: signatures required; the rest is a payload to wrap in a correctly
/// signed envelope (so that the payload readers are reached with signatures required).
pub const REQUIRE_SIGNATURES: u8 = 0x80;
pub const WRAP_PAYLOAD: u8 = 0x40;

/// An agency's fixed signing key.
pub fn key(agency: &str) -> PrivateKey {
    let n = AGENCIES.iter().position(|a| *a == agency).unwrap_or(99);
    PrivateKey {
        id: format!("{agency}-fuzz"),
        key: SigningKey::from_bytes(&[u8::try_from(n + 1).unwrap_or(0); 32]),
    }
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut toml = String::new();
        for agency in AGENCIES {
            let k = key(agency);
            toml.push_str(&format!(
                "[[agency]]\nid = \"{agency}\"\nname = \"fuzz {agency}\"\nkind = \"other\"\n\
                 [[agency.keys]]\nid = \"{}\"\npublic_key = \"{}\"\n\n",
                k.id,
                k.public_b64()
            ));
        }
        Registry::from_toml(&toml).expect("the fuzz registry is valid")
    })
}

fn payload_type_for(subject: &str) -> v1::PayloadType {
    match subject.rsplit('.').next() {
        Some("status") => v1::PayloadType::StatusUpdate,
        Some("consent") => v1::PayloadType::ConsentGrant,
        Some("purge") => v1::PayloadType::PurgeConfirmation,
        _ => v1::PayloadType::Referral,
    }
}

/// A correctly signed envelope from [`AGENCIES`]`[0]` holding `payload`.
pub fn signed_envelope(payload_type: v1::PayloadType, payload: Vec<u8>) -> Vec<u8> {
    let mut e = v1::Envelope {
        message_id: "fuzz-message-1".into(),
        sender: AGENCIES[0].into(),
        sent_at_ms: NOW,
        payload_type: payload_type.into(),
        payload,
        ..Default::default()
    };
    key(AGENCIES[0]).sign(&mut e);
    e.encode_to_vec()
}

/// Well-formed inputs for [`envelope`], for a runner to mutate: a valid signed referral and
/// status update, raw and as payloads to wrap.
pub fn envelope_seeds() -> Vec<Vec<u8>> {
    let referral = v1::Referral {
        referral_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
        from_agency: AGENCIES[0].into(),
        to_agency: AGENCIES[1].into(),
        client: Some(v1::Client {
            pseudonym_id: "client-1".into(),
            household: "1인 가구".into(),
            ..Default::default()
        }),
        field: v1::FieldOfNeed::Livelihood.into(),
        urgency: v1::Urgency::Routine.into(),
        reason: "fuzz".into(),
        legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(
            v1::StatutoryBasis {
                statute: v1::Statute::SocialSecurityBenefitsAct.into(),
                justification: "fuzz".into(),
            },
        )),
        data_categories: vec![v1::DataCategory::Household.into()],
        purpose: v1::Purpose::CaseManagement.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let status = v1::StatusUpdate {
        referral_id: "r-1".into(),
        status: v1::Status::Accepted.into(),
        note: "note".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let with = |selector: u8, bytes: Vec<u8>| {
        let mut input = vec![selector];
        input.extend(bytes);
        input
    };
    vec![
        with(
            REQUIRE_SIGNATURES,
            signed_envelope(v1::PayloadType::Referral, referral.clone()),
        ),
        with(
            REQUIRE_SIGNATURES | 1,
            signed_envelope(v1::PayloadType::StatusUpdate, status.clone()),
        ),
        with(REQUIRE_SIGNATURES | WRAP_PAYLOAD, referral),
        with(REQUIRE_SIGNATURES | WRAP_PAYLOAD | 1, status),
    ]
}

/// One input for `ingest::read`: the first byte picks the subject and flags, the rest is the
/// message (or, with [`WRAP_PAYLOAD`], the payload of a correctly signed envelope).
pub fn envelope(data: &[u8]) {
    envelope_outcome(data);
}

/// [`envelope`], saying how far the input got: `empty`, `rejected` (at the envelope or the
/// payload), `refused` (a referral recorded as REFUSED) or `applied` (a request for the loop).
pub fn envelope_outcome(data: &[u8]) -> &'static str {
    let Some((&selector, rest)) = data.split_first() else {
        return "empty";
    };
    let subject = SUBJECTS[usize::from(selector) % SUBJECTS.len()];
    let bytes = if selector & WRAP_PAYLOAD != 0 {
        signed_envelope(payload_type_for(subject), rest.to_vec())
    } else {
        rest.to_vec()
    };
    let require_signatures = selector & REQUIRE_SIGNATURES != 0;
    let deadlines = |_: Urgency, _: i32| -> (Millis, Millis) { (3_600_000, 86_400_000) };
    let limits = Limits {
        max_message_bytes: 64 * 1024,
        deadlines: &deadlines,
        require_signatures,
        max_skew_ms: Millis::MAX / 4,
        max_age_ms: Millis::MAX / 4,
        // The seeds are referrals in clear, to be applied; a sealed one (field 14) takes the
        // seal checks either way.
        accept_plaintext: true,
    };
    let registry = registry();
    let inbound = ingest::read(subject, &bytes, 7, NOW, registry, &limits);

    // The origin keeps the subject as it may be shown: a served one unchanged, anything else
    // without the sender's own tokens (they could carry personal data into logs).
    assert_eq!(inbound.origin.subject, ingest::shown_subject(subject));
    let refusal = match &inbound.request {
        Request::Reject(r) | Request::Refuse(_, r) => Some(r),
        _ => None,
    };
    if let Some(r) = refusal {
        assert_ne!(
            r.code,
            v1::ReasonCode::Unspecified,
            "a refusal without a code"
        );
    }
    if let Request::Submit(new) = &inbound.request {
        assert!(
            registry.contains(&new.from),
            "submitted from {:?}",
            new.from
        );
        assert!(registry.contains(&new.to), "submitted to {:?}", new.to);
        assert_ne!(new.from, new.to, "submitted to its own sender");
        assert_eq!(
            new.envelope, bytes,
            "the relayed envelope is not the one received"
        );
    }
    if matches!(inbound.request, Request::Reject(_)) {
        return "rejected";
    }
    // Whatever goes further came from a registered agency, as itself, and (when required)
    // signed by it.
    let token = inbound
        .origin
        .reply_to
        .as_deref()
        .expect("a message that went further names its agency");
    assert!(registry.contains(token));
    let e = v1::Envelope::decode(bytes.as_slice()).expect("a message that went further decodes");
    assert_eq!(
        e.sender, token,
        "a message that went further is from another agency"
    );
    assert_eq!(inbound.origin.message_id, e.message_id);
    if require_signatures {
        assert_eq!(
            registry.keys().verify(token, &e, NOW),
            Ok(()),
            "an unsigned or badly signed message went further"
        );
    }
    if matches!(inbound.request, Request::Refuse(..)) {
        "refused"
    } else {
        "applied"
    }
}

/// One input for the state machine: the first byte chooses a SUBMITTED or a REFUSED referral,
/// then each pair of bytes is one event (the first byte: which event, who, which status; the
/// second: how many seconds pass before it).
pub fn state_machine(data: &[u8]) {
    const PARTIES: [&str; 3] = ["cc-haengbok1", "hope-support", "welfare-center"];
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let new = NewReferral {
        id: "r-1".into(),
        from: PARTIES[0].into(),
        from_kind: "other".into(),
        to: PARTIES[1].into(),
        to_kind: "other".into(),
        client: "client-1".into(),
        basis: Basis::Consent("consent-1".into()),
        purpose: 1,
        categories: vec![1],
        urgency: Urgency::Routine,
        receive_by: NOW + 3_600_000,
        accept_within: 86_400_000,
        envelope: Vec::new(),
    };
    let mut now = NOW;
    let mut r = if first & 1 == 0 {
        referral::submit(new, "m-0", now).referral
    } else {
        referral::refuse(new, "m-0", "refused", now).referral
    };
    for (n, pair) in rest.chunks_exact(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        now += i64::from(b) * 1000;
        let event = match a % 8 {
            0 => Event::DeliveryConfirmed,
            1 => Event::DeadlinePassed(DeadlineKind::Receipt),
            2 => Event::DeadlinePassed(DeadlineKind::Acceptance),
            3 => Event::ConsentRevoked,
            _ => Event::Status {
                by: PARTIES[usize::from(a / 8) % PARTIES.len()].into(),
                status: Status::ALL[usize::from(a / 24) % Status::ALL.len()],
                note: String::new(),
            },
        };
        let before = r.state;
        match referral::apply(&r, &event, &format!("m-{}", n + 1), now) {
            Ok(t) => {
                assert!(
                    !before.is_terminal(),
                    "{event:?} moved a {before:?} referral to {:?}",
                    t.referral.state
                );
                assert_ne!(t.referral.state, State::Submitted, "back to SUBMITTED");
                assert_eq!(
                    (&t.referral.id, &t.referral.from, &t.referral.to),
                    (&r.id, &r.from, &r.to),
                    "a transition changed who the referral is between"
                );
                assert!(
                    t.referral.history.len() >= r.history.len(),
                    "a transition lost history"
                );
                r = t.referral;
            }
            Err(e) => {
                if before.is_terminal() {
                    assert!(
                        matches!(e, TransitionError::Terminal { .. }),
                        "a terminal referral refused {event:?} for another reason: {e}"
                    );
                }
            }
        }
    }
}
