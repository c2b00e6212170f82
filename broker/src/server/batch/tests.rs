//! Tests of the batch's decisions.
use prost::Message;

use super::*;
use crate::ingest::{self, Limits};
use crate::referral::{DeadlineKind, State};
use crate::registry::Registry;
use crate::store::SledStore;

fn registry() -> Registry {
    Registry::from_toml(
        "[[agency]]\nid = \"a\"\nname = \"가\"\nkind = \"k\"\n\
         [[agency]]\nid = \"b\"\nname = \"나\"\nkind = \"k\"\n\
         [[agency]]\nid = \"c\"\nname = \"다\"\nkind = \"k\"",
    )
    .unwrap()
}

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

fn referral_msg(id: &str, msg: &str) -> (String, Vec<u8>) {
    let r = v1::Referral {
        referral_id: id.into(),
        from_agency: "a".into(),
        to_agency: "b".into(),
        client: Some(v1::Client {
            pseudonym_id: "p".into(),
            ..Default::default()
        }),
        field: 1,
        urgency: 3,
        purpose: 1,
        legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(
            v1::StatutoryBasis {
                statute: 2,
                justification: "crisis household".into(),
            },
        )),
        ..Default::default()
    };
    (
        "yeongye.in.a.referral".into(),
        envelope("a", msg, PayloadType::Referral, r.encode_to_vec()),
    )
}

fn status_msg(by: &str, id: &str, msg: &str, status: v1::Status) -> (String, Vec<u8>) {
    let u = v1::StatusUpdate {
        referral_id: id.into(),
        status: status as i32,
        note: String::new(),
        ..Default::default()
    };
    (
        format!("yeongye.in.{by}.status"),
        envelope(by, msg, PayloadType::StatusUpdate, u.encode_to_vec()),
    )
}

/// Applies messages as one batch at time `at` and commits it.
fn run(
    store: &SledStore,
    msgs: &[(String, Vec<u8>)],
    first_seq: u64,
    at: Millis,
) -> (Vec<Outcome>, ChangeSet) {
    let reg = registry();
    let limits = Limits::for_tests(&|_, _| (1000, 5000));
    let mut b = Batch::new(store);
    let mut out = Vec::new();
    for (i, (subject, bytes)) in msgs.iter().enumerate() {
        let seq = first_seq + i as u64;
        let read = ingest::read(subject, bytes, seq, at, &reg, &limits);
        out.push(b.inbound(read, seq, at, bytes).unwrap());
    }
    let (c, _) = b.finish();
    store.commit(&c).unwrap();
    (out, c)
}

fn subjects(c: &ChangeSet) -> Vec<&str> {
    c.outbox_put.iter().map(|e| e.subject.as_str()).collect()
}

fn rejection(c: &ChangeSet) -> v1::Rejection {
    let e = c
        .outbox_put
        .iter()
        .find(|e| e.subject.ends_with(".rejection"))
        .expect("a rejection");
    let env = v1::Envelope::decode(e.payload.as_slice()).unwrap();
    v1::Rejection::decode(env.payload.as_slice()).unwrap()
}

#[test]
fn a_referral_is_delivered_and_scheduled() {
    let s = SledStore::temporary().unwrap();
    let (out, c) = run(&s, &[referral_msg("r1", "m1")], 1, 100);
    assert_eq!(out, [Outcome::Applied]);
    // The sender is notified at DELIVERED, not now.
    assert_eq!(subjects(&c), ["yeongye.out.b.delivery"]);
    assert_eq!(c.outbox_put[0].confirms.as_deref(), Some("r1"));
    assert_eq!(c.deadlines_put[0].at, 1100);
    assert_eq!(c.checkpoint, Some(1));
    assert_eq!(s.referral("r1").unwrap().unwrap().state, State::Submitted);
    // The delivery carries the sender's envelope unchanged.
    let env = v1::Envelope::decode(c.outbox_put[0].payload.as_slice()).unwrap();
    let d = v1::Delivery::decode(env.payload.as_slice()).unwrap();
    assert_eq!(
        d.original.unwrap().encode_to_vec(),
        referral_msg("r1", "m1").1
    );
}

