//! [`Queue`]: the HTTP bridge's durable queue of incoming items, between the agency's consumer
//! and the agency system (webhook or pull), in the adapter's store (`crate::storage`, which
//! owns the trees below).
//!
//! ```text
//! http_pending    seq (u64 BE) -> Entry (JSON)   not yet taken by the agency system, in order
//! http_finishing  seq (u64 BE) -> Entry (JSON)   taken; its follow-up not yet published
//! http_index      message id   -> seq            which entry holds a message
//! ```
//!
//! An item is queued and its message id recorded as handled in the dedup store in **one**
//! commit, flushed, before the JetStream message is acknowledged: a crash before that
//! leaves the message to come again; after it, the message is recognised and never queued
//! twice. When the agency system takes an entry (webhook 2xx, or pull ack) it moves to
//! `http_finishing` (or is removed if nothing follows up); the follow-up — the `RECEIVED`
//! receipt of a delivery, the purge confirmation of a withdrawal — is published with its
//! derived id, and only then is the entry removed and the follow-up's id recorded (so a repeat
//! of the message gets the follow-up again; see `incoming`).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::ids;
use crate::item::{Item, ItemKind};
use crate::storage::Storage;

/// What must be published once the agency system has taken an item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum FollowUp {
    /// The `RECEIVED` status update of a delivery.
    Receipt { referral_id: String },
    /// The purge confirmation of a withdrawal.
    PurgeConfirmation {
        referral_id: String,
        consent_id: String,
    },
}

/// One queued item.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) kind: String,
    pub(crate) message_id: String,
    pub(crate) referral_id: Option<String>,
    pub(crate) queued_at_ms: i64,
    /// The payload in proto3 JSON: the `Referral` of a delivery, else the message itself.
    pub(crate) item: Value,
    pub(crate) follow_up: Option<FollowUp>,
}

impl Entry {
    /// The entry for an item arriving now.
    pub(crate) fn from_item(item: &Item, now_ms: i64) -> Result<Entry> {
        let follow_up = match item.kind() {
            ItemKind::Delivery { referral, .. } => Some(FollowUp::Receipt {
                referral_id: referral.referral_id.clone(),
            }),
            ItemKind::Withdrawal(w) => Some(FollowUp::PurgeConfirmation {
                referral_id: w.referral_id.clone(),
                consent_id: w.consent_id.clone(),
            }),
            _ => None,
        };
        Ok(Entry {
            kind: item.kind().name().to_owned(),
            message_id: item.message_id().to_owned(),
            referral_id: item.referral_id().map(str::to_owned),
            queued_at_ms: now_ms,
            item: item.kind().to_json()?,
            follow_up,
        })
    }

    /// The document the agency system gets (webhook body, one element of `GET /v1/inbox`):
    /// `{kind, message_id, referral_id, queued_at_ms, item}`.
    pub(crate) fn document(&self) -> Value {
        serde_json::json!({
            "kind": self.kind,
            "message_id": self.message_id,
            "referral_id": self.referral_id,
            "queued_at_ms": self.queued_at_ms,
            "item": self.item,
        })
    }
}

/// Ids only: the item may hold personal data.
impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("kind", &self.kind)
            .field("message_id", &self.message_id)
            .field("referral_id", &self.referral_id)
            .field("follow_up", &self.follow_up)
            .finish_non_exhaustive()
    }
}

/// What acknowledging a message id did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// It was pending; now it is taken.
    Now,
    /// It was taken before (acknowledging again is harmless).
    Already,
    /// No such message was ever queued (or it is older than the dedup retention).
    Unknown,
}

/// The queue. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Queue {
    store: Storage,
}

impl Queue {
    /// The queue in the adapter's store.
    pub(crate) fn open(store: &Storage) -> Queue {
        Queue {
            store: store.clone(),
        }
    }

    /// Queues `entry` and records its message id as handled, in one commit (flushed).
    /// Returns false (and changes nothing) if the id was recorded already.
    pub(crate) async fn enqueue(&self, entry: &Entry) -> Result<bool> {
        let bytes = serde_json::to_vec(entry)
            .map_err(|e| Error::Protocol(format!("cannot encode a queue entry: {e}")))?;
        let id = entry.message_id.clone();
        let at = entry.queued_at_ms;
        self.store
            .commit(move |tx| {
                if !tx.record(&id, at)? {
                    return Ok(false);
                }
                tx.queue_push(&id, &bytes)?;
                Ok(true)
            })
            .await
    }

    /// Up to `limit` pending entries, oldest first.
    pub(crate) async fn pending(&self, limit: usize) -> Result<Vec<(u64, Entry)>> {
        self.store
            .queue_pending(limit)
            .await?
            .into_iter()
            .map(decode)
            .collect()
    }

    /// How many entries are pending.
    pub(crate) fn pending_len(&self) -> usize {
        self.store.queue_pending_len()
    }

    /// Every entry whose follow-up is still to be published, oldest first.
    pub(crate) async fn finishing(&self) -> Result<Vec<(u64, Entry)>> {
        self.store
            .queue_finishing()
            .await?
            .into_iter()
            .map(decode)
            .collect()
    }

    /// Marks the pending entry of `message_id` taken by the agency system, flushed.
    pub(crate) async fn take(&self, message_id: &str) -> Result<Taken> {
        let Some(seq) = self.store.queue_index(message_id)? else {
            return Ok(if self.store.contains(message_id)? {
                Taken::Already
            } else {
                Taken::Unknown
            });
        };
        self.take_seq(seq).await
    }

