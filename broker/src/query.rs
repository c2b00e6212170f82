//! Lookups by request/reply on `yeongye.query.<agency>`, answered from the store: a referral's
//! status (to its sender or recipient only) and a consent with its withdrawals and outstanding
//! purges (to the collecting agency and the agencies it concerns only). Anyone else is told
//! "unknown", exactly as if nothing existed.

use std::sync::Arc;

use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use yeongye_proto::subject;
use yeongye_proto::v1::{self, PayloadType, ReasonCode};

use crate::consent::Consent;
use crate::convert::{self, derive_id};
use crate::error::{Error, Result};
use crate::store::Store;

/// Answers queries until `token` is cancelled.
pub async fn serve(
    client: async_nats::Client,
    store: Arc<dyn Store>,
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
        let reply = answer(store.as_ref(), msg.subject.as_str(), &msg.payload);
        if let Err(e) = client.publish(reply_to, reply.encode_to_vec().into()).await {
            tracing::warn!(cause = %e, "query reply not sent");
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(())
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
    // Withdrawn: in flight when it was revoked (WITHDRAWN), or ended but asked to purge.
    let mut withdrawn = Vec::new();
    for id in &c.referrals {
        let state = store.referral(id).map_err(read_failed)?.map(|r| r.state);
        if state == Some(crate::referral::State::Withdrawn)
            || c.purges.iter().any(|p| &p.referral_id == id)
        {
            withdrawn.push(id.clone());
        }
    }
    reply.withdrawn_referral_ids = withdrawn;
    Ok(reply)
}