#[test]
fn repeats_have_one_effect_within_and_across_batches() {
    let s = SledStore::temporary().unwrap();
    let m = referral_msg("r1", "m1");
    let (out, c) = run(&s, &[m.clone(), m.clone()], 1, 100);
    assert_eq!(out, [Outcome::Applied, Outcome::Duplicate]);
    assert_eq!(c.outbox_put.len(), 1);
    let (out, c) = run(&s, &[m], 3, 200);
    assert_eq!(out, [Outcome::Duplicate]);
    assert!(c.outbox_put.is_empty() && c.referrals.is_empty());
    // The same referral sent again under a new message id (a retry): a repeat.
    let (out, c) = run(&s, &[referral_msg("r1", "m2")], 4, 300);
    assert_eq!(out, [Outcome::Duplicate]);
    assert!(c.outbox_put.is_empty());
    // A different referral under an existing id: refused.
    let (subject, mut bytes) = referral_msg("r1", "m3");
    let mut env = v1::Envelope::decode(bytes.as_slice()).unwrap();
    let mut r = v1::Referral::decode(env.payload.as_slice()).unwrap();
    r.reason = "something else".into();
    env.payload = r.encode_to_vec();
    bytes = env.encode_to_vec();
    let (out, c) = run(&s, &[(subject, bytes)], 5, 300);
    assert_eq!(out, [Outcome::Rejected(ReasonCode::DuplicateReferralId)]);
    assert_eq!(subjects(&c), ["yeongye.out.a.rejection"]);
    assert_eq!(s.referral("r1").unwrap().unwrap().history.len(), 1);
}

#[test]
fn the_lifecycle_and_its_refusals() {
    let s = SledStore::temporary().unwrap();
    run(&s, &[referral_msg("r1", "m1")], 1, 100);
    let mut b = Batch::new(&s);
    b.delivery_confirmed("r1", 150).unwrap();
    let (c, _) = b.finish();
    s.commit(&c).unwrap();
    assert_eq!(subjects(&c), ["yeongye.out.a.notification"]);
    assert_eq!(s.referral("r1").unwrap().unwrap().state, State::Delivered);

    // Completing before acceptance is refused, and changes nothing.
    let (out, c) = run(
        &s,
        &[status_msg("b", "r1", "s0", v1::Status::Completed)],
        2,
        160,
    );
    assert_eq!(out, [Outcome::Rejected(ReasonCode::IllegalTransition)]);
    assert_eq!(subjects(&c), ["yeongye.out.b.rejection"]);
    assert_eq!(rejection(&c).rejected_message_id, "s0");
    assert_eq!(s.referral("r1").unwrap().unwrap().state, State::Delivered);

    // A stranger cannot tell the referral exists.
    let (out, c) = run(
        &s,
        &[status_msg("c", "r1", "s1", v1::Status::Accepted)],
        3,
        170,
    );
    assert_eq!(out, [Outcome::Rejected(ReasonCode::UnknownReferral)]);
    assert_eq!(subjects(&c), ["yeongye.out.c.rejection"]);

    let steps = [
        (v1::Status::Received, State::Received),
        (v1::Status::Accepted, State::Accepted),
        (v1::Status::InProgress, State::InProgress),
        (v1::Status::Completed, State::Completed),
    ];
    let msgs: Vec<_> = steps
        .iter()
        .enumerate()
        .map(|(i, (st, _))| status_msg("b", "r1", &format!("t{i}"), *st))
        .collect();
    let (out, c) = run(&s, &msgs, 10, 200);
    assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
    let r = s.referral("r1").unwrap().unwrap();
    let states: Vec<_> = r.history.iter().map(|h| h.state).collect();
    assert_eq!(
        states,
        [
            State::Submitted,
            State::Delivered,
            State::Received,
            State::Accepted,
            State::InProgress,
            State::Completed
        ]
    );
    // Receipt unschedules the receipt deadline and schedules the acceptance deadline;
    // acceptance unschedules that.
    let kinds: Vec<_> = c.deadlines_remove.iter().map(|d| d.kind).collect();
    assert_eq!(kinds, [DeadlineKind::Receipt, DeadlineKind::Acceptance]);
    assert!(s.due(i64::MAX, 10).unwrap().is_empty());
    let (out, _) = run(
        &s,
        &[status_msg("a", "r1", "t9", v1::Status::Cancelled)],
        20,
        300,
    );
    assert_eq!(out, [Outcome::Rejected(ReasonCode::TerminalState)]);
}

#[test]
fn an_unreceived_referral_expires_and_both_sides_are_told() {
    let s = SledStore::temporary().unwrap();
    run(&s, &[referral_msg("r1", "m1")], 1, 100);
    let due = s.due(1100, 10).unwrap();
    assert_eq!(due.len(), 1);
    let mut b = Batch::new(&s).with_coordinator(Some("c"));
    for d in due {
        b.deadline(d).unwrap();
    }
    let (c, view) = b.finish();
    s.commit(&c).unwrap();
    assert_eq!(s.referral("r1").unwrap().unwrap().state, State::Expired);
    assert_eq!(
        subjects(&c),
        [
            "yeongye.out.a.notification",
            "yeongye.out.b.notification",
            "yeongye.out.a.escalation",
            "yeongye.out.c.escalation"
        ]
    );
    assert!(s.due(i64::MAX, 10).unwrap().is_empty());
    assert_eq!(view[0].0.as_ref().map(|s| s.state), Some(State::Submitted));
    assert_eq!(view[0].1.state, State::Expired);
}

