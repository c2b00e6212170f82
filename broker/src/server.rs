//! The broker's event loop: one task that owns every write.
//!
//! Each turn: take a batch of inbound messages (and the broker's own events: delivery
//! confirmations from the last turn, due deadlines) → [`batch::Batch`] decides → one store
//! commit, flushed → publish the new outbox entries, PubAcks in flight together → acknowledge
//! the inbound messages. A crash anywhere is repaired on restart: the outbox is published again
//! (same message ids, so repeats are dropped downstream) and unacknowledged inbound messages are
//! redelivered and recognised by their dedup key.

pub mod batch;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ingest::{self, Limits};
use crate::nats;
use crate::ops::Ops;
use crate::referral::Millis;
use crate::registry::Registry;
use crate::store::{DeadLetter, DeadLetterStatus};
use crate::store::{OutboxEntry, Store};
use batch::{Batch, Outcome};

/// How often the loop wakes with nothing to read, to fire deadlines.
const TICK: Duration = Duration::from_millis(250);
/// Publishes in flight at once.
const PUBLISH_WINDOW: usize = 512;
/// How often applied message ids older than the retention are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub struct EventLoop {
    pub store: Arc<dyn Store>,
    pub ops: Arc<Ops>,
    pub js: jetstream::Context,
    pub cfg: Arc<Config>,
    /// The broker's signing key, if configured.
    pub signer: Option<Arc<yeongye_proto::signing::PrivateKey>>,
}

/// What operators ask of the event loop (the only writer).
pub enum Command {
    DeadLetter {
        seq: u64,
        action: DeadLetterAction,
        who: String,
        why: String,
        reply: oneshot::Sender<Result<DeadLetter, String>>,
    },
    /// Read the registry file again (after an agency was added) and create new agencies'
    /// consumers.
    ReloadRegistry {
        reply: oneshot::Sender<Result<usize, String>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    Replay,
    Discard,
}

struct Pending {
    /// Outbox entries not yet acknowledged by the stream, in key order.
    outbox: VecDeque<OutboxEntry>,
    /// Outbox keys whose PubAck was seen: removed by the next commit.
    sent: Vec<u64>,
    /// Deliveries the stream acknowledged: `DELIVERED` in the next batch.
    confirmed: Vec<(String, Millis)>,
}

type Messages = async_nats::jetstream::consumer::pull::Stream;

impl EventLoop {
    pub async fn run(
        self,
        consumer: PullConsumer,
        mut commands: mpsc::Receiver<Command>,
        token: CancellationToken,
    ) -> Result<()> {
        let mut pending = Pending {
            outbox: self.store.outbox()?.into(),
            sent: Vec::new(),
            confirmed: Vec::new(),
        };
        if !pending.outbox.is_empty() {
            tracing::info!(
                entries = pending.outbox.len(),
                "publishing the outbox left from before"
            );
        }
        self.publish(&mut pending).await;

        let mut messages = self.messages(&consumer).await?;
        let mut caught_up = false;
        let mut last_prune = Instant::now() - PRUNE_EVERY;
        loop {
            let idle = pending.sent.is_empty() && pending.confirmed.is_empty();
            let wait = if idle { TICK } else { Duration::ZERO };
            let first = tokio::select! {
                _ = token.cancelled() => break,
                Some(cmd) = commands.recv() => {
                    self.command(cmd, &mut pending).await?;
                    continue;
                }
                m = messages.next() => Some(m),
                _ = tokio::time::sleep(wait) => None,
            };
            let mut inbound = Vec::new();
            match first {
                Some(Some(Ok(m))) => inbound.push(m),
                Some(Some(Err(e))) => tracing::warn!(cause = %e, "reading the inbound stream"),
                Some(None) => {
                    tracing::warn!("inbound message stream ended; reopening");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    messages = self.messages(&consumer).await?;
                }
                None => caught_up = true,
            }
            while inbound.len() < self.cfg.batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => inbound.push(m),
                    Some(Some(Err(e))) => tracing::warn!(cause = %e, "reading the inbound stream"),
                    _ => break,
                }
            }
            if let Some(last) = inbound.last() {
                let backlog = last.info().map(|i| i.pending).unwrap_or(u64::MAX);
                self.ops.backlog.store(backlog, Ordering::Relaxed);
                caught_up = backlog == 0;
            } else if caught_up {
                self.ops.backlog.store(0, Ordering::Relaxed);
            }

