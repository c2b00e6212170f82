//! [`Incoming`]: what the broker sends this agency, read from its durable consumer
//! `agency-<agency>` on `YEONGYE_OUT`, with exactly-once effect (PROTOCOL.md, "Receiving").
//!
//! [`Incoming::next`] yields each message once: one whose id is in the dedup store is
//! acknowledged and skipped. The caller hands an [`Item`] to its agency system durably and then
//! calls [`Item::done`], which records the id (flushed), publishes the receipt for a delivery,
//! and acknowledges. A crash anywhere in between means the message comes again, so handing over
//! must be idempotent (keyed by referral or message id).
//!
//! Follow-ups — the `RECEIVED` receipt of a delivery, the purge confirmation of a withdrawal —
//! go out under ids derived from the message they answer, and the store records each one's id
//! when it is sent. A repeated message whose follow-up was recorded gets it again (the first
//! may have been lost in a crash, or the broker may have lost it and replayed); one whose
//! follow-up was not sent yet (the HTTP bridge sends it when the agency system takes the item)
//! gets nothing. Once a withdrawal for a referral has arrived, a late (re)delivery of that
//! referral is acknowledged and dropped: its data must not come back after the purge.
//!
//! A message that cannot be decoded is logged with its stream sequence, saved to
//! `<state_dir>/undecodable/<stream_seq>.bin`, acknowledged, and skipped.

mod decode;

use std::fmt;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tracing::{Instrument, debug, error, info, info_span, warn};
use yeongye_proto::{subject, v1};

use crate::backoff::Backoff;
use crate::client::Adapter;
use crate::error::{Error, Result};
use crate::ids;
use crate::inbox::{self, Handoff};
use crate::item::{Item, ItemKind};
use crate::storage::Storage;

/// How often old dedup entries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60 * 60);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The dedup-store key that marks a referral as withdrawn (not a message id: message ids are
/// printable ASCII, this starts with a NUL byte).
pub(crate) fn withdrawn_key(referral_id: &str) -> String {
    format!("\0withdrawn/{referral_id}")
}

impl Adapter {
    /// Starts reading what the broker sends this agency.
    ///
    /// Opens the dedup store under `state_dir` (first call only; later calls share it) and binds
    /// to the durable consumer `agency-<agency>` that the broker creates. While the consumer
    /// does not exist yet (broker not started), waits and retries, logging as it goes. Fails if
    /// another process holds the state directory.
    pub async fn incoming(&self) -> Result<Incoming> {
        let store = self.store().await?;
        Incoming::bind(self.clone(), store).await
    }
}

/// The agency's stream of new messages; see the module docs. Get one from
/// [`Adapter::incoming`].
pub struct Incoming {
    adapter: Adapter,
    store: Storage,
    consumer: PullConsumer,
    messages: Option<pull::Stream>,
    last_prune: Option<Instant>,
    errors_in_a_row: u32,
    /// Waits between reads after errors in a row (none after the first).
    retry: Backoff,
}

impl Incoming {
    pub(crate) async fn bind(adapter: Adapter, store: Storage) -> Result<Incoming> {
        let consumer = bind_consumer(&adapter).await?;
        Ok(Incoming {
            adapter,
            store,
            consumer,
            messages: None,
            last_prune: None,
            errors_in_a_row: 0,
            retry: Backoff::new(Duration::from_millis(250), MAX_BACKOFF),
        })
    }

