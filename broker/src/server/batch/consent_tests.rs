//! Consent through the batch: each refusal reason, revocation with referrals in every state,
//! purge tracking, the audit chain — and a property test over random interleavings of grants,
//! revocations and referrals: nothing is ever delivered without a consent (or statute) that
//! covers it when it goes out.

use proptest::prelude::*;
use prost::Message;
use yeongye_proto::v1::{self, PayloadType, ReasonCode};

use super::*;
use crate::audit;
use crate::ingest::{self, Limits};
use crate::referral::State;
use crate::registry::Registry;
use crate::store::{SledStore, Store};

const REGISTRY: &str = "[[agency]]\nid = \"a\"\nname = \"가\"\nkind = \"community_service_centre\"\n\
    [[agency]]\nid = \"b\"\nname = \"나\"\nkind = \"mental_health_centre\"\n\
    [[agency]]\nid = \"c\"\nname = \"다\"\nkind = \"self_sufficiency_centre\"\n\
    [[agency]]\nid = \"d\"\nname = \"라\"\nkind = \"mental_health_centre\"";

fn envelope(sender: &str, id: &str, ty: PayloadType, payload: Vec<u8>) -> Vec<u8> {
    v1::Envelope {
        message_id: id.into(),
        sender: sender.into(),
        sent_at_ms: 1,
        payload_type: ty as i32,
        payload,
        ..Default::default()
    }
    .encode_to_vec()
}

type Msg = (String, Vec<u8>);

fn grant(id: &str, msg: &str, f: impl FnOnce(&mut v1::ConsentGrant)) -> Msg {
    let mut g = v1::ConsentGrant {
        consent_id: id.into(),
        client_pseudonym_id: "p1".into(),
        collected_by: "a".into(),
        recipient_agencies: vec!["b".into()],
        recipient_kinds: vec!["self_sufficiency_centre".into()],
        purposes: vec![v1::Purpose::CaseManagement as i32],
        data_categories: vec![1, 2, 3],
        valid_from_ms: 0,
        valid_until_ms: 0,
        form_reference: "form-001".into(),
    };
    f(&mut g);
    (
        "yeongye.in.a.consent".into(),
        envelope("a", msg, PayloadType::ConsentGrant, g.encode_to_vec()),
    )
}

fn revoke(id: &str, msg: &str, by: &str) -> Msg {
    let r = v1::ConsentRevocation {
        consent_id: id.into(),
        revoked_at_ms: 0,
        recorded_by: by.into(),
    };
    (
        format!("yeongye.in.{by}.consent"),
        envelope(by, msg, PayloadType::ConsentRevocation, r.encode_to_vec()),
    )
}

fn purge(by: &str, referral: &str, consent: &str, msg: &str) -> Msg {
    let p = v1::PurgeConfirmation {
        referral_id: referral.into(),
        consent_id: consent.into(),
    };
    (
        format!("yeongye.in.{by}.purge"),
        envelope(by, msg, PayloadType::PurgeConfirmation, p.encode_to_vec()),
    )
}

fn referral(
    id: &str,
    msg: &str,
    to: &str,
    consent: &str,
    f: impl FnOnce(&mut v1::Referral),
) -> Msg {
    let mut r = v1::Referral {
        referral_id: id.into(),
        from_agency: "a".into(),
        to_agency: to.into(),
        client: Some(v1::Client {
            pseudonym_id: "p1".into(),
            ..Default::default()
        }),
        field: 1,
        urgency: 3,
        purpose: v1::Purpose::CaseManagement as i32,
        data_categories: vec![1, 2],
        legal_basis: Some(v1::referral::LegalBasis::ConsentId(consent.into())),
        ..Default::default()
    };
    f(&mut r);
    (
        "yeongye.in.a.referral".into(),
        envelope("a", msg, PayloadType::Referral, r.encode_to_vec()),
    )
}

fn status(by: &str, id: &str, msg: &str, s: v1::Status) -> Msg {
    let u = v1::StatusUpdate {
        referral_id: id.into(),
        status: s as i32,
        note: String::new(),
        ..Default::default()
    };
    (
        format!("yeongye.in.{by}.status"),
        envelope(by, msg, PayloadType::StatusUpdate, u.encode_to_vec()),
    )
}

