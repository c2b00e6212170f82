//! The only module that knows both the wire types (`yeongye_proto::v1`) and the domain types.
//! Decoding is `TryFrom`-style and total: bad wire values become errors, never panics.

use prost::Message;
use uuid::Uuid;
use yeongye_proto::v1;

use crate::consent::Consent;
use crate::referral::{DeadlineKind, HistoryEntry, Millis, Referral, State, Status, Urgency};

/// The namespace of every id the broker derives (see PROTOCOL.md, "Ids").
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c3a52_7e0b_4d8e_9a43_2b5d7c1e9f10);

/// The id of the `n`th message caused by `cause`: the same inputs always give the same id, so a
/// replayed effect is recognised as a repeat downstream.
pub fn derive_id(cause: &str, n: usize) -> String {
    Uuid::new_v5(&ID_NAMESPACE, format!("{cause}/{n}").as_bytes()).to_string()
}

/// Whether two encoded envelopes carry the same payload bytes.
pub fn same_payload(a: &[u8], b: &[u8]) -> bool {
    match (v1::Envelope::decode(a), v1::Envelope::decode(b)) {
        (Ok(a), Ok(b)) => a.payload_type == b.payload_type && a.payload == b.payload,
        _ => false,
    }
}

pub fn state_to_wire(s: State) -> v1::ReferralState {
    use v1::ReferralState as W;
    match s {
        State::Submitted => W::Submitted,
        State::Delivered => W::Delivered,
        State::Received => W::Received,
        State::Accepted => W::Accepted,
        State::InProgress => W::InProgress,
        State::Completed => W::Completed,
        State::Declined => W::Declined,
        State::Cancelled => W::Cancelled,
        State::Expired => W::Expired,
        State::Refused => W::Refused,
        State::Withdrawn => W::Withdrawn,
    }
}

pub fn status_from_wire(raw: i32) -> Option<Status> {
    match v1::Status::try_from(raw).ok()? {
        v1::Status::Unspecified => None,
        v1::Status::Received => Some(Status::Received),
        v1::Status::Accepted => Some(Status::Accepted),
        v1::Status::Declined => Some(Status::Declined),
        v1::Status::InProgress => Some(Status::InProgress),
        v1::Status::Completed => Some(Status::Completed),
        v1::Status::Cancelled => Some(Status::Cancelled),
    }
}

pub fn urgency_from_wire(raw: i32) -> Option<Urgency> {
    match v1::Urgency::try_from(raw).ok()? {
        v1::Urgency::Unspecified => None,
        v1::Urgency::Routine => Some(Urgency::Routine),
        v1::Urgency::Priority => Some(Urgency::Priority),
        v1::Urgency::Crisis => Some(Urgency::Crisis),
    }
}

/// An envelope from the broker. `at` is the time of the event that caused it (not the wall
/// clock), so that a replay produces the same bytes.
pub fn broker_envelope(
    message_id: String,
    at: Millis,
    ty: v1::PayloadType,
    payload: Vec<u8>,
) -> v1::Envelope {
    v1::Envelope {
        message_id,
        sender: yeongye_proto::BROKER_ID.to_owned(),
        sent_at_ms: at,
        payload_type: ty as i32,
        payload,
        signature: Vec::new(),
        key_id: String::new(),
    }
}

pub fn delivery(referral: &Referral) -> Vec<u8> {
    // The stored envelope decoded when it was accepted; if it ever does not, deliver an empty
    // original rather than nothing, so the recipient can still see and report the referral.
    let original = v1::Envelope::decode(referral.envelope.as_slice()).ok();
    v1::Delivery {
        referral_id: referral.id.clone(),
        original,
    }
    .encode_to_vec()
}

pub fn notification(referral: &Referral, previous: State) -> Vec<u8> {
    let last = referral.history.last();
    v1::Notification {
        referral_id: referral.id.clone(),
        state: state_to_wire(referral.state) as i32,
        previous: state_to_wire(previous) as i32,
        by_agency: last.map(|h| h.by.clone()).unwrap_or_default(),
        at_ms: last.map(|h| h.at).unwrap_or_default(),
        note: last.map(|h| h.note.clone()).unwrap_or_default(),
        from_agency: referral.from.clone(),
        to_agency: referral.to.clone(),
        legal_basis: referral.basis.label(),
        sealed_note: last.and_then(|h| sealed_note(&h.sealed_note)),
        reason: last.map(|h| h.reason).unwrap_or_default(),
    }
    .encode_to_vec()
}

