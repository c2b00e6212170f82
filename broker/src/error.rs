//! The broker library's error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("registry {path}: {message}")]
    Registry { path: PathBuf, message: String },
    #[error("store: {0}")]
    Store(#[from] sled::Error),
    /// Reopening the store (for sled's recovery snapshot) failed: nothing can be read or
    /// written until the broker is restarted (the cause was logged).
    #[error("store: closed after a failed reopen")]
    StoreClosed,
    #[error("store record {key} is corrupt: {message}")]
    CorruptRecord { key: String, message: String },
    #[error("nats: {0}")]
    Nats(String),
    /// The state log refused an append: another broker wrote since this one's position. This
    /// broker must stop leading (it publishes and acknowledges nothing of the refused change).
    #[error("state log append fenced (expected last sequence {expected}): {detail}")]
    Fenced { expected: u64, detail: String },
    /// The state log went on past records this broker had not read (trimmed behind a
    /// snapshot while it was not reading: paused, or cut off, for long). Its store cannot catch
    /// up by reading; started again, it starts from the newest snapshot.
    #[error(
        "the state log goes on at {next} but this broker had read only to {read}: the records \
         between were trimmed behind a snapshot while it was not reading; start it again \
         (its store is moved aside and it starts from the newest snapshot)"
    )]
    BehindTheLog { read: u64, next: u64 },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// An onboarding command (`init`, `agency add|remove|rotate-key`) was refused: bad input,
    /// an agency already (or not) registered, an uninitialised registry, a file in the way.
    #[error("{0}")]
    Onboard(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// A NATS credentials file is unreadable, malformed or unwritable (never holds the password).
    #[error(transparent)]
    Credentials(#[from] yeongye_proto::credentials::CredentialsError),
    #[error("signing key: {0}")]
    Key(#[from] yeongye_proto::signing::KeyError),
}

impl Error {
    pub(crate) fn nats(e: impl std::fmt::Display) -> Error {
        Error::Nats(e.to_string())
    }
}
