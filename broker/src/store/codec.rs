//! The on-disk encoding of store records: private protobuf messages (prost derives, no schema
//! file), converted to and from the domain types. Field numbers are forever, as on the wire.

use prost::Message;

use super::{DeadLetter, DeadLetterStatus, OperatorAction, OutboxEntry};
use crate::consent::{Basis, Consent, Purge, Revocation};
use crate::error::{Error, Result};
use crate::referral::{HistoryEntry, Referral, State, Urgency};
use crate::view::{AgencyQueue, Counts, Summary};

#[derive(Clone, PartialEq, Message)]
struct ReferralRecord {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    from: String,
    #[prost(string, tag = "3")]
    to: String,
    #[prost(uint32, tag = "4")]
    urgency: u32,
    #[prost(uint32, tag = "5")]
    state: u32,
    #[prost(int64, tag = "6")]
    created_at: i64,
    #[prost(int64, tag = "7")]
    receive_by: i64,
    #[prost(bytes = "vec", tag = "8")]
    envelope: Vec<u8>,
    #[prost(message, repeated, tag = "9")]
    history: Vec<HistoryRecord>,
    #[prost(int64, tag = "10")]
    accept_within: i64,
    #[prost(int64, tag = "11")]
    accept_by: i64,
    #[prost(bool, tag = "12")]
    overdue: bool,
    #[prost(string, tag = "13")]
    client: String,
    /// `consent:<id>` (consent) or the statute number with its justification.
    #[prost(string, tag = "14")]
    consent_id: String,
    #[prost(int32, tag = "15")]
    statute: i32,
    #[prost(string, tag = "16")]
    statute_name: String,
    #[prost(string, tag = "17")]
    justification: String,
    #[prost(int32, tag = "18")]
    purpose: i32,
    #[prost(int32, repeated, tag = "19")]
    categories: Vec<i32>,
}

/// What the operators' view needs of a referral (`v/<id>`), kept beside the full record so
/// that start-up reads a few dozen bytes per referral instead of the whole record.
#[derive(Clone, PartialEq, Message)]
struct SummaryRecord {
    #[prost(string, tag = "1")]
    from: String,
    #[prost(string, tag = "2")]
    to: String,
    #[prost(uint32, tag = "3")]
    state: u32,
    #[prost(int64, tag = "4")]
    created_at: i64,
    #[prost(bool, tag = "5")]
    overdue: bool,
}

/// The view's counters (`m/view-counts`).
#[derive(Clone, PartialEq, Message)]
struct CountsRecord {
    #[prost(message, repeated, tag = "1")]
    states: Vec<StateCount>,
    #[prost(message, repeated, tag = "2")]
    agencies: Vec<AgencyCount>,
}

#[derive(Clone, PartialEq, Message)]
struct StateCount {
    #[prost(uint32, tag = "1")]
    state: u32,
    #[prost(uint64, tag = "2")]
    n: u64,
}

#[derive(Clone, PartialEq, Message)]
struct AgencyCount {
    #[prost(string, tag = "1")]
    agency: String,
    #[prost(uint64, tag = "2")]
    sent: u64,
    #[prost(uint64, tag = "3")]
    awaiting_receipt: u64,
    #[prost(uint64, tag = "4")]
    awaiting_acceptance: u64,
    #[prost(uint64, tag = "5")]
    in_progress: u64,
    #[prost(uint64, tag = "6")]
    overdue: u64,
}

#[derive(Clone, PartialEq, Message)]
struct ConsentRecord {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    client: String,
    #[prost(string, tag = "3")]
    collected_by: String,
    #[prost(string, repeated, tag = "4")]
    recipient_agencies: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    recipient_kinds: Vec<String>,
    #[prost(int32, repeated, tag = "6")]
    purposes: Vec<i32>,
    #[prost(int32, repeated, tag = "7")]
    categories: Vec<i32>,
    #[prost(int64, tag = "8")]
    valid_from: i64,
    #[prost(int64, optional, tag = "9")]
    valid_until: Option<i64>,
    #[prost(string, tag = "10")]
    form_reference: String,
    #[prost(int64, tag = "11")]
    granted_at: i64,
    #[prost(int64, optional, tag = "12")]
    revoked_at: Option<i64>,
    #[prost(string, tag = "13")]
    revoked_by: String,
    #[prost(string, repeated, tag = "14")]
    referrals: Vec<String>,
    #[prost(message, repeated, tag = "15")]
    purges: Vec<PurgeRecord>,
}

