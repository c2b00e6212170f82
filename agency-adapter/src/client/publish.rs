//! The one JetStream publish path: send an [`Outgoing`] with its `Nats-Msg-Id`, await the PubAck,
//! and retry transient failures with the same message id inside a bounded budget.
//!
//! Transient: PubAck timeout, no responders (`StreamNotFound`: the stream is between leaders or
//! the server is restarting), a broken connection, too many PubAcks outstanding, and JetStream
//! error replies. Permanent: a message over `max_payload`. A publish refused by permissions
//! shows up only as a timeout (and a `ServerError` event, logged by the event callback).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use prost::Message as _;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use yeongye_proto::signing::PrivateKey;
use yeongye_proto::v1;

use crate::outgoing::Outgoing;

/// Total time a publish may take, retries included, by default.
pub(crate) const DEFAULT_BUDGET: Duration = Duration::from_secs(30);
/// How long one attempt waits for its PubAck.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Publishes to JetStream with bounded retries. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Publisher {
    js: jetstream::Context,
    budget: Duration,
    signer: Option<Arc<PrivateKey>>,
}

impl Publisher {
    pub(crate) fn new(
        mut js: jetstream::Context,
        budget: Duration,
        signer: Option<Arc<PrivateKey>>,
    ) -> Publisher {
        js.set_timeout(ATTEMPT_TIMEOUT.min(budget));
        Publisher { js, budget, signer }
    }

    /// The envelope's bytes as sent: signed with the agency's key when it has one. Ed25519
    /// is deterministic, so a retry sends the very same bytes.
    pub(crate) fn encode(&self, envelope: &v1::Envelope) -> Bytes {
        match &self.signer {
            Some(key) => {
                let mut signed = envelope.clone();
                key.sign(&mut signed);
                Bytes::from(signed.encode_to_vec())
            }
            None => Bytes::from(envelope.encode_to_vec()),
        }
    }

    /// Publishes `out` and returns once JetStream has stored it (or already had it: a repeat
    /// inside the duplicate window is acknowledged as a duplicate, which is success here).
    pub(crate) async fn publish(&self, out: &Outgoing) -> Result<()> {
        let payload = self.encode(out.envelope());
        self.publish_within(out, &payload, self.budget).await
    }

    /// [`publish`](Self::publish) of `out`'s signed bytes `payload`, retrying for `budget`.
    pub(crate) async fn publish_within(
        &self,
        out: &Outgoing,
        payload: &Bytes,
        budget: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match self.attempt(out, payload.clone()).await {
                Ok(ack) => {
                    debug!(
                        message_id = out.message_id(),
                        subject = out.subject(),
                        stream = %ack.stream,
                        stream_seq = ack.sequence,
                        duplicate = ack.duplicate,
                        attempts,
                        "publish acknowledged"
                    );
                    return Ok(());
                }
                Err(err) => err,
            };
            let elapsed = started.elapsed();
            let wait = backoff.next_wait();
            let give_up = !is_transient(err.kind()) || elapsed + wait >= budget;
            if give_up {
                return Err(Error::Publish {
                    subject: out.subject().to_owned(),
                    message_id: out.message_id().to_owned(),
                    attempts,
                    elapsed,
                    source: err,
                });
            }
            warn!(
                message_id = out.message_id(),
                subject = out.subject(),
                attempt = attempts,
                cause = %err,
                retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "publish not acknowledged; retrying with the same message id"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        out: &Outgoing,
        payload: Bytes,
    ) -> std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        self.attempt_raw(out.subject(), out.message_id(), payload)
            .await
    }

    /// Whether the client is connected to a server now.
    pub(crate) fn connected(&self) -> bool {
        self.js.client().connection_state() == async_nats::connection::State::Connected
    }

    /// One publish of `payload` (a signed envelope) to `subject` under `message_id`, awaiting
    /// its PubAck (at most [`ATTEMPT_TIMEOUT`]).
    pub(crate) async fn attempt_raw(
        &self,
        subject: &str,
        message_id: &str,
        payload: Bytes,
    ) -> std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        let message = PublishMessage::build()
            .payload(payload)
            .message_id(message_id);
        self.js
            .send_publish(subject.to_owned(), message)
            .await?
            .await
    }
}

/// Whether a publish that failed this way may succeed when tried again.
pub(crate) fn is_transient(kind: PublishErrorKind) -> bool {
    !matches!(
        kind,
        PublishErrorKind::MaxPayloadExceeded
            | PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::WrongLastSequence
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_kinds() {
        assert!(is_transient(PublishErrorKind::TimedOut));
        assert!(is_transient(PublishErrorKind::StreamNotFound));
        assert!(is_transient(PublishErrorKind::BrokenPipe));
        assert!(is_transient(PublishErrorKind::Other));
        assert!(!is_transient(PublishErrorKind::MaxPayloadExceeded));
    }
}
