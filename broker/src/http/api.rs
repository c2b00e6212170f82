//! The JSON API under `/api/v1`: queues, overdue referrals, one referral's state and history,
//! dead letters, and the operator actions on them (replay, discard — each with who and why).
//! `who` is the authenticated operator ([`Operator`]), never what the body says: a body may
//! leave `who` out, or repeat the operator's own name; any other name is refused (403).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use yeongye_proto::v1::ReasonCode;

use super::AppState;
use super::auth::Operator;
use crate::clock;
use crate::referral::Referral;
use crate::server::{Command, DeadLetterAction};
use crate::store::DeadLetter;

fn reason_name(code: i32) -> String {
    ReasonCode::try_from(code)
        .map(|c| c.as_str_name().to_owned())
        .unwrap_or_else(|_| code.to_string())
}

fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    super::problem::problem(status, super::problem::slug(status), detail)
}

#[derive(Serialize)]
pub(crate) struct QueueRow {
    id: String,
    name: String,
    kind: String,
    #[serde(flatten)]
    queue: crate::view::AgencyQueue,
    /// Age of the oldest referral to this agency not yet RECEIVED, ms (null: none).
    oldest_unacknowledged_age_ms: Option<i64>,
}

#[derive(Serialize)]
pub(crate) struct Queues {
    at_ms: i64,
    agencies: Vec<QueueRow>,
    states: std::collections::BTreeMap<&'static str, u64>,
    overdue: u64,
    dead_letters: u64,
    refusals: std::collections::BTreeMap<String, u64>,
    outbox: u64,
    /// The broker's streams as JetStream last reported them.
    streams: Vec<StreamRow>,
    /// This broker in its group: who leads, where its store is in the state log.
    cluster: ClusterRow,
}

#[derive(Serialize)]
pub(crate) struct ClusterRow {
    broker: String,
    /// `leader` or `standby`.
    role: &'static str,
    leader: Option<String>,
    term: u64,
    state_log_position: u64,
    state_log_last: u64,
    lag: u64,
    takeovers: u64,
    /// The state-log position of the newest snapshot stored (null: none yet).
    snapshot_position: Option<u64>,
}

pub(crate) fn cluster_row(state: &AppState) -> ClusterRow {
    let c = state.ops.cluster();
    ClusterRow {
        role: if c.leading { "leader" } else { "standby" },
        lag: c.lag(),
        broker: c.me,
        leader: c.leader,
        term: c.term,
        state_log_position: c.position,
        state_log_last: c.log_last,
        takeovers: c.takeovers,
        snapshot_position: c.snapshot,
    }
}

pub(super) async fn cluster(State(state): State<AppState>) -> Json<ClusterRow> {
    Json(cluster_row(&state))
}

#[derive(Serialize)]
pub(crate) struct DigestRow {
    broker: String,
    state_log_position: u64,
    /// Hex SHA-256 of everything the store holds (`store::digest`): equal on two brokers
    /// that applied the same state log.
    digest: String,
}

/// The store's digest and the state-log position it was read at (read again if the position
/// moved meanwhile, so that the pair is consistent on a standby still applying).
pub(super) async fn digest(State(state): State<AppState>) -> Response {
    if state
        .ops
        .digesting
        .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "a digest of the store is being read already: try again when it is done",
        );
    }
    let ops = state.ops.clone();
    let read = tokio::task::spawn_blocking(move || {
        // Cleared however the read ends.
        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _done = Done(&ops.digesting);
        for _ in 0..20 {
            let before = ops.store().state_position()?;
            let digest = crate::store::digest(ops.store())?;
            if ops.store().state_position()? == before {
                return Ok(Some((before, digest)));
            }
        }
        Ok::<_, crate::error::Error>(None)
    })
    .await;
    match read {
        Ok(Ok(Some((position, digest)))) => Json(DigestRow {
            broker: state.ops.cluster().me,
            state_log_position: position,
            digest: hex::encode(digest),
        })
        .into_response(),
        Ok(Ok(None)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store kept changing while it was read: try again",
        ),
        Ok(Err(e)) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(_) => problem(StatusCode::INTERNAL_SERVER_ERROR, "the digest task failed"),
    }
}

