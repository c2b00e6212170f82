//! [`Backend`]: what the HTTP handlers need from the adapter — publish a prepared message, ask
//! the broker about a referral or a consent — as a trait, so that the handler layer can be
//! tested with a stub that records what would be sent.

use std::future::Future;

use yeongye_proto::v1;

use crate::client::Adapter;
use crate::error::Result;
use crate::outbox::{OutboxStatus, Sent};
use crate::outgoing::Outgoing;
use crate::sealing::Sealing;

/// The adapter as the HTTP handlers see it.
pub(crate) trait Backend: Clone + Send + Sync + 'static {
    /// This agency's id.
    fn agency(&self) -> &str;
    /// The keys referrals and notes are sealed to.
    fn sealing(&self) -> &Sealing;
    /// Hands a prepared message over: returns once JetStream stored it, or once it waits in
    /// the outbox (the hub did not answer in time).
    fn publish(&self, out: &Outgoing) -> impl Future<Output = Result<Sent>> + Send;
    /// The outbox now (`None` without one).
    fn outbox_status(&self) -> Option<OutboxStatus>;
    /// Whether `message_id` waits in the outbox.
    fn is_queued(&self, message_id: &str) -> bool;
    /// Asks the broker about a referral.
    fn status(&self, referral_id: &str) -> impl Future<Output = Result<v1::StatusReply>> + Send;
    /// Asks the broker about a consent.
    fn consent(&self, consent_id: &str) -> impl Future<Output = Result<v1::ConsentReply>> + Send;
}

impl Backend for Adapter {
    fn agency(&self) -> &str {
        Adapter::agency(self)
    }

    fn sealing(&self) -> &Sealing {
        Adapter::sealing(self)
    }

    async fn publish(&self, out: &Outgoing) -> Result<Sent> {
        Adapter::submit(self, out).await
    }

    fn outbox_status(&self) -> Option<OutboxStatus> {
        Adapter::outbox_status_now(self)
    }

    fn is_queued(&self, message_id: &str) -> bool {
        Adapter::is_queued(self, message_id)
    }

    async fn status(&self, referral_id: &str) -> Result<v1::StatusReply> {
        Adapter::status(self, referral_id).await
    }

    async fn consent(&self, consent_id: &str) -> Result<v1::ConsentReply> {
        Adapter::consent(self, consent_id).await
    }
}
