//! The API's handlers for what an agency system sends and asks: referrals, status updates and
//! consents. Each checks everything (body, fields, ids) before anything is published — bad
//! input gets a [`Problem`] and nothing is sent — and publishes through [`publish_once`], which
//! honours `Idempotency-Key`.
//!
//! Responses to POSTs are `202 Accepted` with the ids and what became of the message
//! (`{"referral_id", "message_id", "status"}` ...): `"status": "stored"`, JetStream stored it;
//! `"queued"`, the hub did not answer in time and it waits, flushed, in the adapter's outbox,
//! to be forwarded in order when the hub is back (nothing to retry). The broker answers later, on the agency's queue (a
//! notification, or a rejection — e.g. for an unregistered recipient or a consent that does not
//! cover the referral, which only the broker can know).

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tracing::{info, warn};
use yeongye_proto::v1;

use super::AppState;
use super::backend::Backend;
use super::body::{parse_json, read_body};
use super::idempotency::{Begin, Prepared, check_key};
use super::problem::{Problem, ProblemType};
use super::signature::sha256;
use super::worker::finish_all;
use crate::ids;
use crate::outbox::Sent;
use crate::outgoing::{self, is_valid_id};

/// The header that makes a POST idempotent.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on a response replayed for a repeated `Idempotency-Key`.
pub(crate) const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// `POST /v1/referrals`: a `Referral` in proto3 JSON.
pub(crate) async fn post_referral<B: Backend>(
    State(st): State<AppState<B>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(async {
        let key = idempotency_key(&headers)?;
        let bytes = read_body(&headers, body, st.body_limit, true).await?;
        let agency = st.backend.agency().to_owned();
        let prepare = || {
            let referral: v1::Referral = parse_json(&bytes)?;
            let out = outgoing::sealed_referral(&agency, referral, st.backend.sealing())?;
            let response = json!({
                "referral_id": out.referral_id(),
                "message_id": out.message_id(),
            });
            Ok(Prepared { out, response })
        };
        let fp = fingerprint("POST /v1/referrals", &bytes);
        publish_once(&st, key.as_deref(), &fp, prepare).await
    })
    .await
}

/// `GET /v1/referrals/{referral_id}`: the broker's `StatusReply`.
pub(crate) async fn get_referral<B: Backend>(
    State(st): State<AppState<B>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    respond(async {
        let id = path_id(id, "referral_id")?;
        let reply = st.backend.status(&id).await?;
        if let Some(err) = &reply.error {
            return Err(Problem::from_rejection(err));
        }
        Ok(proto_json(StatusCode::OK, &reply))
    })
    .await
}

/// `POST /v1/referrals/{referral_id}/status`: `{"status": "STATUS_ACCEPTED", "note": "..."}`
/// (a `StatusUpdate`; its `referralId`, if given, must be the path's).
///
/// A status report on a referral whose delivery is still in the queue (the webhook's 2xx is
/// still on its way, or the system never acknowledged it) counts as taking it: its `RECEIVED`
/// receipt is published first, so that the broker sees RECEIVED before, say, ACCEPTED.
pub(crate) async fn post_status<B: Backend>(
    State(st): State<AppState<B>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(async {
        let id = path_id(id, "referral_id")?;
        let key = idempotency_key(&headers)?;
        let bytes = read_body(&headers, body, st.body_limit, true).await?;
        let agency = st.backend.agency().to_owned();
        // A note is sealed to the referral's other party, whom the broker names.
        let (_, note) = status_update_of(&bytes, &id)?;
        let reader = if note.is_empty() || !st.backend.sealing().seals() {
            None
        } else {
            let reply = st
                .backend
                .status(&id)
                .await
                .map_err(crate::client::note_needs_broker)?;
            if let Some(err) = &reply.error {
                return Err(Problem::from_rejection(err));
            }
            Some(outgoing::other_party(&agency, &reply.from_agency, &reply.to_agency).to_owned())
        };
        let prepare = || {
            let (status, note) = status_update_of(&bytes, &id)?;
            let sealed = match &reader {
                Some(reader) => st
                    .backend
                    .sealing()
                    .seal_note(&agency, reader, &id, status, &note)?,
                None => None,
            };
            let out = outgoing::status_update_with_note(&agency, &id, status, &note, sealed)?;
            let response = json!({
                "referral_id": out.referral_id(),
                "message_id": out.message_id(),
            });
            Ok(Prepared { out, response })
        };
        // Checked first (nothing is done for bad input), built again inside `prepare` only
        // when the key is new.
        prepare()?;
        if st.queue.take_deliveries_of(&id).await? > 0 {
            st.wake.notify_one();
        }
        finish_all(&st.backend, &st.queue).await?;
        let fp = fingerprint(&format!("POST /v1/referrals/{id}/status"), &bytes);
        publish_once(&st, key.as_deref(), &fp, prepare).await
    })
    .await
}