/// Applies `msgs` as one batch at `at`, commits, and "publishes" the outbox (removes it, as the
/// event loop does after the PubAcks). Returns outcomes and what went out.
fn run(s: &SledStore, msgs: &[Msg], seq: u64, at: i64) -> (Vec<Outcome>, Vec<OutboxEntry>) {
    let reg = Registry::from_toml(REGISTRY).unwrap();
    let limits = Limits::for_tests(&|_, _| (3_600_000, 86_400_000));
    let mut b = Batch::new(s);
    let mut out = Vec::new();
    for (i, (subject, bytes)) in msgs.iter().enumerate() {
        let n = seq + i as u64;
        let read = ingest::read(subject, bytes, n, at, &reg, &limits);
        out.push(b.inbound(read, n, at, bytes).unwrap());
    }
    let (c, _) = b.finish();
    s.commit(&c).unwrap();
    let sent = s.outbox().unwrap();
    let keys = sent.iter().map(|e| e.key).collect();
    s.commit(&ChangeSet {
        outbox_remove: keys,
        ..Default::default()
    })
    .unwrap();
    (out, sent)
}

fn delivered(s: &SledStore, id: &str) {
    let mut b = Batch::new(s);
    b.delivery_confirmed(id, 1).unwrap();
    s.commit(&b.finish().0).unwrap();
}

fn state(s: &SledStore, id: &str) -> State {
    s.referral(id).unwrap().unwrap().state
}

#[test]
fn each_refusal_has_its_reason() {
    let s = SledStore::temporary().unwrap();
    let (out, _) = run(
        &s,
        &[
            grant("c1", "g1", |_| {}),
            grant("c-later", "g2", |g| g.valid_from_ms = 10_000),
            grant("c-short", "g3", |g| g.valid_until_ms = 500),
            grant("c-gone", "g4", |_| {}),
        ],
        1,
        100,
    );
    assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
    run(&s, &[revoke("c-gone", "rv", "a")], 10, 200);

    let cases: Vec<(Msg, ReasonCode)> = vec![
        (
            referral("r1", "m1", "b", "nope", |_| {}),
            ReasonCode::ConsentUnknown,
        ),
        (
            referral("r2", "m2", "b", "c1", |r| {
                r.client = Some(v1::Client {
                    pseudonym_id: "p2".into(),
                    ..Default::default()
                })
            }),
            ReasonCode::ConsentOtherClient,
        ),
        (
            referral("r3", "m3", "d", "c1", |_| {}),
            ReasonCode::ConsentRecipientNotCovered,
        ),
        (
            referral("r4", "m4", "b", "c1", |r| {
                r.purpose = v1::Purpose::BenefitApplication as i32
            }),
            ReasonCode::ConsentPurposeNotCovered,
        ),
        (
            referral("r5", "m5", "b", "c1", |r| r.data_categories = vec![1, 6]),
            ReasonCode::ConsentCategoryNotCovered,
        ),
        (
            referral("r6", "m6", "b", "c-short", |_| {}),
            ReasonCode::ConsentExpired,
        ),
        (
            referral("r7", "m7", "b", "c-later", |_| {}),
            ReasonCode::ConsentNotYetValid,
        ),
        (
            referral("r8", "m8", "b", "c-gone", |_| {}),
            ReasonCode::ConsentRevoked,
        ),
        (
            referral("r9", "m9", "b", "c1", |r| r.legal_basis = None),
            ReasonCode::NoLegalBasis,
        ),
        (
            referral("r10", "m10", "b", "c1", |r| {
                r.legal_basis = Some(v1::referral::LegalBasis::StatutoryBasis(
                    v1::StatutoryBasis {
                        statute: v1::Statute::ChildWelfareAct as i32,
                        justification: " ".into(),
                    },
                ))
            }),
            ReasonCode::StatutoryBasisInvalid,
        ),
        (
            // A field carried but not declared is refused before consent is even looked at.
            referral("r11", "m11", "b", "c1", |r| {
                r.client.as_mut().unwrap().household = "alone".into()
            }),
            ReasonCode::InvalidField,
        ),
    ];
    for (i, (msg, code)) in cases.into_iter().enumerate() {
        let (out, sent) = run(&s, &[msg], 100 + i as u64, 1000);
        assert_eq!(out, [Outcome::Rejected(code)], "case {i}");
        assert!(
            sent.iter().all(|e| !e.subject.ends_with(".delivery")),
            "case {i}: nothing delivered"
        );
        let env = v1::Envelope::decode(sent[0].payload.as_slice()).unwrap();
        let rej = v1::Rejection::decode(env.payload.as_slice()).unwrap();
        assert_eq!(rej.code, code as i32);
        assert_eq!(
            state(&s, &format!("r{}", i + 1)),
            State::Refused,
            "case {i}"
        );
    }
    // Covered by agency id, and by kind of agency: delivered.
    let (out, sent) = run(
        &s,
        &[
            referral("ok1", "k1", "b", "c1", |_| {}),
            referral("ok2", "k2", "c", "c1", |_| {}),
        ],
        200,
        1000,
    );
    assert_eq!(out, [Outcome::Applied, Outcome::Applied]);
    assert_eq!(
        sent.iter()
            .filter(|e| e.subject.ends_with(".delivery"))
            .count(),
        2
    );
}

