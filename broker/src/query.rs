//! Lookups by request/reply on `yeongye.query.<agency>`, answered from the store: a referral's
//! status (to its sender or recipient only) and a consent with its withdrawals and outstanding
//! purges (to the collecting agency and the agencies it concerns only). Anyone else is told
//! "unknown", exactly as if nothing existed.
//!
//! The reply goes only to the asker's own inbox (`_INBOX_<asker>.…`, [`subject::is_own_inbox`]),
//! signed with the broker's key. A query with any other reply subject is not answered: the
//! broker would otherwise publish wherever the asker pointed it (a JetStream API subject that
//! purges a stream, another agency's subjects) — a confused deputy. Such a query is counted,
//! logged without its reply subject, and recorded as a dead letter
//! (`REPLY_SUBJECT_FORBIDDEN`) through the event loop, the only writer.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use yeongye_proto::signing::PrivateKey;
use yeongye_proto::subject;
use yeongye_proto::v1::{self, PayloadType, ReasonCode};

use crate::consent::Consent;
use crate::convert::{self, derive_id};
use crate::error::{Error, Result};
use crate::ops::Ops;
use crate::server::{Command, RefusedQuery};
use crate::store::Store;

/// How long a refused query waits for the event loop to take it.
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the query responder needs besides the connection.
pub struct Responder {
    pub store: Arc<dyn Store>,
    /// Signs every reply (absent only on a test bench without a broker key).
    pub signer: Option<Arc<PrivateKey>>,
    pub ops: Arc<Ops>,
    /// To the event loop, which records refused queries as dead letters.
    pub commands: mpsc::Sender<Command>,
}

/// Answers queries until `token` is cancelled.
pub async fn serve(
    client: async_nats::Client,
    responder: Responder,
    token: CancellationToken,
) -> Result<()> {
    let mut sub = client
        .queue_subscribe(subject::QUERY_SUBJECTS, "referral-broker".to_owned())
        .await
        .map_err(Error::nats)?;
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let subject_name = msg.subject.as_str();
        let Some(asker) =
            subject::parse_query(subject_name).filter(|a| subject::is_valid_agency_id(a))
        else {
            continue;
        };
        if !subject::is_own_inbox(asker, reply_to.as_str()) {
            responder.refuse(asker, subject_name, &msg.payload).await;
            continue;
        }
        let mut reply = answer(responder.store.as_ref(), subject_name, &msg.payload);
        if let Some(key) = &responder.signer {
            key.sign(&mut reply);
        }
        if let Err(e) = client.publish(reply_to, reply.encode_to_vec().into()).await {
            tracing::warn!(cause = %e, "query reply not sent");
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(())
}

impl Responder {
    /// A query whose reply subject is not the asker's inbox: no answer; counted, logged (the
    /// reply subject is the asker's text: never echoed) and handed to the event loop to record.
    async fn refuse(&self, asker: &str, subject_name: &str, payload: &[u8]) {
        self.ops.queries_refused.fetch_add(1, Ordering::Relaxed);
        let message_id = v1::Envelope::decode(payload)
            .ok()
            .map(|e| e.message_id)
            .filter(|id| crate::ingest::valid_id(id))
            .unwrap_or_default();
        tracing::warn!(
            agency = asker,
            message_id = %message_id,
            code = ReasonCode::ReplySubjectForbidden.as_str_name(),
            "query refused: its reply subject is not the asking agency's inbox"
        );
        let refused = RefusedQuery {
            subject: subject_name.to_owned(),
            sender: asker.to_owned(),
            message_id,
            raw: payload.to_vec(),
            at: crate::clock::now_ms(),
        };
        // Waiting here slows a flood of such queries to the rate the loop records them.
        let sent = tokio::time::timeout(
            RECORD_WAIT,
            self.commands.send(Command::RefusedQuery(refused)),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            // The loop is stopping or stuck: the count above still shows the attempt.
            tracing::warn!(
                agency = asker,
                "refused query not recorded as a dead letter"
            );
        }
    }
}

struct Failure {
    code: ReasonCode,
    detail: &'static str,
}

fn fail(code: ReasonCode, detail: &'static str) -> Failure {
    Failure { code, detail }
}

/// The reply envelope for one query. Never fails: a bad query gets an `error` in the reply
/// (a `StatusReply`, unless the query was recognisably a consent query).
pub fn answer(store: &dyn Store, subject_name: &str, payload: &[u8]) -> v1::Envelope {
    let now = crate::clock::now_ms();
    let envelope = v1::Envelope::decode(payload).ok();
    let asker = subject::parse_query(subject_name);
    let cause = match (&envelope, asker) {
        (Some(e), Some(a)) => format!("{a}/{}/reply", e.message_id),
        _ => format!("query:{now}"),
    };
    let rejection = |f: Failure| v1::Rejection {
        code: f.code as i32,
        detail: f.detail.to_owned(),
        subject: subject_name.to_owned(),
        ..Default::default()
    };
    let is_consent = envelope
        .as_ref()
        .is_some_and(|e| e.payload_type == PayloadType::ConsentQuery as i32);
    let (ty, bytes) = if is_consent {
        let reply =
            consent_lookup(store, asker, envelope.as_ref()).unwrap_or_else(|f| v1::ConsentReply {
                error: Some(rejection(f)),
                ..Default::default()
            });
        (PayloadType::ConsentReply, reply.encode_to_vec())
    } else {
        let reply =
            status_lookup(store, asker, envelope.as_ref()).unwrap_or_else(|f| v1::StatusReply {
                error: Some(rejection(f)),
                ..Default::default()
            });
        (PayloadType::StatusReply, reply.encode_to_vec())
    };
    convert::broker_envelope(derive_id(&cause, 0), now, ty, bytes)
}

/// The checks every query shares; returns the asking agency.
fn asker<'a>(asker: Option<&'a str>, envelope: Option<&v1::Envelope>) -> Result<&'a str, Failure> {
    let asker = asker.ok_or_else(|| {
        fail(
            ReasonCode::UnknownSubject,
            "subject is not yeongye.query.<agency>",
        )
    })?;
    let envelope =
        envelope.ok_or_else(|| fail(ReasonCode::MalformedEnvelope, "not an Envelope"))?;
    if envelope.sender != asker {
        return Err(fail(
            ReasonCode::SenderMismatch,
            "envelope sender is not the subject's agency",
        ));
    }
    Ok(asker)
}

