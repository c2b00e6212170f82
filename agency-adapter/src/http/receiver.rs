//! The receiving side of `serve`: reads the agency's consumer and puts each new item in the
//! durable [`Queue`], acknowledging the JetStream message only once the item is queued (and
//! recorded as handled) and flushed. The follow-ups (receipt, purge confirmation) wait until the
//! agency system has taken the item (see `worker.rs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use super::queue::{Entry, Queue};
use crate::client::Adapter;
use crate::ids;
use crate::item::Item;

/// The most items taken in one batch.
const MAX_BATCH: usize = 256;

/// Reads the consumer until `cancel`.
pub(crate) async fn run(
    adapter: Adapter,
    queue: Queue,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut incoming = tokio::select! {
        () = cancel.cancelled() => return,
        incoming = adapter.incoming() => match incoming {
            Ok(i) => i,
            Err(e) => {
                error!(cause = %e, "cannot read the agency's consumer; nothing will be received");
                return;
            }
        },
    };
    info!(agency = adapter.agency(), "receiving into the HTTP inbox");
    loop {
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            next = incoming.next_ready(MAX_BATCH) => next,
        };
        match next {
            None => return,
            Some(Ok(items)) => {
                // Not raced against cancellation: the items in hand are finished. Queued
                // together, they share the store's flushes.
                let handled =
                    futures::future::join_all(items.into_iter().map(|i| handle(&queue, i))).await;
                if handled.iter().any(|&queued| queued) {
                    wake.notify_one();
                }
                if !handled.iter().all(|&queued| queued)
                    && sleep_or_cancel(Duration::from_secs(1), &cancel).await
                {
                    return;
                }
            }
            Some(Err(e)) => {
                warn!(cause = %e, "receiving failed; the message will come again");
                if sleep_or_cancel(Duration::from_secs(1), &cancel).await {
                    return;
                }
            }
        }
    }
}

/// Queues one item and acknowledges it. False if it could not be queued (it comes again).
async fn handle(queue: &Queue, item: Item) -> bool {
    let span = info_span!(
        "item",
        message_id = item.message_id(),
        referral_id = item.referral_id().unwrap_or(""),
        kind = item.kind().name(),
    );
    async move {
        let entry = match Entry::from_item(&item, ids::now_ms()) {
            Ok(e) => e,
            Err(e) => {
                error!(cause = %e, "cannot queue the item; it will come again");
                return false;
            }
        };
        match queue.enqueue(&entry).await {
            Ok(true) => info!("queued for the agency system"),
            Ok(false) => info!("was queued before"),
            Err(e) => {
                error!(cause = %e, "cannot queue the item; it will come again");
                return false;
            }
        }
        if let Err(e) = item.ack_only().await {
            warn!(cause = %e, "ack failed; the message will come again and be recognised");
        }
        true
    }
    .instrument(span)
    .await
}

async fn sleep_or_cancel(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}
