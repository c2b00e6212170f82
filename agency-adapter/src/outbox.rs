//! [`Outbox`]: messages the adapter accepted and JetStream has not yet acknowledged, kept in
//! the adapter's store (tree `outbox`, `crate::storage`) and forwarded in order, one at a time,
//! by one task, under their own message ids.
//!
//! # The promise
//!
//! A message the adapter answered "queued" for is on disk (flushed, in a group commit) before
//! the answer. The forwarder publishes the oldest entry, waits for its PubAck, removes it, and
//! only then publishes the next: a later entry is never stored by JetStream before an earlier
//! one (with a window of publishes in flight, a publish lost with a dropped connection could be
//! overtaken by the next one, sent from the client's buffer after the reconnect). Every retry
//! carries the entry's message id (`Nats-Msg-Id`): inside the stream's duplicate window
//! JetStream drops a repeat, after it the broker does (it keeps applied ids for days). A removal
//! after the PubAck is not waited for: losing it in a crash sends the message again, which is
//! harmless for the same reason.
//!
//! # Order with the fast path
//!
//! A send checks whether the outbox is empty (nothing queued, nothing being queued) and the
//! connection up: then it publishes directly, as before the outbox existed, with many such
//! publishes in flight at once (see [`Outbox::submit`]). Otherwise, and when the direct publish
//! is not acknowledged within `queue_after`, the message joins the outbox behind everything
//! there. So a send that starts after another one returned (stored or queued) is stored by
//! JetStream after it; sends running at the same time have no order among them, as before.
//!
//! # The record (private; version 1)
//!
//! ```text
//! "YOB1" | enqueued_at_ms i64 BE | message_id, subject, referral_id, consent_id: u16 BE len ++ UTF-8
//!        | payload (the signed envelope as sent): u32 BE len ++ bytes | SHA-256(all before)[..8]
//! ```
//! A record that does not decode (truncated, checksum, a field that breaks the rules, a
//! payload that is not the envelope its message id names) is **set aside**, bytes unchanged,
//! into tree `outbox_corrupt`, with an error log naming its seq; the others are forwarded.
//! `/healthz`, `/metrics` and `agency-adapter status` show how many were set aside.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State as ConnState;
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};
use yeongye_proto::v1;

use crate::backoff::Backoff;
use crate::client::publish::{Publisher, is_transient};
use crate::config::OutboxConfig;
use crate::error::{Error, Result};
use crate::ids;
use crate::outgoing::{Outgoing, is_valid_id};
use crate::storage::Storage;

const MAGIC: &[u8; 4] = b"YOB1";
const CHECKSUM_LEN: usize = 8;
/// The forwarder's retry waits: from this, doubling, jittered...
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// ...up to this (a returning hub is noticed within about this long).
const MAX_RETRY: Duration = Duration::from_secs(2);
/// How often the status file is rewritten at most.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Records read per scan at start (small in tests, so that they cross pages).
const LOAD_PAGE: usize = if cfg!(test) { 4 } else { 1024 };
/// The status file, in the state directory, for `agency-adapter status` while another process
/// holds the store.
pub(crate) const STATUS_FILE: &str = "outbox-status.json";

/// What became of a message handed to the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sent {
    /// JetStream stored it (PubAck received).
    Stored,
    /// The hub did not acknowledge it in time: it waits in the adapter's durable outbox and is
    /// forwarded, in order and under its message id, when the hub is back. Nothing to retry.
    Queued,
}

impl Sent {
    /// `"stored"` or `"queued"`, as the CLI and the HTTP API say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Sent::Stored => "stored",
            Sent::Queued => "queued",
        }
    }
}

