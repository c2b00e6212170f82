//! Status lookups: request/reply on `yeongye.query.<agency>`, answered from the store, only to
//! the referral's sender or recipient.

use std::sync::Arc;

use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use yeongye_proto::subject;
use yeongye_proto::v1::{self, PayloadType, ReasonCode};

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
            tracing::warn!(cause = %e, "status reply not sent");
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(())
}

/// The reply envelope for one query. Never fails: a bad query gets an `error` in the reply.
pub fn answer(store: &dyn Store, subject_name: &str, payload: &[u8]) -> v1::Envelope {
    let now = crate::clock::now_ms();
    let (cause, reply) = match lookup(store, subject_name, payload) {
        Ok((cause, reply)) => (cause, reply),
        Err((cause, code, detail)) => (
            cause,
            v1::StatusReply {
                error: Some(v1::Rejection {
                    code: code as i32,
                    detail: detail.to_owned(),
                    subject: subject_name.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    };
    convert::broker_envelope(
        derive_id(&cause, 0),
        now,
        PayloadType::StatusReply,
        reply.encode_to_vec(),
    )
}

type Failure = (String, ReasonCode, &'static str);

fn lookup(
    store: &dyn Store,
    subject_name: &str,
    payload: &[u8],
) -> Result<(String, v1::StatusReply), Failure> {
    let anon = || format!("query:{}", crate::clock::now_ms());
    let Some(asker) = subject::parse_query(subject_name) else {
        return Err((
            anon(),
            ReasonCode::UnknownSubject,
            "subject is not yeongye.query.<agency>",
        ));
    };
    let envelope = v1::Envelope::decode(payload)
        .map_err(|_| (anon(), ReasonCode::MalformedEnvelope, "not an Envelope"))?;
    let cause = format!("{asker}/{}/reply", envelope.message_id);
    if envelope.sender != asker {
        return Err((
            cause,
            ReasonCode::SenderMismatch,
            "envelope sender is not the subject's agency",
        ));
    }
    if envelope.payload_type != PayloadType::StatusQuery as i32 {
        return Err((
            cause,
            ReasonCode::WrongPayloadType,
            "expected a StatusQuery",
        ));
    }
    let query = v1::StatusQuery::decode(envelope.payload.as_slice()).map_err(|_| {
        (
            cause.clone(),
            ReasonCode::MalformedPayload,
            "not a StatusQuery",
        )
    })?;
    let found = store.referral(&query.referral_id).map_err(|e| {
        tracing::error!(cause = %e, "status lookup failed");
        (
            cause.clone(),
            ReasonCode::Unspecified,
            "the broker could not read its store",
        )
    })?;
    match found {
        Some(r) if r.from == asker || r.to == asker => Ok((cause, convert::status_reply(&r))),
        _ => Err((
            cause,
            ReasonCode::UnknownReferral,
            "no such referral for this agency",
        )),
    }
}
