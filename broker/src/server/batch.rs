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
                if self.referral(&new.id)?.is_some() {
                    return Ok(self.reject(&origin, duplicate_id(&new.id), seq, at, raw));
                }
                tracing::info!(from = %new.from, to = %new.to, "referral submitted");
                let t = referral::submit(new, &origin.message_id, at);
                self.transition(t, &origin.dedup_key, at);
                Ok(Outcome::Applied)
            }
            Request::Refuse(new, refusal) => {
                span.record("referral_id", new.id.as_str());
                if self.referral(&new.id)?.is_some() {
                    return Ok(self.reject(&origin, duplicate_id(&new.id), seq, at, raw));
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
