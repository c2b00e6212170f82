//! What happens to a referral ([`Event`]) and the record the broker keeps of it ([`Referral`]).

use super::{DeadlineKind, Millis, State};
use crate::consent::Basis;

/// What an agency says about a referral in a status update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Received,
    Accepted,
    Declined,
    InProgress,
    Completed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Received,
        Status::Accepted,
        Status::Declined,
        Status::InProgress,
        Status::Completed,
        Status::Cancelled,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Urgency {
    Routine,
    Priority,
    Crisis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The broker's delivery to the recipient's queue was acknowledged by the stream.
    DeliveryConfirmed,
    /// A deadline passed (fired by the broker's timer, which reads the clock).
    DeadlinePassed(DeadlineKind),
    /// An agency's status update.
    Status {
        by: String,
        status: Status,
        note: String,
    },
    /// The consent the referral cites was revoked.
    ConsentRevoked,
}

/// A referral that passed the broker's checks, about to enter the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReferral {
    pub id: String,
    pub from: String,
    /// The sender's kind in the registry: a consent may cover it by kind, which makes the sender
    /// a party that may cite the consent.
    pub from_kind: String,
    pub to: String,
    /// The recipient's kind in the registry (what a consent may name instead of the agency).
    pub to_kind: String,
    /// The client's pseudonymous id.
    pub client: String,
    pub basis: Basis,
    /// `yeongye.v1.Purpose` number.
    pub purpose: i32,
    /// `yeongye.v1.DataCategory` numbers the referral carries.
    pub categories: Vec<i32>,
    pub urgency: Urgency,
    pub receive_by: Millis,
    /// How long the recipient has, once it has RECEIVED the referral, to accept or decline.
    pub accept_within: Millis,
    /// The sender's envelope, exactly as received: delivered unchanged to the recipient.
    pub envelope: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub state: State,
    /// The agency whose message caused the change, or `broker`.
    pub by: String,
    pub at: Millis,
    pub note: String,
    /// The id of the message that caused the change; empty for the broker's own events.
    pub cause: String,
    /// The party's note sealed to the other party (an encoded `v1::Sealed`, relayed unopened:
    /// the broker cannot read it); empty: none.
    pub sealed_note: Vec<u8>,
    /// The status update's `ReasonCode` number (a recipient's adapter declining a referral it
    /// could not open, say); 0: none.
    pub reason: i32,
}

/// The broker's record of one referral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referral {
    pub id: String,
    pub from: String,
    pub to: String,
    pub client: String,
    pub basis: Basis,
    pub purpose: i32,
    pub categories: Vec<i32>,
    pub urgency: Urgency,
    pub state: State,
    pub created_at: Millis,
    pub receive_by: Millis,
    pub accept_within: Millis,
    /// Set when RECEIVED: `at + accept_within`.
    pub accept_by: Millis,
    /// A deadline passed while the referral waited on its recipient; cleared when the
    /// recipient acts.
    pub overdue: bool,
    pub envelope: Vec<u8>,
    pub history: Vec<HistoryEntry>,
}
