//! `referral-broker`: validates, routes and tracks Yeongye referrals durably.
//!
//! [`run`] connects to NATS, makes sure the streams and consumers exist, and runs the event loop
//! and the status-query responder until the shutdown future completes.
//!
//! # Layout
//! - [`referral`]: the pure state machine (no I/O, no clock).
//! - [`consent`]: consent records and whether one covers a referral (pure).
//! - [`audit`]: the hash-chained audit log's entries, chaining and verification (pure).
//! - [`ingest`]: reading an inbound message into a request or a refusal (pure).
//! - [`convert`]: wire types ↔ domain types; derived message ids.
//! - [`store`]: the durable state behind a trait; sled implementation.
//! - [`server`]: the event loop (the only writer) and [`server::batch`], one batch's decisions.
//! - [`nats`]: connection, streams, consumers.
//! - [`query`]: status lookups by request/reply.
//! - [`view`], [`ops`], [`http`]: what operators see — the in-memory view of queues kept by
//!   the event loop, and the HTTP endpoint (health, metrics, JSON API, dashboard).
//! - [`operator`]: the operators' command line as a library (API client, offline audit);
//!   [`operators`]: the operators file (names and token digests) the HTTP API checks.
//! - [`onboard`]: `init`, `agency add|remove|rotate-key` and `operator add|remove` — identities (signing keys, NATS
//!   users), the registry's entries, and the generated NATS authorization config;
//!   [`credentials`]: the NATS credentials file.
//! - [`config`], [`registry`], [`clock`], [`error`]; [`log_filter`], the binary's `tracing`
//!   filter (`RUST_LOG`, the NATS client capped).

pub mod audit;
pub mod audit_report;
pub mod clock;
pub mod config;
pub mod consent;
pub mod convert;
pub mod dead_letter;
pub mod error;
pub mod http;
pub mod ingest;
/// The binary's `tracing` filter (crate `yeongye-log`, shared with the adapter).
pub use yeongye_log as log_filter;
pub mod nats;
pub mod onboard;
pub mod operator;
pub mod operators;
pub mod ops;
pub mod query;
pub mod referral;
pub mod registry;
pub mod server;
pub mod store;
pub mod time;
pub mod view;

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use error::{Error, Result};

use registry::Registry;
use store::{SledStore, Store};

/// Runs the broker until `shutdown` completes, then stops taking messages, finishes the batch in
/// hand, and returns once everything it committed is flushed.
/// How often the streams' replicas and leaders are read for the metrics.
const STREAM_HEALTH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let registry = Arc::new(Registry::load(&cfg.registry)?);
    // Before anything is opened or connected: a missing, malformed or exposed key stops the
    // start here.
    let signer = cfg.signing_key()?.map(Arc::new);
    if signer.is_none() {
        tracing::warn!("no signing_key_file: the broker's messages go out unsigned");
    }
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&cfg.store_dir)?);
    if let Some(path) = &cfg.testing_clock_offset_file {
        clock::use_offset_file(path.clone());
    }
    let checkpoint = store.checkpoint()?;
    tracing::info!(
        agencies = registry.len(),
        checkpoint,
        store = %cfg.store_dir.display(),
        nats = ?cfg.redacted_urls(),
        "starting"
    );
    // From the stored counters and the summaries of the referrals the view watches, never
    // every referral: with millions stored, reading each would take most of the start-up time
    // and memory.
    let view = {
        let mut v = view::View::start(store.counts()?);
        store.for_each_watched(&mut |summary| v.watch(&summary))?;
        v.add_dead_letters(&store.dead_letters()?);
        v
    };
    let ops = Arc::new(ops::Ops::new(store.clone(), view, registry.clone()));

    let client = nats::connect(&cfg).await?;
    let js = nats::context(client.clone());
    nats::ensure_streams(&js, &cfg).await?;
    nats::ensure_agency_consumers(&js, &registry).await?;
    let consumer = nats::broker_consumer(&js, &cfg, checkpoint).await?;

    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (commands, command_rx) = tokio::sync::mpsc::channel(16);
    let http_state = http::AppState {
        ops: ops.clone(),
        nats: client.clone(),
        commands,
    };
    let responder = query::Responder {
        store: store.clone(),
        signer: signer.clone(),
        ops: ops.clone(),
        commands: http_state.commands.clone(),
    };
    let (http_addr, http_task) = http::serve(&cfg, http_state, token.clone()).await?;
    let queries = {
        let (ops, client, token) = (ops.clone(), client.clone(), token.clone());
        tracker.spawn(async move {
            let served = query::serve(client, responder, token.clone()).await;
            ops.queries_alive
                .store(false, std::sync::atomic::Ordering::Relaxed);
            if !token.is_cancelled() {
                match &served {
                    Err(e) => tracing::error!(cause = %e, "the query responder stopped: not ready"),
                    Ok(()) => tracing::error!("the query responder stopped: not ready"),
                }
            }
            served
        })
    };
    // The streams' health, for operators (metrics, alerts): every few seconds.
    {
        let (ops, js, token) = (ops.clone(), js.clone(), token.clone());
        let replicas = cfg.stream_replicas;
        tracker.spawn(async move {
            loop {
                ops.set_streams(nats::stream_health(&js, replicas).await);
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(STREAM_HEALTH_EVERY) => {}
                }
            }
        });
    }
    let event_loop = server::EventLoop {
        signer,
        store: store.clone(),
        ops,
        js,
        cfg: Arc::new(cfg),
    };
    let mut main = tracker.spawn(event_loop.run(consumer, command_rx, token.clone()));
    tracker.close();
    tracing::info!(http = %http_addr, "broker ready");

    let joined = tokio::select! {
        _ = shutdown => {
            tracing::info!("shutdown requested");
            token.cancel();
            (&mut main).await
        }
        r = &mut main => r,
    };
    token.cancel();
    tracker.wait().await;
    let loop_result = joined.map_err(|e| Error::Nats(format!("event loop task: {e}")))?;
    let _ = http_task.await;
    if let Ok(Err(e)) = queries.await {
        tracing::warn!(cause = %e, "status responder stopped with an error");
    }
    if let Err(e) = client.drain().await {
        tracing::warn!(cause = %e, "draining the nats connection");
    }
    loop_result?;
    tracing::info!("stopped");
    Ok(())
}
