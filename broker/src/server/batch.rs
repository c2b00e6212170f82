//! One batch: inbound messages and the broker's own events (delivery confirmations, deadlines)
//! in, one [`ChangeSet`] out. Reads the store, writes nothing: the event loop commits the
//! change set and only then publishes what it put in the outbox.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};
use yeongye_proto::signing::PrivateKey;

use yeongye_proto::subject::{self, OutKind};
use yeongye_proto::v1::{self, PayloadType, ReasonCode};

use crate::audit;
use crate::consent::{self, Basis, Consent, NotCovered};
use crate::convert::{self, derive_id};
use crate::error::Result;
use crate::ingest::{self, Inbound, Origin, Refusal, Request};
use crate::referral::{
    self, DeadlineKind, Effect, Event, Millis, NewReferral, Referral, State, Status, Transition,
    TransitionError,
};
use crate::store::{
    ChangeSet, DeadLetter, DeadLetterStatus, Deadline, OperatorAction, OutboxEntry, Store,
};
use crate::view::Summary;

/// Longest part of a rejected message kept in its dead letter.
const MAX_DEAD_LETTER_BYTES: usize = 64 * 1024;
/// Fewest envelopes worth signing on two threads.
const PARALLEL_SIGNING: usize = 16;

/// What became of one inbound message (for logs and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Rejected(ReasonCode),
    Duplicate,
}

/// An inbound message as it arrived: who sent it and under which id, its stream sequence, its
/// stream time, and its bytes (kept in a dead letter if it is rejected). What every answer to
/// a message needs, in one place.
pub(super) struct Arrival<'m> {
    pub origin: Origin,
    pub seq: u64,
    pub at: Millis,
    pub raw: &'m [u8],
}

pub struct Batch<'a> {
    store: &'a dyn Store,
    /// The agency told of every escalation besides the sender.
    coordinator: Option<&'a str>,
    /// The broker's own key: everything it publishes is signed with it.
    signer: Option<&'a PrivateKey>,
    changes: ChangeSet,
    /// Referrals changed in this batch, newer than the store's copy.
    touched: HashMap<String, Referral>,
    /// The store's summary of each touched referral before this batch (None: new).
    before: HashMap<String, Option<Summary>>,
    /// Consents recorded or changed in this batch, newer than the store's copy.
    consents: HashMap<String, Consent>,
    /// Audit entries of this batch, chained at `finish`.
    audit: Vec<audit::Entry>,
    /// Dedup keys applied in this batch, with their messages' digests.
    seen: HashMap<String, [u8; 32]>,
    /// The envelopes of this batch's outbox entries, by outbox key: signed and encoded into
    /// the entries' payloads at `finish` (all at once, on two threads), so that an entry
    /// cancelled in the same batch is never signed.
    unsigned: HashMap<u64, v1::Envelope>,
    /// Outbox keys whose message has left the broker (published; removed from the stored
    /// outbox once acknowledged): not to be cancelled.
    pub(super) left: HashSet<u64>,
}

/// A referral's summary before and after a batch, for the operators' view.
pub type ViewChange = (Option<Summary>, Summary);