#[test]
fn a_referral_not_accepted_in_time_is_escalated_once() {
    let s = SledStore::temporary().unwrap();
    run(&s, &[referral_msg("r1", "m1")], 1, 100);
    run(
        &s,
        &[status_msg("b", "r1", "s1", v1::Status::Received)],
        2,
        200,
    );
    // Received at 200, 5000 ms to accept.
    assert!(s.due(5199, 10).unwrap().is_empty());
    let due = s.due(5200, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].kind, DeadlineKind::Acceptance);
    let mut b = Batch::new(&s).with_coordinator(Some("c"));
    b.deadline(due[0].clone()).unwrap();
    let (c, _) = b.finish();
    s.commit(&c).unwrap();
    assert_eq!(
        subjects(&c),
        ["yeongye.out.a.escalation", "yeongye.out.c.escalation"]
    );
    let r = s.referral("r1").unwrap().unwrap();
    assert!(r.overdue);
    assert_eq!(r.state, State::Received);
    // Fired once: nothing is due any more, and a repeat of the event changes nothing.
    assert!(s.due(i64::MAX, 10).unwrap().is_empty());
    let mut b = Batch::new(&s).with_coordinator(Some("c"));
    b.deadline(due[0].clone()).unwrap();
    assert!(b.finish().0.outbox_put.is_empty());
    // Accepting late clears the flag.
    run(
        &s,
        &[status_msg("b", "r1", "s2", v1::Status::Accepted)],
        3,
        9000,
    );
    assert!(!s.referral("r1").unwrap().unwrap().overdue);
}

#[test]
fn an_operator_replays_a_refused_referral_once_its_cause_is_fixed() {
    let s = SledStore::temporary().unwrap();
    // "b" is not registered yet.
    let only_a =
        Registry::from_toml("[[agency]]\nid = \"a\"\nname = \"가\"\nkind = \"k\"").unwrap();
    let limits = Limits::for_tests(&|_, _| (1000, 5000));
    let (subject, bytes) = referral_msg("r1", "m1");
    let mut b = Batch::new(&s);
    let read = ingest::read(&subject, &bytes, 1, 100, &only_a, &limits);
    assert_eq!(
        b.inbound(read, 1, 100, &bytes).unwrap(),
        Outcome::Rejected(ReasonCode::UnknownRecipient)
    );
    s.commit(&b.finish().0).unwrap();
    assert_eq!(s.referral("r1").unwrap().unwrap().state, State::Refused);
    let dead = s.dead_letter(1).unwrap().unwrap();

    // Replayed while the cause remains: refused again, the dead letter stays open.
    let mut b = Batch::new(&s);
    let read = ingest::read(&subject, &dead.raw, 1, 200, &only_a, &limits);
    let outcome = b
        .replay(&dead, read, "operator kim", "first try", 200)
        .unwrap();
    assert!(outcome.unwrap_err().contains("UNKNOWN_RECIPIENT"));
    s.commit(&b.finish().0).unwrap();
    let dead = s.dead_letter(1).unwrap().unwrap();
    assert_eq!(dead.status, DeadLetterStatus::Open);
    assert_eq!(dead.actions.len(), 1);

    // Registered now: replayed, delivered, the history kept.
    let mut b = Batch::new(&s);
    let read = ingest::read(&subject, &dead.raw, 1, 300, &registry(), &limits);
    b.replay(&dead, read, "operator kim", "recipient registered", 300)
        .unwrap()
        .unwrap();
    let (c, _) = b.finish();
    s.commit(&c).unwrap();
    assert_eq!(subjects(&c), ["yeongye.out.b.delivery"]);
    let r = s.referral("r1").unwrap().unwrap();
    let states: Vec<_> = r.history.iter().map(|h| h.state).collect();
    assert_eq!(states, [State::Refused, State::Submitted]);
    assert!(r.history[1].note.contains("operator kim"));
    let dead = s.dead_letter(1).unwrap().unwrap();
    assert_eq!(dead.status, DeadLetterStatus::Replayed);
    assert_eq!(dead.actions[1].who, "operator kim");
}

