//! The batch's consent messages: recording a grant, revoking (withdrawing the referrals that
//! cite it, cancelling deliveries that have not left, asking recipients to purge), and
//! tracking purge confirmations.

use yeongye_proto::subject::OutKind;
use yeongye_proto::v1::ReasonCode;

use super::{Arrival, Batch, Outcome};
use crate::audit;
use crate::consent::{self, Consent};
use crate::convert::{self, derive_id};
use crate::error::Result;
use crate::ingest::Refusal;
use crate::referral::{self, BROKER, Event, Millis, Referral, State};

impl Batch<'_> {
    pub(super) fn grant(&mut self, c: Consent, arrival: &Arrival<'_>) -> Result<Outcome> {
        let (origin, at) = (&arrival.origin, arrival.at);
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
            return Ok(self.reject(arrival, r));
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

    pub(super) fn revoke(
        &mut self,
        id: &str,
        revoked_at: Millis,
        by: &str,
        arrival: &Arrival<'_>,
    ) -> Result<Outcome> {
        let (origin, at) = (&arrival.origin, arrival.at);
        // A revocation by someone who is not a party is answered exactly as one of an unknown
        // consent: it must not learn that the id exists.
        let unknown = || Refusal {
            code: ReasonCode::ConsentUnknown,
            detail: "no consent with this id is recorded".into(),
            referral_id: String::new(),
        };
        let Some(mut c) = self.consent(id)? else {
            return Ok(self.reject(arrival, unknown()));
        };
        if !self.may_revoke(&c, by)? {
            return Ok(self.reject(arrival, unknown()));
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
        self.withdraw_citing(&c, arrival)?;
        Ok(Outcome::Applied)
    }

    /// Who may revoke consent `c`: the agency that collected it, an agency it names, the
    /// recipient of a referral that cites it, or the coordinator.
    fn may_revoke(&self, c: &Consent, by: &str) -> Result<bool> {
        let mut recipients = Vec::new();
        for rid in &c.referrals {
            if let Some(r) = self.referral(rid)? {
                recipients.push(r.to);
            }
        }
        Ok(c.collected_by == by
            || c.recipient_agencies.iter().any(|a| a == by)
            || recipients.iter().any(|a| a == by)
            || self.coordinator == Some(by))
    }

    /// Withdraws every referral that cites revoked consent `c`: an open one moves to
    /// WITHDRAWN; an ended one the recipient had is only asked to be purged.
    fn withdraw_citing(&mut self, c: &Consent, arrival: &Arrival<'_>) -> Result<()> {
        let (origin, at) = (&arrival.origin, arrival.at);
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
        Ok(())
    }

    /// Cancels the delivery of `referral_id` if it has not left the broker: put in the outbox
    /// in this batch, or stored there and not yet published. Whether it was.
    fn cancel_delivery(&mut self, referral_id: &str) -> bool {
        let cancelled_here = {
            let before = self.changes.outbox_put.len();
            self.changes
                .outbox_put
                .retain(|e| e.confirms.as_deref() != Some(referral_id));
            before != self.changes.outbox_put.len()
        };
        let cancelled_stored = match self.store.outbox() {
            Ok(stored) => {
                // A delivery already published has left, even if its removal from the
                // stored outbox is still to come.
                let keys: Vec<u64> = stored
                    .iter()
                    .filter(|e| e.confirms.as_deref() == Some(referral_id))
                    .filter(|e| !self.left.contains(&e.key))
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
        cancelled_here || cancelled_stored
    }

    /// Tells the recipient to purge `r` and tracks the confirmation — or, if the delivery has
    /// not left the broker yet, cancels it (the recipient never had the data).
    pub(super) fn withdraw(&mut self, r: &Referral, message_id: &str, at: Millis) {
        if self.cancel_delivery(&r.id) {
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

    pub(super) fn purged(
        &mut self,
        referral_id: &str,
        consent_id: &str,
        by: &str,
        arrival: &Arrival<'_>,
    ) -> Result<Outcome> {
        let (origin, at) = (&arrival.origin, arrival.at);
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
            return Ok(self.reject(arrival, r));
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
}