/// A standby does not act: the answer says who does (503, so that a client may try the
/// leader; the body names it).
fn standby(state: &AppState) -> Option<Response> {
    let c = state.ops.cluster();
    if c.leading {
        return None;
    }
    Some(problem(
        StatusCode::SERVICE_UNAVAILABLE,
        crate::cluster::not_leading(c.leader.as_deref()),
    ))
}

/// Graceful hand-over: the leader finishes the turns in flight, gives its lease back and
/// leaves it to another broker (it takes it back after a few seconds if no other did).
pub(super) async fn step_down(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
) -> Response {
    tracing::info!(operator = %operator.0, "step-down requested");
    #[derive(Serialize)]
    struct SteppedDown {
        detail: String,
    }
    let who = operator.0.clone();
    ask(
        &state,
        |reply| Command::StepDown { who, reply },
        |detail| Json(SteppedDown { detail }).into_response(),
        StatusCode::CONFLICT,
    )
    .await
}

/// Sends an operator's command to the event loop (a standby refuses at once, naming the
/// leader) and answers with `ok` of its reply, or `refused` with the loop's reason.
async fn ask<T>(
    state: &AppState,
    command: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
    ok: impl FnOnce(T) -> Response,
    refused: StatusCode,
) -> Response {
    if let Some(refused) = standby(state) {
        return refused;
    }
    let shutting_down = || {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker is shutting down",
        )
    };
    let (tx, rx) = oneshot::channel();
    if state.commands.send(command(tx)).await.is_err() {
        return shutting_down();
    }
    match rx.await {
        Ok(Ok(v)) => ok(v),
        Ok(Err(e)) => problem(refused, e),
        Err(_) => shutting_down(),
    }
}

#[derive(Serialize)]
pub(crate) struct StreamRow {
    name: String,
    replicas: usize,
    replicas_current: usize,
    leader: Option<String>,
}

pub(crate) fn queues_now(state: &AppState) -> Queues {
    let view = state.ops.view();
    let registry = state.ops.registry();
    let now = clock::now_ms();
    // Registered agencies only: a referral refused for an unknown recipient must not let a
    // sender add rows at will.
    let agencies: Vec<QueueRow> = registry
        .iter()
        .map(|a| QueueRow {
            id: a.id.clone(),
            name: a.name.clone(),
            kind: a.kind.clone(),
            queue: view.queue(&a.id),
            oldest_unacknowledged_age_ms: view.oldest_unacked(&a.id).map(|at| (now - at).max(0)),
        })
        .collect();
    Queues {
        at_ms: now,
        agencies,
        states: view.by_state().map(|(s, n)| (s.as_str(), n)).collect(),
        overdue: view.overdue_count(),
        dead_letters: view.dead_letters(),
        refusals: view
            .refusals()
            .iter()
            .map(|(c, n)| (reason_name(*c), *n))
            .collect(),
        outbox: state.ops.outbox.load(std::sync::atomic::Ordering::Relaxed),
        streams: state
            .ops
            .streams()
            .into_iter()
            .map(|s| StreamRow {
                name: s.name,
                replicas: s.replicas,
                replicas_current: s.current,
                leader: s.leader,
            })
            .collect(),
        cluster: cluster_row(state),
    }
}

pub(super) async fn queues(State(state): State<AppState>) -> Json<Queues> {
    Json(queues_now(&state))
}

#[derive(Serialize)]
pub(crate) struct OverdueRow {
    referral_id: String,
    from: String,
    to: String,
    state: &'static str,
    created_at_ms: i64,
    age_ms: i64,
}

pub(super) async fn overdue(State(state): State<AppState>) -> Json<Vec<OverdueRow>> {
    let now = clock::now_ms();
    let view = state.ops.view();
    Json(
        view.overdue()
            .map(|s| OverdueRow {
                referral_id: s.id.clone(),
                from: s.from.clone(),
                to: s.to.clone(),
                state: s.state.as_str(),
                created_at_ms: s.created_at,
                age_ms: (now - s.created_at).max(0),
            })
            .collect(),
    )
}

