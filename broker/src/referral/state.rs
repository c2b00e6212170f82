//! The states of a referral (see `docs/PROTOCOL.md` for the table of transitions).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Submitted,
    Delivered,
    Received,
    Accepted,
    InProgress,
    Completed,
    Declined,
    Cancelled,
    Expired,
    Refused,
    Withdrawn,
}

impl State {
    pub const ALL: [State; 11] = [
        State::Submitted,
        State::Delivered,
        State::Received,
        State::Accepted,
        State::InProgress,
        State::Completed,
        State::Declined,
        State::Cancelled,
        State::Expired,
        State::Refused,
        State::Withdrawn,
    ];

    /// A terminal state is final: no event changes it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Completed
                | State::Declined
                | State::Cancelled
                | State::Expired
                | State::Refused
                | State::Withdrawn
        )
    }

    /// The upper-case name used on the wire and in operator output.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Submitted => "SUBMITTED",
            State::Delivered => "DELIVERED",
            State::Received => "RECEIVED",
            State::Accepted => "ACCEPTED",
            State::InProgress => "IN_PROGRESS",
            State::Completed => "COMPLETED",
            State::Declined => "DECLINED",
            State::Cancelled => "CANCELLED",
            State::Expired => "EXPIRED",
            State::Refused => "REFUSED",
            State::Withdrawn => "WITHDRAWN",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