/// The status and note of a `StatusUpdate` body for referral `id`.
fn status_update_of(bytes: &[u8], id: &str) -> Result<(v1::Status, String), Problem> {
    let update: v1::StatusUpdate = parse_json(bytes)?;
    if !update.referral_id.is_empty() && update.referral_id != id {
        return Err(Problem::new(
            ProblemType::InvalidField,
            "referralId differs from the referral id in the path (leave it out)",
        )
        .field("referralId"));
    }
    let status = v1::Status::try_from(update.status).map_err(|_| {
        Problem::new(ProblemType::InvalidField, "status is not a known Status").field("status")
    })?;
    Ok((status, update.note))
}

/// `POST /v1/consents`: a `ConsentGrant` in proto3 JSON.
pub(crate) async fn post_consent<B: Backend>(
    State(st): State<AppState<B>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(async {
        let key = idempotency_key(&headers)?;
        let bytes = read_body(&headers, body, st.body_limit, true).await?;
        let agency = st.backend.agency().to_owned();
        let prepare = || {
            let grant: v1::ConsentGrant = parse_json(&bytes)?;
            let out = outgoing::consent_grant(&agency, grant)?;
            let response = json!({
                "consent_id": out.consent_id(),
                "message_id": out.message_id(),
            });
            Ok(Prepared { out, response })
        };
        let fp = fingerprint("POST /v1/consents", &bytes);
        publish_once(&st, key.as_deref(), &fp, prepare).await
    })
    .await
}

/// `POST /v1/consents/{consent_id}/revoke`: optional body `{"revokedAtMs": "..."}` (a
/// `ConsentRevocation`; `consentId` and `recordedBy`, if given, must match).
pub(crate) async fn post_revoke<B: Backend>(
    State(st): State<AppState<B>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(async {
        let id = path_id(id, "consent_id")?;
        let key = idempotency_key(&headers)?;
        let bytes = read_body(&headers, body, st.body_limit, false).await?;
        let agency = st.backend.agency().to_owned();
        let prepare = || {
            let revocation: v1::ConsentRevocation = if bytes.is_empty() {
                v1::ConsentRevocation::default()
            } else {
                parse_json(&bytes)?
            };
            if !revocation.consent_id.is_empty() && revocation.consent_id != id {
                return Err(Problem::new(
                    ProblemType::InvalidField,
                    "consentId differs from the consent id in the path (leave it out)",
                )
                .field("consentId"));
            }
            if !revocation.recorded_by.is_empty() && revocation.recorded_by != agency {
                return Err(Problem::new(
                    ProblemType::InvalidField,
                    "recordedBy is not this adapter's agency (leave it out)",
                )
                .field("recordedBy"));
            }
            let at = (revocation.revoked_at_ms != 0).then_some(revocation.revoked_at_ms);
            let out = outgoing::consent_revocation(&agency, &id, at, ids::now_ms())?;
            let response = json!({
                "consent_id": out.consent_id(),
                "message_id": out.message_id(),
            });
            Ok(Prepared { out, response })
        };
        let fp = fingerprint(&format!("POST /v1/consents/{id}/revoke"), &bytes);
        publish_once(&st, key.as_deref(), &fp, prepare).await
    })
    .await
}

/// `GET /v1/consents/{consent_id}`: the broker's `ConsentReply`.
pub(crate) async fn get_consent<B: Backend>(
    State(st): State<AppState<B>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    respond(async {
        let id = path_id(id, "consent_id")?;
        let reply = st.backend.consent(&id).await?;
        if let Some(err) = &reply.error {
            return Err(Problem::from_rejection(err));
        }
        Ok(proto_json(StatusCode::OK, &reply))
    })
    .await
}