            self.turn(&inbound, &mut pending, caught_up)?;
            let all_published = self.publish(&mut pending).await;
            if all_published {
                for m in &inbound {
                    if let Err(e) = m.ack().await {
                        tracing::warn!(cause = %e, "ack failed; the message will be redelivered and deduplicated");
                    }
                }
            } else {
                // NATS is unreachable or refusing: leave the inbound unacknowledged (it is
                // redelivered and deduplicated) and back off.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                self.prune();
            }
        }
        tracing::info!(outbox = pending.outbox.len(), "event loop stopped");
        Ok(())
    }

    async fn command(&self, cmd: Command, pending: &mut Pending) -> Result<()> {
        match cmd {
            Command::ReloadRegistry { reply } => {
                let result = match Registry::load(&self.cfg.registry) {
                    Ok(r) => match nats::ensure_agency_consumers(&self.js, &r).await {
                        Ok(()) => {
                            let n = r.len();
                            self.ops.set_registry(Arc::new(r));
                            tracing::info!(agencies = n, "registry reloaded");
                            Ok(n)
                        }
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(result);
            }
            Command::DeadLetter {
                seq,
                action,
                who,
                why,
                reply,
            } => {
                let result = self
                    .dead_letter_action(seq, action, &who, &why, pending)
                    .await?;
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn dead_letter_action(
        &self,
        seq: u64,
        action: DeadLetterAction,
        who: &str,
        why: &str,
        pending: &mut Pending,
    ) -> Result<Result<DeadLetter, String>> {
        let store = self.store.as_ref();
        let Some(dead) = store.dead_letter(seq)? else {
            return Ok(Err(format!("no dead letter {seq}")));
        };
        if dead.status != DeadLetterStatus::Open {
            return Ok(Err(format!(
                "dead letter {seq} is already {}",
                dead.status.as_str()
            )));
        }
        let now = clock::now_ms();
        let registry = self.ops.registry();
        let mut batch = Batch::new(store)
            .with_coordinator(self.cfg.coordinator.as_deref())
            .with_signer(self.signer.as_deref());
        batch.remove_sent(pending.sent.iter().copied());
        for (id, at) in &pending.confirmed {
            batch.delivery_confirmed(id, *at)?;
        }
        let outcome = match action {
            DeadLetterAction::Discard => {
                batch.discard(&dead, who, why, now);
                Ok(())
            }
            DeadLetterAction::Replay => {
                let read = self.read(&dead.subject, &dead.raw, seq, now, &registry);
                batch.replay(&dead, read, who, why, now)?
            }
        };
        self.commit(batch, Vec::new(), pending)?;
        self.publish(pending).await;
        let updated = store.dead_letter(seq)?;
        Ok(match (outcome, updated) {
            (Ok(()), Some(d)) => Ok(d),
            (Ok(()), None) => Err("the dead letter vanished".to_owned()),
            (Err(e), _) => Err(e),
        })
    }

    fn read(
        &self,
        subject: &str,
        bytes: &[u8],
        seq: u64,
        at: Millis,
        registry: &Registry,
    ) -> ingest::Inbound {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let deadlines = |u, field| {
            let d = self.cfg.deadlines(u, field);
            (ms(d.receipt), ms(d.acceptance))
        };
        let secs = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let limits = Limits {
            max_message_bytes: self.cfg.max_message_bytes,
            deadlines: &deadlines,
            require_signatures: self.cfg.require_signatures,
            max_skew_ms: secs(self.cfg.max_clock_skew_secs),
            max_age_ms: secs(self.cfg.max_message_age_secs),
        };
        ingest::read(subject, bytes, seq, at, registry, &limits)
    }

    async fn messages(&self, consumer: &PullConsumer) -> Result<Messages> {
        consumer
            .stream()
            .max_messages_per_batch(self.cfg.batch_size)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(Error::nats)
    }

    /// Decides one batch of inbound messages and the broker's own events, and commits it.
    fn turn(
        &self,
        inbound: &[jetstream::Message],
        pending: &mut Pending,
        caught_up: bool,
    ) -> Result<()> {
        let store = self.store.as_ref();
        let registry = self.ops.registry();
        let mut batch = Batch::new(store)
            .with_coordinator(self.cfg.coordinator.as_deref())
            .with_signer(self.signer.as_deref());
        batch.remove_sent(pending.sent.iter().copied());
        for (id, at) in &pending.confirmed {
            batch.delivery_confirmed(id, *at)?;
        }
        let (mut applied, mut rejected, mut duplicates) = (0u32, 0u32, 0u32);
        let mut arrivals = Vec::with_capacity(inbound.len());
        for m in inbound {
            let (seq, at) = match m.info() {
                Ok(info) => (
                    info.stream_sequence,
                    (info.published.unix_timestamp_nanos() / 1_000_000) as Millis,
                ),
                Err(e) => {
                    tracing::warn!(cause = %e, "inbound message without stream info; skipped");
                    continue;
                }
            };
            let read = self.read(m.subject.as_str(), &m.payload, seq, at, &registry);
            arrivals.push(at);
            match batch.inbound(read, seq, at, &m.payload)? {
                Outcome::Applied => applied += 1,
                Outcome::Rejected(_) => rejected += 1,
                Outcome::Duplicate => duplicates += 1,
            }
        }
        // Deadlines fire only once the backlog is read, so that a replay applies a receipt
        // that arrived in time before it can expire the referral.
        if caught_up {
            for d in store.due(clock::now_ms(), 1000)? {
                batch.deadline(d)?;
            }
        }
        let committed = self.commit(batch, arrivals, pending)?;
        tracing::debug!(applied, rejected, duplicates, committed, "turn");
        Ok(())
    }

    /// Commits a batch, then brings the view and the pending outbox up to date. `arrivals` are
    /// the stream times of the inbound messages in it (for the latency histogram). Returns
    /// whether there was anything to commit.
    fn commit(
        &self,
        batch: Batch<'_>,
        arrivals: Vec<Millis>,
        pending: &mut Pending,
    ) -> Result<bool> {
        let (changes, view_changes) = batch.finish();
        if changes.is_empty() {
            self.ops.turned(clock::now_ms());
            return Ok(false);
        }
        let committed = tokio::task::block_in_place(|| self.store.commit(&changes));
        self.ops
            .store_ok
            .store(committed.is_ok(), Ordering::Relaxed);
        committed?;
        let now = clock::now_ms();
        for at in arrivals {
            self.ops
                .commit_latency
                .observe((now - at).max(0) as f64 / 1000.0);
        }
        self.ops.update_view(|v| {
            for (old, new) in &view_changes {
                v.change(old.as_ref(), new);
            }
            v.add_dead_letters(&changes.dead_letters);
            for d in changes
                .dead_letter_updates
                .iter()
                .filter(|d| d.status != DeadLetterStatus::Open)
            {
                v.dead_letter_resolved(&d.sender);
            }
        });
        self.ops.turned(now);
        pending.sent.clear();
        pending.confirmed.clear();
        // Deliveries cancelled by a consent revocation must not go out after all.
        if !changes.outbox_remove.is_empty() {
            let removed: std::collections::HashSet<u64> =
                changes.outbox_remove.iter().copied().collect();
            pending.outbox.retain(|e| !removed.contains(&e.key));
        }
        pending.outbox.extend(changes.outbox_put);
        self.ops
            .outbox
            .store(pending.outbox.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Publishes the outbox in key order, a window of PubAcks in flight at a time. Returns
    /// whether everything was acknowledged; what was not stays for the next turn and is sent
    /// again with the same message id (so a repeat is dropped by the stream or the recipient).
    async fn publish(&self, pending: &mut Pending) -> bool {
        let entries: Vec<OutboxEntry> = pending.outbox.drain(..).collect();
        let mut chunks = entries.chunks(PUBLISH_WINDOW);
        for chunk in chunks.by_ref() {
            let mut acks = Vec::with_capacity(chunk.len());
            for e in chunk {
                let publish = jetstream::message::PublishMessage::build()
                    .payload(e.payload.clone().into())
                    .message_id(&e.message_id);
                acks.push(self.js.send_publish(e.subject.clone(), publish).await);
            }
            // Await the window's PubAcks together: each one's timeout starts when it is first
            // polled, so awaiting them one by one after an outage would add the timeouts up
            // (5 s for every ack lost) and stall the loop for minutes.
            let results = futures::future::join_all(acks.into_iter().map(|ack| async move {
                match ack {
                    Ok(fut) => fut.await.map(|_| ()).map_err(|err| err.to_string()),
                    Err(err) => Err(err.to_string()),
                }
            }))
            .await;
            let mut failed = false;
            for (e, result) in chunk.iter().zip(results) {
                match result {
                    Ok(()) => {
                        pending.sent.push(e.key);
                        if let Some(id) = &e.confirms {
                            pending.confirmed.push((id.clone(), clock::now_ms()));
                        }
                    }
                    Err(err) => {
                        if !failed {
                            tracing::warn!(cause = %err, subject = %e.subject, "publish failed; will retry with the same id");
                        }
                        failed = true;
                        pending.outbox.push_back(e.clone());
                    }
                }
            }
            if failed {
                for rest in chunks {
                    pending.outbox.extend(rest.iter().cloned());
                }
                return false;
            }
        }
        true
    }

    fn prune(&self) {
        let keep = Duration::from_secs(u64::from(self.cfg.dedup_retention_days) * 24 * 3600);
        let before = clock::now_ms() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        match tokio::task::block_in_place(|| self.store.prune_seen(before)) {
            Ok(0) => {}
            Ok(n) => tracing::info!(forgotten = n, "pruned applied message ids past retention"),
            Err(e) => tracing::warn!(cause = %e, "pruning applied message ids failed"),
        }
    }
}
