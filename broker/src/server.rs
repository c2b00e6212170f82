//! The broker's event loop: one task that owns every write.
//!
//! Each turn: take a batch of inbound messages (and the broker's own events: delivery
//! confirmations from earlier turns, due deadlines) → [`batch::Batch`] decides → one store
//! commit, flushed → publish the new outbox entries, PubAcks in flight together → acknowledge
//! the inbound messages once their PubAcks are all in. A crash anywhere is repaired on restart:
//! the outbox is published again (same message ids, so repeats are dropped downstream) and
//! unacknowledged inbound messages are redelivered and recognised by their dedup key.
//!
//! Turns are pipelined: a turn's publishes are a *flight* whose PubAcks are awaited by a task
//! of their own, while the loop goes on to the next turn (at most [`MAX_FLIGHTS`] at once).
//! What a flight brings back — entries acknowledged (removed from the store by the next
//! commit), deliveries confirmed (`DELIVERED` in the next batch), the inbound messages to
//! acknowledge — is taken in by the loop. Each turn's inbound messages wait for their own
//! flight only: their state and outbox were committed before it left.

pub(crate) mod background;
pub mod batch;
mod pending;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{PullConsumer, pull::MessagesErrorKind};
use futures::stream::FuturesUnordered;
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
use background::Background;
use batch::{Batch, Outcome};
use pending::{FlightId, Landing, Pending};

/// How often the loop wakes with nothing to read, to fire deadlines.
const TICK: Duration = Duration::from_millis(250);
/// How long landed PubAcks (outbox removals, deliveries to confirm) wait for inbound messages
/// to share a turn with: under load they ride along instead of costing a store flush of their
/// own; when quiet, `DELIVERED` is recorded this much later.
const PIGGYBACK: Duration = Duration::from_millis(5);
/// Publishes in flight at once (outside the pipelined main loop: at start and for operator
/// actions).
const PUBLISH_WINDOW: usize = 512;
/// Turns whose publishes may await their PubAcks at once while the loop goes on.
const MAX_FLIGHTS: usize = 4;
/// Fewest inbound messages worth reading (signature checks) on two threads.
const PARALLEL_READS: usize = 8;
/// How long a stopping loop waits for the flights still out.
const LANDING_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two steps of background work (the end of one, the start of the next),
/// however busy the loop.
pub(crate) const BACKGROUND_PAUSE: Duration = Duration::from_millis(15);
/// How often applied message ids older than the retention are forgotten.
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub struct EventLoop {
    pub store: Arc<dyn Store>,
    pub ops: Arc<Ops>,
    pub js: jetstream::Context,
    pub cfg: Arc<Config>,
    /// The broker's signing key, if configured.
    pub signer: Option<Arc<yeongye_proto::signing::PrivateKey>>,
    /// The state log, as this leader writes it: every change set is appended (fenced) before
    /// it is committed to the store.
    pub log: Arc<crate::cluster::log::Writer>,
    /// Takes the snapshots that let the log be trimmed.
    pub snapshots: Arc<crate::cluster::snapshot::Snapshotter>,
}

/// Why the event loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Its token was cancelled (shutdown, or the lease was lost).
    Cancelled,
    /// An operator asked it to step down.
    StepDown,
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
        /// The authenticated operator, for the audit log.
        who: String,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    /// Record a query the responder refused to answer (its reply subject was not the asker's
    /// inbox) as a dead letter.
    RefusedQuery(RefusedQuery),
    /// Stop leading (graceful hand-over): finish the turns in flight, give the lease back, and
    /// leave it to another broker for a while.
    StepDown {
        /// The authenticated operator, for the log.
        who: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

impl Command {
    /// Answers the command with `why` without doing it (a standby's answer: it does not lead).
    pub fn refuse(self, why: &str) {
        match self {
            Command::DeadLetter { reply, .. } => {
                let _ = reply.send(Err(why.to_owned()));
            }
            Command::ReloadRegistry { reply, .. } => {
                let _ = reply.send(Err(why.to_owned()));
            }
            Command::StepDown { reply, .. } => {
                let _ = reply.send(Err(why.to_owned()));
            }
            // Recorded by the leader only; the query it was about got no answer.
            Command::RefusedQuery(q) => {
                tracing::warn!(agency = %q.sender, "refused query not recorded: {why}");
            }
        }
    }
}

/// A query not answered because of its reply subject. Its dead letter is numbered above
/// [`REFUSED_QUERY_SEQ_BASE`], apart from the inbound stream's sequences.
#[derive(Debug, Clone)]
pub struct RefusedQuery {
    /// `yeongye.query.<agency>`.
    pub subject: String,
    /// The asking agency (the subject's token, checked).
    pub sender: String,
    /// The query envelope's message id, if it was a valid id; else empty.
    pub message_id: String,
    /// The query as received.
    pub raw: Vec<u8>,
    pub at: Millis,
}

/// Dead letters of refused queries are numbered from here (2^52: far above any inbound stream
/// sequence, and still exact as a JSON number): `base + at_ms * 1024 + n`.
pub const REFUSED_QUERY_SEQ_BASE: u64 = 1 << 52;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    Replay,
    Discard,
}