    /// Marks the pending entry `seq` taken: moved to finishing if something follows up,
    /// removed otherwise. Flushed.
    pub(crate) async fn take_seq(&self, seq: u64) -> Result<Taken> {
        self.store
            .commit(move |tx| {
                let Some(bytes) = tx.pending_remove(seq)? else {
                    return Ok(Taken::Already);
                };
                match serde_json::from_slice::<Entry>(&bytes) {
                    Ok(e) if e.follow_up.is_some() => tx.finishing_put(seq, &bytes)?,
                    Ok(e) => tx.index_remove(&e.message_id)?,
                    Err(_) => {}
                }
                Ok(Taken::Now)
            })
            .await
    }

    /// Takes every pending delivery of `referral_id` (whose receipt is yet to be sent). Returns
    /// how many.
    pub(crate) async fn take_deliveries_of(&self, referral_id: &str) -> Result<usize> {
        let mut taken = 0;
        for (seq, e) in self.pending(usize::MAX).await? {
            if matches!(&e.follow_up, Some(FollowUp::Receipt { referral_id: r }) if r == referral_id)
                && self.take_seq(seq).await? == Taken::Now
            {
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Removes a finishing entry once its follow-up `follow_up_id` is published, recording
    /// that id as sent. Flushed.
    pub(crate) async fn finish(&self, seq: u64, entry: &Entry, follow_up_id: &str) -> Result<()> {
        let now = ids::now_ms();
        let (message_id, follow_up_id) = (entry.message_id.clone(), follow_up_id.to_owned());
        self.store
            .commit(move |tx| {
                if !follow_up_id.is_empty() {
                    tx.record(&follow_up_id, now)?;
                }
                tx.finishing_remove(seq)?;
                tx.index_remove(&message_id)
            })
            .await
    }
}

fn decode((seq, bytes): (u64, Vec<u8>)) -> Result<(u64, Entry)> {
    let entry = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Protocol(format!("corrupt queue entry: {e}")))?;
    Ok((seq, entry))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(message_id: &str, follow_up: Option<FollowUp>) -> Entry {
        Entry {
            kind: if follow_up.is_some() {
                "delivery"
            } else {
                "notification"
            }
            .into(),
            message_id: message_id.into(),
            referral_id: Some("r-1".into()),
            queued_at_ms: 7,
            item: serde_json::json!({"referralId": "r-1"}),
            follow_up,
        }
    }

    fn receipt() -> Option<FollowUp> {
        Some(FollowUp::Receipt {
            referral_id: "r-1".into(),
        })
    }

    #[tokio::test]
    async fn lifecycle_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup");
        {
            let store = Storage::open(&path, 14).unwrap();
            let q = Queue::open(&store);
            assert!(q.enqueue(&entry("m-1", receipt())).await.unwrap());
            assert!(q.enqueue(&entry("m-2", None)).await.unwrap());
            // A repeat is not queued twice.
            assert!(!q.enqueue(&entry("m-1", receipt())).await.unwrap());
            assert!(store.contains("m-1").unwrap());
        }
        // Everything survives a reopen (the flush happened before enqueue returned).
        let store = Storage::open(&path, 14).unwrap();
        let q = Queue::open(&store);
        let pending = q.pending(10).await.unwrap();
        let ids: Vec<_> = pending.iter().map(|(_, e)| e.message_id.as_str()).collect();
        assert_eq!(ids, ["m-1", "m-2"]);
        assert_eq!(q.pending(1).await.unwrap().len(), 1);

        // Taking a notification removes it; taking a delivery leaves its follow-up to do.
        assert_eq!(q.take("m-2").await.unwrap(), Taken::Now);
        assert_eq!(q.take("m-2").await.unwrap(), Taken::Already);
        assert_eq!(q.take("m-1").await.unwrap(), Taken::Now);
        assert_eq!(q.take("m-1").await.unwrap(), Taken::Already);
        assert_eq!(q.take("never").await.unwrap(), Taken::Unknown);
        assert_eq!(q.pending_len(), 0);
        let finishing = q.finishing().await.unwrap();
        assert_eq!(finishing.len(), 1);
        let (seq, e) = &finishing[0];
        q.finish(*seq, e, "follow-1").await.unwrap();
        assert!(q.finishing().await.unwrap().is_empty());
        assert!(store.contains("follow-1").unwrap());
        assert_eq!(q.take("m-1").await.unwrap(), Taken::Already);

        // A status report on a referral takes its pending delivery.
        assert!(q.enqueue(&entry("m-9", receipt())).await.unwrap());
        assert_eq!(q.take_deliveries_of("r-other").await.unwrap(), 0);
        assert_eq!(q.take_deliveries_of("r-1").await.unwrap(), 1);
        assert_eq!(q.pending_len(), 0);
        assert_eq!(q.finishing().await.unwrap().len(), 1);
    }

    #[test]
    fn documents_and_debug() {
        let e = entry("m-1", receipt());
        let doc = e.document();
        assert_eq!(doc["kind"], "delivery");
        assert_eq!(doc["message_id"], "m-1");
        assert_eq!(doc["item"]["referralId"], "r-1");
        assert!(doc.get("follow_up").is_none());
        let mut personal = e.clone();
        personal.item = serde_json::json!({"client": {"name": "홍길동"}});
        assert!(!format!("{personal:?}").contains("홍길동"));
    }
}
