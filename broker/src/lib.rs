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
pub mod cluster;
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

/// How often the streams' replicas and leaders are read for the metrics.
const STREAM_HEALTH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a broker that stepped down leaves the lease to the others before it may take it
/// again (it takes it back after that if no other broker did).
const STEP_DOWN_HOLD_OFF: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a broker whose leading ended on a NATS error leaves the lease to the others (or,
/// alone, waits) before it tries again.
const LEAD_ERROR_HOLD_OFF: std::time::Duration = std::time::Duration::from_secs(1);

/// The broker's store, at `store_dir`.
fn open_store(cfg: &Config) -> Result<Arc<dyn Store>> {
    let store = if cfg.testing_store_without_background_flush {
        tracing::warn!("TESTING: the store's background flusher is off");
        SledStore::open_without_background_flush(&cfg.store_dir)?
    } else {
        SledStore::open(&cfg.store_dir)?
    };
    Ok(Arc::new(match cfg.testing_store_reopen_after_bytes {
        Some(bytes) => store.reopen_after(bytes),
        None => store,
    }))
}

/// Runs the broker until `shutdown` completes, then stops taking messages, finishes the batch in
/// hand, gives its lease back if it leads, and returns once everything it committed is flushed.
///
/// The broker is a member of its group (`cluster`): it follows the state log as a standby until
/// it takes the lease, then leads until it stops, steps down, loses the lease or is fenced, and
/// then follows again. A single broker is a group of one: the same path.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let registry = Arc::new(Registry::load(&cfg.registry)?);
    // Before anything is opened or connected: a missing, malformed or exposed key stops the
    // start here.
    let signer = cfg.signing_key()?.map(Arc::new);
    if signer.is_none() {
        tracing::warn!("no signing_key_file: the broker's messages go out unsigned");
    }
    // Opening the store (sled replays its log since the last open) and restoring an empty one
    // from a snapshot are bulk reads: freed memory goes back at once until they are done.
    let start_up = yeongye_alloc::purge_at_once();
    let mut store = open_store(&cfg)?;
    if let Some(path) = &cfg.testing_clock_offset_file {
        clock::use_offset_file(path.clone());
    }
    tracing::info!(
        broker = %cfg.broker_name,
        agencies = registry.len(),
        checkpoint = store.checkpoint()?,
        state_position = store.state_position()?,
        store = %cfg.store_dir.display(),
        nats = ?cfg.redacted_urls(),
        "starting"
    );
    let client = nats::connect(&cfg).await?;
    let js = nats::context(client.clone());
    nats::ensure_streams(&js, &cfg).await?;
    nats::ensure_agency_consumers(&js, &registry).await?;
    // A standby away for long: its store is behind the trimmed log, so it starts again from
    // the newest snapshot (restored by `join`) instead of refusing to start.
    if let Some((position, first)) =
        cluster::behind_the_log(&js, store.as_ref(), cfg.stream_replicas).await?
    {
        drop(store);
        let aside = cluster::move_aside(&cfg.store_dir)?;
        tracing::warn!(
            position,
            log_starts_at = first,
            moved_to = %aside.display(),
            "this store is behind the trimmed state log: moved aside; starting from the newest \
             snapshot (the copy aside may be deleted)"
        );
        store = open_store(&cfg)?;
    }
    let view = ops::load_view(store.as_ref())?;
    let ops = Arc::new(ops::Ops::new(store.clone(), view, registry.clone()));
    let member = cluster::Member::join(js.clone(), &cfg, store.clone(), ops.clone()).await?;
    drop(start_up);

    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (commands, mut command_rx) = tokio::sync::mpsc::channel(16);
    let http_state = http::AppState {
        ops: ops.clone(),
        nats: client.clone(),
        commands,
    };
    let (http_addr, http_task) = http::serve(&cfg, http_state.clone(), token.clone()).await?;
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
    tracker.close();
    tracing::info!(http = %http_addr, "broker ready");
    let cfg = Arc::new(cfg);
    let members = async {
        let mut hold_off = std::time::Duration::ZERO;
        loop {
            let followed = member.follow(&mut command_rx, &token, hold_off).await;
            hold_off = std::time::Duration::ZERO;
            let lead_token = token.child_token();
            // Renewals stop when leading has ended, not at the shutdown request (see `keep`).
            let renewals = CancellationToken::new();
            let taken = match followed {
                Ok(Some((lease, tail))) => {
                    // Renewed from now on: catching up may take longer than the lease lives,
                    // and a standby taking it meanwhile would race this broker's first append.
                    let keeper = member.keep(lease, renewals.clone(), lead_token.clone());
                    match member.take_over(lease.term, tail, &lead_token).await {
                        Ok(Some(writer)) => Ok(Some((keeper, writer))),
                        not_leading => {
                            member.give_back(&renewals, keeper).await;
                            not_leading.map(|_| None)
                        }
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => Err(e),
            };
            let (keeper, writer) = match taken {
                Ok(Some(taken)) => taken,
                Ok(None) => continue,
                // NATS unreachable, a stream without a leader for a while: follow again.
                Err(e @ (Error::Nats(_) | Error::Fenced { .. })) => {
                    tracing::warn!(cause = %e, "following the state log failed; again in a second");
                    tokio::select! {
                        _ = token.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    }
                }
                Err(e) => return Err(e),
            };
            ops.set_cluster(|c| c.takeovers += 1);
            let snapshots = Arc::new(cluster::snapshot::Snapshotter::new(
                js.clone(),
                member.snapshots.clone(),
                ops.clone(),
                store.clone(),
                cfg.snapshot_dir(),
                cfg.snapshot_every_records,
                cfg.snapshot_upload_mib_per_sec.saturating_mul(1 << 20),
                ops.cluster().snapshot,
            ));
            let lead = Leadership {
                snapshots,
                cfg: cfg.clone(),
                store: store.clone(),
                ops: ops.clone(),
                js: js.clone(),
                client: client.clone(),
                signer: signer.clone(),
                commands: http_state.commands.clone(),
            };
            let leading = lead.run(writer, &mut command_rx, lead_token.clone());
            let led = leading.await;
            ops.set_cluster(|c| c.leading = false);
            member.give_back(&renewals, keeper).await;
            match led {
                // Stopping, and another broker leads already (the lease was lost, say, while
                // NATS could not be reached): the fence refused the turn in hand, which
                // nothing committed; its messages go to the new leader. Not an error.
                Err(e @ Error::Fenced { .. }) if token.is_cancelled() => {
                    tracing::warn!(cause = %e, "stopping: another broker leads; the turn in hand was not committed");
                    return Ok(());
                }
                _ if token.is_cancelled() => return led.map(|_| ()),
                Ok(server::Stop::StepDown) => hold_off = STEP_DOWN_HOLD_OFF,
                Ok(server::Stop::Cancelled) => {}
                Err(e @ (Error::Fenced { .. } | Error::Nats(_))) => {
                    tracing::warn!(cause = %e, "stopped leading: following the state log");
                    // Fenced: another broker leads already. A NATS error may come again at
                    // once: the lease is left to the others for a moment (seen: a failure at
                    // each start of leading, and the lease taken again within milliseconds,
                    // thousands of times, a `leader` record appended each time).
                    if matches!(e, Error::Nats(_)) {
                        hold_off = LEAD_ERROR_HOLD_OFF;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    };
    let members = async {
        let r: Result<()> = members.await;
        token.cancel();
        r
    };
    // On a task of its own: joined with the members, it was polled only when the event loop's
    // task yielded, and a loop busy with a backlog (each turn in `block_in_place`) noticed a
    // SIGTERM seconds late (1.4 s in a debug build; over 10 s once under a loaded test run).
    let watch = tokio::spawn({
        let token = token.clone();
        async move {
            tokio::select! {
                _ = shutdown => {
                    tracing::info!("shutdown requested");
                    token.cancel();
                }
                _ = token.cancelled() => {}
            }
        }
    });
    let result = members.await;
    let _ = watch.await;
    tracker.wait().await;
    let _ = http_task.await;
    if let Err(e) = client.drain().await {
        tracing::warn!(cause = %e, "draining the nats connection");
    }
    result?;
    snapshot_at_stop(store).await;
    tracing::info!("stopped");
    Ok(())
}

/// Once stopped, nothing waits on the store: if enough was written since it was opened, it
/// reopens now so that sled writes its recovery snapshot and the next start replays little.
/// A leader's loop never does that while it runs (it would hold every referral behind it);
/// a standby does it between records. A failure is logged: the next start replays more.
async fn snapshot_at_stop(store: Arc<dyn Store>) {
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || store.snapshot_if_due()).await {
        Ok(Ok(true)) => tracing::info!(
            took_ms = clock::ms(started.elapsed()),
            "store reopened at stop for its recovery snapshot"
        ),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(cause = %e, "reopening the store at stop failed"),
        Err(e) => tracing::warn!(cause = %e, "reopening the store at stop failed"),
    }
}

/// What a broker needs to lead: the event loop and the query responder, for as long as its
/// token lasts.
struct Leadership {
    snapshots: Arc<cluster::snapshot::Snapshotter>,
    cfg: Arc<Config>,
    store: Arc<dyn Store>,
    ops: Arc<ops::Ops>,
    js: async_nats::jetstream::Context,
    client: async_nats::Client,
    signer: Option<Arc<yeongye_proto::signing::PrivateKey>>,
    commands: tokio::sync::mpsc::Sender<server::Command>,
}

impl Leadership {
    async fn run(
        self,
        writer: cluster::log::Writer,
        command_rx: &mut tokio::sync::mpsc::Receiver<server::Command>,
        token: CancellationToken,
    ) -> Result<server::Stop> {
        // What the store holds now (a standby's view was refreshed only now and then).
        let view = tokio::task::block_in_place(|| ops::load_view(self.store.as_ref()))?;
        self.ops.update_view(|v| *v = view);
        let consumer = nats::broker_consumer(&self.js, &self.cfg, self.store.checkpoint()?).await?;
        // Only the leader answers queries: a standby's store may be a moment behind.
        let responder = query::Responder {
            store: self.store.clone(),
            signer: self.signer.clone(),
            ops: self.ops.clone(),
            commands: self.commands.clone(),
        };
        let queries = {
            let (ops, client, token) = (self.ops.clone(), self.client.clone(), token.clone());
            ops.queries_alive
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let served = query::serve(client, responder, token.clone()).await;
                ops.queries_alive
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                if !token.is_cancelled() {
                    match &served {
                        Err(e) => {
                            tracing::error!(cause = %e, "the query responder stopped: not ready")
                        }
                        Ok(()) => tracing::error!("the query responder stopped: not ready"),
                    }
                }
                served
            })
        };
        let event_loop = server::EventLoop {
            signer: self.signer,
            store: self.store,
            ops: self.ops,
            js: self.js,
            cfg: self.cfg,
            log: Arc::new(writer),
            snapshots: self.snapshots,
        };
        let stop = event_loop.run(consumer, command_rx, token.clone()).await;
        token.cancel();
        if let Ok(Err(e)) = queries.await {
            tracing::warn!(cause = %e, "status responder stopped with an error");
        }
        stop
    }
}