/// Acknowledges a turn's inbound messages (their state and outbox are committed and published).
async fn ack_all(inbound: &[jetstream::Message]) {
    for m in inbound {
        if let Err(e) = m.ack().await {
            tracing::warn!(cause = %e, "ack failed; the message will be redelivered and deduplicated");
        }
    }
}

type Messages = async_nats::jetstream::consumer::pull::Stream;

/// What a flight (one turn's publishes) brought back.
struct Landed {
    flight: FlightId,
    /// Entries the stream acknowledged, with when.
    acked: Vec<(OutboxEntry, Millis)>,
    /// Entries not acknowledged: sent again (same message id) by a later turn.
    failed: Vec<OutboxEntry>,
    /// The first error among the failed.
    error: Option<String>,
    /// The turn's inbound messages: acknowledged only if nothing failed.
    inbound: Vec<jetstream::Message>,
}

/// Flights out, each a task awaiting its PubAcks; a task that is lost still names its flight.
type Flights = FuturesUnordered<
    futures::future::BoxFuture<
        'static,
        (
            FlightId,
            std::result::Result<Landed, tokio::task::JoinError>,
        ),
    >,
>;

/// `items` mapped by `f`, in order: on two threads when there are at least `min` of them (the
/// pure, CPU-bound parts of a turn: signature checks, signing), else on this one. Should the
/// helper thread fail, this one does its half.
pub(crate) fn map_halves<T: Sync, R: Send>(
    items: &[T],
    min: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if items.len() < min {
        return items.iter().map(&f).collect();
    }
    let (first, second) = items.split_at(items.len() / 2);
    std::thread::scope(|s| {
        let helper = s.spawn(|| second.iter().map(&f).collect::<Vec<_>>());
        let mut out: Vec<R> = first.iter().map(&f).collect();
        match helper.join() {
            Ok(rest) => out.extend(rest),
            Err(_) => out.extend(second.iter().map(&f)),
        }
        out
    })
}