#[test]
fn a_statutory_basis_passes_and_is_marked_everywhere() {
    let s = SledStore::temporary().unwrap();
    let msg = referral("r1", "m1", "b", "", |r| {
        r.legal_basis = Some(v1::referral::LegalBasis::StatutoryBasis(
            v1::StatutoryBasis {
                statute: v1::Statute::ChildWelfareAct as i32,
                justification: "suspected neglect".into(),
            },
        ))
    });
    let (out, _) = run(&s, &[msg], 1, 100);
    assert_eq!(out, [Outcome::Applied]);
    // The sender's first notification: DELIVERED.
    delivered(&s, "r1");
    let sent = s.outbox().unwrap();
    let note = sent
        .iter()
        .find(|e| e.subject.ends_with(".notification"))
        .unwrap();
    let env = v1::Envelope::decode(note.payload.as_slice()).unwrap();
    let n = v1::Notification::decode(env.payload.as_slice()).unwrap();
    assert_eq!(n.legal_basis, "statute:STATUTE_CHILD_WELFARE_ACT");
    let r = s.referral("r1").unwrap().unwrap();
    assert_eq!(
        convert::status_reply(&r).legal_basis,
        "statute:STATUTE_CHILD_WELFARE_ACT"
    );
    let entries = s.audit_raw().unwrap();
    let first = audit::Entry::decode(entries[0].1.as_slice()).unwrap();
    assert_eq!(first.basis, "statute:STATUTE_CHILD_WELFARE_ACT");
}