fn read_failed(e: Error) -> Failure {
    tracing::error!(cause = %e, "lookup failed");
    fail(
        ReasonCode::Unspecified,
        "the broker could not read its store",
    )
}

fn status_lookup(
    store: &dyn Store,
    asking: Option<&str>,
    envelope: Option<&v1::Envelope>,
) -> Result<v1::StatusReply, Failure> {
    let asker = asker(asking, envelope)?;
    let envelope =
        envelope.ok_or_else(|| fail(ReasonCode::MalformedEnvelope, "not an Envelope"))?;
    if envelope.payload_type != PayloadType::StatusQuery as i32 {
        return Err(fail(
            ReasonCode::WrongPayloadType,
            "expected a StatusQuery or a ConsentQuery",
        ));
    }
    let query = v1::StatusQuery::decode(envelope.payload.as_slice())
        .map_err(|_| fail(ReasonCode::MalformedPayload, "not a StatusQuery"))?;
    match store.referral(&query.referral_id).map_err(read_failed)? {
        Some(r) if r.from == asker || r.to == asker => Ok(convert::status_reply(&r)),
        _ => Err(fail(
            ReasonCode::UnknownReferral,
            "no such referral for this agency",
        )),
    }
}

/// Whether `agency` is concerned by `c`: it collected it, is named in it, or received a
/// referral under it.
fn concerned(store: &dyn Store, c: &Consent, agency: &str) -> Result<bool, Failure> {
    if c.collected_by == agency || c.recipient_agencies.iter().any(|a| a == agency) {
        return Ok(true);
    }
    for id in &c.referrals {
        if store
            .referral(id)
            .map_err(read_failed)?
            .is_some_and(|r| r.to == agency)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn consent_lookup(
    store: &dyn Store,
    asking: Option<&str>,
    envelope: Option<&v1::Envelope>,
) -> Result<v1::ConsentReply, Failure> {
    let asker = asker(asking, envelope)?;
    let envelope =
        envelope.ok_or_else(|| fail(ReasonCode::MalformedEnvelope, "not an Envelope"))?;
    let query = v1::ConsentQuery::decode(envelope.payload.as_slice())
        .map_err(|_| fail(ReasonCode::MalformedPayload, "not a ConsentQuery"))?;
    let unknown = || {
        fail(
            ReasonCode::ConsentUnknown,
            "no such consent for this agency",
        )
    };
    let c = store
        .consent(&query.consent_id)
        .map_err(read_failed)?
        .ok_or_else(unknown)?;
    if !concerned(store, &c, asker)? {
        return Err(unknown());
    }
    let mut reply = convert::consent_reply(&c);
    // Withdrawn: only the referrals that are WITHDRAWN (in flight when it was revoked). Those
    // that had ended and were only asked to purge are in `purge_requested_referral_ids`.
    let mut withdrawn = Vec::new();
    for id in &c.referrals {
        let state = store.referral(id).map_err(read_failed)?.map(|r| r.state);
        if state == Some(crate::referral::State::Withdrawn) {
            withdrawn.push(id.clone());
        }
    }
    reply.withdrawn_referral_ids = withdrawn;
    Ok(reply)
}
