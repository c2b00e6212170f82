//! Yeongye's wire contract, generated from `proto/yeongye/v1/*.proto`.
//!
//! Every message on a `yeongye.*` subject is an [`v1::Envelope`] whose `payload` holds one of the
//! payload messages named by its `payload_type`. `docs/PROTOCOL.md` describes streams, subjects,
//! ids and ordering. Each type also implements serde in the canonical proto3 JSON mapping (via
//! pbjson), which the adapter's command line and HTTP API speak.
//!
//! # Layout
//! - `v1`: the generated types of package `yeongye.v1`.
//! - [`subject`]: the subject names, built and parsed in one place.
//! - [`signing`]: how envelopes are signed, key files, and the registry's key ring.
//! - [`credentials`]: NATS credentials files and private (0600) secret files.
//! - [`rules`]: protocol rules both sides check (ids, the receipt-deadline limit, the data
//!   categories client fields imply), written once.

pub mod credentials;
pub mod rules;
pub mod seal;
pub mod signing;
pub mod subject;

/// Package `yeongye.v1`.
#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/yeongye.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/yeongye.v1.serde.rs"));
}

/// The agency id the broker uses as the sender of what it publishes.
pub const BROKER_ID: &str = "broker";