#[derive(Serialize)]
struct HistoryRow {
    state: &'static str,
    by: String,
    at_ms: i64,
}

#[derive(Serialize)]
pub(crate) struct ReferralView {
    referral_id: String,
    state: &'static str,
    from: String,
    to: String,
    created_at_ms: i64,
    receive_by_ms: i64,
    accept_by_ms: i64,
    overdue: bool,
    history: Vec<HistoryRow>,
}

pub(crate) fn referral_view(r: &Referral) -> ReferralView {
    ReferralView {
        referral_id: r.id.clone(),
        state: r.state.as_str(),
        from: r.from.clone(),
        to: r.to.clone(),
        created_at_ms: r.created_at,
        receive_by_ms: r.receive_by,
        accept_by_ms: r.accept_by,
        overdue: r.overdue,
        history: r
            .history
            .iter()
            .map(|h| HistoryRow {
                state: h.state.as_str(),
                by: h.by.clone(),
                at_ms: h.at,
            })
            .collect(),
    }
}

pub(super) async fn referral(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.ops.store().referral(&id) {
        Ok(Some(r)) => Json(referral_view(&r)).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such referral"),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Serialize)]
pub(crate) struct DeadLetterRow {
    seq: u64,
    subject: String,
    message_id: String,
    sender: String,
    referral_id: String,
    reason: String,
    detail: String,
    at_ms: i64,
    size: usize,
    status: &'static str,
    actions: Vec<ActionRow>,
}

#[derive(Serialize)]
struct ActionRow {
    action: String,
    who: String,
    why: String,
    at_ms: i64,
    outcome: String,
}

pub(crate) fn dead_letter_row(d: &DeadLetter) -> DeadLetterRow {
    DeadLetterRow {
        seq: d.stream_seq,
        subject: d.subject.clone(),
        message_id: d.message_id.clone(),
        sender: d.sender.clone(),
        referral_id: d.referral_id.clone(),
        reason: reason_name(d.code),
        detail: d.detail.clone(),
        at_ms: d.at,
        size: d.raw.len(),
        status: d.status.as_str(),
        actions: d
            .actions
            .iter()
            .map(|a| ActionRow {
                action: a.action.clone(),
                who: a.who.clone(),
                why: a.why.clone(),
                at_ms: a.at,
                outcome: a.outcome.clone(),
            })
            .collect(),
    }
}

pub(super) async fn dead_letters(State(state): State<AppState>) -> Response {
    match state.ops.store().dead_letters() {
        Ok(all) => Json(all.iter().map(dead_letter_row).collect::<Vec<_>>()).into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) async fn dead_letter(State(state): State<AppState>, Path(seq): Path<u64>) -> Response {
    match state.ops.store().dead_letter(seq) {
        Ok(Some(d)) => Json(dead_letter_row(&d)).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such dead letter"),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ActionBody {
    /// Optional, and only ever the authenticated operator's own name.
    #[serde(default)]
    who: Option<String>,
    why: String,
}

async fn act(
    state: AppState,
    operator: Operator,
    seq: u64,
    body: Result<Json<ActionBody>, axum::extract::rejection::JsonRejection>,
    action: DeadLetterAction,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"why\": ...}}: {e}"),
            );
        }
    };
    let who = operator.0.as_str();
    if let Some(claimed) = body.who.as_deref().map(str::trim)
        && claimed != who
    {
        tracing::warn!(
            operator = who,
            seq,
            "operator action refused: the body's who is not the authenticated operator"
        );
        return problem(
            StatusCode::FORBIDDEN,
            "who is recorded from the operator's token; leave it out of the body",
        );
    }
    let why = body.why.trim();
    if why.is_empty() || why.len() > 2000 {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "why is required (≤ 2000 bytes)",
        );
    }
    let (who, why) = (who.to_owned(), why.to_owned());
    ask(
        &state,
        |reply| Command::DeadLetter {
            seq,
            action,
            who,
            why,
            reply,
        },
        |d| Json(dead_letter_row(&d)).into_response(),
        StatusCode::CONFLICT,
    )
    .await
}

pub(super) async fn replay(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(seq): Path<u64>,
    body: Result<Json<ActionBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    act(state, operator, seq, body, DeadLetterAction::Replay).await
}

