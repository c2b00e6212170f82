//! One batch: inbound messages and the broker's own events (delivery confirmations, deadlines)
//! in, one [`ChangeSet`] out. Reads the store, writes nothing: the event loop commits the
//! change set and only then publishes what it put in the outbox.

use std::collections::{HashMap, HashSet};

use yeongye_proto::subject::{self, OutKind};
use yeongye_proto::v1::{self, PayloadType, ReasonCode};

use crate::audit;
use crate::consent::{self, Basis, Consent, NotCovered};
use crate::convert::{self, derive_id};
use crate::error::Result;
use crate::ingest::{Inbound, Origin, Refusal, Request};
use crate::referral::{
    self, BROKER, Effect, Event, Millis, Referral, State, Transition, TransitionError,
};
use crate::store::{
    ChangeSet, DeadLetter, DeadLetterStatus, Deadline, OperatorAction, OutboxEntry, Store,
};
use crate::view::Summary;

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
    /// The agency told of every escalation besides the sender.
    coordinator: Option<&'a str>,
    changes: ChangeSet,
    /// Referrals changed in this batch, newer than the store's copy.
    touched: HashMap<String, Referral>,
    /// The store's summary of each touched referral before this batch (None: new).
    before: HashMap<String, Option<Summary>>,
    /// Consents recorded or changed in this batch, newer than the store's copy.
    consents: HashMap<String, Consent>,
    /// Audit entries of this batch, chained at `finish`.
    audit: Vec<audit::Entry>,
    seen: HashSet<String>,
}

/// A referral's summary before and after a batch, for the operators' view.
pub type ViewChange = (Option<Summary>, Summary);

