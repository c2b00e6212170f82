//! The state log: the stream `YEONGYE_STATE`, to which the leading broker appends every change
//! set before it applies it to its own store, publishes an effect or acknowledges a message.
//!
//! **The fence.** Every append carries `Nats-Expected-Last-Sequence` = the last sequence the
//! writer applied: JetStream refuses it (10071) if anything else was appended since, so a broker
//! that is not up to date — a deposed leader back from a pause — cannot write, whatever it
//! believes about its lease. Each append's `Nats-Msg-Id` is unique to it (writer, term,
//! position, part): a retry after a lost PubAck that JetStream reports as a duplicate is this
//! very append, landed (the dedup check comes before the fence: NATS-NOTES.md).
//!
//! **Parts.** A record larger than [`PART_BYTES`] is appended in consecutive parts, each fenced
//! on the one before, so no other writer's append can come between them. A reader applies a
//! record once its last part is read; parts of a record whose writer died before its last are
//! dropped when the next record begins (the next leader's `leader` record).

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::store::{ChangeSet, Store, decode_log_change, encode_change_set, encode_log_change};

pub const STATE_STREAM: &str = "YEONGYE_STATE";
pub const STATE_SUBJECT: &str = "yeongye.state";
/// Largest part of a record (NATS's default `max_payload` is 1 MiB).
pub const PART_BYTES: usize = 256 * 1024;
/// How long an append is retried (with the same id) while JetStream cannot take it (a stream
/// leader election took up to ~10 s on nats-server 2.12, ~5 s on 2.15): past it the writer steps down.
const APPEND_BUDGET: Duration = Duration::from_secs(30);

const KIND: &str = "Yeongye-Kind";
const PART: &str = "Yeongye-Part";
const RECORD: &str = "Yeongye-Record";

/// One record of the log.
#[derive(Debug, Clone)]
pub enum Record {
    /// A change set. With `envelopes_kept`, a referral's empty envelope means the one the
    /// reader's store holds: fill it in ([`Record::fill_envelopes`]) before committing.
    Change {
        change: Box<ChangeSet>,
        envelopes_kept: bool,
    },
    /// A broker took the lead: everything after it is its own.
    Leader { name: String, term: u64 },
}

impl Record {
    fn kind(&self) -> &'static str {
        match self {
            Record::Change { .. } => "change",
            Record::Leader { .. } => "leader",
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Record::Change { change, .. } => encode_change_set(change),
            Record::Leader { name, term } => format!("{term} {name}").into_bytes(),
        }
    }

    fn decode(kind: &str, bytes: &[u8]) -> Result<Record> {
        match kind {
            "change" => {
                let (change, envelopes_kept) = decode_log_change(bytes)?;
                Ok(Record::Change {
                    change: Box::new(change),
                    envelopes_kept,
                })
            }
            "leader" => {
                let text = std::str::from_utf8(bytes).map_err(|_| corrupt("leader record"))?;
                let (term, name) = text.split_once(' ').ok_or_else(|| corrupt(text))?;
                let term = term.parse().map_err(|_| corrupt(text))?;
                Ok(Record::Leader {
                    name: name.to_owned(),
                    term,
                })
            }
            other => Err(corrupt(&format!("unknown record kind {other:?}"))),
        }
    }
}

/// Puts back the envelopes a state-log record left out: each referral's empty envelope is
/// the one `store` holds (an envelope never changes once a referral exists).
pub fn fill_envelopes(change: &mut ChangeSet, store: &dyn Store) -> Result<()> {
    for r in change
        .referrals
        .iter_mut()
        .filter(|r| r.envelope.is_empty())
    {
        if let Some(stored) = store.referral(&r.id)? {
            r.envelope = stored.envelope;
        }
    }
    Ok(())
}

fn corrupt(what: &str) -> Error {
    Error::CorruptRecord {
        key: "state log".into(),
        message: what.chars().take(120).collect(),
    }
}