#[test]
fn revocation_withdraws_every_state_and_tracks_purges_to_the_last() {
    let s = SledStore::temporary().unwrap();
    run(
        &s,
        &[grant("c1", "g1", |g| {
            g.recipient_agencies = vec!["b".into(), "c".into(), "d".into()]
        })],
        1,
        100,
    );
    // In flight, one per state: SUBMITTED (delivery out), DELIVERED, RECEIVED, ACCEPTED,
    // IN_PROGRESS, COMPLETED (ended, but the recipient had the data).
    let ids = ["sub", "del", "rec", "acc", "inp", "com"];
    let to = ["b", "c", "d", "b", "c", "d"];
    let msgs: Vec<Msg> = ids
        .iter()
        .zip(to)
        .map(|(id, to)| referral(id, &format!("m-{id}"), to, "c1", |_| {}))
        .collect();
    run(&s, &msgs, 10, 200);
    for id in &ids[1..] {
        delivered(&s, id);
    }
    let mut n = 100;
    let mut say = |s: &SledStore, id: &str, to: &str, st: v1::Status| {
        n += 1;
        run(s, &[status(to, id, &format!("s{n}"), st)], n, 300);
    };
    for (id, to, steps) in [
        ("rec", "d", &[v1::Status::Received][..]),
        (
            "acc",
            "b",
            &[v1::Status::Received, v1::Status::Accepted][..],
        ),
        (
            "inp",
            "c",
            &[
                v1::Status::Received,
                v1::Status::Accepted,
                v1::Status::InProgress,
            ][..],
        ),
        (
            "com",
            "d",
            &[
                v1::Status::Received,
                v1::Status::Accepted,
                v1::Status::Completed,
            ][..],
        ),
    ] {
        for st in steps {
            say(&s, id, to, *st);
        }
    }
    // And one submitted in the same batch as the revocation: its delivery never leaves.
    let (out, sent) = run(
        &s,
        &[
            referral("late", "m-late", "b", "c1", |_| {}),
            revoke("c1", "rv1", "a"),
        ],
        200,
        400,
    );
    assert_eq!(out, [Outcome::Applied, Outcome::Applied]);
    assert!(
        !sent.iter().any(|e| e.subject.ends_with(".delivery")),
        "the late delivery was cancelled"
    );
    for id in ["sub", "del", "rec", "acc", "inp", "late"] {
        assert_eq!(state(&s, id), State::Withdrawn, "{id}");
    }
    assert_eq!(
        state(&s, "com"),
        State::Completed,
        "an ended referral keeps its state"
    );
    let withdrawals: Vec<&str> = sent
        .iter()
        .filter(|e| e.subject.ends_with(".withdrawal"))
        .map(|e| e.subject.as_str())
        .collect();
    assert_eq!(
        withdrawals.len(),
        6,
        "every recipient that had the data, not the late one: {withdrawals:?}"
    );

    let c = s.consent("c1").unwrap().unwrap();
    let outstanding: Vec<&str> = c.outstanding().map(|p| p.referral_id.as_str()).collect();
    assert_eq!(outstanding.len(), 6);
    // New referrals citing it are refused.
    let (out, _) = run(
        &s,
        &[referral("after", "m-after", "b", "c1", |_| {})],
        300,
        500,
    );
    assert_eq!(out, [Outcome::Rejected(ReasonCode::ConsentRevoked)]);
    // A confirmation from the wrong agency is refused; the right ones count down.
    let (out, _) = run(&s, &[purge("c", "sub", "c1", "p-wrong")], 310, 600);
    assert_eq!(out, [Outcome::Rejected(ReasonCode::UnknownReferral)]);
    let confirmations: Vec<Msg> = ids
        .iter()
        .zip(to)
        .map(|(id, to)| purge(to, id, "c1", &format!("p-{id}")))
        .collect();
    let (out, _) = run(&s, &confirmations[..5], 320, 700);
    assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
    let c = s.consent("c1").unwrap().unwrap();
    assert_eq!(
        c.outstanding()
            .map(|p| p.referral_id.as_str())
            .collect::<Vec<_>>(),
        ["com"]
    );
    let (out, _) = run(
        &s,
        &[confirmations[5].clone(), confirmations[5].clone()],
        330,
        800,
    );
    assert_eq!(out, [Outcome::Applied, Outcome::Duplicate]);
    assert_eq!(s.consent("c1").unwrap().unwrap().outstanding().count(), 0);
    // The whole history verifies.
    assert!(audit::verify(s.audit_raw().unwrap(), s.audit_head().unwrap()).unwrap() > 20);
}

