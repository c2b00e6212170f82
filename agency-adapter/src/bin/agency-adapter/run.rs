//! `run`: the long-running adapter. Reads the agency's consumer until SIGINT or SIGTERM; for
//! each item, hands it to the `--inbox` folder (if given), prints one JSON line of ids and
//! states (never personal data) to stdout, then marks it done. A signal lets the item in hand
//! finish before the adapter drains its connection and exits.
//!
//! Items come in batches — every new message already received when the first arrives
//! ([`Incoming::next_ready`]) — handed over, printed and recorded ([`Item::record`], flushed)
//! one by one in the order the broker sent them, then marked done together: their receipts
//! and acks are in flight together. Nothing is acknowledged before its record is flushed. The
//! records are not grouped across the batch on purpose: a line printed but not yet recorded
//! is printed again after a crash, and recording each before printing the next keeps that to
//! one line (the store still groups whatever else is ready with each record).
//!
//! Exactly once is the inbox: an item handed over again (the adapter died before marking it
//! done) finds its file present and leaves it. The stdout line is a log of the handoff and is
//! printed again in that case: at least once.
//!
//! A withdrawal handed to the inbox purges the referral's file there; the purge is then
//! confirmed to the broker (derived id) before the item is marked done. Without `--inbox` the
//! adapter holds no data to purge: the line is printed and the agency confirms with
//! `purge-confirm` once its system has purged.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{Instrument, debug, error, info, info_span, warn};
use yeongye_adapter::{Adapter, AdapterConfig, FolderInbox, Handoff, Item, ItemKind, v1};

/// The most items taken in one batch.
const MAX_BATCH: usize = 256;

use crate::print_json;

