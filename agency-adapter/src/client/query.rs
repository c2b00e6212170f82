//! Core NATS request/reply with the broker on `yeongye.query.<agency>`: status and consent
//! lookups. Each query is an envelope under a fresh id; the reply is an envelope from the broker
//! whose payload type must be the one expected and, when the adapter has the registry (the
//! broker's public keys), whose signature must verify. The reply comes to this agency's own
//! inbox (`_INBOX_<agency>.…`): the broker answers nowhere else.

use async_nats::RequestErrorKind;
use prost::Message;
use yeongye_proto::signing::KeyRing;
use yeongye_proto::subject;
use yeongye_proto::{BROKER_ID, v1};

use crate::error::{Error, Result};
use crate::ids;
use crate::outgoing;

/// Sends `query` (of `query_type`) as `adapter`'s agency and decodes the reply as `R`, which
/// must come in an envelope of `reply_type` (signed by the broker, when the adapter has its key).
pub(crate) async fn request<Q: Message, R: Message + Default>(
    adapter: &super::Adapter,
    query_type: v1::PayloadType,
    query: &Q,
    reply_type: v1::PayloadType,
) -> Result<R> {
    let inner = &adapter.inner;
    let (client, agency, timeout) = (&inner.client, adapter.agency(), inner.query_timeout);
    let envelope = outgoing::envelope(agency, ids::new_id(), query_type, query.encode_to_vec());
    let subject = subject::query(agency);
    let request = async_nats::Request::new()
        .payload(inner.publisher.encode(&envelope))
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
    decode_reply(&reply.payload, reply_type, adapter.keys())
}

/// Decodes a reply envelope holding a payload of `reply_type`, sent — and, with `keys`,
/// signed — by the broker.
pub(crate) fn decode_reply<R: Message + Default>(
    bytes: &[u8],
    reply_type: v1::PayloadType,
    keys: Option<&KeyRing>,
) -> Result<R> {
    let name = reply_type.as_str_name();
    let envelope = v1::Envelope::decode(bytes)
        .map_err(|e| Error::Protocol(format!("reply is not an envelope: {e}")))?;
    if envelope.sender != BROKER_ID {
        return Err(Error::Protocol(format!(
            "reply is not from the broker (sender {:?})",
            envelope.sender.chars().take(64).collect::<String>()
        )));
    }
    if let Some(keys) = keys {
        keys.verify(BROKER_ID, &envelope, envelope.sent_at_ms)
            .map_err(|e| Error::Protocol(format!("reply signature does not verify: {e}")))?;
    }
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
            decode_reply(&env.encode_to_vec(), v1::PayloadType::StatusReply, None).unwrap();
        assert_eq!(back, reply);
        let wrong = outgoing::envelope("broker", "m".into(), v1::PayloadType::Rejection, vec![]);
        assert!(
            decode_reply::<v1::StatusReply>(
                &wrong.encode_to_vec(),
                v1::PayloadType::StatusReply,
                None
            )
            .is_err()
        );
        assert!(
            decode_reply::<v1::StatusReply>(b"\xff\xff\xff", v1::PayloadType::StatusReply, None)
                .is_err()
        );

        let consent = v1::ConsentReply {
            revoked: true,
            withdrawn_referral_ids: vec!["r-1".into()],
            purge_requested_referral_ids: vec!["r-1".into()],
            ..Default::default()
        };
        let env = outgoing::envelope(
            "broker",
            "m".into(),
            v1::PayloadType::ConsentReply,
            consent.encode_to_vec(),
        );
        let back: v1::ConsentReply =
            decode_reply(&env.encode_to_vec(), v1::PayloadType::ConsentReply, None).unwrap();
        assert_eq!(back, consent);
    }

    #[test]
    fn a_reply_must_be_the_brokers_and_signed_when_keys_are_known() {
        use yeongye_proto::signing::{PrivateKey, PublicKeyEntry};
        let broker = PrivateKey::generate("broker-k1").unwrap();
        let other = PrivateKey::generate("broker-k1").unwrap();
        let mut keys = KeyRing::default();
        keys.add(
            BROKER_ID,
            &PublicKeyEntry {
                id: broker.id.clone(),
                public_key: broker.public_b64(),
                not_after_ms: 0,
            },
        )
        .unwrap();
        let reply = v1::StatusReply {
            referral_id: "r-1".into(),
            ..Default::default()
        };
        let env = |sender: &str, key: Option<&PrivateKey>| {
            let mut e = outgoing::envelope(
                sender,
                "m".into(),
                v1::PayloadType::StatusReply,
                reply.encode_to_vec(),
            );
            if let Some(k) = key {
                k.sign(&mut e);
            }
            e.encode_to_vec()
        };
        let decode = |bytes: &[u8]| {
            decode_reply::<v1::StatusReply>(bytes, v1::PayloadType::StatusReply, Some(&keys))
        };
        assert_eq!(decode(&env(BROKER_ID, Some(&broker))).unwrap(), reply);
        for (what, bytes) in [
            ("unsigned", env(BROKER_ID, None)),
            (
                "signed by another key under the same id",
                env(BROKER_ID, Some(&other)),
            ),
            ("not from the broker", env("cc-1", Some(&broker))),
        ] {
            let e = decode(&bytes).unwrap_err();
            assert!(matches!(e, Error::Protocol(_)), "{what}: {e}");
        }
        let mut tampered = v1::Envelope::decode(env(BROKER_ID, Some(&broker)).as_slice()).unwrap();
        tampered.payload = v1::StatusReply {
            referral_id: "r-2".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(decode(&tampered.encode_to_vec()).is_err(), "tampered");
    }
}