#[test]
fn garbage_is_answered_and_kept_as_a_dead_letter() {
    let s = SledStore::temporary().unwrap();
    let (out, c) = run(
        &s,
        &[(
            "yeongye.in.a.referral".into(),
            b"\x08\xff\xff garbage".to_vec(),
        )],
        7,
        100,
    );
    assert_eq!(out, [Outcome::Rejected(ReasonCode::MalformedEnvelope)]);
    assert_eq!(c.dead_letters.len(), 1);
    assert_eq!(c.dead_letters[0].stream_seq, 7);
    assert_eq!(rejection(&c).code, ReasonCode::MalformedEnvelope as i32);
    // An unregistered sender is kept, not answered.
    let (_, c) = run(
        &s,
        &[("yeongye.in.zz.referral".into(), b"x".to_vec())],
        8,
        100,
    );
    assert!(c.outbox_put.is_empty());
    assert_eq!(s.dead_letters().unwrap().len(), 2);
}

#[test]
fn replaying_into_an_empty_store_reproduces_the_same_messages() {
    let msgs = [
        referral_msg("r1", "m1"),
        status_msg("b", "r1", "s1", v1::Status::Received),
        status_msg("b", "r1", "s2", v1::Status::Completed),
    ];
    let ids = |c: &ChangeSet| {
        c.outbox_put
            .iter()
            .map(|e| (e.subject.clone(), e.message_id.clone(), e.payload.clone()))
            .collect::<Vec<_>>()
    };
    let first = run(&SledStore::temporary().unwrap(), &msgs, 1, 100).1;
    let again = run(&SledStore::temporary().unwrap(), &msgs, 1, 100).1;
    assert_eq!(ids(&first), ids(&again));
}

#[test]
fn a_reused_message_id_with_other_bytes_is_refused_as_a_replay() {
    let s = SledStore::temporary().unwrap();
    let (out, _) = run(&s, &[referral_msg("r1", "m1")], 1, 100);
    assert_eq!(out, [Outcome::Applied]);
    // The same id, different content (another referral): not a repeat, a replay.
    let (out, c) = run(&s, &[referral_msg("r2", "m1")], 2, 200);
    assert_eq!(out, [Outcome::Rejected(ReasonCode::ReplayedMessageId)]);
    let r = rejection(&c);
    assert_eq!(r.code, ReasonCode::ReplayedMessageId as i32);
    // It names the referral the refused message was about, and says the first one stands.
    assert_eq!(r.referral_id, "r2");
    assert!(
        r.detail.contains("the first message with it"),
        "{}",
        r.detail
    );
    assert!(
        s.referral("r2").unwrap().is_none(),
        "the replayed message changed nothing"
    );
    // The same bytes again are still a plain repeat.
    let (out, c) = run(&s, &[referral_msg("r1", "m1")], 3, 300);
    assert_eq!(out, [Outcome::Duplicate]);
    assert!(c.outbox_put.is_empty());
    // Within one batch too.
    let (out, _) = run(
        &s,
        &[referral_msg("r3", "m3"), referral_msg("r4", "m3")],
        4,
        400,
    );
    assert_eq!(
        out,
        [
            Outcome::Applied,
            Outcome::Rejected(ReasonCode::ReplayedMessageId)
        ]
    );
}

#[test]
fn a_resend_differing_only_in_sent_at_and_signature_is_a_repeat() {
    let s = SledStore::temporary().unwrap();
    let (out, _) = run(&s, &[referral_msg("r1", "m1")], 2, 100);
    assert_eq!(out, [Outcome::Applied]);
    // The message rebuilt after a crash (as a receipt is, under its derived id): the same id
    // and payload, a fresh sent_at_ms and signature, long after the stream's duplicate window.
    let rebuilt = |sent_at_ms: i64, signature: &[u8]| {
        let (subject, bytes) = referral_msg("r1", "m1");
        let mut e = v1::Envelope::decode(bytes.as_slice()).unwrap();
        e.sent_at_ms = sent_at_ms;
        e.signature = signature.to_vec();
        e.key_id = "k2".into();
        (subject, e.encode_to_vec())
    };
    let (out, c) = run(&s, &[rebuilt(999, b"")], 3, 1000);
    assert_eq!(out, [Outcome::Duplicate]);
    assert!(c.outbox_put.is_empty(), "a repeat is not answered");
    // An id recorded before meanings were kept (the digest of its bytes) still matches the
    // same bytes.
    let (subject, bytes) = referral_msg("r5", "old");
    let legacy: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    let mut c = ChangeSet::default();
    c.seen.push(("a/old".into(), 1, legacy));
    s.commit(&c).unwrap();
    let (out, _) = run(&s, &[(subject, bytes)], 4, 1000);
    assert_eq!(out, [Outcome::Duplicate]);
}