impl<'a> Batch<'a> {
    pub fn new(store: &'a dyn Store) -> Batch<'a> {
        Batch {
            store,
            coordinator: None,
            changes: ChangeSet::default(),
            touched: HashMap::new(),
            before: HashMap::new(),
            consents: HashMap::new(),
            audit: Vec::new(),
            seen: HashSet::new(),
        }
    }

    /// Escalations also go to `coordinator` (the district's Hope Welfare Support Group).
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
                if let Basis::Consent(cid) = &new.basis {
                    let consent = self.consent(cid)?;
                    let ask = consent::Ask {
                        client: &new.client,
                        to: &new.to,
                        to_kind: &new.to_kind,
                        purpose: new.purpose,
                        categories: &new.categories,
                    };
                    if let Err(not) = consent::check(consent.as_ref(), ask, at) {
                        let refusal = Refusal {
                            code: not_covered(&not),
                            detail: not.to_string(),
                            referral_id: new.id.clone(),
                        };
                        let t = referral::refuse(new, &origin.message_id, &refusal.detail, at);
                        self.transition(t, &origin.dedup_key, at);
                        return Ok(self.reject(&origin, refusal, seq, at, raw));
                    }
                    if let Some(mut c) = consent {
                        c.referrals.push(new.id.clone());
                        self.consents.insert(c.id.clone(), c);
                    }
                }
                tracing::info!(from = %new.from, to = %new.to, basis = %new.basis.label(), "referral submitted");
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
            Request::Grant(c) => self.grant(c, &origin, seq, at, raw),
            Request::Revoke {
                consent_id,
                at: revoked_at,
                by,
            } => self.revoke(
                &consent_id,
                revoked_at.unwrap_or(at).min(at),
                &by,
                &origin,
                seq,
                at,
                raw,
            ),
            Request::Purged {
                referral_id,
                consent_id,
                by,
            } => {
                span.record("referral_id", referral_id.as_str());
                self.purged(&referral_id, &consent_id, &by, &origin, seq, at, raw)
            }
            Request::Reject(refusal) => Ok(self.reject(&origin, refusal, seq, at, raw)),
        }
    }

    fn grant(
        &mut self,
        c: Consent,
        origin: &Origin,
        seq: u64,
        at: Millis,
        raw: &[u8],
    ) -> Result<Outcome> {
        if let Some(existing) = self.consent(&c.id)? {
            let same = existing.collected_by == c.collected_by
                && existing.client == c.client
                && existing.recipient_agencies == c.recipient_agencies
                && existing.recipient_kinds == c.recipient_kinds
                && existing.purposes == c.purposes
                && existing.categories == c.categories
                && existing.valid_from == c.valid_from
                && existing.valid_until == c.valid_until;
            if same {
                return Ok(Outcome::Duplicate);
            }
            let r = Refusal {
                code: ReasonCode::ConsentExists,
                detail: "a consent with this id is recorded".into(),
                referral_id: String::new(),
            };
            return Ok(self.reject(origin, r, seq, at, raw));
        }
        tracing::info!(consent_id = %c.id, collected_by = %c.collected_by, "consent recorded");
        self.audit.push(
            audit::Entry::draft("consent.granted", at)
                .consent(&c.id)
                .actor(&c.collected_by)
                .message(&origin.message_id),
        );
        self.consents.insert(c.id.clone(), c);
        Ok(Outcome::Applied)
    }

    #[allow(clippy::too_many_arguments)]
    fn revoke(
        &mut self,
        id: &str,
        revoked_at: Millis,
        by: &str,
        origin: &Origin,
        seq: u64,
        at: Millis,
        raw: &[u8],
    ) -> Result<Outcome> {
        let Some(mut c) = self.consent(id)? else {
            let r = Refusal {
                code: ReasonCode::ConsentUnknown,
                detail: "no consent with this id is recorded".into(),
                referral_id: String::new(),
            };
            return Ok(self.reject(origin, r, seq, at, raw));
        };
        let mut recipients = Vec::new();
        for rid in &c.referrals {
            if let Some(r) = self.referral(rid)? {
                recipients.push(r.to);
            }
        }
        let may = c.collected_by == by
            || c.recipient_agencies.iter().any(|a| a == by)
            || recipients.iter().any(|a| a == by)
            || self.coordinator == Some(by);
        if !may {
            let r = Refusal {
                code: ReasonCode::NotAParty,
                detail: "only the collecting agency, a covered agency or the coordinator may record a revocation".into(),
                referral_id: String::new(),
            };
            return Ok(self.reject(origin, r, seq, at, raw));
        }
        if c.revoked.is_some() {
            return Ok(Outcome::Duplicate);
        }
        tracing::info!(
            consent_id = id,
            referrals = c.referrals.len(),
            "consent revoked: withdrawing referrals"
        );
        c.revoked = Some(consent::Revocation {
            at: revoked_at,
            by: by.to_owned(),
        });
        self.audit.push(
            audit::Entry::draft("consent.revoked", at)
                .consent(id)
                .actor(by)
                .message(&origin.message_id),
        );
        self.consents.insert(id.to_owned(), c.clone());
        for (n, rid) in c.referrals.iter().enumerate() {
            let Some(r) = self.referral(rid)? else {
                continue;
            };
            let cause = format!("{}/withdraw/{n}", origin.dedup_key);
            if r.state.is_terminal() {
                // Ended, but the recipient had the data: it must purge it all the same.
                if r.state != State::Refused && r.state != State::Withdrawn {
                    self.withdraw(&r, &derive_id(&cause, 0), at);
                }
                continue;
            }
            match referral::apply(&r, &Event::ConsentRevoked, &origin.message_id, at) {
                Ok(t) => self.transition(t, &cause, at),
                Err(e) => tracing::warn!(referral_id = %rid, cause = %e, "withdrawal not applied"),
            }
        }
        Ok(Outcome::Applied)
    }

    /// Tells the recipient to purge `r` and tracks the confirmation — or, if the delivery has
    /// not left the broker yet, cancels it (the recipient never had the data).
    fn withdraw(&mut self, r: &Referral, message_id: &str, at: Millis) {
        let cancelled_here = {
            let before = self.changes.outbox_put.len();
            self.changes
                .outbox_put
                .retain(|e| e.confirms.as_deref() != Some(r.id.as_str()));
            before != self.changes.outbox_put.len()
        };
        let cancelled_stored = match self.store.outbox() {
            Ok(stored) => {
                let keys: Vec<u64> = stored
                    .iter()
                    .filter(|e| e.confirms.as_deref() == Some(r.id.as_str()))
                    .map(|e| e.key)
                    .collect();
                let any = !keys.is_empty();
                self.changes.outbox_remove.extend(keys);
                any
            }
            Err(e) => {
                tracing::error!(cause = %e, "reading the outbox to cancel a delivery");
                false
            }
        };
        if cancelled_here || cancelled_stored {
            tracing::info!(referral_id = %r.id, "delivery cancelled before it left: nothing to purge");
            return;
        }
        let Some(cid) = r.basis.consent_id() else {
            return;
        };
        let payload = convert::withdrawal(r, cid, at);
        self.publish(
            &r.to,
            OutKind::Withdrawal,
            message_id.to_owned(),
            at,
            PayloadType::Withdrawal,
            payload,
            None,
        );
        if let Ok(Some(mut c)) = self.consent(cid)
            && !c.purges.iter().any(|p| p.referral_id == r.id)
        {
            c.purges.push(consent::Purge {
                referral_id: r.id.clone(),
                agency: r.to.clone(),
                requested_at: at,
                confirmed_at: None,
            });
            self.consents.insert(cid.to_owned(), c);
        }
        self.audit.push(
            audit::Entry::draft("purge.requested", at)
                .referral(&r.id)
                .consent(cid)
                .actor(BROKER)
                .agency(&r.to),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn purged(
        &mut self,
        referral_id: &str,
        consent_id: &str,
        by: &str,
        origin: &Origin,
        seq: u64,
        at: Millis,
        raw: &[u8],
    ) -> Result<Outcome> {
        let consent = self.consent(consent_id)?;
        let Some(mut c) = consent.filter(|c| {
            c.purges
                .iter()
                .any(|p| p.referral_id == referral_id && p.agency == by)
        }) else {
            let r = Refusal {
                code: ReasonCode::UnknownReferral,
                detail: "no purge was requested of this agency for this referral and consent"
                    .into(),
                referral_id: referral_id.to_owned(),
            };
            return Ok(self.reject(origin, r, seq, at, raw));
        };
        let Some(p) = c
            .purges
            .iter_mut()
            .find(|p| p.referral_id == referral_id && p.agency == by)
        else {
            return Ok(Outcome::Duplicate);
        };
        if p.confirmed_at.is_some() {
            return Ok(Outcome::Duplicate);
        }
        p.confirmed_at = Some(at);
        tracing::info!(consent_id, agency = by, "purge confirmed");
        self.audit.push(
            audit::Entry::draft("purge.confirmed", at)
                .referral(referral_id)
                .consent(consent_id)
                .actor(by)
                .message(&origin.message_id),
        );
        self.consents.insert(consent_id.to_owned(), c);
        Ok(Outcome::Applied)
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
        let outcome = match read.request {
            Request::Submit(new) => match self.referral(&new.id)? {
                None => {
                    let t = referral::submit(new, &cause, at);
                    self.transition(t, &cause, at);
                    Ok(())
                }
                Some(old) if old.from == new.from => {
                    match referral::resubmit(&old, new, &cause, &note, at) {
                        Ok(t) => {
                            self.transition(t, &cause, at);
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
            } => match self.referral(&referral_id)? {
                Some(r) if r.from == by || r.to == by => {
                    let event = Event::Status {
                        by,
                        status,
                        note: status_note,
                    };
                    match referral::apply(&r, &event, &cause, at) {
                        Ok(t) => {
                            self.transition(t, &cause, at);
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
        };
        let mut updated = dead.clone();
        updated.actions.push(OperatorAction {
            action: "replay".to_owned(),
            who: who.to_owned(),
            why: why.to_owned(),
            at,
            outcome: match &outcome {
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
        Ok(outcome)
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
        tracing::info!(
            seq = dead.stream_seq,
            "dead letter discarded by an operator"
        );
        self.changes.dead_letter_updates.push(updated);
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
        let previous = match self.touched.get(&referral.id) {
            Some(r) => Some(r.state),
            None => self
                .store
                .referral(&referral.id)
                .ok()
                .flatten()
                .map(|r| r.state),
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
            // Not touched yet in this batch: what the store holds is the "before".
            let old = match self.store.referral(&referral.id) {
                Ok(old) => old.as_ref().map(Summary::of),
                Err(e) => {
                    tracing::error!(cause = %e, "reading a referral's previous state");
                    None
                }
            };
            self.before.insert(referral.id.clone(), old);
        }
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
                Effect::Withdraw { .. } => self.withdraw(&referral, &id, at),
                Effect::Escalate { kind, due } => {
                    let mut targets = vec![referral.from.clone()];
                    if let Some(c) = self.coordinator.filter(|c| *c != referral.from) {
                        targets.push(c.to_owned());
                    }
                    tracing::warn!(referral_id = %referral.id, kind = kind.as_str(), to = %referral.to, "deadline passed: escalating");
                    let payload = convert::escalation(&referral, kind, due);
                    for (i, target) in targets.iter().enumerate() {
                        let id = derive_id(&format!("{cause}/escalate"), i);
                        self.publish(
                            target,
                            OutKind::Escalation,
                            id,
                            at,
                            PayloadType::Escalation,
                            payload.clone(),
                            None,
                        );
                    }
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
mod tests {
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
            deadlines: &|_, _| (1000, 5000),
        };
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
        let limits = Limits {
            max_message_bytes: 65536,
            deadlines: &|_, _| (1000, 5000),
        };
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
        assert_eq!(
            subjects(&c),
            ["yeongye.out.b.delivery", "yeongye.out.a.notification"]
        );
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
}
