//! The local HTTP/JSON API (`agency-adapter serve`): how an agency system written in any
//! language sends referrals, status updates and consents, looks them up, and receives what the
//! broker sends it — by webhook or by pulling — without touching NATS or protobuf.
//!
//! ```text
//! GET  /openapi.json                          the OpenAPI 3.1 document (no token needed)
//! GET  /healthz                               liveness and the outbox (no token needed)
//! GET  /metrics                               Prometheus text: the outbox (no token needed)
//! POST /v1/referrals                          Referral            -> 202 {referral_id, message_id, status}
//! GET  /v1/referrals/{referral_id}            -> StatusReply
//! POST /v1/referrals/{referral_id}/status     {status, note}      -> 202 {referral_id, message_id}
//! POST /v1/consents                           ConsentGrant        -> 202 {consent_id, message_id}
//! GET  /v1/consents/{consent_id}              -> ConsentReply
//! POST /v1/consents/{consent_id}/revoke       {revokedAtMs?}      -> 202 {consent_id, message_id}
//! GET  /v1/inbox[?limit=N]                    -> {items: [{kind, message_id, referral_id, queued_at_ms, item}], pending}
//! POST /v1/inbox/{message_id}/ack             -> {message_id, already}
//! ```
//!
//! Bodies and replies are the wire messages in the canonical proto3 JSON mapping (pbjson);
//! the API's own envelopes (`{referral_id, message_id}`, inbox items) use snake_case. Every
//! request under `/v1` needs `Authorization: Bearer <token>`. Errors are RFC 9457 problem
//! documents ([`problem`]). POSTs honour `Idempotency-Key`.
//!
//! # Layout
//! - this file: [`serve`], the router and its shared state.
//! - `routes.rs`: referral, status and consent handlers; `inbox.rs`: the pull inbox.
//! - `body.rs`: body size, media type and JSON parsing into problems; [`problem`]: the problem
//!   documents.
//! - `auth.rs`: the bearer token; [`signature`]: HMAC-SHA256 webhook signatures.
//! - `idempotency.rs`: `Idempotency-Key`, kept in the adapter's store (`crate::storage`).
//! - `queue.rs`: the durable queue of incoming items; `receiver.rs` fills it from the
//!   consumer; `worker.rs` empties it (webhook pushes, follow-ups); [`webhook`]: the POST.
//! - `backend.rs`: the [`Adapter`] as the handlers see it (a trait, stubbed in tests).
//!
//! The OpenAPI document is `agency-adapter/openapi.json` in the repository, compiled in.
//! Served by [`yeongye_http::serve`] within `[http.limits]`: a slow header or body is cut off
//! (a slow body with a 408 problem document), and past `max_connections` a connection is
//! answered 503.

mod auth;
mod backend;
mod body;
mod idempotency;
mod inbox;
pub mod problem;
mod queue;
mod receiver;
mod routes;
pub mod signature;
pub mod webhook;
mod worker;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::client::Adapter;
use crate::config::{DeliveryMode, WebhookTarget};
use crate::error::{Error, Result};
use auth::TokenDigest;
use backend::Backend;
use idempotency::IdempotencyStore;
use problem::{Problem, ProblemType};
use queue::Queue;
use webhook::Webhook;
use worker::Worker;

/// The API's OpenAPI 3.1 document (`agency-adapter/openapi.json`), served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub(crate) struct AppState<B> {
    pub(crate) backend: B,
    pub(crate) idem: IdempotencyStore,
    pub(crate) queue: Queue,
    pub(crate) body_limit: usize,
    /// Wakes the worker (an item was taken).
    pub(crate) wake: Arc<Notify>,
}