/// Creates or updates `YEONGYE_STATE`: file storage, `replicas`, kept until trimmed behind a
/// snapshot (no age limit: a broker on an empty disk needs it all, from the last snapshot).
pub async fn ensure_stream(js: &jetstream::Context, replicas: usize) -> Result<()> {
    js.create_or_update_stream(stream::Config {
        name: STATE_STREAM.to_owned(),
        subjects: vec![STATE_SUBJECT.to_owned()],
        num_replicas: replicas,
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_message_size: i32::try_from(PART_BYTES + 4096).unwrap_or(i32::MAX),
        duplicate_window: Duration::from_secs(120),
        // Never drop a record to make room: an append is refused instead.
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Nats(format!("stream {STATE_STREAM}: {e}")))?;
    Ok(())
}

/// The log's first and last sequences (a trimmed log starts past 1; an empty one ends at 0).
pub async fn extent(js: &jetstream::Context) -> Result<(u64, u64)> {
    let mut s = js.get_stream(STATE_STREAM).await.map_err(Error::nats)?;
    let info = s.info().await.map_err(Error::nats)?;
    Ok((info.state.first_sequence, info.state.last_sequence))
}

/// The leader's pen: appends fenced on the last sequence it wrote or read.
pub struct Writer {
    js: jetstream::Context,
    name: String,
    term: u64,
    position: std::sync::Mutex<u64>,
}

impl Writer {
    /// A writer for broker `name` leading in `term`, its store applied up to `position`.
    pub fn new(js: jetstream::Context, name: &str, term: u64, position: u64) -> Writer {
        Writer {
            js,
            name: name.to_owned(),
            term,
            position: std::sync::Mutex::new(position),
        }
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    pub fn position(&self) -> u64 {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `record`, fenced; returns the sequence of its last part. [`Error::Fenced`] if
    /// another broker appended since this one's position (it must stop leading); another error
    /// if JetStream did not take it within the budget (whether it landed is then unknown: the
    /// caller steps down and reads the log again).
    pub async fn append(&self, record: &Record) -> Result<u64> {
        self.append_encoded(record.kind(), record.encode()).await
    }

    /// [`append`](Self::append) of a change set, without copying it into a [`Record`]; the
    /// envelope of each referral `store` already holds (before this change) is left out: its
    /// readers hold it too.
    pub async fn append_change(&self, change: &ChangeSet, store: &dyn Store) -> Result<u64> {
        let bytes = encode_log_change(change, &|id| store.contains_referral(id).unwrap_or(false));
        self.append_encoded("change", bytes).await
    }

    async fn append_encoded(&self, kind: &'static str, bytes: Vec<u8>) -> Result<u64> {
        // One buffer: the parts are views of it, and a retry sends the same views again.
        let bytes = bytes::Bytes::from(bytes);
        let count = bytes.len().div_ceil(PART_BYTES).max(1);
        let start = self.position();
        let id = format!("{}.{}.{}", self.name, self.term, start);
        let mut last = start;
        for i in 0..count {
            let part = bytes
                .slice((i * PART_BYTES).min(bytes.len())..((i + 1) * PART_BYTES).min(bytes.len()));
            let mut headers = HeaderMap::new();
            headers.insert(KIND, kind);
            headers.insert(PART, format!("{}/{}", i + 1, count).as_str());
            headers.insert(RECORD, id.as_str());
            headers.insert("Nats-Expected-Last-Sequence", last.to_string().as_str());
            headers.insert("Nats-Msg-Id", format!("{id}.{i}").as_str());
            last = self.publish(headers, part, last).await?;
        }
        *self.position.lock().unwrap_or_else(|p| p.into_inner()) = last;
        Ok(last)
    }

    async fn publish(
        &self,
        headers: HeaderMap,
        payload: bytes::Bytes,
        expected: u64,
    ) -> Result<u64> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let sent = self
                .js
                .publish_with_headers(STATE_SUBJECT, headers.clone(), payload.clone())
                .await;
            let error = match sent {
                Ok(ack) => match ack.await {
                    Ok(ack) => return Ok(ack.sequence),
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                        return Err(Error::Fenced {
                            expected,
                            detail: e.to_string(),
                        });
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if started.elapsed() > APPEND_BUDGET {
                return Err(Error::Nats(format!("state log append: {error}")));
            }
            tracing::warn!(cause = %error, "state log append failed; retrying with the same id");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// How long a reader behind the log's end may go without reading anything before it is
/// opened again: a reader whose consumer was on a node that was cut off (R1, on the stream
/// leader's node when it was made) heard nothing for over 50 s (seen in the partition test),
/// async-nats's ordered consumer recreating it only after missed heartbeats, if at all.
pub const TAIL_STALL: Duration = Duration::from_secs(3);

/// Whether a [`Tail`] behind the log's end has read nothing for [`TAIL_STALL`].
#[derive(Debug)]
pub struct Progress {
    read: u64,
    since: Instant,
}

impl Progress {
    pub fn new(read: u64, now: Instant) -> Progress {
        Progress { read, since: now }
    }

    /// At `now` the tail has read up to `read` and the log ends at `last`: true if it has been
    /// behind without reading on for [`TAIL_STALL`] (the clock then starts again).
    pub fn stalled(&mut self, read: u64, last: u64, now: Instant) -> bool {
        if read != self.read || read >= last {
            *self = Progress::new(read, now);
            return false;
        }
        if now.saturating_duration_since(self.since) < TAIL_STALL {
            return false;
        }
        self.since = now;
        true
    }
}

/// A reader of the log from a position on: whole records, in order.
pub struct Tail {
    messages: consumer::pull::Ordered,
    /// The last sequence read (parts of an unfinished record included).
    pub read: u64,
    partial: Option<Partial>,
}

struct Partial {
    id: String,
    kind: String,
    next: usize,
    of: usize,
    bytes: Vec<u8>,
}

impl Tail {
    /// Reads the log after sequence `after`.
    pub async fn open(js: &jetstream::Context, name: &str, after: u64) -> Result<Tail> {
        let stream = js.get_stream(STATE_STREAM).await.map_err(Error::nats)?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                // Named by the server: a reader of an earlier run of this broker may linger
                // (until its inactivity threshold) and a new one must not collide with it.
                name: None,
                description: Some(format!("state log reader of broker {name}")),
                deliver_policy: if after == 0 {
                    consumer::DeliverPolicy::All
                } else {
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    }
                },
                ..Default::default()
            })
            .await
            .map_err(Error::nats)?;
        let messages = consumer.messages().await.map_err(Error::nats)?;
        tracing::debug!(after, "state log reader opened");
        Ok(Tail {
            messages,
            read: after,
            partial: None,
        })
    }

    /// The next whole record and the sequence of its last part; None if the reader ended.
    pub async fn next(&mut self) -> Result<Option<(u64, Record)>> {
        loop {
            let Some(m) = self.messages.next().await else {
                return Ok(None);
            };
            let m = m.map_err(Error::nats)?;
            let seq = m.info().map_err(Error::nats)?.stream_sequence;
            if seq > self.read + 1 {
                // Nothing is ever deleted inside the log: only its start is trimmed, behind a
                // snapshot. Applying on from here would silently miss what was skipped.
                return Err(Error::BehindTheLog {
                    read: self.read,
                    next: seq,
                });
            }
            self.read = seq;
            if let Some(record) = self.take(seq, &m)? {
                return Ok(Some((seq, record)));
            }
        }
    }

    fn take(&mut self, seq: u64, m: &jetstream::Message) -> Result<Option<Record>> {
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let (kind, id, part) = (header(KIND), header(RECORD), header(PART));
        let (i, of) = part
            .split_once('/')
            .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
            .filter(|(i, n)| *i >= 1 && i <= n)
            .ok_or_else(|| corrupt(&format!("record at {seq}: bad part {part:?}")))?;
        let continues = self
            .partial
            .as_ref()
            .is_some_and(|p| p.id == id && p.next == i && p.of == of);
        if !continues {
            if let Some(p) = self.partial.take() {
                tracing::warn!(
                    record = %p.id,
                    parts = p.next - 1,
                    of = p.of,
                    "dropping a record its writer did not finish"
                );
            }
            if i != 1 {
                // The rest of a record whose first part is behind the reader's start (or was
                // dropped): nothing of it is applied.
                return Ok(None);
            }
            self.partial = Some(Partial {
                id,
                kind,
                next: 1,
                of,
                bytes: Vec::new(),
            });
        }
        let Some(p) = self.partial.as_mut() else {
            return Ok(None);
        };
        p.bytes.extend_from_slice(&m.payload);
        p.next += 1;
        if p.next <= p.of {
            return Ok(None);
        }
        let Some(p) = self.partial.take() else {
            return Ok(None);
        };
        Record::decode(&p.kind, &p.bytes).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_behind_the_end_that_reads_nothing_for_the_stall_time_is_stalled_once() {
        let t0 = Instant::now();
        let mut p = Progress::new(5, t0);
        // Behind (the log ends at 9), nothing read: not yet, then stalled, then the clock
        // starts again.
        assert!(!p.stalled(5, 9, t0 + TAIL_STALL / 2));
        assert!(p.stalled(5, 9, t0 + TAIL_STALL));
        assert!(!p.stalled(5, 9, t0 + TAIL_STALL + TAIL_STALL / 2));
        assert!(p.stalled(5, 9, t0 + TAIL_STALL * 2));
    }

    #[test]
    fn a_reader_that_reads_on_or_is_at_the_end_is_not_stalled() {
        let t0 = Instant::now();
        let mut p = Progress::new(5, t0);
        // Reading on: each step restarts the clock.
        assert!(!p.stalled(6, 9, t0 + TAIL_STALL));
        assert!(!p.stalled(7, 9, t0 + TAIL_STALL * 2));
        // At the end (or past what the last look at the log said): never stalled, however long.
        assert!(!p.stalled(9, 9, t0 + TAIL_STALL * 3));
        assert!(!p.stalled(9, 9, t0 + TAIL_STALL * 9));
        assert!(!p.stalled(9, 8, t0 + TAIL_STALL * 10));
        // The log grows: the clock starts at the last look that saw the reader at the end.
        assert!(!p.stalled(9, 12, t0 + TAIL_STALL * 10 + TAIL_STALL / 2));
        assert!(p.stalled(9, 12, t0 + TAIL_STALL * 11));
        // A reader opened again from an earlier position (a record read in part): moved.
        assert!(!p.stalled(8, 12, t0 + TAIL_STALL * 12));
    }
}
