//! The operators' HTTP endpoint (axum, loopback by default): `/healthz`, `/readyz`,
//! `/metrics` (Prometheus text), a JSON API under `/api/v1`, and the dashboard at `/`.
//! Everything here reads [`Ops`]; operator actions go to the event loop as [`Command`]s.
//! Ids, agencies, states, reason codes and times only: no personal data, no notes.

mod api;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock;
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

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/queues", get(api::queues))
        .route("/api/v1/overdue", get(api::overdue))
        .route("/api/v1/referrals/{id}", get(api::referral))
        .route("/api/v1/dead-letters", get(api::dead_letters))
        .route("/api/v1/dead-letters/{seq}", get(api::dead_letter))
        .route("/api/v1/dead-letters/{seq}/replay", post(api::replay))
        .route("/api/v1/dead-letters/{seq}/discard", post(api::discard))
        .route("/api/v1/registry/reload", post(api::reload_registry))
        .route("/api/v1/consents/{id}", get(api::consent))
        .route("/api/v1/purges", get(api::purges))
        .route("/api/v1/audit/verify", get(api::audit_verify))
        .route("/api/v1/audit/referrals/{id}", get(api::audit_referral))
        .with_state(state)
}

/// Binds `addr` and serves until `token` is cancelled. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    token: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::InvalidConfig(format!("http_addr {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    let app = router(state);
    let handle = tokio::spawn(async move {
        let stop = token.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(cause = %e, "http server stopped");
        }
    });
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
}

pub(crate) fn readiness(state: &AppState) -> (bool, impl serde::Serialize) {
    let nats_connected = state.nats.connection_state() == async_nats::connection::State::Connected;
    let backlog = state.ops.backlog.load(Ordering::Relaxed);
    let caught_up = backlog <= READY_BACKLOG;
    let event_loop_alive =
        clock::now_ms() - state.ops.last_turn.load(Ordering::Relaxed) < READY_LOOP_STALL_MS;
    let store_ok = state.ops.store_ok.load(Ordering::Relaxed);
    let ready = nats_connected && caught_up && event_loop_alive && store_ok;
    (
        ready,
        Readiness {
            ready,
            nats_connected,
            backlog,
            caught_up,
            event_loop_alive,
            store_ok,
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
