//! The queue's worker: publishes the follow-ups of items the agency system has taken, and in
//! webhook mode pushes pending items to the webhook in order, retrying with exponential backoff
//! (from 1 s, doubling, up to `webhook_max_backoff_secs`, with jitter: `crate::backoff`) until a 2xx. It also prunes old
//! idempotency keys. One task; it sleeps until woken (a new item, an ack) or a timer fires.
//!
//! Delivery is in order and head-of-line: while the endpoint fails, nothing behind the first
//! item is pushed (the agency system sees items in the order the broker sent them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::backend::Backend;
use super::idempotency::IdempotencyStore;
use super::queue::{Entry, FollowUp, Queue};
use super::webhook::Webhook;
use crate::backoff::Backoff;
use crate::error::Result;
use crate::ids;
use crate::outgoing;

/// How often idempotency keys are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The first wait before a retry (webhook or follow-up); they double from there.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between retries of a follow-up publish.
const FOLLOW_UP_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long the worker sleeps when there is nothing to do (it is woken earlier by new work).
const IDLE: Duration = Duration::from_secs(30);

/// What the worker works with.
pub(crate) struct Worker<B> {
    pub(crate) backend: B,
    pub(crate) queue: Queue,
    pub(crate) idem: IdempotencyStore,
    pub(crate) idempotency_retention_ms: i64,
    pub(crate) webhook: Option<Webhook>,
    pub(crate) max_backoff: Duration,
    pub(crate) wake: Arc<Notify>,
}

impl<B: Backend> Worker<B> {
    /// Runs until `cancel`.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let mut hook_backoff = Backoff::new(FIRST_RETRY, self.max_backoff);
        let mut follow_backoff = Backoff::new(FIRST_RETRY, FOLLOW_UP_MAX_BACKOFF);
        let mut attempts = 0u32;
        let mut last_prune: Option<Instant> = None;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                last_prune = Some(Instant::now());
                let cutoff = ids::now_ms().saturating_sub(self.idempotency_retention_ms);
                match self.idem.prune(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => info!(removed = n, "pruned old idempotency keys"),
                    Err(e) => warn!(cause = %e, "pruning idempotency keys failed"),
                }
            }
            if let Err(e) = finish_all(&self.backend, &self.queue).await {
                let wait = follow_backoff.next_wait();
                warn!(cause = %e, retry_in_ms = millis(wait), "follow-up not published; retrying");
                if sleep_or_cancel(wait, &cancel).await {
                    return;
                }
                continue;
            }
            follow_backoff.reset();
            if let Some(hook) = &self.webhook {
                match self.push_first(hook).await {
                    Push::Delivered => {
                        hook_backoff.reset();
                        attempts = 0;
                        continue;
                    }
                    Push::Failed => {
                        attempts += 1;
                        let wait = hook_backoff.next_wait();
                        info!(
                            attempts,
                            retry_in_ms = millis(wait),
                            "webhook retry scheduled"
                        );
                        if sleep_or_cancel(wait, &cancel).await {
                            return;
                        }
                        continue;
                    }
                    Push::Empty => {}
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(IDLE) => {}
            }
        }
    }

    /// Posts the oldest pending item to the webhook.
    async fn push_first(&self, hook: &Webhook) -> Push {
        let first = match self.queue.pending(1).await {
            Ok(mut v) => v.pop(),
            Err(e) => {
                error!(cause = %e, "cannot read the queue");
                return Push::Failed;
            }
        };
        let Some((seq, entry)) = first else {
            return Push::Empty;
        };
        let body = match serde_json::to_vec(&entry.document()) {
            Ok(b) => b,
            Err(e) => {
                error!(message_id = %entry.message_id, cause = %e, "cannot render the webhook body");
                return Push::Failed;
            }
        };
        match hook.post(&entry.message_id, &entry.kind, body).await {
            Ok(status) if status.is_success() => {
                info!(
                    message_id = %entry.message_id,
                    kind = %entry.kind,
                    referral_id = entry.referral_id.as_deref().unwrap_or(""),
                    status = status.as_u16(),
                    "webhook delivered"
                );
                match self.queue.take_seq(seq).await {
                    Ok(_) => Push::Delivered,
                    Err(e) => {
                        error!(message_id = %entry.message_id, cause = %e, "cannot mark the item delivered; it will be posted again");
                        Push::Failed
                    }
                }
            }
            Ok(status) => {
                warn!(
                    message_id = %entry.message_id,
                    status = status.as_u16(),
                    "webhook answered without 2xx; the item stays queued"
                );
                Push::Failed
            }
            Err(cause) => {
                warn!(message_id = %entry.message_id, %cause, "webhook failed; the item stays queued");
                Push::Failed
            }
        }
    }
}

enum Push {
    Delivered,
    Failed,
    Empty,
}

/// Publishes the follow-up of every taken item and removes it from the queue. Stops at the
/// first failure (the rest wait for the next round).
pub(crate) async fn finish_all<B: Backend>(backend: &B, queue: &Queue) -> Result<usize> {
    let mut done = 0;
    for (seq, entry) in queue.finishing().await? {
        let id = follow_up(backend, &entry).await?;
        queue.finish(seq, &entry, &id).await?;
        done += 1;
    }
    Ok(done)
}

/// Publishes an entry's follow-up; returns its (derived) message id.
async fn follow_up<B: Backend>(backend: &B, entry: &Entry) -> Result<String> {
    let out = match &entry.follow_up {
        Some(FollowUp::Receipt { referral_id }) => {
            outgoing::receipt(backend.agency(), &entry.message_id, referral_id)
        }
        Some(FollowUp::PurgeConfirmation {
            referral_id,
            consent_id,
        }) => match outgoing::purge_confirmation(
            backend.agency(),
            referral_id,
            consent_id,
            Some(&entry.message_id),
        ) {
            Ok(out) => out,
            Err(e) => {
                // The broker sent ids that cannot be confirmed: nothing to publish.
                error!(message_id = %entry.message_id, cause = %e, "withdrawal with unusable ids; no purge confirmation sent");
                return Ok(ids::purge_message_id(&entry.message_id));
            }
        },
        None => return Ok(String::new()),
    };
    backend.publish(&out).await?;
    debug!(
        message_id = %entry.message_id,
        follow_up_message_id = out.message_id(),
        "follow-up published"
    );
    Ok(out.message_id().to_owned())
}

/// Sleeps `wait`; true if cancelled meanwhile.
async fn sleep_or_cancel(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
