//! [`IdempotencyStore`]: `Idempotency-Key` for the API's POSTs, kept durably in the adapter's
//! store (tree `http_idempotency`, owned by `crate::storage`), so that a POST retried — after
//! a timeout, a lost response, a restart of the adapter — returns the first result instead of
//! sending again.
//!
//! The first request with a key builds its message (ids fixed) and stores it with a
//! fingerprint of the request (SHA-256 of method, path and body) and the response, flushed,
//! **before** publishing. A later request with the same key and fingerprint gets the stored
//! response; if the first never finished publishing, the stored message — same message id —
//! is published again (JetStream and the broker drop the repeat). The same key with a
//! different request is refused (422). Keys are kept for `idempotency_retention_hours`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use yeongye_proto::v1;

use super::problem::{Problem, ProblemType};
use crate::error::{Error, Result};
use crate::outgoing::Outgoing;
use crate::storage::Storage;
/// Longest key accepted.
pub(crate) const MAX_KEY_LEN: usize = 255;

/// What is stored per key.
#[derive(Serialize, Deserialize)]
struct Record {
    fingerprint: String,
    created_at_ms: i64,
    subject: String,
    referral_id: String,
    consent_id: String,
    /// The envelope, protobuf-encoded, hex.
    envelope: String,
    response: Value,
    completed: bool,
}

/// A message and the response that reports it.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) out: Outgoing,
    pub(crate) response: Value,
}

/// What to do with a request that carries a key.
#[derive(Debug)]
pub(crate) enum Begin {
    /// Publish this (a first request, or a retry of one that did not finish), then
    /// [`complete`](IdempotencyStore::complete).
    Publish(Box<Prepared>),
    /// Done before: answer this again.
    Replay(Value),
}

/// The key store. Cheap to clone.
#[derive(Clone)]
pub(crate) struct IdempotencyStore {
    store: Storage,
}

/// What storing a new key found.
enum Stored {
    /// The record was stored.
    Now,
    /// A concurrent request with the same key stored first: this is its record.
    Before(Vec<u8>),
}

impl IdempotencyStore {
    pub(crate) fn open(store: &Storage) -> IdempotencyStore {
        IdempotencyStore {
            store: store.clone(),
        }
    }

    /// Looks `key` up; if it is new, calls `prepare` (whose error — bad input — is returned as
    /// it is, storing nothing) and stores the result, flushed.
    pub(crate) async fn begin(
        &self,
        key: &str,
        fingerprint: &str,
        now_ms: i64,
        prepare: impl FnOnce() -> std::result::Result<Prepared, Problem>,
    ) -> std::result::Result<Begin, Problem> {
        if let Some(existing) = self.store.idempotency_record(key)? {
            return self.resolve(&existing, fingerprint);
        }
        let prepared = prepare()?;
        let record = Record {
            fingerprint: fingerprint.to_owned(),
            created_at_ms: now_ms,
            subject: prepared.out.subject().to_owned(),
            referral_id: prepared.out.referral_id().to_owned(),
            consent_id: prepared.out.consent_id().to_owned(),
            envelope: hex::encode(prost::Message::encode_to_vec(prepared.out.envelope())),
            response: prepared.response.clone(),
            completed: false,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| {
            Problem::from_error(&Error::Protocol(format!("idempotency record: {e}")))
        })?;
        let owned_key = key.to_owned();
        let stored = self
            .store
            .commit(move |tx| {
                if let Some(current) = tx.idempotency_get(&owned_key)? {
                    return Ok(Stored::Before(current));
                }
                tx.idempotency_put(&owned_key, &bytes)?;
                Ok(Stored::Now)
            })
            .await?;
        match stored {
            Stored::Now => Ok(Begin::Publish(Box::new(prepared))),
            Stored::Before(current) => self.resolve(&current, fingerprint),
        }
    }

    fn resolve(&self, bytes: &[u8], fingerprint: &str) -> std::result::Result<Begin, Problem> {
        let record: Record = serde_json::from_slice(bytes).map_err(|e| {
            Problem::from_error(&Error::Protocol(format!("corrupt idempotency record: {e}")))
        })?;
        if record.fingerprint != fingerprint {
            return Err(Problem::new(
                ProblemType::IdempotencyKeyReused,
                "this Idempotency-Key was used with a different request (method, path or body); use a new key for a new request",
            )
            .field("Idempotency-Key"));
        }
        if record.completed {
            return Ok(Begin::Replay(record.response));
        }
        let envelope_bytes = hex::decode(&record.envelope).map_err(|e| {
            Problem::from_error(&Error::Protocol(format!("corrupt idempotency record: {e}")))
        })?;
        let envelope: v1::Envelope =
            prost::Message::decode(envelope_bytes.as_slice()).map_err(|e| {
                Problem::from_error(&Error::Protocol(format!("corrupt idempotency record: {e}")))
            })?;
        Ok(Begin::Publish(Box::new(Prepared {
            out: Outgoing::from_parts(
                record.subject,
                record.referral_id,
                record.consent_id,
                envelope,
            ),
            response: record.response,
        })))
    }

