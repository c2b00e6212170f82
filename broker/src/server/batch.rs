//! One batch: inbound messages and the broker's own events (delivery confirmations, deadlines)
//! in, one [`ChangeSet`] out. Reads the store, writes nothing: the event loop commits the
//! change set and only then publishes what it put in the outbox.

use std::collections::{HashMap, HashSet};

use yeongye_proto::subject::{self, OutKind};
use yeongye_proto::v1::{self, PayloadType, ReasonCode};

use crate::convert::{self, derive_id};
use crate::error::Result;
use crate::ingest::{Inbound, Origin, Refusal, Request};
use crate::referral::{self, Effect, Event, Millis, Referral, Transition, TransitionError};
use crate::store::{ChangeSet, DeadLetter, Deadline, OutboxEntry, Store};

/// Longest part of a rejected message kept in its dead letter.
const MAX_DEAD_LETTER_BYTES: usize = 64 * 1024;

/// What became of one inbound message (for logs and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Rejected(ReasonCode),
    Duplicate,
}

pub struct Batch<'a> {
    store: &'a dyn Store,
    changes: ChangeSet,
    /// Referrals changed in this batch, newer than the store's copy.
    touched: HashMap<String, Referral>,
    seen: HashSet<String>,
}

impl<'a> Batch<'a> {
    pub fn new(store: &'a dyn Store) -> Batch<'a> {
        Batch {
            store,
            changes: ChangeSet::default(),
            touched: HashMap::new(),
            seen: HashSet::new(),
        }
    }

    fn referral(&self, id: &str) -> Result<Option<Referral>> {
        match self.touched.get(id) {
            Some(r) => Ok(Some(r.clone())),
            None => self.store.referral(id),
        }
    }

    /// Applies one inbound message that the stream stored at `at` with sequence `seq`.
    pub fn inbound(
        &mut self,
        inbound: Inbound,
        seq: u64,
        at: Millis,
        raw: &[u8],
    ) -> Result<Outcome> {
        let Inbound { origin, request } = inbound;
        self.changes.checkpoint = Some(self.changes.checkpoint.map_or(seq, |c| c.max(seq)));
        if self.seen.contains(&origin.dedup_key) || self.store.seen(&origin.dedup_key)? {
            return Ok(Outcome::Duplicate);
        }
        self.seen.insert(origin.dedup_key.clone());
        self.changes.seen.push((origin.dedup_key.clone(), at));

        let span = tracing::info_span!("inbound", seq, referral_id = tracing::field::Empty);
        let _enter = span.enter();
        match request {
            Request::Submit(new) => {
                span.record("referral_id", new.id.as_str());
                if let Some(existing) = self.referral(&new.id)? {
                    return Ok(self.repeat_or_reject(
                        &existing,
                        &new.envelope,
                        &origin,
                        seq,
                        at,
                        raw,
                    ));
                }
                tracing::info!(from = %new.from, to = %new.to, "referral submitted");
                let t = referral::submit(new, &origin.message_id, at);
                self.transition(t, &origin.dedup_key, at);
                Ok(Outcome::Applied)
            }
            Request::Refuse(new, refusal) => {
                span.record("referral_id", new.id.as_str());
                if let Some(existing) = self.referral(&new.id)? {
                    return Ok(self.repeat_or_reject(
                        &existing,
                        &new.envelope,
                        &origin,
                        seq,
                        at,
                        raw,
                    ));
                }
                let t = referral::refuse(new, &origin.message_id, &refusal.detail, at);
                self.transition(t, &origin.dedup_key, at);
                Ok(self.reject(&origin, refusal, seq, at, raw))
            }
            Request::Status {
                referral_id,
                by,
                status,
                note,
            } => {
                span.record("referral_id", referral_id.as_str());
                let existing = self.referral(&referral_id)?;
                let Some(current) = existing.filter(|r| r.from == by || r.to == by) else {
                    // A stranger learns nothing about whether the referral exists.
                    let r = Refusal {
                        code: ReasonCode::UnknownReferral,
                        detail: "no such referral for this agency".into(),
                        referral_id,
                    };
                    return Ok(self.reject(&origin, r, seq, at, raw));
                };
                let event = Event::Status { by, status, note };
                match referral::apply(&current, &event, &origin.message_id, at) {
                    Ok(t) => {
                        tracing::info!(state = %t.referral.state, "referral status");
                        self.transition(t, &origin.dedup_key, at);
                        Ok(Outcome::Applied)
                    }
                    Err(e) => {
                        let r = Refusal {
                            code: reason(&e),
                            detail: e.to_string(),
                            referral_id,
                        };
                        Ok(self.reject(&origin, r, seq, at, raw))
                    }
                }
            }
            Request::Reject(refusal) => Ok(self.reject(&origin, refusal, seq, at, raw)),
        }
    }

    /// The stream acknowledged the delivery of `referral_id`.
    pub fn delivery_confirmed(&mut self, referral_id: &str, at: Millis) -> Result<()> {
        self.broker_event(referral_id, Event::DeliveryConfirmed, "delivered", at)
    }

    /// A deadline is due. It is removed whatever the referral's state.
    pub fn deadline(&mut self, d: Deadline) -> Result<()> {
        self.changes.deadlines_remove.push(d.clone());
        let cause = format!("deadline-{}", d.kind.as_str());
        self.broker_event(&d.referral_id, Event::DeadlinePassed(d.kind), &cause, d.at)
    }

    fn broker_event(&mut self, id: &str, event: Event, what: &str, at: Millis) -> Result<()> {
        let Some(current) = self.referral(id)? else {
            tracing::warn!(
                referral_id = id,
                what,
                "broker event for an unknown referral"
            );
            return Ok(());
        };
        match referral::apply(&current, &event, "", at) {
            Ok(t) => {
                tracing::info!(referral_id = id, state = %t.referral.state, "referral {what}");
                self.transition(t, &format!("{id}/{what}"), at);
            }
            Err(e) => tracing::debug!(referral_id = id, cause = %e, "broker event dropped"),
        }
        Ok(())
    }

    /// Outbox entries whose PubAck was seen: removed in this batch.
    pub fn remove_sent(&mut self, keys: impl IntoIterator<Item = u64>) {
        self.changes.outbox_remove.extend(keys);
    }

    pub fn finish(self) -> ChangeSet {
        let mut changes = self.changes;
        changes.referrals = self.touched.into_values().collect();
        changes
    }

    fn transition(&mut self, t: Transition, cause: &str, at: Millis) {
        let Transition { referral, effects } = t;
        for (n, effect) in effects.into_iter().enumerate() {
            let id = derive_id(cause, n);
            match effect {
                Effect::Deliver { to } => {
                    let payload = convert::delivery(&referral);
                    self.publish(
                        &to,
                        OutKind::Delivery,
                        id,
                        at,
                        PayloadType::Delivery,
                        payload,
                        Some(&referral.id),
                    );
                }
                Effect::Notify { to, previous } => {
                    let payload = convert::notification(&referral, previous);
                    self.publish(
                        &to,
                        OutKind::Notification,
                        id,
                        at,
                        PayloadType::Notification,
                        payload,
                        None,
                    );
                }
                Effect::Schedule { kind, at } => {
                    self.changes.deadlines_put.push(Deadline {
                        at,
                        kind,
                        referral_id: referral.id.clone(),
                    });
                }
                Effect::Unschedule { kind } => {
                    self.changes.deadlines_remove.push(Deadline {
                        at: referral.receive_by,
                        kind,
                        referral_id: referral.id.clone(),
                    });
                }
            }
        }
        self.touched.insert(referral.id.clone(), referral);
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        to: &str,
        kind: OutKind,
        message_id: String,
        at: Millis,
        ty: PayloadType,
        payload: Vec<u8>,
        confirms: Option<&str>,
    ) {
        let envelope = convert::broker_envelope(message_id.clone(), at, ty, payload);
        let key = match self.store.next_outbox_key() {
            Ok(k) => k,
            Err(e) => {
                // generate_id only fails if sled cannot write; the commit will fail the same way.
                tracing::error!(cause = %e, "no outbox key");
                return;
            }
        };
        self.changes.outbox_put.push(OutboxEntry {
            key,
            subject: subject::outbound(to, kind),
            message_id,
            payload: prost::Message::encode_to_vec(&envelope),
            confirms: confirms.map(str::to_owned),
        });
    }

    /// A second message creating an existing referral: if the same sender sent the same referral
    /// again (a retry under a fresh message id), it is a repeat with no effect; anything else
    /// is refused.
    fn repeat_or_reject(
        &mut self,
        existing: &Referral,
        envelope: &[u8],
        origin: &Origin,
        seq: u64,
        at: Millis,
        raw: &[u8],
    ) -> Outcome {
        if origin.reply_to.as_deref() == Some(existing.from.as_str())
            && convert::same_payload(&existing.envelope, envelope)
        {
            tracing::info!(referral_id = %existing.id, "referral sent again under a new message id: a repeat");
            return Outcome::Duplicate;
        }
        self.reject(origin, duplicate_id(&existing.id), seq, at, raw)
    }

    fn reject(&mut self, origin: &Origin, r: Refusal, seq: u64, at: Millis, raw: &[u8]) -> Outcome {
        tracing::warn!(
            code = r.code.as_str_name(),
            detail = %r.detail,
            referral_id = %r.referral_id,
            subject = %origin.subject,
            "inbound message rejected"
        );
        self.changes.dead_letters.push(DeadLetter {
            stream_seq: seq,
            subject: origin.subject.clone(),
            message_id: origin.message_id.clone(),
            sender: origin.reply_to.clone().unwrap_or_default(),
            referral_id: r.referral_id.clone(),
            code: r.code as i32,
            detail: r.detail.clone(),
            at,
            raw: raw[..raw.len().min(MAX_DEAD_LETTER_BYTES)].to_vec(),
        });
        if let Some(to) = &origin.reply_to {
            let rejection = v1::Rejection {
                rejected_message_id: origin.message_id.clone(),
                code: r.code as i32,
                detail: r.detail,
                referral_id: r.referral_id,
                subject: origin.subject.clone(),
            };
            let id = derive_id(&format!("{}/rejection", origin.dedup_key), 0);
            let payload = prost::Message::encode_to_vec(&rejection);
            self.publish(
                to,
                OutKind::Rejection,
                id,
                at,
                PayloadType::Rejection,
                payload,
                None,
            );
        }
        Outcome::Rejected(r.code)
    }
}

fn duplicate_id(id: &str) -> Refusal {
    Refusal {
        code: ReasonCode::DuplicateReferralId,
        detail: "a referral with this id already exists".into(),
        referral_id: id.to_owned(),
    }
}

fn reason(e: &TransitionError) -> ReasonCode {
    match e {
        TransitionError::Terminal { .. } => ReasonCode::TerminalState,
        TransitionError::Illegal { .. } => ReasonCode::IllegalTransition,
        TransitionError::NotAParty { .. } => ReasonCode::NotAParty,
        TransitionError::Superseded { .. } => ReasonCode::IllegalTransition,
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::ingest::{self, Limits};
    use crate::referral::State;
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
        let limits = Limits {
            max_message_bytes: 65536,
            receipt_deadline: &|_| 1000,
        };
        let mut b = Batch::new(store);
        let mut out = Vec::new();
        for (i, (subject, bytes)) in msgs.iter().enumerate() {
            let seq = first_seq + i as u64;
            let read = ingest::read(subject, bytes, seq, at, &reg, &limits);
            out.push(b.inbound(read, seq, at, bytes).unwrap());
        }
        let c = b.finish();
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
    fn a_referral_is_delivered_notified_and_scheduled() {
        let s = SledStore::temporary().unwrap();
        let (out, c) = run(&s, &[referral_msg("r1", "m1")], 1, 100);
        assert_eq!(out, [Outcome::Applied]);
        assert_eq!(
            subjects(&c),
            ["yeongye.out.b.delivery", "yeongye.out.a.notification"]
        );
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
        assert_eq!(c.outbox_put.len(), 2);
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
        let c = b.finish();
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
        // Receipt unschedules the deadline.
        assert_eq!(c.deadlines_remove.len(), 1);
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
        let mut b = Batch::new(&s);
        for d in due {
            b.deadline(d).unwrap();
        }
        let c = b.finish();
        s.commit(&c).unwrap();
        assert_eq!(s.referral("r1").unwrap().unwrap().state, State::Expired);
        assert_eq!(
            subjects(&c),
            ["yeongye.out.a.notification", "yeongye.out.b.notification"]
        );
        assert!(s.due(i64::MAX, 10).unwrap().is_empty());
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
}