    /// Waits for the next new message. Transient trouble (lost connection, consumer briefly
    /// gone) is logged and retried inside. `Some(Err)` reports a failure that left the current
    /// message unacknowledged (it comes again); calling `next` again is fine. `None` means the
    /// adapter was [drained](Adapter::drain).
    pub async fn next(&mut self) -> Option<Result<Item>> {
        loop {
            self.maybe_prune().await;
            let message = match self.pull().await {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            match self.admit(message).await {
                Ok(Some(item)) => return Some(Ok(item)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Waits for the next new message like [`next`](Self::next), then takes every other new
    /// message already received (up to `max` in all) without waiting: the items ready now,
    /// in the order the broker sent them. Handing them over in that order and then calling
    /// [`Item::done`] on all of them at once lets their records share one flush (the store
    /// commits in groups) and their receipts and acks travel together. A message that fails
    /// after the first is left unacknowledged (it comes again) and ends the batch.
    pub async fn next_ready(&mut self, max: usize) -> Option<Result<Vec<Item>>> {
        let first = match self.next().await? {
            Ok(item) => item,
            Err(e) => return Some(Err(e)),
        };
        let mut items = vec![first];
        while items.len() < max {
            let Some(message) = self.pull_ready() else {
                break;
            };
            match self.admit(message).await {
                Ok(Some(item)) => items.push(item),
                Ok(None) => {}
                Err(e) => {
                    warn!(cause = %e, "a message could not be taken; it will come again");
                    break;
                }
            }
        }
        Some(Ok(items))
    }

    /// A message already received, without waiting; None if none is ready now (trouble is
    /// left to [`pull`](Self::pull)).
    fn pull_ready(&mut self) -> Option<async_nats::jetstream::Message> {
        if self.adapter.is_closed() {
            return None;
        }
        let messages = self.messages.as_mut()?;
        match messages.next().now_or_never()? {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                warn!(cause = %e, "reading the consumer failed; continuing");
                self.messages = None;
                None
            }
            None => {
                self.messages = None;
                None
            }
        }
    }

    /// The next raw message from the consumer, re-binding as needed.
    async fn pull(&mut self) -> Result<Option<async_nats::jetstream::Message>> {
        loop {
            if self.adapter.is_closed() {
                return Ok(None);
            }
            let messages = match &mut self.messages {
                Some(m) => m,
                None => match self.consumer.messages().await {
                    Ok(m) => self.messages.insert(m),
                    Err(e) => {
                        warn!(cause = %e, "cannot start reading the consumer; retrying");
                        self.pause().await;
                        self.consumer = bind_consumer(&self.adapter).await?;
                        continue;
                    }
                },
            };
            match messages.next().await {
                Some(Ok(m)) => {
                    if self.errors_in_a_row > 0 {
                        self.errors_in_a_row = 0;
                        self.retry.reset();
                    }
                    return Ok(Some(m));
                }
                Some(Err(e)) => {
                    warn!(cause = %e, "reading the consumer failed; continuing");
                    let rebind = matches!(
                        e.kind(),
                        MessagesErrorKind::ConsumerDeleted
                            | MessagesErrorKind::PushBasedConsumer
                            | MessagesErrorKind::RequestLimitExceeded
                    );
                    // After a pull that reached no consumer (its group electing a leader) the
                    // stream counts it as outstanding and would never pull again: a fresh one.
                    if rebind
                        || matches!(
                            e.kind(),
                            MessagesErrorKind::NoResponders | MessagesErrorKind::MissingHeartbeat
                        )
                    {
                        self.messages = None;
                    }
                    self.pause().await;
                    if rebind {
                        self.consumer = bind_consumer(&self.adapter).await?;
                    }
                }
                None => {
                    self.messages = None;
                    if !self.adapter.is_closed() {
                        debug!("consumer stream ended; restarting it");
                        self.pause().await;
                    }
                }
            }
        }
    }

    /// Sleeps longer the more errors came in a row (none after the first).
    async fn pause(&mut self) {
        self.errors_in_a_row = self.errors_in_a_row.saturating_add(1);
        if self.errors_in_a_row > 1 {
            tokio::time::sleep(self.retry.next_wait()).await;
        }
    }

    /// Decodes a message and either returns it as a new item, or deals with it here
    /// (duplicate, undecodable) and returns `None`.
    async fn admit(&mut self, message: async_nats::jetstream::Message) -> Result<Option<Item>> {
        let (stream_sequence, delivered) = match message.info() {
            Ok(info) => (Some(info.stream_sequence), Some(info.delivered)),
            Err(_) => (None, None),
        };
        let subject = message.subject.to_string();
        let payload = message.payload.clone();
        let (_, acker) = message.split();

        let decoded = match decode::decode(
            self.adapter.agency(),
            &subject,
            &payload,
            self.adapter.keys(),
        ) {
            Ok(mut d) => {
                decode::open(
                    &mut d,
                    self.adapter.agency(),
                    self.adapter.sealing(),
                    ids::now_ms(),
                );
                d
            }
            Err(reason) => {
                self.quarantine(stream_sequence, &subject, payload, &reason)
                    .await;
                if let Err(e) = acker.double_ack().await {
                    warn!(stream_seq = stream_sequence, cause = %e, "ack of undecodable message failed");
                }
                return Ok(None);
            }
        };
        let span = info_span!(
            "incoming",
            message_id = %decoded.message_id,
            referral_id = ids::shown_id(decoded.referral_id.as_deref().unwrap_or("")),
            kind = decoded.kind.name(),
            stream_seq = stream_sequence,
        );
        async {
            if !self.store.contains(&decoded.message_id)? {
                match &decoded.kind {
                    ItemKind::Withdrawal(w) => {
                        // Marks the referral so that a late delivery of it is dropped.
                        self.store
                            .record_all(&[&withdrawn_key(&w.referral_id)], ids::now_ms())
                            .await?;
                    }
                    ItemKind::Delivery { referral, .. }
                        if self.store.contains(&withdrawn_key(&referral.referral_id))? =>
                    {
                        info!(delivered, "delivery of a withdrawn referral; dropped");
                        self.store
                            .record_all(&[&decoded.message_id], ids::now_ms())
                            .await?;
                        if let Err(e) = acker.double_ack().await {
                            warn!(cause = %e, "ack of a dropped delivery failed; it will come again");
                        }
                        return Ok(None);
                    }
                    ItemKind::Delivery { referral, .. } if decoded.declined.is_some() => {
                        let (code, why) = decoded.declined.unwrap_or((
                            v1::ReasonCode::SealedOpenFailed,
                            "declined",
                        ));
                        warn!(reason = code.as_str_name(), why, "delivered referral declined by this adapter; nothing of it kept");
                        let receipt = ids::receipt_message_id(&decoded.message_id);
                        let decline = ids::decline_message_id(&decoded.message_id);
                        self.store
                            .record_all(&[&decoded.message_id, &receipt, &decline], ids::now_ms())
                            .await?;
                        self.adapter
                            .decline_delivery(&decoded.message_id, &referral.referral_id, code)
                            .await?;
                        if let Err(e) = acker.double_ack().await {
                            warn!(cause = %e, "ack of a declined delivery failed; it will come again");
                        }
                        return Ok(None);
                    }
                    _ => {}
                }
                debug!(delivered, "new message");
                return Ok(Some(Item {
                    message_id: decoded.message_id,
                    referral_id: decoded.referral_id,
                    kind: decoded.kind,
                    stream_sequence,
                    delivered,
                    acker,
                    adapter: self.adapter.clone(),
                    store: self.store.clone(),
                    recorded: false,
                }));
            }
            info!(delivered, "already handled; acknowledging again");
            self.send_follow_up_again(&decoded).await?;
            if let Err(e) = acker.double_ack().await {
                warn!(cause = %e, "ack of repeated message failed; it will come again");
            }
            Ok(None)
        }
        .instrument(span)
        .await
    }

    /// For a repeated delivery or withdrawal whose receipt or purge confirmation was sent
    /// before, sends it again (same derived id: harmless if it arrived).
    async fn send_follow_up_again(&self, decoded: &decode::Decoded) -> Result<()> {
        match &decoded.kind {
            ItemKind::Delivery { referral, .. }
                if self
                    .store
                    .contains(&ids::decline_message_id(&decoded.message_id))? =>
            {
                let code = decoded
                    .declined
                    .map_or(v1::ReasonCode::SealedOpenFailed, |(c, _)| c);
                self.adapter
                    .decline_delivery(&decoded.message_id, &referral.referral_id, code)
                    .await
            }
            ItemKind::Delivery { referral, .. }
                if self
                    .store
                    .contains(&ids::receipt_message_id(&decoded.message_id))? =>
            {
                self.adapter
                    .send_receipt(&decoded.message_id, &referral.referral_id)
                    .await
            }
            ItemKind::Withdrawal(w)
                if self
                    .store
                    .contains(&ids::purge_message_id(&decoded.message_id))? =>
            {
                self.adapter
                    .send_purge_confirmation(&decoded.message_id, &w.referral_id, &w.consent_id)
                    .await
                    .map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Keeps an undecodable message for operators. Never fails: the message also stays in the
    /// stream (retention is by age, not by ack).
    async fn quarantine(&self, seq: Option<u64>, subject: &str, payload: Bytes, reason: &str) {
        let dir = self.adapter.config().undecodable_dir();
        let name = match seq {
            Some(seq) => format!("{seq}.bin"),
            None => format!("unknown-seq-{}.bin", ids::new_id()),
        };
        let path = dir.join(&name);
        let saved = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            inbox::write_new_file(&dir, &name, &payload)
        })
        .await;
        match saved {
            Ok(Ok(Handoff::Written | Handoff::AlreadyPresent)) => error!(
                stream = subject::OUT_STREAM,
                stream_seq = seq,
                subject = decode::shown_subject(subject),
                reason,
                saved_to = %path.display(),
                "undecodable message: saved and acknowledged"
            ),
            Ok(Err(e)) => error!(
                stream = subject::OUT_STREAM,
                stream_seq = seq,
                subject = decode::shown_subject(subject),
                reason,
                cause = %e,
                "undecodable message: could not save it; acknowledged (it stays in the stream)"
            ),
            Err(e) => error!(stream_seq = seq, cause = %e, "undecodable message: save task failed"),
        }
    }

    /// Prunes old handled ids, once an hour (the scan on the blocking pool, the removal in a
    /// group commit).
    async fn maybe_prune(&mut self) {
        if self.last_prune.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return;
        }
        self.last_prune = Some(Instant::now());
        match self.store.prune_handled(ids::now_ms()).await {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "pruned old message ids from the dedup store"),
            Err(e) => warn!(cause = %e, "pruning the dedup store failed"),
        }
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("agency", &self.adapter.agency())
            .finish_non_exhaustive()
    }
}

/// Binds to the agency's durable consumer, waiting (with backoff, logging) until the broker
/// has created it. Never creates it. Fails only if the adapter is drained meanwhile.
async fn bind_consumer(adapter: &Adapter) -> Result<PullConsumer> {
    let js = async_nats::jetstream::new(adapter.nats().clone());
    let name = subject::agency_consumer(adapter.agency());
    let mut backoff = Backoff::new(Duration::from_millis(250), MAX_BACKOFF);
    let mut attempt = 0u32;
    loop {
        if adapter.is_closed() {
            return Err(Error::Consumer {
                stream: subject::OUT_STREAM.into(),
                consumer: name,
                detail: "the adapter was drained".into(),
            });
        }
        match js
            .get_consumer_from_stream::<pull::Config, _, _>(&name, subject::OUT_STREAM)
            .await
        {
            Ok(consumer) => {
                info!(stream = subject::OUT_STREAM, consumer = %name, "bound to consumer");
                return Ok(consumer);
            }
            Err(e) => {
                attempt += 1;
                if attempt == 1 || attempt.is_multiple_of(10) {
                    warn!(
                        stream = subject::OUT_STREAM,
                        consumer = %name,
                        attempt,
                        cause = %e,
                        "consumer not available yet (the broker creates it); waiting"
                    );
                } else {
                    debug!(consumer = %name, attempt, cause = %e, "consumer not available yet");
                }
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}
