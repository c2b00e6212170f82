//! The operators' HTTP endpoint (axum, loopback by default): `/healthz`, `/readyz`,
//! `/metrics` (Prometheus text), a JSON API under `/api/v1`, and the dashboard at `/`.
//! Everything here reads [`Ops`]; operator actions go to the event loop as [`Command`]s.
//! Ids, agencies, states, reason codes and times only: no personal data, no notes.
//!
//! Who may do what:
//! - every request: its `Host` must be one of `http_allowed_hosts`, and a state change must not
//!   come from another `Origin` ([`guard`]);
//! - operator actions (`POST` replay, discard, registry reload, step-down): an operator's bearer token
//!   ([`auth`]), whose name is recorded as `who`;
//! - `GET /api/v1/digest` (it reads the whole store): an operator's token, one at a time;
//! - the JSON API's other reads: open on loopback (they hold no personal data, and whoever can reach
//!   loopback can read the store anyway); an operator's token when `http_allow_remote` binds
//!   the endpoint beyond loopback;
//! - `/healthz`, `/readyz`, `/metrics` and the dashboard page itself: open (probes and
//!   scrapers; the page holds no data, it fetches the API).
//!
//! Served by [`yeongye_http::serve`]: header and body timeouts, an idle timeout and a cap on
//! connections (`[http_limits]`).

mod api;
pub(crate) mod auth;
pub mod guard;
mod metrics;
pub(crate) mod problem;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ops::Ops;
use crate::server::Command;

/// Readiness: the inbound backlog the broker may have and still call itself caught up.
pub const READY_BACKLOG: u64 = 1000;
/// Readiness: how long the event loop may go without completing a turn.
pub const READY_LOOP_STALL_MS: i64 = 10_000;

#[derive(Clone)]
pub struct AppState {
    pub ops: Arc<Ops>,
    pub nats: async_nats::Client,
    pub commands: mpsc::Sender<Command>,
}

/// Who may use the endpoint: the hosts it answers to, where the operators are, and whether
/// the API's reads need an operator too (bound beyond loopback).
#[derive(Debug, Clone)]
pub struct Access {
    pub hosts: guard::AllowedHosts,
    pub operators_file: Option<PathBuf>,
    pub reads_need_operator: bool,
}

impl Access {
    /// From the configuration and the port actually bound.
    pub fn new(cfg: &Config, port: u16) -> Access {
        Access {
            hosts: guard::AllowedHosts::new(&cfg.http_allowed_hosts, port),
            operators_file: cfg.operators_file.clone(),
            reads_need_operator: !cfg.http_addr.ip().is_loopback(),
        }
    }
}

pub fn router(state: AppState, access: Access) -> Router {
    let operators = Arc::new(auth::OperatorsFile(access.operators_file));
    let require_operator =
        || axum::middleware::from_fn_with_state(Arc::clone(&operators), auth::require_operator);
    let mut reads = Router::new()
        .route("/api/v1/queues", get(api::queues))
        .route("/api/v1/cluster", get(api::cluster))
        .route("/api/v1/overdue", get(api::overdue))
        .route("/api/v1/referrals/{id}", get(api::referral))
        .route("/api/v1/dead-letters", get(api::dead_letters))
        .route("/api/v1/dead-letters/{seq}", get(api::dead_letter))
        .route("/api/v1/consents/{id}", get(api::consent))
        .route("/api/v1/purges", get(api::purges))
        .route("/api/v1/audit/verify", get(api::audit_verify))
        .route("/api/v1/audit/referrals/{id}", get(api::audit_referral));
    if access.reads_need_operator {
        reads = reads.route_layer(require_operator());
    }
    // A digest reads the whole store: an operator's check, one at a time (`api::digest`).
    let operator_reads = Router::new()
        .route("/api/v1/digest", get(api::digest))
        .route_layer(require_operator());
    let writes = Router::new()
        .route("/api/v1/dead-letters/{seq}/replay", post(api::replay))
        .route("/api/v1/dead-letters/{seq}/discard", post(api::discard))
        .route("/api/v1/registry/reload", post(api::reload_registry))
        .route("/api/v1/step-down", post(api::step_down))
        .route_layer(require_operator());
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics))
        .merge(reads)
        .merge(operator_reads)
        .merge(writes)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(access.hosts),
            guard::check,
        ))
        .with_state(state)
}

/// Binds `http_addr` and serves until `token` is cancelled. Returns the bound address.
pub async fn serve(
    cfg: &Config,
    state: AppState,
    token: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let addr = cfg.http_addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::InvalidConfig(format!("http_addr {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            addr = %bound,
            "the operators' HTTP endpoint listens beyond loopback (http_allow_remote) and speaks \
             plain HTTP: terminate TLS in a reverse proxy in front of it, and list its name in \
             http_allowed_hosts; the JSON API's reads need an operator token too"
        );
    }
    match &cfg.operators_file {
        None => tracing::warn!(
            "no operators_file: operator actions (replay, discard, registry reload) are refused \
             until one is set (referral-broker operator add)"
        ),
        Some(path) => {
            let operators = crate::operators::Operators::load(path)?;
            tracing::info!(operators = operators.len(), "operators file read");
        }
    }
    let app = router(state, Access::new(cfg, bound.port()));
    let limits = cfg.http_limits;
    let handle = tokio::spawn(yeongye_http::serve(listener, app, limits, token));
    Ok((bound, handle))
}

#[derive(serde::Serialize)]
struct Readiness {
    ready: bool,
    nats_connected: bool,
    backlog: u64,
    caught_up: bool,
    event_loop_alive: bool,
    store_ok: bool,
    queries_answered: bool,
    /// `leader` or `standby`. A standby is ready when it follows the state log closely (its
    /// store no more than [`READY_BACKLOG`] records behind): it can take over at once.
    role: &'static str,
    state_log_lag: u64,
}

pub(crate) fn readiness(state: &AppState) -> (bool, impl serde::Serialize) {
    let nats_connected = state.nats.connection_state() == async_nats::connection::State::Connected;
    let backlog = state.ops.backlog.load(Ordering::Relaxed);
    let caught_up = backlog <= READY_BACKLOG;
    let event_loop_alive =
        clock::now_ms() - state.ops.last_turn.load(Ordering::Relaxed) < READY_LOOP_STALL_MS;
    let store_ok = state.ops.store_ok.load(Ordering::Relaxed);
    let queries_answered = state.ops.queries_alive.load(Ordering::Relaxed);
    let cluster = state.ops.cluster();
    let state_log_lag = cluster.lag();
    let ready = if cluster.leading {
        nats_connected && caught_up && event_loop_alive && store_ok && queries_answered
    } else {
        nats_connected && state_log_lag <= READY_BACKLOG
    };
    (
        ready,
        Readiness {
            ready,
            nats_connected,
            backlog,
            caught_up,
            event_loop_alive,
            store_ok,
            queries_answered,
            role: if cluster.leading { "leader" } else { "standby" },
            state_log_lag,
        },
    )
}

async fn readyz(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    let (ready, body) = readiness(&state);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn dashboard() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(include_str!("http/dashboard.html")),
    )
}