#[test]
fn only_those_concerned_may_revoke_and_grants_are_immutable() {
    let s = SledStore::temporary().unwrap();
    run(&s, &[grant("c1", "g1", |_| {})], 1, 100);
    // A non-party is told what it would be told of a consent that does not exist.
    let (out, _) = run(&s, &[revoke("c1", "rv1", "d")], 2, 200);
    assert_eq!(out, [Outcome::Rejected(ReasonCode::ConsentUnknown)]);
    let (out, _) = run(&s, &[revoke("c-none", "rv0", "d")], 2, 200);
    assert_eq!(out, [Outcome::Rejected(ReasonCode::ConsentUnknown)]);
    let (out, _) = run(
        &s,
        &[grant("c1", "g2", |g| g.data_categories = vec![1, 2, 3, 6])],
        3,
        200,
    );
    assert_eq!(out, [Outcome::Rejected(ReasonCode::ConsentExists)]);
    let (out, _) = run(&s, &[grant("c1", "g3", |_| {})], 4, 200);
    assert_eq!(
        out,
        [Outcome::Duplicate],
        "the same grant again is a repeat"
    );
    let (out, _) = run(
        &s,
        &[revoke("c1", "rv2", "b"), revoke("c1", "rv3", "a")],
        5,
        300,
    );
    assert_eq!(
        out,
        [Outcome::Applied, Outcome::Duplicate],
        "a covered agency may record it; once"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Grant(usize),
    Revoke(usize),
    Refer {
        consent: usize,
        to: usize,
        categories: Vec<i32>,
    },
    Receive,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..3usize).prop_map(Op::Grant),
        1 => (0..3usize).prop_map(Op::Revoke),
        5 => (0..3usize, 0..3usize, proptest::sample::subsequence(vec![1, 2, 3, 6], 1..=3))
            .prop_map(|(consent, to, categories)| Op::Refer { consent, to, categories }),
        1 => Just(Op::Receive),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random interleavings, in random batches: every delivery that goes out is covered, at
    /// that moment, by its consent as the store holds it — never revoked, the right client,
    /// recipient, purpose and categories.
    #[test]
    fn nothing_is_delivered_without_a_covering_consent(
        batches in proptest::collection::vec(proptest::collection::vec(arb_op(), 1..5), 1..8),
    ) {
        let s = SledStore::temporary().unwrap();
        let reg = Registry::from_toml(REGISTRY).unwrap();
        let agencies = ["b", "c", "d"];
        let mut seq = 1u64;
        let mut referrals = Vec::new();
        for (bi, ops) in batches.iter().enumerate() {
            let at = 1000 + bi as i64 * 10;
            let mut msgs = Vec::new();
            for op in ops {
                seq += 1;
                match op {
                    // Consent k covers agency b and kind mental_health_centre (b, d), categories 1-3.
                    Op::Grant(k) => msgs.push(grant(&format!("c{k}"), &format!("g{seq}"), |g| g.recipient_kinds = vec!["mental_health_centre".into()])),
                    Op::Revoke(k) => msgs.push(revoke(&format!("c{k}"), &format!("v{seq}"), "a")),
                    Op::Refer { consent, to, categories } => {
                        let id = format!("r{seq}");
                        referrals.push((id.clone(), agencies[*to]));
                        msgs.push(referral(&id, &format!("m{seq}"), agencies[*to], &format!("c{consent}"), |r| r.data_categories = categories.clone()));
                    }
                    Op::Receive => {
                        if let Some((id, to)) = referrals.last() {
                            msgs.push(status(to, id, &format!("s{seq}"), v1::Status::Received));
                        }
                    }
                }
            }
            let (_, sent) = run(&s, &msgs, seq * 100, at);
            for e in sent.iter().filter(|e| e.subject.ends_with(".delivery")) {
                let id = e.confirms.clone().unwrap();
                let r = s.referral(&id).unwrap().unwrap();
                let cid = r.basis.consent_id().unwrap().to_owned();
                let c = s.consent(&cid).unwrap();
                let kind = reg.get(&r.to).unwrap().kind.clone();
                let from_kind = reg.get(&r.from).unwrap().kind.clone();
                let ask = consent::Ask { from: &r.from, from_kind: &from_kind, client: &r.client, to: &r.to, to_kind: &kind, purpose: r.purpose, categories: &r.categories };
                prop_assert_eq!(consent::check(c.as_ref(), ask, at), Ok(()), "{} delivered without cover", id);
                prop_assert_ne!(r.state, State::Withdrawn);
            }
            for (id, _) in &referrals {
                if let Some(r) = s.referral(id).unwrap() {
                    let cid = r.basis.consent_id().unwrap_or_default().to_owned();
                    if let Some(c) = s.consent(&cid).unwrap()
                        && c.revoked.is_some()
                    {
                        prop_assert!(r.state.is_terminal(), "{} is {} under a revoked consent", id, r.state);
                    }
                }
            }
        }
        prop_assert!(audit::verify(s.audit_raw().unwrap(), s.audit_head().unwrap()).is_ok());
    }
}
