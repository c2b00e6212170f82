//! The adapter's one error type, [`Error`], and its stable classification, [`ErrorKind`].
//!
//! Messages name what went wrong and, where it helps, what to do; they never carry personal
//! data (only ids, subjects, paths and causes).

use std::path::PathBuf;
use std::time::Duration;

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

    /// The dedup store failed.
    #[error("dedup store at {path:?}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },

    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
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
}

impl Error {
    /// This error's classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::Config,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::Connect { .. } => ErrorKind::Connect,
            Error::Publish { .. } => ErrorKind::Publish,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Request { .. } => ErrorKind::Request,
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::Consumer { .. } => ErrorKind::Consumer,
            Error::Ack { .. } => ErrorKind::Ack,
            Error::StateDirInUse { .. } | Error::Store { .. } => ErrorKind::Store,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    /// True when the caller's input was at fault (configuration or message): retrying the
    /// same thing cannot succeed.
    pub fn is_input_error(&self) -> bool {
        matches!(self.kind(), ErrorKind::Config | ErrorKind::InvalidInput)
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
    }
}
