//! [`Item`]: one message the broker sent this agency, as [`crate::Incoming`] hands it over —
//! what it holds ([`ItemKind`]) and what handing it over ends with ([`Item::done`]: record,
//! receipt, ack; [`Item::confirm_purge`] for a withdrawal). Its own module so that the inbox
//! handoff and the HTTP bridge's queue, which take items, need not import the reader.

use std::fmt;

use async_nats::jetstream::message::Acker;
use tracing::{Instrument, debug, info_span};
use yeongye_proto::v1;

use crate::client::Adapter;
use crate::error::{Error, Result};
use crate::ids;
use crate::json::item_json;
use crate::storage::Storage;

/// What one message on the agency's consumer holds.
// One per message and moved rarely: boxing the delivery would only make matching clumsier.
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum ItemKind {
    /// A referral for this agency. `original` is the sender's envelope, unchanged.
    Delivery {
        referral: v1::Referral,
        original: v1::Envelope,
    },
    /// A referral this agency sent or received changed state.
    Notification(v1::Notification),
    /// The broker could not apply something this agency sent.
    Rejection(v1::Rejection),
    /// A referral this agency sent (or coordinates) missed a deadline.
    Escalation(v1::Escalation),
    /// A referral this agency received is withdrawn (consent revoked): purge its data.
    Withdrawal(v1::Withdrawal),
}

impl ItemKind {
    /// `"delivery"`, `"notification"`, `"rejection"`, `"escalation"` or `"withdrawal"`.
    pub fn name(&self) -> &'static str {
        match self {
            ItemKind::Delivery { .. } => "delivery",
            ItemKind::Notification(_) => "notification",
            ItemKind::Rejection(_) => "rejection",
            ItemKind::Escalation(_) => "escalation",
            ItemKind::Withdrawal(_) => "withdrawal",
        }
    }

    /// What the agency system gets, in proto3 JSON: the `Referral` of a delivery, else the
    /// message itself (enum values this build does not know as numbers: [`crate::json::item_json`]).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        match self {
            ItemKind::Delivery { referral, .. } => item_json(referral),
            ItemKind::Notification(n) => item_json(n),
            ItemKind::Rejection(r) => item_json(r),
            ItemKind::Escalation(e) => item_json(e),
            ItemKind::Withdrawal(w) => item_json(w),
        }
    }
}

/// Names and ids only: a referral holds personal data.
impl fmt::Debug for ItemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ItemKind::Delivery { referral, original } => f
                .debug_struct("Delivery")
                .field("referral_id", &referral.referral_id)
                .field("from_agency", &referral.from_agency)
                .field("original_message_id", &original.message_id)
                .finish_non_exhaustive(),
            ItemKind::Notification(n) => f.debug_tuple("Notification").field(n).finish(),
            ItemKind::Rejection(r) => f.debug_tuple("Rejection").field(r).finish(),
            ItemKind::Escalation(e) => f.debug_tuple("Escalation").field(e).finish(),
            ItemKind::Withdrawal(w) => f
                .debug_struct("Withdrawal")
                .field("referral_id", &w.referral_id)
                .field("consent_id", &w.consent_id)
                .finish_non_exhaustive(),
        }
    }
}

/// One new message for the agency. Hand it over, then call [`done`](Item::done); dropping it
/// without `done` leaves it to be delivered again.
pub struct Item {
    pub(crate) message_id: String,
    pub(crate) referral_id: Option<String>,
    pub(crate) kind: ItemKind,
    pub(crate) stream_sequence: Option<u64>,
    pub(crate) delivered: Option<i64>,
    pub(crate) acker: Acker,
    pub(crate) adapter: Adapter,
    pub(crate) store: Storage,
    /// Whether [`Item::record`] made the record already (then `done` does not again).
    pub(crate) recorded: bool,
}

impl Item {
    /// The broker's message id (the unit of deduplication).
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The referral the message is about (absent for a rejection of unreadable bytes).
    pub fn referral_id(&self) -> Option<&str> {
        self.referral_id.as_deref()
    }

    /// What the message holds.
    pub fn kind(&self) -> &ItemKind {
        &self.kind
    }