/// A history entry's sealed note as the wire carries it (stored encoded, as it came).
pub fn sealed_note(bytes: &[u8]) -> Option<v1::Sealed> {
    if bytes.is_empty() {
        return None;
    }
    v1::Sealed::decode(bytes).ok()
}

pub fn deadline_kind_to_wire(k: DeadlineKind) -> v1::DeadlineKind {
    match k {
        DeadlineKind::Receipt => v1::DeadlineKind::Receipt,
        DeadlineKind::Acceptance => v1::DeadlineKind::Acceptance,
    }
}

pub fn escalation(referral: &Referral, kind: DeadlineKind, due: Millis) -> Vec<u8> {
    v1::Escalation {
        referral_id: referral.id.clone(),
        kind: deadline_kind_to_wire(kind) as i32,
        due_at_ms: due,
        from_agency: referral.from.clone(),
        to_agency: referral.to.clone(),
        state: state_to_wire(referral.state) as i32,
    }
    .encode_to_vec()
}

pub fn withdrawal(referral: &Referral, consent_id: &str, at: Millis) -> Vec<u8> {
    v1::Withdrawal {
        referral_id: referral.id.clone(),
        consent_id: consent_id.to_owned(),
        client_pseudonym_id: referral.client.clone(),
        at_ms: at,
    }
    .encode_to_vec()
}

pub fn consent_reply(c: &Consent) -> v1::ConsentReply {
    v1::ConsentReply {
        grant: Some(v1::ConsentGrant {
            consent_id: c.id.clone(),
            client_pseudonym_id: c.client.clone(),
            collected_by: c.collected_by.clone(),
            recipient_agencies: c.recipient_agencies.clone(),
            recipient_kinds: c.recipient_kinds.clone(),
            purposes: c.purposes.clone(),
            data_categories: c.categories.clone(),
            valid_from_ms: c.valid_from,
            valid_until_ms: c.valid_until.unwrap_or(0),
            form_reference: c.form_reference.clone(),
        }),
        revoked: c.revoked.is_some(),
        revoked_at_ms: c.revoked.as_ref().map(|r| r.at).unwrap_or(0),
        // The query fills in which referrals are WITHDRAWN (it needs their states).
        withdrawn_referral_ids: Vec::new(),
        purge_requested_referral_ids: {
            let mut ids: Vec<String> = Vec::new();
            for p in &c.purges {
                if !ids.contains(&p.referral_id) {
                    ids.push(p.referral_id.clone());
                }
            }
            ids
        },
        pending_purges: c
            .outstanding()
            .map(|p| v1::PendingPurge {
                referral_id: p.referral_id.clone(),
                agency: p.agency.clone(),
            })
            .collect(),
        error: None,
    }
}

pub fn history_to_wire(h: &HistoryEntry) -> v1::HistoryEntry {
    v1::HistoryEntry {
        state: state_to_wire(h.state) as i32,
        by_agency: h.by.clone(),
        at_ms: h.at,
        note: h.note.clone(),
        cause_message_id: h.cause.clone(),
        sealed_note: sealed_note(&h.sealed_note),
        reason: h.reason,
    }
}

pub fn status_reply(referral: &Referral) -> v1::StatusReply {
    v1::StatusReply {
        referral_id: referral.id.clone(),
        state: state_to_wire(referral.state) as i32,
        from_agency: referral.from.clone(),
        to_agency: referral.to.clone(),
        history: referral.history.iter().map(history_to_wire).collect(),
        receive_by_ms: referral.receive_by,
        error: None,
        legal_basis: referral.basis.label(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derive_id("m1", 0), derive_id("m1", 0));
        assert_ne!(derive_id("m1", 0), derive_id("m1", 1));
        assert_ne!(derive_id("m1", 0), derive_id("m2", 0));
        // Pinned: other implementations (PROTOCOL.md) must derive the same value.
        assert_eq!(
            derive_id("m1", 0),
            Uuid::new_v5(&ID_NAMESPACE, b"m1/0").to_string()
        );
    }

    #[test]
    fn every_wire_status_maps() {
        assert_eq!(status_from_wire(0), None);
        assert_eq!(status_from_wire(99), None);
        assert_eq!(status_from_wire(-1), None);
        for s in 1..=6 {
            assert!(status_from_wire(s).is_some());
        }
        assert_eq!(urgency_from_wire(3), Some(Urgency::Crisis));
        assert_eq!(urgency_from_wire(4), None);
    }
}
