//! Core NATS request/reply with the broker on `yeongye.query.<agency>`: status and consent
//! lookups. Each query is an envelope under a fresh id; the reply is an envelope whose payload
//! type must be the one expected.

use std::time::Duration;

use async_nats::RequestErrorKind;
use prost::Message;
use yeongye_proto::subject;
use yeongye_proto::v1;

use crate::error::{Error, Result};
use crate::ids;
use crate::outgoing;

/// Sends `query` (of `query_type`) from `agency` and decodes the reply as `R`, which must come
/// in an envelope of `reply_type`.
pub(crate) async fn request<Q: Message, R: Message + Default>(
    client: &async_nats::Client,
    publisher: &super::Publisher,
    agency: &str,
    timeout: Duration,
    query_type: v1::PayloadType,
    query: &Q,
    reply_type: v1::PayloadType,
) -> Result<R> {
    let envelope = outgoing::envelope(agency, ids::new_id(), query_type, query.encode_to_vec());
    let subject = subject::query(agency);
    let request = async_nats::Request::new()
        .payload(publisher.encode(&envelope))
        .timeout(Some(timeout));
    let reply = client
        .send_request(subject.clone(), request)
        .await
        .map_err(|e| match e.kind() {
            RequestErrorKind::TimedOut => Error::Timeout {
                subject: subject.clone(),
                timeout,
            },
            RequestErrorKind::NoResponders => Error::Request {
                subject: subject.clone(),
                detail: "no broker is answering queries (no responders)".into(),
            },
            _ => Error::Request {
                subject: subject.clone(),
                detail: e.to_string(),
            },
        })?;
    decode_reply(&reply.payload, reply_type)
}

/// Decodes a reply envelope holding a payload of `reply_type`.
pub(crate) fn decode_reply<R: Message + Default>(
    bytes: &[u8],
    reply_type: v1::PayloadType,
) -> Result<R> {
    let name = reply_type.as_str_name();
    let envelope = v1::Envelope::decode(bytes)
        .map_err(|e| Error::Protocol(format!("reply is not an envelope: {e}")))?;
    if envelope.payload_type != reply_type as i32 {
        return Err(Error::Protocol(format!(
            "reply has payload type {}, expected {name}",
            envelope.payload_type
        )));
    }
    R::decode(envelope.payload.as_ref())
        .map_err(|e| Error::Protocol(format!("{name} payload does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_decoding() {
        let reply = v1::StatusReply {
            referral_id: "r-1".into(),
            state: v1::ReferralState::Received as i32,
            ..Default::default()
        };
        let env = outgoing::envelope(
            "broker",
            "m".into(),
            v1::PayloadType::StatusReply,
            reply.encode_to_vec(),
        );
        let back: v1::StatusReply =
            decode_reply(&env.encode_to_vec(), v1::PayloadType::StatusReply).unwrap();
        assert_eq!(back, reply);
        let wrong = outgoing::envelope("broker", "m".into(), v1::PayloadType::Rejection, vec![]);
        assert!(
            decode_reply::<v1::StatusReply>(&wrong.encode_to_vec(), v1::PayloadType::StatusReply)
                .is_err()
        );
        assert!(
            decode_reply::<v1::StatusReply>(b"\xff\xff\xff", v1::PayloadType::StatusReply).is_err()
        );

        let consent = v1::ConsentReply {
            revoked: true,
            withdrawn_referral_ids: vec!["r-1".into()],
            ..Default::default()
        };
        let env = outgoing::envelope(
            "broker",
            "m".into(),
            v1::PayloadType::ConsentReply,
            consent.encode_to_vec(),
        );
        let back: v1::ConsentReply =
            decode_reply(&env.encode_to_vec(), v1::PayloadType::ConsentReply).unwrap();
        assert_eq!(back, consent);
    }
}