pub(super) async fn discard(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(seq): Path<u64>,
    body: Result<Json<ActionBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    act(state, operator, seq, body, DeadLetterAction::Discard).await
}

/// Reads the registry file again: new agencies get their consumers and can send and receive.
/// Audited with the operator's name (the registry change itself is the file's).
pub(super) async fn reload_registry(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
) -> Response {
    tracing::info!(operator = %operator.0, "registry reload requested");
    #[derive(Serialize)]
    struct Reloaded {
        agencies: usize,
    }
    let who = operator.0.clone();
    ask(
        &state,
        |reply| Command::ReloadRegistry { who, reply },
        |agencies| Json(Reloaded { agencies }).into_response(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await
}

#[derive(Serialize)]
pub(crate) struct PurgeRow {
    consent_id: String,
    referral_id: String,
    agency: String,
    requested_at_ms: i64,
    confirmed_at_ms: Option<i64>,
}

#[derive(Serialize)]
pub(crate) struct ConsentView {
    consent_id: String,
    collected_by: String,
    recipient_agencies: Vec<String>,
    recipient_kinds: Vec<String>,
    purposes: Vec<String>,
    data_categories: Vec<String>,
    valid_from_ms: i64,
    valid_until_ms: Option<i64>,
    revoked_at_ms: Option<i64>,
    revoked_by: Option<String>,
    referrals: Vec<String>,
    purges: Vec<PurgeRow>,
}

fn purge_rows(c: &crate::consent::Consent) -> Vec<PurgeRow> {
    c.purges
        .iter()
        .map(|p| PurgeRow {
            consent_id: c.id.clone(),
            referral_id: p.referral_id.clone(),
            agency: p.agency.clone(),
            requested_at_ms: p.requested_at,
            confirmed_at_ms: p.confirmed_at,
        })
        .collect()
}

/// A consent as operators see it: no client id (it is personal), the rest as recorded.
pub(super) async fn consent(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    use yeongye_proto::v1;
    let name = |n: &i32, f: fn(i32) -> Option<&'static str>| {
        f(*n).map_or_else(|| n.to_string(), str::to_owned)
    };
    match state.ops.store().consent(&id) {
        Ok(Some(c)) => Json(ConsentView {
            consent_id: c.id.clone(),
            collected_by: c.collected_by.clone(),
            recipient_agencies: c.recipient_agencies.clone(),
            recipient_kinds: c.recipient_kinds.clone(),
            purposes: c
                .purposes
                .iter()
                .map(|p| {
                    name(p, |v| {
                        v1::Purpose::try_from(v).ok().map(|p| p.as_str_name())
                    })
                })
                .collect(),
            data_categories: c
                .categories
                .iter()
                .map(|p| {
                    name(p, |v| {
                        v1::DataCategory::try_from(v).ok().map(|p| p.as_str_name())
                    })
                })
                .collect(),
            valid_from_ms: c.valid_from,
            valid_until_ms: c.valid_until,
            revoked_at_ms: c.revoked.as_ref().map(|r| r.at),
            revoked_by: c.revoked.as_ref().map(|r| r.by.clone()),
            referrals: c.referrals.clone(),
            purges: purge_rows(&c),
        })
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such consent"),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Purge confirmations still outstanding, across all consents: who has not yet confirmed.
pub(super) async fn purges(State(state): State<AppState>) -> Response {
    match state.ops.store().consents() {
        Ok(all) => {
            let rows: Vec<PurgeRow> = all
                .iter()
                .flat_map(purge_rows)
                .filter(|p| p.confirmed_at_ms.is_none())
                .collect();
            Json(rows).into_response()
        }
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) async fn audit_verify(State(state): State<AppState>) -> Response {
    match crate::audit_report::verify_audit(state.ops.store()) {
        Ok(v) if v.get("ok").and_then(serde_json::Value::as_bool) == Some(true) => {
            Json(v).into_response()
        }
        Ok(v) => (StatusCode::CONFLICT, Json(v)).into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) async fn audit_referral(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    match crate::audit_report::audit_entries(state.ops.store(), &id) {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
