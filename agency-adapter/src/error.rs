//! The adapter's one error type, [`Error`], and its stable classification, [`ErrorKind`].
//!
//! Messages name what went wrong and, where it helps, what to do; they never carry personal
//! data (only ids, subjects, paths and causes).

use std::path::PathBuf;
use std::time::Duration;

/// The store's own error, as [`Error::Store`] carries it.
pub use crate::storage::StoreError;

/// What can go wrong in the adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unreadable or invalid.
    #[error("configuration: {0}")]
    Config(String),

    /// A referral, status update or JSON document given to the adapter is not acceptable.
    /// Nothing was sent.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// One field of a message given to the adapter is missing or invalid. Nothing was sent.
    /// `field` is the field's path in the protobuf message, snake_case (`client.pseudonym_id`);
    /// `detail` says what is wrong, never with personal data.
    #[error("invalid input: {field} {detail}")]
    InvalidField {
        field: String,
        issue: FieldIssue,
        detail: String,
    },

    /// No NATS server could be reached.
    #[error("could not connect to NATS at {urls}: {source}")]
    Connect {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },

    /// A JetStream publish was not acknowledged within the retry budget (or failed for good).
    /// The message may or may not be stored: publishing it again with the same message id is safe.
    #[error(
        "publish of message {message_id} to {subject} not acknowledged after {attempts} attempt(s) in {elapsed:?}: {source}"
    )]
    Publish {
        subject: String,
        message_id: String,
        attempts: u32,
        elapsed: Duration,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },

    /// No reply to a request in time.
    #[error("no reply on {subject} within {timeout:?}: is the broker running?")]
    Timeout { subject: String, timeout: Duration },

    /// A core NATS request failed (other than by timing out).
    #[error("request on {subject} failed: {detail}")]
    Request { subject: String, detail: String },

    /// The broker answered with something that does not follow the protocol.
    #[error("unexpected reply from the broker: {0}")]
    Protocol(String),

    /// The agency's consumer could not be bound or read.
    #[error("consumer {consumer} on stream {stream}: {detail}")]
    Consumer {
        stream: String,
        consumer: String,
        detail: String,
    },

    /// Acknowledging a JetStream message failed. The item was handled and recorded: when the
    /// message is delivered again it is recognised and skipped.
    #[error("acknowledging message {message_id} failed: {detail}")]
    Ack { message_id: String, detail: String },

    /// Another process holds the dedup store of this state directory.
    #[error(
        "state directory {path:?} is in use by another adapter process (only one `run` per agency state_dir)"
    )]
    StateDirInUse { path: PathBuf },

    /// The adapter's store (handled ids, the HTTP bridge's queue and keys) failed.
    #[error("dedup store at {path:?}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },

    /// The outbox holds its configured maximum (`[outbox]` `max_entries` / `max_bytes`):
    /// nothing was accepted (and nothing queued is ever dropped). It empties as soon as the
    /// hub is reachable again.
    #[error(
        "the outbox is full ({entries} messages, {bytes} bytes; at most {max_entries} / {max_bytes}): the hub has been unreachable for a while; nothing was accepted, retry later"
    )]
    OutboxFull {
        entries: u64,
        bytes: u64,
        max_entries: u64,
        max_bytes: u64,
    },

    /// A status note is sealed to the referral's other party, whom only the broker can name
    /// (a status query): it cannot be queued while the hub is unreachable. Nothing was sent.
    #[error(
        "a note is sealed to the referral's other party, whom the broker names, and the broker cannot be asked now ({source}): send the status without a note, or retry later"
    )]
    NoteNeedsBroker {
        #[source]
        source: Box<Error>,
    },

    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a field of [`Error::InvalidField`] is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FieldIssue {
    /// A required field is absent or empty.
    Missing,
    /// The field is present but its value is not acceptable.
    Invalid,
}

/// A stable, matchable classification of [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    Config,
    InvalidInput,
    Connect,
    Publish,
    Timeout,
    Request,
    Protocol,
    Consumer,
    Ack,
    Store,
    Io,
    /// The outbox is at its configured maximum.
    OutboxFull,
}

impl Error {
    /// This error's classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::Config,
            Error::InvalidInput(_) | Error::InvalidField { .. } => ErrorKind::InvalidInput,
            Error::Connect { .. } => ErrorKind::Connect,
            Error::Publish { .. } => ErrorKind::Publish,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Request { .. } => ErrorKind::Request,
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::Consumer { .. } => ErrorKind::Consumer,
            Error::Ack { .. } => ErrorKind::Ack,
            Error::StateDirInUse { .. } | Error::Store { .. } => ErrorKind::Store,
            Error::Io { .. } => ErrorKind::Io,
            Error::OutboxFull { .. } => ErrorKind::OutboxFull,
            Error::NoteNeedsBroker { .. } => ErrorKind::Timeout,
        }
    }

    /// True when the caller's input was at fault (configuration or message): retrying the
    /// same thing cannot succeed.
    pub fn is_input_error(&self) -> bool {
        matches!(self.kind(), ErrorKind::Config | ErrorKind::InvalidInput)
    }

    /// A required field is missing.
    pub(crate) fn missing(field: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::InvalidField {
            field: field.into(),
            issue: FieldIssue::Missing,
            detail: detail.into(),
        }
    }

    /// A field has a value that is not acceptable.
    pub(crate) fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::InvalidField {
            field: field.into(),
            issue: FieldIssue::Invalid,
            detail: detail.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The adapter's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(Error::Config("x".into()).kind(), ErrorKind::Config);
        assert!(Error::InvalidInput("x".into()).is_input_error());
        let e = Error::StateDirInUse {
            path: PathBuf::from("/tmp/x"),
        };
        assert_eq!(e.kind(), ErrorKind::Store);
        assert!(!e.is_input_error());
        assert!(e.to_string().contains("in use"));
        let e = Error::missing("client.pseudonym_id", "is required");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.is_input_error());
        assert_eq!(
            e.to_string(),
            "invalid input: client.pseudonym_id is required"
        );
    }
}