#[derive(Clone, PartialEq, Message)]
struct PurgeRecord {
    #[prost(string, tag = "1")]
    referral_id: String,
    #[prost(string, tag = "2")]
    agency: String,
    #[prost(int64, tag = "3")]
    requested_at: i64,
    #[prost(int64, optional, tag = "4")]
    confirmed_at: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct HistoryRecord {
    #[prost(uint32, tag = "1")]
    state: u32,
    #[prost(string, tag = "2")]
    by: String,
    #[prost(int64, tag = "3")]
    at: i64,
    #[prost(string, tag = "4")]
    note: String,
    #[prost(string, tag = "5")]
    cause: String,
    #[prost(bytes = "vec", tag = "6")]
    sealed_note: Vec<u8>,
    #[prost(int32, tag = "7")]
    reason: i32,
}

#[derive(Clone, PartialEq, Message)]
struct OutboxRecord {
    #[prost(string, tag = "1")]
    subject: String,
    #[prost(string, tag = "2")]
    message_id: String,
    #[prost(bytes = "vec", tag = "3")]
    payload: Vec<u8>,
    #[prost(string, optional, tag = "4")]
    confirms: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct DeadLetterRecord {
    #[prost(string, tag = "1")]
    subject: String,
    #[prost(string, tag = "2")]
    message_id: String,
    #[prost(string, tag = "3")]
    sender: String,
    #[prost(string, tag = "4")]
    referral_id: String,
    #[prost(int32, tag = "5")]
    code: i32,
    #[prost(string, tag = "6")]
    detail: String,
    #[prost(int64, tag = "7")]
    at: i64,
    #[prost(bytes = "vec", tag = "8")]
    raw: Vec<u8>,
    /// 0 open, 1 replayed, 2 discarded.
    #[prost(uint32, tag = "9")]
    status: u32,
    #[prost(message, repeated, tag = "10")]
    actions: Vec<ActionRecord>,
}

#[derive(Clone, PartialEq, Message)]
struct ActionRecord {
    #[prost(string, tag = "1")]
    action: String,
    #[prost(string, tag = "2")]
    who: String,
    #[prost(string, tag = "3")]
    why: String,
    #[prost(int64, tag = "4")]
    at: i64,
    #[prost(string, tag = "5")]
    outcome: String,
}

fn state_code(s: State) -> u32 {
    // Stable numbers: never reorder (they are stored).
    match s {
        State::Submitted => 1,
        State::Delivered => 2,
        State::Received => 3,
        State::Accepted => 4,
        State::InProgress => 5,
        State::Completed => 6,
        State::Declined => 7,
        State::Cancelled => 8,
        State::Expired => 9,
        State::Refused => 10,
        State::Withdrawn => 11,
    }
}

fn state_from(code: u32) -> Option<State> {
    State::ALL.into_iter().find(|s| state_code(*s) == code)
}

fn urgency_code(u: Urgency) -> u32 {
    match u {
        Urgency::Routine => 1,
        Urgency::Priority => 2,
        Urgency::Crisis => 3,
    }
}

fn urgency_from(code: u32) -> Option<Urgency> {
    [Urgency::Routine, Urgency::Priority, Urgency::Crisis]
        .into_iter()
        .find(|u| urgency_code(*u) == code)
}

fn corrupt(key: &str, message: impl Into<String>) -> Error {
    Error::CorruptRecord {
        key: key.to_owned(),
        message: message.into(),
    }
}

pub(super) fn encode_referral(r: &Referral) -> Vec<u8> {
    encode_referral_with(r, true)
}

/// [`encode_referral`], its envelope left out unless `envelope` (the state log's record of a
/// referral its readers already hold: an envelope never changes once a referral exists).
pub(super) fn encode_referral_with(r: &Referral, envelope: bool) -> Vec<u8> {
    ReferralRecord {
        id: r.id.clone(),
        from: r.from.clone(),
        to: r.to.clone(),
        urgency: urgency_code(r.urgency),
        state: state_code(r.state),
        created_at: r.created_at,
        receive_by: r.receive_by,
        envelope: if envelope {
            r.envelope.clone()
        } else {
            Vec::new()
        },
        accept_within: r.accept_within,
        accept_by: r.accept_by,
        overdue: r.overdue,
        client: r.client.clone(),
        consent_id: r.basis.consent_id().unwrap_or_default().to_owned(),
        statute: match &r.basis {
            Basis::Statute { statute, .. } => *statute,
            Basis::Consent(_) => 0,
        },
        statute_name: match &r.basis {
            Basis::Statute { name, .. } => name.clone(),
            Basis::Consent(_) => String::new(),
        },
        justification: match &r.basis {
            Basis::Statute { justification, .. } => justification.clone(),
            Basis::Consent(_) => String::new(),
        },
        purpose: r.purpose,
        categories: r.categories.clone(),
        history: r
            .history
            .iter()
            .map(|h| HistoryRecord {
                state: state_code(h.state),
                by: h.by.clone(),
                at: h.at,
                note: h.note.clone(),
                cause: h.cause.clone(),
                sealed_note: h.sealed_note.clone(),
                reason: h.reason,
            })
            .collect(),
    }
    .encode_to_vec()
}

pub(super) fn decode_referral(key: &str, bytes: &[u8]) -> Result<Referral> {
    let r = ReferralRecord::decode(bytes).map_err(|e| corrupt(key, e.to_string()))?;
    let mut history = Vec::with_capacity(r.history.len());
    for h in r.history {
        history.push(HistoryEntry {
            state: state_from(h.state).ok_or_else(|| corrupt(key, "unknown history state"))?,
            by: h.by,
            at: h.at,
            note: h.note,
            cause: h.cause,
            sealed_note: h.sealed_note,
            reason: h.reason,
        });
    }
    Ok(Referral {
        id: r.id,
        from: r.from,
        to: r.to,
        urgency: urgency_from(r.urgency).ok_or_else(|| corrupt(key, "unknown urgency"))?,
        state: state_from(r.state).ok_or_else(|| corrupt(key, "unknown state"))?,
        created_at: r.created_at,
        receive_by: r.receive_by,
        accept_within: r.accept_within,
        accept_by: r.accept_by,
        overdue: r.overdue,
        basis: if r.statute != 0 {
            Basis::Statute {
                statute: r.statute,
                name: r.statute_name,
                justification: r.justification,
            }
        } else {
            Basis::Consent(r.consent_id)
        },
        client: r.client,
        purpose: r.purpose,
        categories: r.categories,
        envelope: r.envelope,
        history,
    })
}

pub(super) fn encode_summary(s: &Summary) -> Vec<u8> {
    SummaryRecord {
        from: s.from.clone(),
        to: s.to.clone(),
        state: state_code(s.state),
        created_at: s.created_at,
        overdue: s.overdue,
    }
    .encode_to_vec()
}

pub(super) fn decode_summary(id: &str, bytes: &[u8]) -> Result<Summary> {
    let key = || format!("v/{id}");
    let r = SummaryRecord::decode(bytes).map_err(|e| corrupt(&key(), e.to_string()))?;
    Ok(Summary {
        id: id.to_owned(),
        from: r.from,
        to: r.to,
        state: state_from(r.state).ok_or_else(|| corrupt(&key(), "unknown state"))?,
        created_at: r.created_at,
        overdue: r.overdue,
    })
}

pub(super) fn encode_counts(c: &Counts) -> Vec<u8> {
    CountsRecord {
        states: c
            .by_state
            .iter()
            .map(|(s, n)| StateCount {
                state: state_code(*s),
                n: *n,
            })
            .collect(),
        agencies: c
            .agencies
            .iter()
            .map(|(a, q)| AgencyCount {
                agency: a.clone(),
                sent: q.sent,
                awaiting_receipt: q.awaiting_receipt,
                awaiting_acceptance: q.awaiting_acceptance,
                in_progress: q.in_progress,
                overdue: q.overdue,
            })
            .collect(),
    }
    .encode_to_vec()
}

pub(super) fn decode_counts(bytes: &[u8]) -> Result<Counts> {
    const KEY: &str = "m/view-counts";
    let r = CountsRecord::decode(bytes).map_err(|e| corrupt(KEY, e.to_string()))?;
    let mut c = Counts::default();
    for s in r.states {
        let state = state_from(s.state).ok_or_else(|| corrupt(KEY, "unknown state"))?;
        c.by_state.insert(state, s.n);
    }
    for a in r.agencies {
        c.agencies.insert(
            a.agency,
            AgencyQueue {
                sent: a.sent,
                awaiting_receipt: a.awaiting_receipt,
                awaiting_acceptance: a.awaiting_acceptance,
                in_progress: a.in_progress,
                overdue: a.overdue,
                dead_letters: 0,
            },
        );
    }
    Ok(c)
}

pub(super) fn encode_outbox(e: &OutboxEntry) -> Vec<u8> {
    OutboxRecord {
        subject: e.subject.clone(),
        message_id: e.message_id.clone(),
        payload: e.payload.clone(),
        confirms: e.confirms.clone(),
    }
    .encode_to_vec()
}

pub(super) fn decode_outbox(key: u64, bytes: &[u8]) -> Result<OutboxEntry> {
    let r = OutboxRecord::decode(bytes)
        .map_err(|e| corrupt(&format!("outbox/{key}"), e.to_string()))?;
    Ok(OutboxEntry {
        key,
        subject: r.subject,
        message_id: r.message_id,
        payload: r.payload,
        confirms: r.confirms,
    })
}

pub(super) fn encode_dead_letter(d: &DeadLetter) -> Vec<u8> {
    DeadLetterRecord {
        subject: d.subject.clone(),
        message_id: d.message_id.clone(),
        sender: d.sender.clone(),
        referral_id: d.referral_id.clone(),
        code: d.code,
        detail: d.detail.clone(),
        at: d.at,
        raw: d.raw.clone(),
        status: match d.status {
            DeadLetterStatus::Open => 0,
            DeadLetterStatus::Replayed => 1,
            DeadLetterStatus::Discarded => 2,
        },
        actions: d
            .actions
            .iter()
            .map(|a| ActionRecord {
                action: a.action.clone(),
                who: a.who.clone(),
                why: a.why.clone(),
                at: a.at,
                outcome: a.outcome.clone(),
            })
            .collect(),
    }
    .encode_to_vec()
}

pub(super) fn decode_dead_letter(seq: u64, bytes: &[u8]) -> Result<DeadLetter> {
    let r = DeadLetterRecord::decode(bytes)
        .map_err(|e| corrupt(&format!("dead-letter/{seq}"), e.to_string()))?;
    Ok(DeadLetter {
        stream_seq: seq,
        subject: r.subject,
        message_id: r.message_id,
        sender: r.sender,
        referral_id: r.referral_id,
        code: r.code,
        detail: r.detail,
        at: r.at,
        raw: r.raw,
        status: match r.status {
            0 => DeadLetterStatus::Open,
            1 => DeadLetterStatus::Replayed,
            2 => DeadLetterStatus::Discarded,
            _ => return Err(corrupt(&format!("dead-letter/{seq}"), "unknown status")),
        },
        actions: r
            .actions
            .into_iter()
            .map(|a| OperatorAction {
                action: a.action,
                who: a.who,
                why: a.why,
                at: a.at,
                outcome: a.outcome,
            })
            .collect(),
    })
}

pub(super) fn encode_consent(c: &Consent) -> Vec<u8> {
    ConsentRecord {
        id: c.id.clone(),
        client: c.client.clone(),
        collected_by: c.collected_by.clone(),
        recipient_agencies: c.recipient_agencies.clone(),
        recipient_kinds: c.recipient_kinds.clone(),
        purposes: c.purposes.clone(),
        categories: c.categories.clone(),
        valid_from: c.valid_from,
        valid_until: c.valid_until,
        form_reference: c.form_reference.clone(),
        granted_at: c.granted_at,
        revoked_at: c.revoked.as_ref().map(|r| r.at),
        revoked_by: c.revoked.as_ref().map(|r| r.by.clone()).unwrap_or_default(),
        referrals: c.referrals.clone(),
        purges: c
            .purges
            .iter()
            .map(|p| PurgeRecord {
                referral_id: p.referral_id.clone(),
                agency: p.agency.clone(),
                requested_at: p.requested_at,
                confirmed_at: p.confirmed_at,
            })
            .collect(),
    }
    .encode_to_vec()
}

pub(super) fn decode_consent(key: &str, bytes: &[u8]) -> Result<Consent> {
    let r = ConsentRecord::decode(bytes).map_err(|e| corrupt(key, e.to_string()))?;
    Ok(Consent {
        id: r.id,
        client: r.client,
        collected_by: r.collected_by,
        recipient_agencies: r.recipient_agencies,
        recipient_kinds: r.recipient_kinds,
        purposes: r.purposes,
        categories: r.categories,
        valid_from: r.valid_from,
        valid_until: r.valid_until,
        form_reference: r.form_reference,
        granted_at: r.granted_at,
        revoked: r.revoked_at.map(|at| Revocation {
            at,
            by: r.revoked_by,
        }),
        referrals: r.referrals,
        purges: r
            .purges
            .into_iter()
            .map(|p| Purge {
                referral_id: p.referral_id,
                agency: p.agency,
                requested_at: p.requested_at,
                confirmed_at: p.confirmed_at,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_codes_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for s in State::ALL {
            assert_eq!(state_from(state_code(s)), Some(s));
            assert!(seen.insert(state_code(s)));
        }
        assert_eq!(state_from(0), None);
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        assert!(decode_referral("r/x", &[0xff, 0xff, 0xff]).is_err());
        // A valid record with an unknown state number.
        let bad = ReferralRecord {
            state: 99,
            urgency: 1,
            ..Default::default()
        }
        .encode_to_vec();
        assert!(decode_referral("r/x", &bad).is_err());
    }
}