pub(crate) async fn run(cfg: AdapterConfig, inbox: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let inbox = inbox.map(FolderInbox::open).transpose()?;
    info!(config = ?cfg, inbox = ?inbox.as_ref().map(FolderInbox::root), "starting");
    let adapter = Adapter::builder(cfg)
        .retry_on_initial_connect(true)
        .connect()
        .await?;

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut incoming = tokio::select! {
        signal = &mut shutdown => {
            info!(signal, "stopping before the consumer was bound");
            return Ok(ExitCode::SUCCESS);
        }
        incoming = adapter.incoming() => incoming?,
    };
    info!(agency = adapter.agency(), "receiving");

    let code = loop {
        let next = tokio::select! {
            biased;
            signal = &mut shutdown => {
                info!(signal, "stopping");
                break ExitCode::SUCCESS;
            }
            next = incoming.next_ready(MAX_BATCH) => next,
        };
        match next {
            None => break ExitCode::SUCCESS,
            Some(Ok(items)) => {
                // Not raced against the signal: the items in hand are finished.
                if let Err(e) = handle_all(inbox.as_ref(), items).await {
                    error!(cause = %format!("{e:#}"), "stopping");
                    break ExitCode::FAILURE;
                }
            }
            Some(Err(e)) => {
                error!(cause = %e, "receiving failed; the message will come again");
                tokio::select! {
                    signal = &mut shutdown => {
                        info!(signal, "stopping");
                        break ExitCode::SUCCESS;
                    }
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    drop(incoming);
    if let Err(e) = adapter.drain().await {
        warn!(cause = %e, "draining the NATS connection failed");
    }
    info!("stopped");
    Ok(code)
}

/// Hands a batch over item by item, in order (a withdrawal's purge after the delivery it
/// withdraws), printing each line; then records every item handed over at once (the records
/// share one flush: the store commits concurrent records as one group), then marks them done
/// (receipts and acks). A crash before the records are flushed brings the batch's messages
/// again: the inbox handoff is idempotent (one file per item), and the lines of that one batch
/// (at most `MAX_BATCH`) may be printed again: stdout is at-least-once, repeats carry the same
/// message ids. Errors other than a broken stdout are logged and leave the item to come again;
/// a broken stdout stops the adapter (the items of the batch not yet printed come again).
async fn handle_all(inbox: Option<&FolderInbox>, items: Vec<Item>) -> anyhow::Result<()> {
    let mut handed = Vec::with_capacity(items.len());
    for item in items {
        let span = span_of(&item);
        if !hand_over(inbox, &item).instrument(span.clone()).await {
            continue;
        }
        print_json(&summary(&item), false)?;
        handed.push((item, span));
    }
    let recorded = futures::future::join_all(handed.into_iter().map(|(mut item, span)| {
        async move {
            match item.record().await {
                Ok(()) => Some((item, tracing::Span::current())),
                Err(e) => {
                    error!(cause = %e, "recording the item failed; it will come again");
                    None
                }
            }
        }
        .instrument(span)
    }))
    .await;
    futures::future::join_all(recorded.into_iter().flatten().map(|(item, span)| {
        async move {
            if let Err(e) = item.done().await {
                error!(cause = %e, "marking the item done failed; it will come again");
            }
        }
        .instrument(span)
    }))
    .await;
    Ok(())
}

fn span_of(item: &Item) -> tracing::Span {
    info_span!(
        "item",
        message_id = item.message_id(),
        referral_id = item.referral_id().unwrap_or(""),
        kind = item.kind().name(),
    )
}

/// Hands one item to the inbox (if any), purging and confirming a withdrawal. False (logged)
/// if that failed: the item comes again.
async fn hand_over(inbox: Option<&FolderInbox>, item: &Item) -> bool {
    let Some(inbox) = inbox else {
        return true;
    };
    match inbox.hand_over(item).await {
        Ok((path, Handoff::Written)) => info!(path = %path.display(), "handed over"),
        Ok((path, Handoff::AlreadyPresent)) => {
            debug!(path = %path.display(), "was already handed over");
        }
        Err(e) => {
            error!(cause = %e, "handoff failed; the item will come again");
            return false;
        }
    }
    if matches!(item.kind(), ItemKind::Withdrawal(_)) {
        match item.confirm_purge().await {
            Ok(id) => info!(purge_message_id = %id, "purged and confirmed"),
            Err(e) => {
                error!(cause = %e, "purge confirmation failed; the item will come again");
                return false;
            }
        }
    }
    true
}

/// The stdout line for an item: ids and states only.
fn summary(item: &Item) -> Value {
    match item.kind() {
        ItemKind::Delivery { referral, .. } => json!({
            "kind": "delivery",
            "message_id": item.message_id(),
            "referral_id": item.referral_id(),
            "from_agency": referral.from_agency,
        }),
        ItemKind::Notification(n) => json!({
            "kind": "notification",
            "message_id": item.message_id(),
            "referral_id": item.referral_id(),
            "state": enum_name(n.state, |v| v1::ReferralState::try_from(v).ok().map(|s| s.as_str_name())),
            "by_agency": n.by_agency,
            "at_ms": n.at_ms,
        }),
        ItemKind::Rejection(r) => json!({
            "kind": "rejection",
            "message_id": item.message_id(),
            "referral_id": item.referral_id(),
            "rejected_message_id": r.rejected_message_id,
            "code": enum_name(r.code, |v| v1::ReasonCode::try_from(v).ok().map(|c| c.as_str_name())),
            "detail": r.detail,
        }),
        ItemKind::Escalation(e) => json!({
            "kind": "escalation",
            "message_id": item.message_id(),
            "referral_id": item.referral_id(),
            "deadline": enum_name(e.kind, |v| v1::DeadlineKind::try_from(v).ok().map(|k| k.as_str_name())),
            "to_agency": e.to_agency,
            "state": enum_name(e.state, |v| v1::ReferralState::try_from(v).ok().map(|s| s.as_str_name())),
        }),
        ItemKind::Withdrawal(w) => json!({
            "kind": "withdrawal",
            "message_id": item.message_id(),
            "referral_id": item.referral_id(),
            "consent_id": w.consent_id,
            "at_ms": w.at_ms,
        }),
        other => json!({
            "kind": other.name(),
            "message_id": item.message_id(),
            "referral_id": item.referral_id(),
        }),
    }
}

/// An enum value's proto name, or its number as text if this build does not know it.
fn enum_name(value: i32, name: impl Fn(i32) -> Option<&'static str>) -> String {
    name(value).map_or_else(|| value.to_string(), str::to_owned)
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
pub(crate) async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                warn!(cause = %e, "cannot listen for SIGTERM; only SIGINT stops the adapter");
                ctrl_c().await
            }
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c().await
    }
}

async fn ctrl_c() -> &'static str {
    if let Err(e) = tokio::signal::ctrl_c().await {
        warn!(cause = %e, "cannot listen for SIGINT");
        std::future::pending::<()>().await;
    }
    "SIGINT"
}
