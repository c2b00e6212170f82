//! Dead letters: messages the broker could not apply, kept whole for operators with what they
//! did about them. Domain records: the store keeps them, the view counts them.

use crate::referral::Millis;

/// A message the broker could not apply, kept for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The inbound stream sequence: unique, and orders dead letters by arrival.
    pub stream_seq: u64,
    pub subject: String,
    pub message_id: String,
    pub sender: String,
    pub referral_id: String,
    /// The wire reason code (`yeongye.v1.ReasonCode` number).
    pub code: i32,
    pub detail: String,
    pub at: Millis,
    /// The message as received (up to the size limit).
    pub raw: Vec<u8>,
    pub status: DeadLetterStatus,
    /// What operators did with it.
    pub actions: Vec<OperatorAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterStatus {
    Open,
    Replayed,
    Discarded,
}

impl DeadLetterStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Open => "open",
            DeadLetterStatus::Replayed => "replayed",
            DeadLetterStatus::Discarded => "discarded",
        }
    }
}

/// One operator action on a dead letter: who, why, when, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorAction {
    pub action: String,
    pub who: String,
    pub why: String,
    pub at: Millis,
    pub outcome: String,
}