/// Publishes what `prepare` builds, once per `Idempotency-Key` (see `idempotency.rs`), and
/// answers 202 with the prepared response.
async fn publish_once<B: Backend>(
    st: &AppState<B>,
    key: Option<&str>,
    fingerprint: &str,
    prepare: impl FnOnce() -> Result<Prepared, Problem>,
) -> Result<Response, Problem> {
    let Some(key) = key else {
        let p = prepare()?;
        let sent = st.backend.publish(&p.out).await?;
        log_sent(&p, false, sent);
        return Ok(accepted(with_status(p.response, sent), false));
    };
    match st
        .idem
        .begin(key, fingerprint, ids::now_ms(), prepare)
        .await?
    {
        Begin::Replay(response) => {
            let message_id = response["message_id"].as_str().unwrap_or("");
            info!(message_id, "idempotent replay");
            let sent = if st.backend.is_queued(message_id) {
                Sent::Queued
            } else {
                Sent::Stored
            };
            Ok(accepted(with_status(response, sent), true))
        }
        Begin::Publish(p) => {
            let sent = st.backend.publish(&p.out).await?;
            if let Err(e) = st.idem.complete(key).await {
                // Sent all the same; a retry publishes the same message id again (harmless).
                warn!(cause = %e, "cannot mark the idempotency key complete");
            }
            log_sent(&p, true, sent);
            Ok(accepted(with_status(p.response, sent), false))
        }
    }
}

fn log_sent(p: &Prepared, keyed: bool, sent: Sent) {
    info!(
        subject = p.out.subject(),
        message_id = p.out.message_id(),
        referral_id = p.out.referral_id(),
        consent_id = p.out.consent_id(),
        idempotency_key = keyed,
        outcome = sent.as_str(),
        "accepted over HTTP"
    );
}

/// The response with `"status": "stored" | "queued"` (a replay says what is true now).
fn with_status(mut body: Value, sent: Sent) -> Value {
    if let Value::Object(map) = &mut body {
        map.insert("status".into(), Value::from(sent.as_str()));
    }
    body
}

/// 202 with `body`; `Idempotent-Replayed: true` when answered from the key store.
fn accepted(body: Value, replayed: bool) -> Response {
    let mut r = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if replayed {
        r.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    r
}

/// A message in proto3 JSON (pbjson's serde impl).
pub(crate) fn proto_json<T: serde::Serialize>(status: StatusCode, message: &T) -> Response {
    (status, axum::Json(message)).into_response()
}

/// Runs a handler body, turning its problem into the response.
pub(crate) async fn respond(
    f: impl std::future::Future<Output = Result<Response, Problem>>,
) -> Response {
    match f.await {
        Ok(r) => r,
        Err(p) => {
            info!(
                status = p.status,
                problem = p.kind().map_or("", |k| k.slug()),
                field = loggable(p.field.as_deref().unwrap_or("")),
                "request refused"
            );
            p.into_response()
        }
    }
}

/// A field name as it may be logged: an unknown field's name is the client's text, so only
/// plain identifiers are shown.
fn loggable(field: &str) -> &str {
    let plain = field.len() <= 64
        && field
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'[' | b']' | b'-'));
    if plain { field } else { "(not shown)" }
}

/// The `Idempotency-Key` header, checked, if present.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Problem::new(
            ProblemType::InvalidParameter,
            "send one Idempotency-Key header, not several",
        )
        .field("Idempotency-Key"));
    }
    check_key(first.as_bytes()).map(Some)
}

/// A referral or consent id from the path, checked (400 naming the parameter).
pub(crate) fn path_id(
    id: Result<Path<String>, PathRejection>,
    name: &str,
) -> Result<String, Problem> {
    let bad = || {
        Problem::new(
            ProblemType::InvalidParameter,
            format!("{name} must be {}", yeongye_proto::rules::ID_SYNTAX),
        )
        .field(name)
    };
    let Path(id) = id.map_err(|_| bad())?;
    if is_valid_id(&id) { Ok(id) } else { Err(bad()) }
}

/// What an `Idempotency-Key` is bound to: method and path, and the body's bytes.
fn fingerprint(method_and_path: &str, body: &[u8]) -> String {
    let mut input = Vec::with_capacity(method_and_path.len() + 1 + body.len());
    input.extend_from_slice(method_and_path.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(body);
    hex::encode(sha256(&input))
}
