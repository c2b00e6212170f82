//! The Yeongye agency adapter: the Rust SDK through which an agency system sends referrals,
//! reports their progress, and receives what the referral broker sends it, over NATS
//! JetStream as `docs/PROTOCOL.md` specifies.
//!
//! ```no_run
//! # async fn demo() -> yeongye_adapter::Result<()> {
//! use yeongye_adapter::{Adapter, AdapterConfig, ItemKind, v1};
//!
//! let cfg = AdapterConfig::new("cc-haengbok1", ["nats://127.0.0.1:4222"], "/var/lib/yeongye/cc");
//! let adapter = Adapter::connect(cfg).await?;
//! let referral_id = adapter
//!     .send(v1::Referral {
//!         to_agency: "hope-support".into(),
//!         client: Some(v1::Client { pseudonym_id: "p-7f3a".into(), ..Default::default() }),
//!         field: v1::FieldOfNeed::Housing as i32,
//!         urgency: v1::Urgency::Crisis as i32,
//!         purpose: v1::Purpose::CaseManagement as i32,
//!         legal_basis: Some(v1::referral::LegalBasis::ConsentId("consent-1".into())),
//!         ..Default::default()
//!     })
//!     .await?;
//!
//! let mut incoming = adapter.incoming().await?;
//! while let Some(item) = incoming.next().await {
//!     let item = item?;
//!     if let ItemKind::Delivery { referral, .. } = item.kind() {
//!         // hand `referral` to the agency system durably, then:
//!     }
//!     item.done().await?;
//! }
//! # let _ = referral_id;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`config`]: [`AdapterConfig`], from TOML and `YEONGYE_*` environment overrides; its
//!   `[http]` section is [`HttpConfig`] (`config/http.rs`).
//! - [`client`]: [`Adapter`] (connect, send, update status, status and consent queries, grant
//!   and revoke consents, confirm purges), the retrying JetStream publish path
//!   (`client/publish.rs`) and request/reply with the broker (`client/query.rs`).
//! - `outgoing`: referrals, status updates, consents and purge confirmations checked and wrapped
//!   in envelopes ([`Outgoing`]); `outgoing/consent.rs` holds the consent messages.
//! - [`incoming`]: [`Incoming`] and [`Item`], the agency's consumer with exactly-once effect;
//!   `incoming/decode.rs` checks and decodes what arrives.
//! - `storage`: the adapter's one sled store — handled message ids, the HTTP bridge's queue
//!   and idempotency keys — committing in groups (one flush for every write that is ready);
//!   nothing else names sled.
//! - `outbox`: the durable outbox ([`Sent`], [`OutboxStatus`]): what the hub did not
//!   acknowledge in time waits in the store and is forwarded in order, one at a time, under
//!   its message id.
//! - [`inbox`]: [`FolderInbox`], crash-safe no-replace handoff of items to a folder.
//! - [`http`]: the local HTTP/JSON API (`agency-adapter serve`): handlers, problem documents,
//!   idempotency keys, the durable webhook/pull queue and its worker.
//! - [`json`]: referrals in proto3 JSON, with limits.
//! - [`ids`]: fresh (UUIDv7) and derived (UUIDv5) ids.
//! - [`log_filter`]: the binary's `tracing` filter (`RUST_LOG`, the NATS client capped).
//! - [`error`]: [`Error`], [`ErrorKind`], [`Result`].
//! - `src/bin/agency-adapter.rs`: the command-line adapter built on all of the above.
//!
//! Personal data (client name, birth date, phone, address, household, notes) is never logged:
//! logs, errors and `Debug` output carry ids only, and an id from the wire only once it is
//! well-formed. Secret files (credentials, signing key, token, webhook secret) are refused when
//! others than their owner may read them (`yeongye_proto::credentials::check_private`).

mod backoff;
pub mod client;
pub mod config;
pub mod error;
pub mod http;
pub mod ids;
pub mod inbox;
pub mod incoming;
mod item;
pub mod json;
mod outbox;
/// The binary's `tracing` filter (crate `yeongye-log`, shared with the broker).
pub use yeongye_log as log_filter;
mod outgoing;
pub mod sealing;
mod storage;

pub use client::{Adapter, AdapterBuilder};
pub use config::{AdapterConfig, HttpConfig, OutboxConfig};
pub use error::{Error, ErrorKind, FieldIssue, Result};
pub use inbox::{FolderInbox, Handoff};
pub use incoming::Incoming;
pub use item::{Item, ItemKind};
pub use outbox::{CorruptRecord, OutboxStatus, Sent, report as outbox_report};
pub use outgoing::{MAX_NOTE_CHARS, MAX_REFERRAL_ID_LEN, Outgoing, is_valid_id};
pub use sealing::Sealing;
pub use yeongye_proto::v1;