/// The outbox as `/healthz`, `/metrics` and `agency-adapter status` show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OutboxStatus {
    /// Messages waiting (accepted, not yet acknowledged by JetStream).
    pub depth: u64,
    /// Their signed envelopes' bytes.
    pub bytes: u64,
    /// When the oldest waiting message was queued (Unix ms).
    pub oldest_queued_at_ms: Option<i64>,
    /// How long the oldest has waited, ms, when this was taken.
    pub oldest_age_ms: Option<u64>,
    /// `"ok"` (the last publish was acknowledged, or none was tried) or `"unreachable"`.
    pub hub: &'static str,
    /// Why the last publish failed, while the hub is unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Records set aside because they did not decode: their seq and why.
    pub corrupt: Vec<CorruptRecord>,
    pub max_entries: u64,
    pub max_bytes: u64,
    /// Messages that entered the outbox since start.
    pub queued_total: u64,
    /// Messages the forwarder got acknowledged since start.
    pub forwarded_total: u64,
}

/// An outbox record set aside: where it is (`outbox_corrupt` tree, key = seq) and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CorruptRecord {
    pub seq: u64,
    pub error: String,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) enqueued_at_ms: i64,
    pub(crate) message_id: String,
    pub(crate) subject: String,
    pub(crate) referral_id: String,
    pub(crate) consent_id: String,
    /// The signed envelope, as sent.
    pub(crate) payload: Vec<u8>,
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.enqueued_at_ms.to_be_bytes());
        for field in [
            &self.message_id,
            &self.subject,
            &self.referral_id,
            &self.consent_id,
        ] {
            // Ids and subjects are short (checked when built); clamp all the same.
            let bytes = &field.as_bytes()[..field.len().min(usize::from(u16::MAX))];
            out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(bytes);
        }
        out.extend_from_slice(
            &u32::try_from(self.payload.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&self.payload);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum[..CHECKSUM_LEN]);
        out
    }

    /// Decodes and checks a record; the error says what is wrong (never the contents).
    pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Record, String> {
        let body_len = bytes
            .len()
            .checked_sub(CHECKSUM_LEN)
            .ok_or_else(|| format!("{} bytes: shorter than any record", bytes.len()))?;
        let (body, sum) = bytes.split_at(body_len);
        if !body.starts_with(MAGIC) {
            return Err("not an outbox record of version 1 (no YOB1 header)".into());
        }
        if Sha256::digest(body)[..CHECKSUM_LEN] != *sum {
            return Err("checksum mismatch (the record's bytes changed)".into());
        }
        let mut r = Reader(&body[MAGIC.len()..]);
        let at: [u8; 8] = r
            .take(8, "enqueued_at_ms")?
            .try_into()
            .map_err(|_| "time")?;
        let mut text = |name: &str| -> std::result::Result<String, String> {
            let len: [u8; 2] = r.take(2, name)?.try_into().map_err(|_| name.to_owned())?;
            let raw = r.take(usize::from(u16::from_be_bytes(len)), name)?;
            String::from_utf8(raw.to_vec()).map_err(|_| format!("{name} is not UTF-8"))
        };
        let message_id = text("message_id")?;
        let subject = text("subject")?;
        let referral_id = text("referral_id")?;
        let consent_id = text("consent_id")?;
        let len: [u8; 4] = r
            .take(4, "payload length")?
            .try_into()
            .map_err(|_| "payload length")?;
        let len = usize::try_from(u32::from_be_bytes(len)).map_err(|_| "payload length")?;
        let payload = r.take(len, "payload")?.to_vec();
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the payload", r.0.len()));
        }
        if !is_valid_id(&message_id) {
            return Err("message_id is not a valid id".into());
        }
        for (name, id) in [("referral_id", &referral_id), ("consent_id", &consent_id)] {
            if !id.is_empty() && !is_valid_id(id) {
                return Err(format!("{name} is not a valid id"));
            }
        }
        if !subject.starts_with("yeongye.in.") {
            return Err("subject is not an inbound subject".into());
        }
        let envelope: v1::Envelope = prost::Message::decode(payload.as_slice())
            .map_err(|e| format!("payload is not an envelope: {e}"))?;
        if envelope.message_id != message_id {
            return Err("payload is not the envelope of this record's message id".into());
        }
        Ok(Record {
            enqueued_at_ms: i64::from_be_bytes(at),
            message_id,
            subject,
            referral_id,
            consent_id,
            payload,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("truncated in {what}"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

/// What the outbox keeps in memory of each waiting entry (the payload stays on disk).
#[derive(Debug)]
struct Meta {
    bytes: u64,
    at_ms: i64,
    message_id: String,
}

#[derive(Default)]
struct State {
    /// Every waiting entry, by seq (= the order they are forwarded in).
    entries: BTreeMap<u64, Meta>,
    ids: HashSet<String>,
    bytes: u64,
    /// Entries being committed (counted against the bound, not yet in `entries`).
    reserved: u64,
    reserved_bytes: u64,
    waiters: HashMap<u64, Vec<oneshot::Sender<()>>>,
    /// The last publish failed (and why).
    unreachable: Option<String>,
    corrupt: Vec<CorruptRecord>,
    queued_total: u64,
    forwarded_total: u64,
    /// Bumped by every change, for the status file.
    version: u64,
}

impl State {
    /// Takes in the record `seq` read at start: waiting if it decodes, else to be set aside.
    fn take(&mut self, store: &Storage, seq: u64, bytes: &[u8], bad: &mut Vec<u64>) {
        match Record::decode(bytes) {
            Ok(r) => {
                let size = r.payload.len() as u64;
                self.bytes += size;
                self.ids.insert(r.message_id.clone());
                self.entries.insert(
                    seq,
                    Meta {
                        bytes: size,
                        at_ms: r.enqueued_at_ms,
                        message_id: r.message_id,
                    },
                );
            }
            Err(why) => {
                error!(
                    seq,
                    store = %store.path().display(),
                    cause = %why,
                    "outbox record is corrupt: set aside in tree outbox_corrupt, the others are forwarded"
                );
                bad.push(seq);
                self.corrupt.push(CorruptRecord { seq, error: why });
            }
        }
    }
}

/// The outbox of one store. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    store: Storage,
    limits: OutboxConfig,
    state: Mutex<State>,
    wake: Notify,
    status_file: Option<PathBuf>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Outbox {
    /// Reads every record of the store's outbox: the ones that decode wait to be forwarded,
    /// the others are set aside (logged as errors, named by seq; nothing is deleted).
    pub(crate) async fn load(
        store: Storage,
        limits: OutboxConfig,
        status_file: Option<PathBuf>,
    ) -> Result<Outbox> {
        let mut state = State::default();
        let mut bad = Vec::new();
        // In pages: the payloads are not all held at once.
        let mut after = 0;
        loop {
            let page = store.outbox_after(after, LOAD_PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (seq, bytes) in page {
                state.take(&store, seq, &bytes, &mut bad);
            }
        }
        if !bad.is_empty() {
            store
                .commit(move |tx| {
                    for seq in &bad {
                        tx.outbox_set_aside(*seq)?;
                    }
                    Ok(())
                })
                .await?;
        }
        for seq in store.outbox_corrupt_seqs().await? {
            if !state.corrupt.iter().any(|c| c.seq == seq) {
                state.corrupt.push(CorruptRecord {
                    seq,
                    error: "set aside at an earlier start (see that start's log)".into(),
                });
            }
        }
        if !state.entries.is_empty() {
            info!(
                depth = state.entries.len(),
                bytes = state.bytes,
                "outbox holds messages from before: forwarding them first"
            );
        }
        Ok(Outbox {
            shared: Arc::new(Shared {
                store,
                limits,
                state: Mutex::new(state),
                wake: Notify::new(),
                status_file,
            }),
        })
    }

    /// Whether nothing waits and nothing is being queued.
    fn is_idle(&self) -> bool {
        let st = lock(&self.shared.state);
        st.entries.is_empty() && st.reserved == 0
    }

    /// Whether `message_id` waits in the outbox.
    pub(crate) fn holds(&self, message_id: &str) -> bool {
        lock(&self.shared.state).ids.contains(message_id)
    }

    /// Hands `out` (its signed bytes `payload`) to JetStream: directly when the outbox is idle
    /// and the connection up, else through the outbox. Returns [`Sent::Stored`] once JetStream
    /// acknowledged it within `queue_after`, [`Sent::Queued`] once it waits durably instead.
    pub(crate) async fn submit(
        &self,
        publisher: &Publisher,
        connection: ConnState,
        out: &Outgoing,
        payload: Bytes,
        max_payload: impl FnOnce() -> usize,
    ) -> Result<Sent> {
        let budget = self.shared.limits.queue_after();
        let started = tokio::time::Instant::now();
        if self.is_idle() && connection == ConnState::Connected {
            match tokio::time::timeout(budget, publisher.publish_within(out, &payload, budget))
                .await
            {
                Ok(Ok(())) => return Ok(Sent::Stored),
                // Refused for good (too large): queueing it would only block the outbox.
                Ok(Err(e)) if matches!(&e, Error::Publish { source, .. } if !is_transient(source.kind())) =>
                {
                    return Err(e);
                }
                Ok(Err(e)) => {
                    info!(message_id = out.message_id(), cause = %e, "not acknowledged in time: queueing");
                }
                Err(_) => {
                    info!(
                        message_id = out.message_id(),
                        "not acknowledged in time: queueing"
                    );
                }
            }
        }
        let max = max_payload();
        if payload.len() > max {
            return Err(Error::InvalidInput(format!(
                "the signed message is {} bytes, over the NATS server's max_payload of {max}: it could never be stored",
                payload.len()
            )));
        }
        let (seq, done) = self.enqueue(out, payload).await?;
        if connection != ConnState::Connected || lock(&self.shared.state).unreachable.is_some() {
            return Ok(Sent::Queued);
        }
        let left = budget.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, done).await {
            Ok(Ok(())) => Ok(Sent::Stored),
            _ => {
                info!(seq, message_id = out.message_id(), "queued in the outbox");
                Ok(Sent::Queued)
            }
        }
    }

    /// Appends `out` to the outbox, flushed; returns its seq and a receiver told when
    /// JetStream acknowledged it. Refused past the configured bound.
    async fn enqueue(
        &self,
        out: &Outgoing,
        payload: Bytes,
    ) -> Result<(u64, oneshot::Receiver<()>)> {
        let size = payload.len() as u64;
        let limits = &self.shared.limits;
        {
            let mut st = lock(&self.shared.state);
            let entries = st.entries.len() as u64 + st.reserved;
            let bytes = st.bytes + st.reserved_bytes;
            if entries >= limits.max_entries || bytes.saturating_add(size) > limits.max_bytes {
                warn!(
                    message_id = out.message_id(),
                    entries, bytes, "outbox full: refusing"
                );
                return Err(Error::OutboxFull {
                    entries,
                    bytes,
                    max_entries: limits.max_entries,
                    max_bytes: limits.max_bytes,
                });
            }
            st.reserved += 1;
            st.reserved_bytes += size;
        }
        let at_ms = ids::now_ms();
        let record = Record {
            enqueued_at_ms: at_ms,
            message_id: out.message_id().to_owned(),
            subject: out.subject().to_owned(),
            referral_id: out.referral_id().to_owned(),
            consent_id: out.consent_id().to_owned(),
            payload: payload.to_vec(),
        }
        .encode();
        let committed = self
            .shared
            .store
            .commit(move |tx| tx.outbox_push(&record))
            .await;
        let (tell, done) = oneshot::channel();
        {
            let mut st = lock(&self.shared.state);
            st.reserved -= 1;
            st.reserved_bytes -= size;
            let seq = committed?;
            st.entries.insert(
                seq,
                Meta {
                    bytes: size,
                    at_ms,
                    message_id: out.message_id().to_owned(),
                },
            );
            st.ids.insert(out.message_id().to_owned());
            st.bytes += size;
            st.queued_total += 1;
            st.version += 1;
            st.waiters.entry(seq).or_default().push(tell);
            drop(st);
            self.shared.wake.notify_one();
            Ok((seq, done))
        }
    }

    /// What `/healthz`, `/metrics` and `agency-adapter status` show.
    pub(crate) fn status(&self) -> OutboxStatus {
        let st = lock(&self.shared.state);
        let oldest = st.entries.values().map(|m| m.at_ms).min();
        OutboxStatus {
            depth: st.entries.len() as u64,
            bytes: st.bytes,
            oldest_queued_at_ms: oldest,
            oldest_age_ms: oldest.map(|at| u64::try_from(ids::now_ms() - at).unwrap_or(0)),
            hub: if st.unreachable.is_some() {
                "unreachable"
            } else {
                "ok"
            },
            last_error: st.unreachable.clone(),
            corrupt: st.corrupt.clone(),
            max_entries: self.shared.limits.max_entries,
            max_bytes: self.shared.limits.max_bytes,
            queued_total: st.queued_total,
            forwarded_total: st.forwarded_total,
        }
    }

    /// Forwards the outbox until `cancel`: the oldest entry, one at a time, each retried under
    /// its message id until JetStream acknowledges it.
    pub(crate) async fn forward(self, publisher: Publisher, cancel: CancellationToken) {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        let status_writer = tokio::spawn(self.clone().write_status(cancel.clone()));
        loop {
            let wake = self.shared.wake.notified();
            let next = lock(&self.shared.state)
                .entries
                .first_key_value()
                .map(|(seq, m)| (*seq, m.message_id.clone()));
            let Some((seq, message_id)) = next else {
                tokio::select! {
                    () = wake => continue,
                    () = cancel.cancelled() => break,
                }
            };
            let record = match self.shared.store.outbox_get(seq) {
                Ok(Some(bytes)) => Record::decode(&bytes),
                Ok(None) => Err("gone from the store".to_owned()),
                Err(e) => {
                    warn!(seq, cause = %e, "cannot read an outbox record; retrying");
                    if sleep_or_cancel(backoff.next_wait(), &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            let record = match record {
                Ok(r) => r,
                Err(why) => {
                    self.set_aside(seq, why).await;
                    continue;
                }
            };
            let span = info_span!("forward", seq, message_id = %message_id, referral_id = %record.referral_id);
            // Not connected: no attempt (it would only wait for its PubAck in the client's
            // buffer); the hub is unreachable until the client reconnects.
            let outcome = if publisher.connected() {
                publisher
                    .attempt_raw(
                        &record.subject,
                        &record.message_id,
                        Bytes::from(record.payload),
                    )
                    .instrument(span.clone())
                    .await
                    .map_err(|e| (!is_transient(e.kind()), e.to_string()))
            } else {
                Err((false, "not connected to any NATS server".to_owned()))
            };
            match outcome {
                Ok(ack) => {
                    backoff.reset();
                    let _enter = span.enter();
                    info!(
                        stream_seq = ack.sequence,
                        duplicate = ack.duplicate,
                        "queued message stored"
                    );
                    self.acknowledged(seq);
                }
                Err((permanent, cause)) => {
                    {
                        let mut st = lock(&self.shared.state);
                        if st.unreachable.is_none() {
                            let _enter = span.enter();
                            warn!(cause = %cause, "hub unreachable: messages wait in the outbox");
                        }
                        st.unreachable = Some(cause.clone());
                        st.version += 1;
                    }
                    if permanent {
                        let _enter = span.enter();
                        error!(cause = %cause, "JetStream refuses this queued message; the outbox waits behind it (see /healthz)");
                    }
                    let wait = if permanent {
                        MAX_RETRY * 5
                    } else {
                        backoff.next_wait()
                    };
                    if sleep_or_cancel(wait, &cancel).await {
                        break;
                    }
                }
            }
        }
        status_writer.abort();
    }

    /// Entry `seq` is stored by JetStream: forget it (durably later) and tell its waiters.
    fn acknowledged(&self, seq: u64) {
        let waiters = {
            let mut st = lock(&self.shared.state);
            if let Some(meta) = st.entries.remove(&seq) {
                st.bytes -= meta.bytes;
                st.ids.remove(&meta.message_id);
            }
            if st.unreachable.take().is_some() {
                info!("hub reachable again: forwarding the outbox");
            }
            st.forwarded_total += 1;
            st.version += 1;
            st.waiters.remove(&seq).unwrap_or_default()
        };
        for w in waiters {
            let _ = w.send(());
        }
        // Not waited for: a removal lost in a crash sends the message again (same id).
        if let Err(e) = self
            .shared
            .store
            .commit_detached(move |tx| tx.outbox_remove(seq))
        {
            warn!(seq, cause = %e, "cannot remove a forwarded outbox entry (it will be sent again, harmlessly)");
        }
    }

    async fn set_aside(&self, seq: u64, why: String) {
        error!(seq, cause = %why, "outbox record is corrupt: set aside in tree outbox_corrupt, the others are forwarded");
        if let Err(e) = self
            .shared
            .store
            .commit(move |tx| tx.outbox_set_aside(seq))
            .await
        {
            warn!(seq, cause = %e, "cannot set the corrupt record aside");
        }
        let mut st = lock(&self.shared.state);
        if let Some(meta) = st.entries.remove(&seq) {
            st.bytes -= meta.bytes;
            st.ids.remove(&meta.message_id);
        }
        st.waiters.remove(&seq);
        st.corrupt.push(CorruptRecord { seq, error: why });
        st.version += 1;
    }

    /// Rewrites the status file (if any) when the outbox changed, at most every second.
    async fn write_status(self, cancel: CancellationToken) {
        let Some(path) = self.shared.status_file.clone() else {
            return;
        };
        let mut written = None;
        loop {
            let version = lock(&self.shared.state).version;
            if written != Some(version) {
                let status = StatusFile {
                    pid: std::process::id(),
                    written_at_ms: ids::now_ms(),
                    outbox: self.status(),
                };
                if let Err(e) = write_atomically(&path, &status) {
                    warn!(cause = %e, "cannot write the outbox status file");
                }
                written = Some(version);
            }
            if sleep_or_cancel(STATUS_EVERY, &cancel).await {
                return;
            }
        }
    }
}

/// The status file's content.
#[derive(Serialize)]
struct StatusFile {
    pid: u32,
    written_at_ms: i64,
    outbox: OutboxStatus,
}

fn write_atomically(path: &std::path::Path, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The outbox of the state directory `cfg` names, for `agency-adapter status`, without
/// connecting: read from the store when no other process holds it (`"source": "store"`), else
/// from the status file the process holding it keeps (`"source": "status file"`, with its pid
/// and when it wrote it).
pub async fn report(cfg: &crate::AdapterConfig) -> Result<serde_json::Value> {
    let path = cfg.dedup_dir();
    match Storage::open_async_waiting(path, cfg.dedup_retention_days, Duration::ZERO).await {
        Ok(store) => {
            let outbox = Outbox::load(store, cfg.outbox.clone(), None).await?;
            Ok(serde_json::json!({ "source": "store", "outbox": outbox.status() }))
        }
        Err(Error::StateDirInUse { .. }) => {
            let file = cfg.state_dir.join(STATUS_FILE);
            let text = std::fs::read(&file).map_err(|e| {
                Error::io(
                    format!(
                        "another process holds the state directory and its status file {} cannot be read",
                        file.display()
                    ),
                    e,
                )
            })?;
            status_from_file(&text, &file, ids::now_ms())
        }
        Err(e) => Err(e),
    }
}

/// The status another process wrote to `file` (its bytes `text`), with the oldest entry's age
/// as of `now`. The file is the adapter's own, but read as untrusted: anything that is not an
/// object with an `outbox` object is a clear error, never a panic.
fn status_from_file(text: &[u8], file: &std::path::Path, now: i64) -> Result<serde_json::Value> {
    let bad = |why: String| Error::Protocol(format!("status file {}: {why}", file.display()));
    let mut value: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let root = value
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let outbox = root
        .get_mut("outbox")
        .and_then(serde_json::Value::as_object_mut)
        .ok_or_else(|| bad("no outbox object in it".into()))?;
    // The age as of now, not as of the file.
    if let Some(at) = outbox
        .get("oldest_queued_at_ms")
        .and_then(serde_json::Value::as_i64)
    {
        let age = u64::try_from(now.saturating_sub(at)).unwrap_or(0);
        outbox.insert("oldest_age_ms".into(), serde_json::Value::from(age));
    }
    root.insert("source".into(), serde_json::Value::from("status file"));
    Ok(value)
}

/// Sleeps `wait`; true if `cancel` fired first.
async fn sleep_or_cancel(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = cancel.cancelled() => true,
    }
}

#[cfg(test)]
mod tests;