    /// Marks `key`'s message published: later requests replay the response. Flushed.
    pub(crate) async fn complete(&self, key: &str) -> Result<()> {
        let key = key.to_owned();
        self.store
            .commit(move |tx| {
                let Some(bytes) = tx.idempotency_get(&key)? else {
                    return Ok(());
                };
                let Ok(mut record) = serde_json::from_slice::<Record>(&bytes) else {
                    return Ok(());
                };
                record.completed = true;
                // Serializing a record read back always works; if not, it stays incomplete
                // (a retry publishes the same message id again: harmless).
                if let Ok(updated) = serde_json::to_vec(&record) {
                    tx.idempotency_put(&key, &updated)?;
                }
                Ok(())
            })
            .await
    }

    /// Removes keys created before `cutoff_ms` (and unreadable ones); returns how many. The
    /// scan runs on the blocking pool.
    pub(crate) async fn prune(&self, cutoff_ms: i64) -> Result<usize> {
        self.store
            .prune_idempotency(move |value| {
                serde_json::from_slice::<Record>(value)
                    .map(|r| r.created_at_ms < cutoff_ms)
                    .unwrap_or(true)
            })
            .await
    }
}

/// Checks an `Idempotency-Key` header value: 1-255 visible ASCII characters. A structured-field
/// string (`"..."`) is unquoted.
pub(crate) fn check_key(raw: &[u8]) -> std::result::Result<String, Problem> {
    let bad = || {
        Problem::new(
            ProblemType::InvalidParameter,
            format!("Idempotency-Key must be 1-{MAX_KEY_LEN} visible ASCII characters"),
        )
        .field("Idempotency-Key")
    };
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if text.is_empty() || text.len() > MAX_KEY_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outgoing;

    fn prepared() -> Prepared {
        let out = outgoing::status_update("cc-1", "r-1", v1::Status::Accepted, "").unwrap();
        let response = serde_json::json!({"message_id": out.message_id()});
        Prepared { out, response }
    }

    #[tokio::test]
    async fn first_retry_replay_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup");
        let first = {
            let store = Storage::open(&path, 14).unwrap();
            let idem = IdempotencyStore::open(&store);
            let Begin::Publish(p) = idem
                .begin("k-1", "f-1", 10, || Ok(prepared()))
                .await
                .unwrap()
            else {
                panic!("a new key publishes");
            };
            // Not completed (say the publish failed): a retry publishes the same message.
            let Begin::Publish(again) = idem
                .begin("k-1", "f-1", 11, || panic!("not prepared twice"))
                .await
                .unwrap()
            else {
                panic!("an unfinished key publishes again");
            };
            assert_eq!(again.out, p.out);
            assert_eq!(again.response, p.response);
            idem.complete("k-1").await.unwrap();
            p
        };
        // After a restart: the response is replayed.
        let store = Storage::open(&path, 14).unwrap();
        let idem = IdempotencyStore::open(&store);
        match idem.begin("k-1", "f-1", 12, || panic!("no")).await.unwrap() {
            Begin::Replay(v) => assert_eq!(v, first.response),
            other => panic!("{other:?}"),
        }
        let p = idem
            .begin("k-1", "f-2", 12, || panic!("no"))
            .await
            .unwrap_err();
        assert_eq!(p.kind(), Some(ProblemType::IdempotencyKeyReused));
        // Bad input stores nothing.
        let p = idem
            .begin("k-2", "f-1", 12, || {
                Err(Problem::new(ProblemType::InvalidField, "x"))
            })
            .await
            .unwrap_err();
        assert_eq!(p.kind(), Some(ProblemType::InvalidField));
        assert!(matches!(
            idem.begin("k-2", "f-1", 12, || Ok(prepared()))
                .await
                .unwrap(),
            Begin::Publish(_)
        ));
        assert_eq!(idem.prune(11).await.unwrap(), 1);
        assert_eq!(idem.prune(13).await.unwrap(), 1);
    }

    #[test]
    fn keys() {
        assert_eq!(check_key(b"abc-123").unwrap(), "abc-123");
        assert_eq!(check_key(b"\"quoted\"").unwrap(), "quoted");
        for bad in [&b""[..], b"\"\"", b"has space", b"\xff", &[b'a'; 256][..]] {
            assert_eq!(
                check_key(bad).unwrap_err().kind(),
                Some(ProblemType::InvalidParameter)
            );
        }
    }
}
