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
    #[error("store record {key} is corrupt: {message}")]
    CorruptRecord { key: String, message: String },
    #[error("nats: {0}")]
    Nats(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn nats(e: impl std::fmt::Display) -> Error {
        Error::Nats(e.to_string())
    }
}