impl<'a> Batch<'a> {
    pub fn new(store: &'a dyn Store) -> Batch<'a> {
        Batch {
            store,
            coordinator: None,
            signer: None,
            changes: ChangeSet::default(),
            touched: HashMap::new(),
            before: HashMap::new(),
            consents: HashMap::new(),
            audit: Vec::new(),
            seen: HashMap::new(),
            unsigned: HashMap::new(),
            left: HashSet::new(),
        }
    }

    /// Outbox entries already published (in flight, or acknowledged and not yet removed from
    /// the store): a consent revocation must not count their deliveries as cancelled.
    pub fn published(&mut self, keys: impl IntoIterator<Item = u64>) {
        self.left.extend(keys);
    }

    /// Escalations also go to `coordinator` (the district's Hope Welfare Support Group).
    /// Signs what the batch publishes with the broker's key.
    pub fn with_signer(mut self, signer: Option<&'a PrivateKey>) -> Batch<'a> {
        self.signer = signer;
        self
    }

    pub fn with_coordinator(mut self, coordinator: Option<&'a str>) -> Batch<'a> {
        self.coordinator = coordinator;
        self
    }

    fn consent(&self, id: &str) -> Result<Option<Consent>> {
        match self.consents.get(id) {
            Some(c) => Ok(Some(c.clone())),
            None => self.store.consent(id),
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
        let arrival = Arrival {
            origin,
            seq,
            at,
            raw,
        };
        self.changes.checkpoint = Some(self.changes.checkpoint.map_or(seq, |c| c.max(seq)));
        if let Some(outcome) = self.seen_before(&arrival, &request)? {
            return Ok(outcome);
        }
        let span = tracing::info_span!("inbound", seq, referral_id = tracing::field::Empty);
        if let Some(id) = traced_referral(&request) {
            span.record("referral_id", id);
        }
        let _enter = span.enter();
        self.request(request, &arrival)
    }

    /// Whether the message's id was applied before (in this batch or an earlier one): then it
    /// is a repeat, or a replay refused with its reason. Otherwise its id and digest are kept.
    fn seen_before(&mut self, arrival: &Arrival<'_>, request: &Request) -> Result<Option<Outcome>> {
        let origin = &arrival.origin;
        // What the message means (sender, payload type, payload); the digest of its bytes for
        // one whose envelope could not be read. Ids applied before the broker kept meanings
        // were recorded with the digest of their bytes: those still match a byte-identical
        // resend.
        let bytes_digest: [u8; 32] = Sha256::digest(arrival.raw).into();
        let digest = origin.meaning.unwrap_or(bytes_digest);
        let earlier = match self.seen.get(&origin.dedup_key) {
            Some(d) => Some(d.to_vec()),
            None => self.store.seen_digest(&origin.dedup_key)?,
        };
        if let Some(earlier) = earlier {
            // The same message again (a redelivery, or a retry rebuilt with a fresh sent_at_ms
            // and signature): a repeat. A different message under an id already used: a replay
            // (or a sender reusing ids), refused with its reason.
            if earlier.is_empty()
                || earlier == digest
                || earlier == bytes_digest
                || origin.message_id.is_empty()
            {
                return Ok(Some(Outcome::Duplicate));
            }
            let r = Refusal {
                code: ReasonCode::ReplayedMessageId,
                detail: format!(
                    "message id {} was already used, and the first message with it was \
                     processed and stands (applied, or answered on its own); this different \
                     message under the same id has no effect: a new message needs a new id",
                    origin.message_id
                ),
                referral_id: request.referral_id().to_owned(),
            };
            return Ok(Some(self.reject(arrival, r)));
        }
        self.seen.insert(origin.dedup_key.clone(), digest);
        self.changes
            .seen
            .push((origin.dedup_key.clone(), arrival.at, digest));
        Ok(None)
    }

    /// Applies what a message new to the broker asks for.
    fn request(&mut self, request: Request, arrival: &Arrival<'_>) -> Result<Outcome> {
        match request {
            Request::Submit(new) => self.submit(new, arrival),
            Request::Refuse(new, refusal) => self.refuse(new, refusal, arrival),
            Request::Status {
                referral_id,
                by,
                status,
                note,
                sealed_note,
                reason: reason_code,
            } => self.status(
                referral_id,
                by,
                status,
                (note, sealed_note, reason_code),
                arrival,
            ),
            Request::Grant(c) => self.grant(c, arrival),
            Request::Revoke {
                consent_id,
                at: revoked_at,
                by,
            } => {
                let revoked_at = revoked_at.unwrap_or(arrival.at).min(arrival.at);
                self.revoke(&consent_id, revoked_at, &by, arrival)
            }
            Request::Purged {
                referral_id,
                consent_id,
                by,
            } => self.purged(&referral_id, &consent_id, &by, arrival),
            Request::Reject(refusal) => Ok(self.reject(arrival, refusal)),
        }
    }

    /// A new referral: submitted if its id is new and the consent it cites (if any) covers
    /// it, else recorded as refused.
    fn submit(&mut self, new: NewReferral, arrival: &Arrival<'_>) -> Result<Outcome> {
        if let Some(existing) = self.referral(&new.id)? {
            return Ok(self.repeat_or_reject(&existing, &new.envelope, arrival));
        }
        let (at, origin) = (arrival.at, &arrival.origin);
        if let Some(refusal) = self.cite_consent(&new, at)? {
            let t = referral::refuse(new, &origin.message_id, &refusal.detail, at);
            self.transition(t, &origin.dedup_key, at);
            return Ok(self.reject(arrival, refusal));
        }
        tracing::info!(from = %new.from, to = %new.to, basis = %new.basis.label(), "referral submitted");
        let t = referral::submit(new, &origin.message_id, at);
        self.transition(t, &origin.dedup_key, at);
        Ok(Outcome::Applied)
    }

    /// Why the consent a new referral cites does not cover it (`None`: it does, and now lists
    /// the referral, so that its revocation withdraws it; or the referral cites a statute).
    fn cite_consent(&mut self, new: &NewReferral, at: Millis) -> Result<Option<Refusal>> {
        let Basis::Consent(cid) = &new.basis else {
            return Ok(None);
        };
        let consent = self.consent(cid)?;
        let ask = consent::Ask {
            from: &new.from,
            from_kind: &new.from_kind,
            client: &new.client,
            to: &new.to,
            to_kind: &new.to_kind,
            purpose: new.purpose,
            categories: &new.categories,
        };
        if let Err(not) = consent::check(consent.as_ref(), ask, at) {
            return Ok(Some(Refusal {
                code: not_covered(&not),
                detail: not.to_string(),
                referral_id: new.id.clone(),
            }));
        }
        if let Some(mut c) = consent {
            c.referrals.push(new.id.clone());
            self.consents.insert(c.id.clone(), c);
        }
        Ok(None)
    }

    /// A new referral that ingest refused: recorded as refused, unless its id is taken.
    fn refuse(
        &mut self,
        new: NewReferral,
        refusal: Refusal,
        arrival: &Arrival<'_>,
    ) -> Result<Outcome> {
        if let Some(existing) = self.referral(&new.id)? {
            return Ok(self.repeat_or_reject(&existing, &new.envelope, arrival));
        }
        let (at, origin) = (arrival.at, &arrival.origin);
        let mut new = new;
        if arrival.origin.clear_personal_data {
            // The broker keeps no copy of personal data it was sent in clear.
            new.envelope.clear();
        }
        let t = referral::refuse(new, &origin.message_id, &refusal.detail, at);
        self.transition(t, &origin.dedup_key, at);
        Ok(self.reject(arrival, refusal))
    }

    /// A party's status update on `referral_id`, applied if the state machine allows it.
    fn status(
        &mut self,
        referral_id: String,
        by: String,
        status: Status,
        (note, sealed_note, reason_code): (String, Vec<u8>, i32),
        arrival: &Arrival<'_>,
    ) -> Result<Outcome> {
        let existing = self.referral(&referral_id)?;
        let Some(current) = existing.filter(|r| r.from == by || r.to == by) else {
            // A stranger learns nothing about whether the referral exists.
            let r = Refusal {
                code: ReasonCode::UnknownReferral,
                detail: "no such referral for this agency".into(),
                referral_id,
            };
            return Ok(self.reject(arrival, r));
        };
        let (at, origin) = (arrival.at, &arrival.origin);
        let event = Event::Status { by, status, note };
        match referral::apply(&current, &event, &origin.message_id, at) {
            Ok(mut t) => {
                carry_note(&mut t, sealed_note, reason_code);
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
                Ok(self.reject(arrival, r))
            }
        }
    }

    /// An operator replays a dead letter (`read` is it read again, with today's registry).
    /// Returns what came of it; the dead letter's record is updated either way.
    pub fn replay(
        &mut self,
        dead: &DeadLetter,
        read: Inbound,
        who: &str,
        why: &str,
        at: Millis,
    ) -> Result<Result<(), String>> {
        let cause = format!("replay/{}/{}", dead.stream_seq, dead.actions.len());
        let note = format!("replayed by {who}: {why}");
        let outcome = self.replayed(read.request, &cause, &note, at)?;
        self.record_replay(dead, who, why, at, &outcome);
        Ok(outcome)
    }

    /// Applies a dead letter's request again, under `cause` (with `note` in the history of a
    /// referral it resubmits): `Err` says why it still cannot be applied.
    fn replayed(
        &mut self,
        request: Request,
        cause: &str,
        note: &str,
        at: Millis,
    ) -> Result<Result<(), String>> {
        Ok(match request {
            Request::Submit(new) => match self.referral(&new.id)? {
                None => {
                    let t = referral::submit(new, cause, at);
                    self.transition(t, cause, at);
                    Ok(())
                }
                Some(old) if old.from == new.from => {
                    match referral::resubmit(&old, new, cause, note, at) {
                        Ok(t) => {
                            self.transition(t, cause, at);
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                Some(_) => Err("a referral with this id exists from another sender".to_owned()),
            },
            Request::Status {
                referral_id,
                by,
                status,
                note: status_note,
                sealed_note,
                reason: reason_code,
            } => match self.referral(&referral_id)? {
                Some(r) if r.from == by || r.to == by => {
                    let event = Event::Status {
                        by,
                        status,
                        note: status_note,
                    };
                    match referral::apply(&r, &event, cause, at) {
                        Ok(mut t) => {
                            carry_note(&mut t, sealed_note, reason_code);
                            self.transition(t, cause, at);
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                _ => Err("no such referral for this agency".to_owned()),
            },
            Request::Grant(_) | Request::Revoke { .. } | Request::Purged { .. } => {
                Err("consent messages are not replayed: send them again".to_owned())
            }
            Request::Refuse(_, r) | Request::Reject(r) => Err(format!(
                "still refused: {} ({})",
                r.code.as_str_name(),
                r.detail
            )),
        })
    }

    /// The dead letter's record of a replay and its outcome, and the audit entry.
    fn record_replay(
        &mut self,
        dead: &DeadLetter,
        who: &str,
        why: &str,
        at: Millis,
        outcome: &std::result::Result<(), String>,
    ) {
        let mut updated = dead.clone();
        updated.actions.push(OperatorAction {
            action: "replay".to_owned(),
            who: who.to_owned(),
            why: why.to_owned(),
            at,
            outcome: match outcome {
                Ok(()) => "replayed".to_owned(),
                Err(e) => format!("failed: {e}"),
            },
        });
        if outcome.is_ok() {
            updated.status = DeadLetterStatus::Replayed;
        }
        self.audit.push(
            audit::Entry::draft("operator.replay", at)
                .referral(&dead.referral_id)
                .actor(who)
                .message(&dead.message_id)
                .reason(if outcome.is_ok() {
                    "replayed"
                } else {
                    "failed"
                }),
        );
        tracing::info!(
            seq = dead.stream_seq,
            ok = outcome.is_ok(),
            "dead letter replayed by an operator"
        );
        self.changes.dead_letter_updates.push(updated);
    }

    /// An operator discards a dead letter.
    pub fn discard(&mut self, dead: &DeadLetter, who: &str, why: &str, at: Millis) {
        let mut updated = dead.clone();
        updated.status = DeadLetterStatus::Discarded;
        updated.actions.push(OperatorAction {
            action: "discard".to_owned(),
            who: who.to_owned(),
            why: why.to_owned(),
            at,
            outcome: "discarded".to_owned(),
        });
        self.audit.push(
            audit::Entry::draft("operator.discard", at)
                .referral(&dead.referral_id)
                .actor(who)
                .message(&dead.message_id)
                .reason("discarded"),
        );
        tracing::info!(
            seq = dead.stream_seq,
            "dead letter discarded by an operator"
        );
        self.changes.dead_letter_updates.push(updated);
    }

    /// An operator had the registry read again (`ok`: it loaded and every consumer exists).
    pub fn registry_reloaded(&mut self, who: &str, ok: bool, at: Millis) {
        self.audit.push(
            audit::Entry::draft("operator.registry_reload", at)
                .actor(who)
                .reason(if ok { "reloaded" } else { "failed" }),
        );
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

    /// The change set to commit, and how each touched referral's summary changed.
    pub fn finish(self) -> (ChangeSet, Vec<ViewChange>) {
        let mut changes = self.changes;
        seal(self.signer, &mut changes.outbox_put, self.unsigned);
        let mut before = self.before;
        let view = self
            .touched
            .values()
            .map(|r| (before.remove(&r.id).flatten(), Summary::of(r)))
            .collect();
        changes.referrals = self.touched.into_values().collect();
        changes.consents = self.consents.into_values().collect();
        if !self.audit.is_empty() {
            match self.store.audit_head() {
                Ok(head) => changes.audit = audit::chain(head, self.audit).0,
                Err(e) => {
                    tracing::error!(cause = %e, "audit head unreadable: the commit will fail")
                }
            }
        }
        (changes, view)
    }

    fn transition(&mut self, t: Transition, cause: &str, at: Millis) {
        let Transition { referral, effects } = t;
        self.record_transition(&referral, at);
        for (n, effect) in effects.into_iter().enumerate() {
            self.effect(&referral, effect, derive_id(cause, n), cause, at);
        }
        self.touched.insert(referral.id.clone(), referral);
    }

    /// The audit entry of a referral's new state, and (the first time it changes in this
    /// batch) its summary before, for the operators' view.
    fn record_transition(&mut self, referral: &Referral, at: Millis) {
        // Not touched yet in this batch: what the store holds is the "before" (read once).
        let stored = match self.touched.get(&referral.id) {
            Some(_) => None,
            None => Some(self.store.referral(&referral.id)),
        };
        let previous = match (self.touched.get(&referral.id), &stored) {
            (Some(r), _) => Some(r.state),
            (None, Some(Ok(Some(r)))) => Some(r.state),
            (None, _) => None,
        };
        if let Some(last) = referral.history.last() {
            let event = if previous.is_none() {
                "referral.submitted"
            } else {
                "referral.state"
            };
            self.audit.push(
                audit::Entry::draft(event, at)
                    .referral(&referral.id)
                    .actor(&last.by)
                    .agency(&referral.to)
                    .states(
                        previous.map(State::as_str).unwrap_or(""),
                        referral.state.as_str(),
                    )
                    .message(&last.cause)
                    .basis(&referral.basis.label()),
            );
        }
        if !self.before.contains_key(&referral.id) {
            let old = match stored {
                Some(Ok(old)) => old.as_ref().map(Summary::of),
                Some(Err(e)) => {
                    tracing::error!(cause = %e, "reading a referral's previous state");
                    None
                }
                None => None,
            };
            self.before.insert(referral.id.clone(), old);
        }
    }

    /// Does what a transition asks (`id`: the message id derived for it from `cause`).
    fn effect(&mut self, referral: &Referral, effect: Effect, id: String, cause: &str, at: Millis) {
        match effect {
            Effect::Deliver { to } => {
                let payload = convert::delivery(referral);
                self.publish(&to, OutKind::Delivery, id, at, payload, Some(&referral.id));
            }
            Effect::Notify { to, previous } => {
                let payload = convert::notification(referral, previous);
                self.publish(&to, OutKind::Notification, id, at, payload, None);
            }
            // Within one batch the last word on a deadline wins: the store applies all
            // removals before all insertions, so a pair must cancel out here.
            Effect::Schedule { kind, at } => {
                let d = Deadline {
                    at,
                    kind,
                    referral_id: referral.id.clone(),
                };
                self.changes.deadlines_remove.retain(|x| *x != d);
                self.changes.deadlines_put.push(d);
            }
            Effect::Unschedule { kind, at } => {
                let d = Deadline {
                    at,
                    kind,
                    referral_id: referral.id.clone(),
                };
                self.changes.deadlines_put.retain(|x| *x != d);
                self.changes.deadlines_remove.push(d);
            }
            Effect::Withdraw { .. } => self.withdraw(referral, &id, at),
            Effect::Escalate { kind, due } => self.escalate(referral, kind, due, cause, at),
        }
    }

    /// A deadline passed: the sender, and the coordinator if there is one, are told.
    fn escalate(
        &mut self,
        referral: &Referral,
        kind: DeadlineKind,
        due: Millis,
        cause: &str,
        at: Millis,
    ) {
        let mut targets = vec![referral.from.clone()];
        if let Some(c) = self.coordinator.filter(|c| *c != referral.from) {
            targets.push(c.to_owned());
        }
        tracing::warn!(referral_id = %referral.id, kind = kind.as_str(), to = %referral.to, "deadline passed: escalating");
        let payload = convert::escalation(referral, kind, due);
        for (i, target) in targets.iter().enumerate() {
            let id = derive_id(&format!("{cause}/escalate"), i);
            self.publish(target, OutKind::Escalation, id, at, payload.clone(), None);
        }
    }

    /// Puts a message of `kind` to agency `to` in the outbox (`confirms`: the referral whose
    /// delivery it is), its envelope to be signed at `finish`.
    fn publish(
        &mut self,
        to: &str,
        kind: OutKind,
        message_id: String,
        at: Millis,
        payload: Vec<u8>,
        confirms: Option<&str>,
    ) {
        let envelope =
            convert::broker_envelope(message_id.clone(), at, payload_type(kind), payload);
        let key = match self.store.next_outbox_key() {
            Ok(k) => k,
            Err(e) => {
                // generate_id only fails if sled cannot write; the commit will fail the same way.
                tracing::error!(cause = %e, "no outbox key");
                return;
            }
        };
        // The payload is the envelope, signed and encoded at `finish`.
        self.unsigned.insert(key, envelope);
        self.changes.outbox_put.push(OutboxEntry {
            key,
            subject: subject::outbound(to, kind),
            message_id,
            payload: Vec::new(),
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
        arrival: &Arrival<'_>,
    ) -> Outcome {
        if arrival.origin.reply_to.as_deref() == Some(existing.from.as_str())
            && convert::same_payload(&existing.envelope, envelope)
        {
            tracing::info!(referral_id = %existing.id, "referral sent again under a new message id: a repeat");
            return Outcome::Duplicate;
        }
        self.reject(arrival, duplicate_id(&existing.id))
    }

    /// A query the responder refused (its reply subject was not the asker's inbox): audited and
    /// kept as dead letter `seq` for operators. Nothing is sent to anyone.
    pub fn refused_query(&mut self, q: &super::RefusedQuery, seq: u64) {
        let code = ReasonCode::ReplySubjectForbidden;
        self.audit.push(
            audit::Entry::draft("query.refused", q.at)
                .actor(&q.sender)
                .reason(code.as_str_name())
                .message(&q.message_id),
        );
        self.changes.dead_letters.push(DeadLetter {
            stream_seq: seq,
            subject: q.subject.clone(),
            message_id: q.message_id.clone(),
            sender: q.sender.clone(),
            referral_id: String::new(),
            code: code as i32,
            detail: "a query's reply subject must be the asking agency's own inbox \
                     (_INBOX_<agency>.…): not answered"
                .to_owned(),
            at: q.at,
            raw: q.raw[..q.raw.len().min(MAX_DEAD_LETTER_BYTES)].to_vec(),
            status: DeadLetterStatus::Open,
            actions: Vec::new(),
        });
    }

    /// Refuses a message: audited, kept as a dead letter, and answered with a rejection when
    /// the subject names an agency to answer.
    fn reject(&mut self, arrival: &Arrival<'_>, r: Refusal) -> Outcome {
        let (origin, seq, at, raw) = (&arrival.origin, arrival.seq, arrival.at, arrival.raw);
        self.audit.push(
            audit::Entry::draft("message.rejected", at)
                .referral(&r.referral_id)
                .actor(origin.reply_to.as_deref().unwrap_or(""))
                .reason(r.code.as_str_name())
                .message(&origin.message_id),
        );
        tracing::warn!(
            code = r.code.as_str_name(),
            detail = %r.detail,
            referral_id = %r.referral_id,
            subject = %ingest::shown_subject(&origin.subject),
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
            raw: if origin.clear_personal_data {
                Vec::new()
            } else {
                raw[..raw.len().min(MAX_DEAD_LETTER_BYTES)].to_vec()
            },
            status: DeadLetterStatus::Open,
            actions: Vec::new(),
        });
        if let Some(to) = &origin.reply_to {
            let rejection = v1::Rejection {
                rejected_message_id: origin.message_id.clone(),
                code: r.code as i32,
                detail: r.detail,
                referral_id: r.referral_id,
                subject: origin.subject.clone(),
            };
            let id = derive_id(&format!("{}/rejection/{seq}", origin.dedup_key), 0);
            let payload = prost::Message::encode_to_vec(&rejection);
            self.publish(to, OutKind::Rejection, id, at, payload, None);
        }
        Outcome::Rejected(r.code)
    }
}

/// Signs (with `signer`, if any) and encodes the envelope of every entry of `outbox` into its
/// payload. Ed25519 signing is most of a batch's CPU after the store: a large batch is signed
/// on two threads. Signatures are deterministic, so where it happens changes no byte.
fn seal(
    signer: Option<&PrivateKey>,
    outbox: &mut [OutboxEntry],
    mut unsigned: HashMap<u64, v1::Envelope>,
) {
    // Every entry of the outbox was made by `publish`, with its envelope kept here.
    let envelopes: Vec<Option<v1::Envelope>> =
        outbox.iter().map(|e| unsigned.remove(&e.key)).collect();
    let signatures = match signer {
        Some(key) => super::map_halves(&envelopes, PARALLEL_SIGNING, |e| {
            e.as_ref().map(|e| key.signature(e))
        }),
        None => vec![None; envelopes.len()],
    };
    for ((entry, envelope), signature) in outbox.iter_mut().zip(envelopes).zip(signatures) {
        if let Some(mut envelope) = envelope {
            if let (Some(key), Some(signature)) = (signer, signature) {
                envelope.key_id = key.id.clone();
                envelope.signature = signature;
            }
            entry.payload = prost::Message::encode_to_vec(&envelope);
        }
    }
}

/// The referral a request is about, for its tracing span (none for consent grants and
/// revocations, nor for a message rejected outright).
fn traced_referral(request: &Request) -> Option<&str> {
    match request {
        Request::Submit(_)
        | Request::Refuse(..)
        | Request::Status { .. }
        | Request::Purged { .. } => Some(request.referral_id()),
        Request::Grant(_) | Request::Revoke { .. } | Request::Reject(_) => None,
    }
}

/// The payload type of what the broker publishes: one for each outbound kind.
fn payload_type(kind: OutKind) -> PayloadType {
    match kind {
        OutKind::Delivery => PayloadType::Delivery,
        OutKind::Notification => PayloadType::Notification,
        OutKind::Rejection => PayloadType::Rejection,
        OutKind::Escalation => PayloadType::Escalation,
        OutKind::Withdrawal => PayloadType::Withdrawal,
    }
}

fn duplicate_id(id: &str) -> Refusal {
    Refusal {
        code: ReasonCode::DuplicateReferralId,
        detail: "a referral with this id already exists".into(),
        referral_id: id.to_owned(),
    }
}

fn not_covered(n: &NotCovered) -> ReasonCode {
    match n {
        NotCovered::Unknown => ReasonCode::ConsentUnknown,
        NotCovered::OtherClient => ReasonCode::ConsentOtherClient,
        NotCovered::Recipient => ReasonCode::ConsentRecipientNotCovered,
        NotCovered::Purpose => ReasonCode::ConsentPurposeNotCovered,
        NotCovered::Category(_) => ReasonCode::ConsentCategoryNotCovered,
        NotCovered::Expired => ReasonCode::ConsentExpired,
        NotCovered::NotYetValid => ReasonCode::ConsentNotYetValid,
        NotCovered::Revoked => ReasonCode::ConsentRevoked,
    }
}

fn reason(e: &TransitionError) -> ReasonCode {
    match e {
        TransitionError::Terminal {
            state: State::Withdrawn,
        } => ReasonCode::Withdrawn,
        TransitionError::Terminal { .. } => ReasonCode::TerminalState,
        TransitionError::Illegal { .. } => ReasonCode::IllegalTransition,
        TransitionError::NotAParty { .. } => ReasonCode::NotAParty,
        TransitionError::Superseded { .. } | TransitionError::NotReplayable { .. } => {
            ReasonCode::IllegalTransition
        }
    }
}

#[cfg(test)]
mod consent_tests;
mod consents;
#[cfg(test)]
mod tests;

/// Puts a status update's sealed note and reason code on the history entry its transition
/// added: carried to the notification unopened, no part of the state machine's decision.
fn carry_note(t: &mut referral::Transition, sealed_note: Vec<u8>, reason: i32) {
    if let Some(h) = t.referral.history.last_mut() {
        h.sealed_note = sealed_note;
        h.reason = reason;
    }
}