impl EventLoop {
    pub async fn run(
        self,
        consumer: PullConsumer,
        commands: &mut mpsc::Receiver<Command>,
        token: CancellationToken,
    ) -> Result<Stop> {
        let mut pending = Pending::new(self.store.outbox()?);
        if pending.waiting() > 0 {
            tracing::info!(
                entries = pending.waiting(),
                "publishing the outbox left from before"
            );
        }
        self.publish(&mut pending).await;

        let mut messages = self.messages(&consumer).await?;
        let mut flights = Flights::new();
        let mut caught_up = false;
        let mut background =
            Background::new(PRUNE_EVERY, crate::store::PRUNE_STEP, BACKGROUND_PAUSE);
        let retention = Duration::from_secs(u64::from(self.cfg.dedup_retention_days) * 24 * 3600);
        let mut stop = Stop::Cancelled;
        loop {
            // Stopping: after the turn in hand, not after another one (the select below picks
            // at random among ready branches, and a backlog keeps the intake ready).
            if token.is_cancelled() {
                break;
            }
            // Take in the flights that have landed.
            while let Some(Some(landed)) = flights.next().now_or_never() {
                self.landed(landed, &mut pending, true).await;
            }
            // Background work waiting: its next step soon after this turn, not a tick later
            // (the pause lets sled's and the allocator's deferred frees keep up with it).
            let wait = if background.busy() {
                background.wait()
            } else if pending.idle() {
                TICK
            } else {
                PIGGYBACK
            };
            let room = flights.len() < MAX_FLIGHTS;
            let first = tokio::select! {
                _ = token.cancelled() => break,
                Some(cmd) = commands.recv() => {
                    if let Command::StepDown { who, reply } = cmd {
                        tracing::info!(operator = %who, "stepping down");
                        let _ = reply.send(Ok(format!("{} steps down", self.cfg.broker_name)));
                        stop = Stop::StepDown;
                        break;
                    }
                    self.command(cmd, &mut pending).await?;
                    continue;
                }
                Some(landed) = flights.next(), if !flights.is_empty() => {
                    self.landed(landed, &mut pending, true).await;
                    continue;
                }
                m = messages.next(), if room => Some(m),
                _ = tokio::time::sleep(wait), if room => None,
            };
            let mut inbound = Vec::new();
            let reopen = match first {
                Some(Some(Ok(m))) => {
                    inbound.push(m);
                    false
                }
                Some(Some(Err(e))) => {
                    tracing::warn!(cause = %e, "reading the inbound stream");
                    // async-nats's pull stream counts a pull that reached no consumer (its
                    // group electing a leader, just after the consumer was made or moved) as
                    // outstanding and never pulls again: the loop sat idle once after taking
                    // over. A missed heartbeat is the same silence. A fresh stream pulls anew.
                    matches!(
                        e.kind(),
                        MessagesErrorKind::NoResponders | MessagesErrorKind::MissingHeartbeat
                    )
                }
                Some(None) => {
                    tracing::warn!("inbound message stream ended; reopening");
                    true
                }
                None => {
                    caught_up = true;
                    false
                }
            };
            if reopen {
                tokio::time::sleep(Duration::from_millis(500)).await;
                messages = self.messages(&consumer).await?;
            }
            self.read_ready(&mut messages, &mut inbound).await;
            caught_up = self.note_backlog(&inbound, caught_up);

            // The whole turn is synchronous work (checks, signatures, decisions, the store
            // commit): off the runtime's worker, so that the NATS connection's task is not
            // stuck behind it (tokio does not steal a task from a busy worker's LIFO slot, and
            // the connection task is woken by this one) and keeps reading the next batch.
            if self.cfg.testing_stop_delay_ms > 0 && !inbound.is_empty() {
                // Testing only: a turn in hand when the stop request lands, and long.
                tracing::warn!(
                    inbound = inbound.len(),
                    "TESTING: a turn in hand waits for the stop request"
                );
                token.cancelled().await;
                tokio::time::sleep(Duration::from_millis(self.cfg.testing_stop_delay_ms)).await;
            }
            let started = Instant::now();
            tokio::task::block_in_place(|| self.turn(&inbound, &mut pending, caught_up))?;
            self.ops.turns.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                inbound = inbound.len(),
                backlog = self.ops.backlog.load(Ordering::Relaxed),
                flights = flights.len(),
                turn_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "turn time"
            );
            self.launch(inbound, &mut pending, &mut flights).await;
            // One bounded step of background work per turn (a few ms; see background.rs).
            tokio::task::block_in_place(|| {
                background.step(self.store.as_ref(), &self.ops, retention)
            });
        }
        self.land_all(&mut flights, &mut pending).await;
        tracing::info!(outbox = pending.waiting(), "event loop stopped");
        Ok(stop)
    }

    /// Everything already received, up to a batch. Unconstrained: tokio's cooperative budget
    /// (128 operations per task poll, spent also on the acks) would otherwise report the
    /// stream empty after a few dozen messages, and batches would stay small however long the
    /// backlog.
    async fn read_ready(&self, messages: &mut Messages, inbound: &mut Vec<jetstream::Message>) {
        tokio::task::unconstrained(async {
            while inbound.len() < self.cfg.batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => inbound.push(m),
                    Some(Some(Err(e))) => {
                        tracing::warn!(cause = %e, "reading the inbound stream")
                    }
                    _ => break,
                }
            }
        })
        .await;
    }

    /// Records the inbound backlog (what the consumer still holds after this batch); returns
    /// whether the loop has caught up with the stream (deadlines fire only then).
    fn note_backlog(&self, inbound: &[jetstream::Message], caught_up: bool) -> bool {
        if let Some(last) = inbound.last() {
            let backlog = last.info().map(|i| i.pending).unwrap_or(u64::MAX);
            self.ops.backlog.store(backlog, Ordering::Relaxed);
            backlog == 0
        } else {
            if caught_up {
                self.ops.backlog.store(0, Ordering::Relaxed);
            }
            caught_up
        }
    }

    /// At stop: lets the flights still out land, so that their inbound messages are
    /// acknowledged.
    async fn land_all(&self, flights: &mut Flights, pending: &mut Pending) {
        let landing = async {
            while let Some(landed) = flights.next().await {
                self.landed(landed, pending, false).await;
            }
        };
        if tokio::time::timeout(LANDING_TIMEOUT, landing)
            .await
            .is_err()
        {
            tracing::warn!("publishes still unacknowledged at stop: they are sent again at start");
        }
    }

    /// Publishes the waiting outbox (in key order) as a flight: its PubAcks are awaited, all
    /// together, by a task of its own, which then hands back what came of them and the turn's
    /// inbound messages to acknowledge.
    async fn launch(
        &self,
        inbound: Vec<jetstream::Message>,
        pending: &mut Pending,
        flights: &mut Flights,
    ) {
        let Some((flight, entries)) = pending.start_flight() else {
            // Nothing of this turn's is left to publish (its effects, if any, were cancelled).
            ack_all(&inbound).await;
            return;
        };
        let mut acks = Vec::with_capacity(entries.len());
        for e in &entries {
            let publish = jetstream::message::PublishMessage::build()
                .payload(e.payload.clone().into())
                .message_id(&e.message_id);
            acks.push(self.js.send_publish(e.subject.clone(), publish).await);
        }
        let task = tokio::spawn(async move {
            // Together: each PubAck's timeout starts when it is first polled.
            let results = futures::future::join_all(acks.into_iter().map(|ack| async move {
                match ack {
                    Ok(fut) => fut
                        .await
                        .map(|_| clock::now_ms())
                        .map_err(|err| err.to_string()),
                    Err(err) => Err(err.to_string()),
                }
            }))
            .await;
            let mut landed = Landed {
                flight,
                acked: Vec::with_capacity(entries.len()),
                failed: Vec::new(),
                error: None,
                inbound,
            };
            for (e, result) in entries.into_iter().zip(results) {
                match result {
                    Ok(at) => landed.acked.push((e, at)),
                    Err(err) => {
                        landed.error.get_or_insert(err);
                        landed.failed.push(e);
                    }
                }
            }
            landed
        });
        flights.push(Box::pin(task.map(move |result| (flight, result))));
        self.ops.outbox.store(pending.depth(), Ordering::Relaxed);
    }

    /// Takes in a landed flight: acknowledged entries are removed by the next commit and
    /// deliveries among them confirmed; the turn's inbound messages are acknowledged if
    /// nothing failed. What failed goes back to the outbox (in key order) to be sent again
    /// with the same ids, and the inbound stays unacknowledged (redelivered later and
    /// recognised as applied); with `backoff`, the loop then pauses for a second. A lost task
    /// (it cannot fail, but if it ever does) gives its entries back: they are read again from
    /// the store and sent again.
    async fn landed(
        &self,
        (flight, landed): (
            FlightId,
            std::result::Result<Landed, tokio::task::JoinError>,
        ),
        pending: &mut Pending,
        backoff: bool,
    ) {
        let landing = match landed {
            Ok(l) => {
                debug_assert_eq!(l.flight, flight);
                if let (Some(err), Some(e)) = (&l.error, l.failed.first()) {
                    tracing::warn!(cause = %err, subject = %e.subject, failed = l.failed.len(), "publish failed; will retry with the same id");
                }
                let landing = pending.landed(&l.acked, l.failed);
                if landing == Landing::Acknowledge {
                    ack_all(&l.inbound).await;
                }
                landing
            }
            Err(e) => {
                tracing::error!(cause = %e, flight, "a publish task was lost; its entries are sent again");
                let keys = pending.lost(flight);
                let again = match tokio::task::block_in_place(|| self.store.outbox()) {
                    Ok(outbox) => outbox
                        .into_iter()
                        .filter(|e| keys.binary_search(&e.key).is_ok())
                        .collect(),
                    Err(e) => {
                        // Still in the store's outbox: published again at the next start.
                        tracing::error!(cause = %e, "reading the outbox back after a lost publish task");
                        Vec::new()
                    }
                };
                pending.failed(again);
                Landing::Retry
            }
        };
        if landing == Landing::Retry && backoff {
            // NATS is unreachable or refusing: back off.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.ops.outbox.store(pending.depth(), Ordering::Relaxed);
    }

    async fn command(&self, cmd: Command, pending: &mut Pending) -> Result<()> {
        match cmd {
            Command::ReloadRegistry { who, reply } => {
                let result = match Registry::load(&self.cfg.registry) {
                    Ok(r) => match nats::ensure_agency_consumers(&self.js, &r).await {
                        Ok(()) => {
                            let n = r.len();
                            self.ops.set_registry(Arc::new(r));
                            tracing::info!(agencies = n, operator = %who, "registry reloaded");
                            Ok(n)
                        }
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                // Audited whatever came of it, like every operator action.
                let mut batch = self.pending_batch(pending)?;
                batch.registry_reloaded(&who, result.is_ok(), clock::now_ms());
                self.commit(batch, Vec::new(), pending)?;
                self.publish(pending).await;
                let _ = reply.send(result);
            }
            Command::RefusedQuery(q) => self.record_refused_query(q, pending).await?,
            // Taken by the loop itself (`run`).
            Command::StepDown { reply, .. } => {
                let _ = reply.send(Err("already stepping down".to_owned()));
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

    /// Records a refused query as a dead letter (with its audit entry), under the first free
    /// number from its time.
    async fn record_refused_query(&self, q: RefusedQuery, pending: &mut Pending) -> Result<()> {
        let store = self.store.as_ref();
        let at = u64::try_from(q.at).unwrap_or(0);
        let mut seq = REFUSED_QUERY_SEQ_BASE + at.saturating_mul(1024);
        while store.dead_letter(seq)?.is_some() {
            seq += 1;
        }
        let mut batch = self.pending_batch(pending)?;
        batch.refused_query(&q, seq);
        self.commit(batch, Vec::new(), pending)?;
        self.publish(pending).await;
        Ok(())
    }

    /// A batch carrying what the loop has pending: acknowledged entries to remove, deliveries
    /// to confirm.
    fn pending_batch(&self, pending: &Pending) -> Result<Batch<'_>> {
        let mut batch = Batch::new(self.store.as_ref())
            .with_coordinator(self.cfg.coordinator.as_deref())
            .with_signer(self.signer.as_deref());
        batch.remove_sent(pending.sent().iter().copied());
        batch.published(pending.published());
        for (id, at) in pending.confirmed() {
            batch.delivery_confirmed(id, *at)?;
        }
        Ok(batch)
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
        if seq >= REFUSED_QUERY_SEQ_BASE && action == DeadLetterAction::Replay {
            return Ok(Err(format!(
                "dead letter {seq} is a refused query: there is nothing to replay (discard it)"
            )));
        }
        let now = clock::now_ms();
        let registry = self.ops.registry();
        let mut batch = self.pending_batch(pending)?;
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
            accept_plaintext: self.cfg.plaintext_referrals
                == crate::config::PlaintextReferrals::Accept,
        };
        ingest::read(subject, bytes, seq, at, registry, &limits)
    }

    /// Reads every inbound message of a batch (envelope and signature checks: pure, and most
    /// of a turn's CPU after the store), on two threads for a large batch. In order; `None`
    /// for a message without stream info (skipped).
    fn read_all(
        &self,
        inbound: &[jetstream::Message],
        registry: &Registry,
    ) -> Vec<Option<(u64, Millis, ingest::Inbound)>> {
        let read = |m: &jetstream::Message| {
            let (seq, at) = match m.info() {
                Ok(info) => (
                    info.stream_sequence,
                    (info.published.unix_timestamp_nanos() / 1_000_000) as Millis,
                ),
                Err(e) => {
                    tracing::warn!(cause = %e, "inbound message without stream info; skipped");
                    return None;
                }
            };
            Some((
                seq,
                at,
                self.read(m.subject.as_str(), &m.payload, seq, at, registry),
            ))
        };
        map_halves(inbound, PARALLEL_READS, read)
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
        let mut batch = self.pending_batch(pending)?;
        let (mut applied, mut rejected, mut duplicates) = (0u32, 0u32, 0u32);
        let mut arrivals = Vec::with_capacity(inbound.len());
        for (m, read) in inbound.iter().zip(self.read_all(inbound, &registry)) {
            let Some((seq, at, read)) = read else {
                continue;
            };
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
        let (mut changes, view_changes) = batch.finish();
        if !view_changes.is_empty() {
            // The counters as they will be once this commits, stored with it.
            changes.counts = Some(self.ops.view().counts_after(&view_changes));
        }
        if changes.is_empty() {
            self.ops.turned(clock::now_ms());
            return Ok(false);
        }
        let started = Instant::now();
        // The state log first: once the append lands the change is committed (the store is
        // this broker's materialisation of the log, so its write is not waited on to reach the
        // disk: a broker killed before it did reads the change back from the log). A fenced
        // append stops the loop before anything of it reaches the store, the streams or an
        // acknowledgement.
        let (log, store) = (&self.log, self.store.as_ref());
        let appended = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(log.append_change(&changes, store))
        })?;
        changes.state_seq = Some(appended);
        let committed = tokio::task::block_in_place(|| self.store.commit_logged(&changes));
        tracing::debug!(
            commit_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            referrals = changes.referrals.len(),
            "store commit"
        );
        self.ops
            .store_ok
            .store(committed.is_ok(), Ordering::Relaxed);
        committed?;
        self.ops.set_cluster(|c| {
            c.position = appended;
            c.log_last = c.log_last.max(appended);
        });
        let now = clock::now_ms();
        for at in arrivals {
            self.ops
                .commit_latency
                .observe((now - at).max(0) as f64 / 1000.0);
        }
        let counts = changes.counts.take();
        self.ops.update_view(|v| {
            if let Some(counts) = counts {
                v.committed(counts, &view_changes);
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
        // Deliveries cancelled by a consent revocation must not go out after all.
        pending.committed(&changes.outbox_remove, changes.outbox_put);
        self.ops.outbox.store(pending.depth(), Ordering::Relaxed);
        // A snapshot at this position, when one is due: read and uploaded off the loop.
        self.snapshots.maybe(appended);
        // The store never reopens here for its engine's recovery snapshot: that stalls as long
        // as an open (0.2-0.4 s at a million referrals), every referral behind it. The broker
        // does it once stopped (`snapshot_at_stop`) or as a standby (`cluster::Member::follow`).
        Ok(true)
    }

    /// Publishes the outbox in key order, a window of PubAcks in flight at a time. Returns
    /// whether everything was acknowledged; what was not stays for the next turn and is sent
    /// again with the same message id (so a repeat is dropped by the stream or the recipient).
    async fn publish(&self, pending: &mut Pending) -> bool {
        let entries: Vec<OutboxEntry> = pending.take_waiting();
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
            let mut failed = Vec::new();
            for (e, result) in chunk.iter().zip(results) {
                match result {
                    Ok(()) => pending.acked(e, clock::now_ms()),
                    Err(err) => {
                        if failed.is_empty() {
                            tracing::warn!(cause = %err, subject = %e.subject, "publish failed; will retry with the same id");
                        }
                        failed.push(e.clone());
                    }
                }
            }
            if !failed.is_empty() {
                for rest in chunks {
                    failed.extend(rest.iter().cloned());
                }
                pending.failed(failed);
                return false;
            }
        }
        true
    }
}