    /// The message's sequence in `YEONGYE_OUT`, when known.
    pub fn stream_sequence(&self) -> Option<u64> {
        self.stream_sequence
    }

    /// How many times the server has delivered this message (1 the first time), when known.
    pub fn delivery_count(&self) -> Option<i64> {
        self.delivered
    }

    /// Marks the item handled: records its id durably, publishes the `RECEIVED` receipt for a
    /// delivery (awaiting the PubAck), then acknowledges the message. Call it only after the
    /// agency system durably has the item — and for a [`ItemKind::Withdrawal`], after the
    /// client's data is purged and [`confirm_purge`](Item::confirm_purge) returned. On error,
    /// the item comes again later (after the consumer's ack wait) and is recognised as handled
    /// if the record was made.
    pub async fn done(self) -> Result<()> {
        let span = info_span!(
            "done",
            message_id = %self.message_id,
            referral_id = ids::shown_id(self.referral_id.as_deref().unwrap_or("")),
            kind = self.kind.name(),
        );
        async move {
            // Durable (flushed, in a group with whatever else is ready) before the receipt
            // and the ack.
            if !self.recorded {
                self.write_record().await?;
            }
            if let ItemKind::Delivery { referral, .. } = &self.kind {
                self.adapter
                    .send_receipt(&self.message_id, &referral.referral_id)
                    .await?;
            }
            self.acker.double_ack().await.map_err(|e| Error::Ack {
                message_id: self.message_id.clone(),
                detail: e.to_string(),
            })?;
            debug!("item handled");
            Ok(())
        }
        .instrument(span)
        .await
    }
}

impl Item {
    /// The first part of [`done`](Item::done) on its own: records the item as handled,
    /// durably (flushed), without the receipt or the ack, which `done` then sends without
    /// recording again. For a reader that logs each handoff and wants at most one item logged
    /// but not recorded at any time (a crash then repeats at most that one line) while the
    /// receipts and acks of many items travel together. An item recorded but not done comes
    /// again after the ack wait and is recognised as handled (its receipt is sent again).
    pub async fn record(&mut self) -> Result<()> {
        if !self.recorded {
            self.write_record().await?;
            self.recorded = true;
        }
        Ok(())
    }

    /// Records the message id — and for a delivery its receipt's id, together: a duplicate of
    /// a handled delivery always gets its receipt again (see `incoming`) — in one group commit.
    async fn write_record(&self) -> Result<()> {
        let receipt = ids::receipt_message_id(&self.message_id);
        let mut handled = vec![self.message_id.as_str()];
        if matches!(self.kind, ItemKind::Delivery { .. }) {
            handled.push(&receipt);
        }
        self.store.record_all(&handled, ids::now_ms()).await
    }
}

impl Item {
    /// For a [`ItemKind::Withdrawal`]: confirms to the broker that the client's data that came
    /// with the referral is purged, under the id derived from the withdrawal
    /// (`UUIDv5(ns, "<withdrawal message id>/purged")`), and records that it did so. Call it
    /// once the purge is done, then [`done`](Item::done). Returns the confirmation's message id.
    /// Any other kind of item is an input error.
    pub async fn confirm_purge(&self) -> Result<String> {
        let ItemKind::Withdrawal(w) = &self.kind else {
            return Err(Error::InvalidInput(format!(
                "confirm_purge is for withdrawals; message {} is a {}",
                self.message_id,
                self.kind.name()
            )));
        };
        let id = self
            .adapter
            .send_purge_confirmation(&self.message_id, &w.referral_id, &w.consent_id)
            .await?;
        self.store.record_all(&[&id], ids::now_ms()).await?;
        Ok(id)
    }

    /// Acknowledges the message without recording it or sending any follow-up: for callers
    /// that recorded the id themselves, in the same store transaction as their own handoff
    /// (the HTTP bridge's queue).
    pub(crate) async fn ack_only(self) -> Result<()> {
        self.acker.double_ack().await.map_err(|e| Error::Ack {
            message_id: self.message_id.clone(),
            detail: e.to_string(),
        })
    }
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Item")
            .field("message_id", &self.message_id)
            .field("referral_id", &self.referral_id)
            .field("kind", &self.kind)
            .field("stream_sequence", &self.stream_sequence)
            .finish_non_exhaustive()
    }
}
