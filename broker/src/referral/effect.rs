//! What a transition asks the caller to do, and why a transition was refused.

use super::{Referral, State, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadlineKind {
    /// The recipient must acknowledge (RECEIVED) by the referral's `receive_by`.
    Receipt,
}

impl DeadlineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadlineKind::Receipt => "receipt",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Put the referral (its original envelope) in the recipient's queue.
    Deliver {
        to: String,
    },
    /// Tell an agency that the referral is now in the transition's state (it was in `previous`).
    Notify {
        to: String,
        previous: State,
    },
    /// Fire [`super::Event::DeadlinePassed`] at `at` unless unscheduled first.
    Schedule {
        kind: DeadlineKind,
        at: super::Millis,
    },
    Unschedule {
        kind: DeadlineKind,
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
    /// A broker event that no longer applies (the referral moved on first). Not an error to
    /// report to anyone: the caller drops the event.
    #[error("the event no longer applies: the referral is {state}")]
    Superseded { state: State },
}
