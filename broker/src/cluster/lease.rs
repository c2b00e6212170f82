//! Leadership by a lease in the JetStream KV bucket `YEONGYE_LEADER`: one key, `leader`, whose
//! value is the holder's name. Taken by create-if-absent, renewed by update-with-revision well
//! inside its time to live (the bucket's `max_age`: a key not renewed vanishes), given back by
//! a delete expecting the holder's revision. The revision that took it is the leader's *term*.
//!
//! The lease decides who *tries* to lead; it never makes writing safe — clocks and pauses lie.
//! What stops a deposed leader is the state log's fence (`log.rs`).

use std::time::Duration;

use async_nats::jetstream::{self, kv};

use crate::error::{Error, Result};

pub const LEASE_BUCKET: &str = "YEONGYE_LEADER";
const KEY: &str = "leader";

/// The bucket, for one broker.
#[derive(Clone)]
pub struct Leases {
    kv: kv::Store,
    me: String,
}

/// A lease held: its last revision and the term it began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub revision: u64,
    pub term: u64,
}

/// Why a renewal failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Someone else holds it now, or it expired: stop leading.
    Lost,
    /// JetStream did not answer: try again (the fence keeps writing safe meanwhile).
    Unavailable(String),
}

impl Leases {
    /// Creates or updates the bucket (`ttl`: how long a lease outlives its last renewal).
    pub async fn open(
        js: &jetstream::Context,
        me: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Leases> {
        // The bucket's stream, made directly: the KV client's own create reads the account's
        // info first (`$JS.API.INFO`), which the broker's NATS user is not given.
        let stream = format!("KV_{LEASE_BUCKET}");
        js.create_or_update_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("$KV.{LEASE_BUCKET}.>")],
            max_messages_per_subject: 1,
            max_age: ttl,
            // A repeat is recognised only within the age limit (the KV client's own choice).
            duplicate_window: ttl,
            discard: jetstream::stream::DiscardPolicy::New,
            deny_delete: true,
            allow_rollup: true,
            allow_direct: true,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Nats(format!("bucket {LEASE_BUCKET}: {e}")))?;
        let kv = js
            .get_key_value(LEASE_BUCKET)
            .await
            .map_err(|e| Error::Nats(format!("bucket {LEASE_BUCKET}: {e}")))?;
        Ok(Leases {
            kv,
            me: me.to_owned(),
        })
    }

    /// Takes the lease if no one holds it.
    pub async fn try_take(&self) -> Option<Lease> {
        match self.kv.create(KEY, self.me.clone().into()).await {
            Ok(revision) => Some(Lease {
                revision,
                term: revision,
            }),
            Err(e) => {
                if e.kind() != kv::CreateErrorKind::AlreadyExists {
                    tracing::debug!(cause = %e, "taking the lease");
                }
                None
            }
        }
    }

    pub async fn renew(&self, lease: &mut Lease) -> std::result::Result<(), Renewal> {
        match self
            .kv
            .update(KEY, self.me.clone().into(), lease.revision)
            .await
        {
            Ok(revision) => {
                lease.revision = revision;
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(Renewal::Lost),
            Err(e) => Err(Renewal::Unavailable(e.to_string())),
        }
    }

    /// Gives the lease back (graceful stop, step-down), so that a standby takes it at once
    /// rather than after it expires.
    pub async fn release(&self, lease: Lease) {
        match self
            .kv
            .delete_expect_revision(KEY, Some(lease.revision))
            .await
        {
            Ok(()) => tracing::info!(term = lease.term, "gave the lease back"),
            Err(e) => tracing::warn!(cause = %e, "giving the lease back; it expires instead"),
        }
    }

    /// Who holds the lease, if anyone.
    pub async fn holder(&self) -> Option<String> {
        match self.kv.get(KEY).await {
            Ok(Some(v)) if !v.is_empty() => Some(String::from_utf8_lossy(&v).into_owned()),
            _ => None,
        }
    }
}
