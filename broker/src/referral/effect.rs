//! What a transition asks the caller to do, and why a transition was refused.

use super::{Referral, State, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadlineKind {
    /// The recipient must acknowledge (RECEIVED) by the referral's `receive_by`, or the
    /// referral EXPIRES.
    Receipt,
    /// The recipient must accept or decline by the referral's `accept_by`, or the referral is
    /// marked overdue and escalated.
    Acceptance,
}

impl DeadlineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadlineKind::Receipt => "receipt",
            DeadlineKind::Acceptance => "acceptance",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Put the referral (its original envelope) in the recipient's queue.
    Deliver { to: String },
    /// Tell an agency that the referral is now in the transition's state (it was in `previous`).
    Notify { to: String, previous: State },
    /// Fire [`super::Event::DeadlinePassed`] at `at` unless unscheduled first.
    Schedule {
        kind: DeadlineKind,
        at: super::Millis,
    },
    /// Cancel the deadline scheduled for `at`.
    Unschedule {
        kind: DeadlineKind,
        at: super::Millis,
    },
    /// Tell the recipient the referral is withdrawn and its data must be purged — unless the
    /// delivery never left the broker, in which case the caller cancels the delivery instead.
    Withdraw { to: String },
    /// Tell the sender and the district's coordinator that a deadline passed.
    Escalate {
        kind: DeadlineKind,
        due: super::Millis,
    },
}

/// The outcome of a legal event: the referral as it now is, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub referral: Referral,
    pub effects: Vec<Effect>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the referral is {state}, a terminal state")]
    Terminal { state: State },
    #[error("{status:?} is not allowed from {from}")]
    Illegal { from: State, status: Status },
    #[error("agency {agency} may not set {status:?} on this referral")]
    NotAParty { agency: String, status: Status },
    /// Only a REFUSED referral can be replayed by an operator.
    #[error("only a REFUSED referral can be replayed; this one is {state}")]
    NotReplayable { state: State },
    /// A broker event that no longer applies (the referral moved on first). Not an error to
    /// report to anyone: the caller drops the event.
    #[error("the event no longer applies: the referral is {state}")]
    Superseded { state: State },
}