/// The API's routes over `state`, `/v1` behind the bearer token.
pub(crate) fn router<B: Backend>(state: AppState<B>, token: TokenDigest) -> Router {
    let api = Router::new()
        .route("/v1/referrals", post(routes::post_referral::<B>))
        .route(
            "/v1/referrals/{referral_id}",
            get(routes::get_referral::<B>),
        )
        .route(
            "/v1/referrals/{referral_id}/status",
            post(routes::post_status::<B>),
        )
        .route("/v1/consents", post(routes::post_consent::<B>))
        .route("/v1/consents/{consent_id}", get(routes::get_consent::<B>))
        .route(
            "/v1/consents/{consent_id}/revoke",
            post(routes::post_revoke::<B>),
        )
        .route("/v1/inbox", get(inbox::list::<B>))
        .route("/v1/inbox/{message_id}/ack", post(inbox::ack::<B>))
        .route_layer(axum::middleware::from_fn_with_state(
            token,
            auth::require_token,
        ))
        .with_state(state.clone());
    let open = Router::new()
        .route("/healthz", get(healthz::<B>))
        .route("/metrics", get(metrics::<B>))
        .with_state(state.clone());
    Router::new()
        .route("/openapi.json", get(openapi))
        .merge(open)
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

/// `{"status": "ok", "outbox": {depth, oldest_age_ms, hub, ...}}`: the adapter serves; what
/// waits for the hub.
async fn healthz<B: Backend>(State(st): State<AppState<B>>) -> Response {
    let mut body = serde_json::json!({"status": "ok"});
    if let Some(outbox) = st.backend.outbox_status() {
        body["outbox"] = serde_json::to_value(outbox).unwrap_or_default();
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Prometheus text exposition of the outbox.
async fn metrics<B: Backend>(State(st): State<AppState<B>>) -> Response {
    let text = st
        .backend
        .outbox_status()
        .map(|o| metrics_text(st.backend.agency(), &o))
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The outbox as Prometheus gauges and counters, labelled with the agency.
pub(crate) fn metrics_text(agency: &str, o: &crate::outbox::OutboxStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let age = o.oldest_age_ms.map_or(0.0, |ms| ms as f64 / 1000.0);
    let rows: [(&str, &str, &str, String); 8] = [
        (
            "yeongye_adapter_outbox_depth",
            "gauge",
            "Messages accepted and not yet acknowledged by JetStream.",
            o.depth.to_string(),
        ),
        (
            "yeongye_adapter_outbox_bytes",
            "gauge",
            "Bytes of the signed messages waiting in the outbox.",
            o.bytes.to_string(),
        ),
        (
            "yeongye_adapter_outbox_oldest_age_seconds",
            "gauge",
            "How long the oldest message in the outbox has waited (0 when empty).",
            format!("{age:.3}"),
        ),
        (
            "yeongye_adapter_outbox_hub_unreachable",
            "gauge",
            "1 while the last publish to JetStream failed.",
            u8::from(o.hub != "ok").to_string(),
        ),
        (
            "yeongye_adapter_outbox_corrupt_records",
            "gauge",
            "Outbox records set aside because they did not decode.",
            o.corrupt.len().to_string(),
        ),
        (
            "yeongye_adapter_outbox_max_entries",
            "gauge",
            "The outbox's configured bound, entries.",
            o.max_entries.to_string(),
        ),
        (
            "yeongye_adapter_outbox_queued_total",
            "counter",
            "Messages that entered the outbox since start.",
            o.queued_total.to_string(),
        ),
        (
            "yeongye_adapter_outbox_forwarded_total",
            "counter",
            "Queued messages acknowledged by JetStream since start.",
            o.forwarded_total.to_string(),
        ),
    ];
    for (name, kind, help, value) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{agency=\"{agency}\"}} {value}"
        );
    }
    out
}

async fn not_found() -> Response {
    Problem::new(ProblemType::NotFound, "no such resource; see /openapi.json").into_response()
}

async fn method_not_allowed() -> Response {
    Problem::new(
        ProblemType::MethodNotAllowed,
        "the resource does not support this method; see /openapi.json",
    )
    .into_response()
}

/// Serves the API of `adapter` (its configuration's `[http]` section) until `shutdown`
/// resolves: binds the address, receives the agency's consumer into the durable queue, runs
/// the worker (webhook pushes, follow-ups) and the HTTP server. On shutdown, stops taking
/// requests and items, lets the ones in hand finish, and drains the NATS connection.
///
/// Holds the adapter's state directory: no `run` (or second `serve`) may use it meanwhile.
pub async fn serve(
    adapter: Adapter,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let http = adapter.config().http.clone().ok_or_else(|| {
        Error::Config("serve needs an [http] section in the configuration".into())
    })?;
    http.validate()?;
    let token = http.load_token()?;
    let webhook = match (http.delivery, http.load_webhook_secret()?) {
        (DeliveryMode::Webhook, Some(secret)) => {
            let url = http.webhook_url.as_deref().unwrap_or_default();
            Some(Webhook::new(
                WebhookTarget::parse(url)?,
                &secret,
                http.webhook_timeout(),
            ))
        }
        _ => None,
    };
    let store = adapter.store().await?;
    let queue = Queue::open(&store);
    let idem = IdempotencyStore::open(&store);
    let listener = tokio::net::TcpListener::bind(http.bind)
        .await
        .map_err(|e| Error::io(format!("cannot listen on {}", http.bind), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the bound address", e))?;

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let wake = Arc::new(Notify::new());
    tracker.spawn(receiver::run(
        adapter.clone(),
        queue.clone(),
        Arc::clone(&wake),
        cancel.clone(),
    ));
    let worker = Worker {
        backend: adapter.clone(),
        queue: queue.clone(),
        idem: idem.clone(),
        idempotency_retention_ms: http.idempotency_retention_ms(),
        webhook,
        max_backoff: http.webhook_max_backoff(),
        wake: Arc::clone(&wake),
    };
    tracker.spawn(worker.run(cancel.clone()));
    let stop = cancel.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("stopping");
        stop.cancel();
    });

    let state = AppState {
        backend: adapter.clone(),
        idem,
        queue,
        body_limit: http.body_limit_bytes,
        wake,
    };
    info!(
        addr = %bound,
        delivery = ?http.delivery,
        agency = adapter.agency(),
        "HTTP API listening"
    );
    let app = router(state, TokenDigest::new(&token));
    // Header, body and idle timeouts and the connection cap: the one server loop the broker
    // uses too.
    yeongye_http::serve(listener, app, http.limits, cancel.clone()).await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    if let Err(e) = adapter.drain().await {
        warn!(cause = %e, "draining the NATS connection failed");
    }
    info!("stopped");
    Ok(())
}
