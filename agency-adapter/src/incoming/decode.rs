//! Turns the bytes of a message on the agency's consumer into an [`ItemKind`], or says why not.
//!
//! Pure. A message is accepted only if it is an envelope from the broker with a message id,
//! its payload type fits the subject it came on (`yeongye.out.<me>.<kind>`), and the payload
//! decodes. Reasons for refusal name fields and types, never content: an id or subject is
//! quoted only once it is well-formed ([`shown_subject`], `ids::shown_id`).

use prost::Message as _;
use yeongye_proto::signing::KeyRing;
use yeongye_proto::subject::{self, OutKind};
use yeongye_proto::{BROKER_ID, v1};

use crate::item::ItemKind;
use crate::sealing::{Opened, Sealing};

/// A message that passed every check.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) message_id: String,
    pub(crate) referral_id: Option<String>,
    pub(crate) kind: ItemKind,
    /// A delivered referral the adapter declines itself ([`open`]): not handed over.
    pub(crate) declined: Option<(v1::ReasonCode, &'static str)>,
}

/// Opens what was sealed to this agency in a decoded message: a delivered referral's contents
/// (refused, and so declined, if they do not open or carry an undeclared category: then the
/// item keeps the sealed referral, metadata only), a notification's note.
pub(crate) fn open(d: &mut Decoded, me: &str, sealing: &Sealing, now_ms: i64) {
    match &mut d.kind {
        ItemKind::Delivery { referral, .. } => match sealing.open_referral(referral, now_ms) {
            Opened::Referral(r) => *referral = *r,
            Opened::Refused(code, why) => d.declined = Some((code, why)),
        },
        ItemKind::Notification(n) => sealing.open_note(me, n, now_ms),
        _ => {}
    }
}

/// Longest message id accepted from the broker.
const MAX_MESSAGE_ID_LEN: usize = 128;

/// Decodes a message that arrived on `subject` for agency `me`.
pub(crate) fn decode(
    me: &str,
    subject: &str,
    bytes: &[u8],
    keys: Option<&KeyRing>,
) -> Result<Decoded, String> {
    let envelope =
        v1::Envelope::decode(bytes).map_err(|e| format!("not a yeongye.v1.Envelope: {e}"))?;
    let message_id = envelope.message_id.clone();
    if message_id.is_empty() {
        return Err("envelope has no message_id".into());
    }
    if message_id.len() > MAX_MESSAGE_ID_LEN || !message_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("envelope message_id is not 1-128 printable ASCII characters".into());
    }
    if envelope.sender != BROKER_ID {
        return Err(format!(
            "envelope sender is {}, not {BROKER_ID:?}",
            shown_agency(&envelope.sender)
        ));
    }
    let payload_type = v1::PayloadType::try_from(envelope.payload_type).ok();
    let out_kind = match payload_type {
        Some(v1::PayloadType::Delivery) => OutKind::Delivery,
        Some(v1::PayloadType::Notification) => OutKind::Notification,
        Some(v1::PayloadType::Rejection) => OutKind::Rejection,
        Some(v1::PayloadType::Escalation) => OutKind::Escalation,
        Some(v1::PayloadType::Withdrawal) => OutKind::Withdrawal,
        _ => {
            return Err(format!(
                "payload type {} is not one an agency receives",
                envelope.payload_type
            ));
        }
    };
    let expected = subject::outbound(me, out_kind);
    if subject != expected {
        return Err(format!(
            "payload type {} arrived on {:?}, expected {expected:?}",
            out_kind.as_str(),
            shown_subject(subject)
        ));
    }
    let payload = envelope.payload.as_ref();
    let (referral_id, kind) = match out_kind {
        OutKind::Delivery => {
            let decoded = decode_delivery(me, payload)?;
            // The sender's own signature, relayed unchanged by the broker: the recipient checks
            // origin itself, judged at the time the broker applied the referral.
            if let (Some(keys), ItemKind::Delivery { original, .. }) = (keys, &decoded.1) {
                keys.verify(&original.sender, original, envelope.sent_at_ms)
                    .map_err(|e| {
                        format!("the delivery's relayed signature does not verify: {e}")
                    })?;
            }
            decoded
        }
        OutKind::Notification => {
            let n = v1::Notification::decode(payload)
                .map_err(|e| format!("Notification payload does not decode: {e}"))?;
            (non_empty(&n.referral_id), ItemKind::Notification(n))
        }
        OutKind::Rejection => {
            let r = v1::Rejection::decode(payload)
                .map_err(|e| format!("Rejection payload does not decode: {e}"))?;
            (non_empty(&r.referral_id), ItemKind::Rejection(r))
        }
        OutKind::Escalation => {
            let e = v1::Escalation::decode(payload)
                .map_err(|e| format!("Escalation payload does not decode: {e}"))?;
            (non_empty(&e.referral_id), ItemKind::Escalation(e))
        }
        OutKind::Withdrawal => {
            let w = v1::Withdrawal::decode(payload)
                .map_err(|e| format!("Withdrawal payload does not decode: {e}"))?;
            (non_empty(&w.referral_id), ItemKind::Withdrawal(w))
        }
    };
    Ok(Decoded {
        message_id,
        referral_id,
        kind,
        declined: None,
    })
}

fn decode_delivery(me: &str, payload: &[u8]) -> Result<(Option<String>, ItemKind), String> {
    let delivery = v1::Delivery::decode(payload)
        .map_err(|e| format!("Delivery payload does not decode: {e}"))?;
    let original = delivery
        .original
        .ok_or_else(|| "Delivery has no original envelope".to_owned())?;
    if original.payload_type != v1::PayloadType::Referral as i32 {
        return Err(format!(
            "Delivery's original envelope has payload type {}, expected PAYLOAD_TYPE_REFERRAL",
            original.payload_type
        ));
    }
    let referral = v1::Referral::decode(original.payload.as_ref())
        .map_err(|e| format!("Delivery's referral does not decode: {e}"))?;
    if referral.referral_id.is_empty() {
        return Err("Delivery's referral has no referral_id".into());
    }
    if !delivery.referral_id.is_empty() && delivery.referral_id != referral.referral_id {
        return Err("Delivery's referral_id differs from its referral's".into());
    }
    if referral.to_agency != me {
        return Err(format!(
            "Delivery's referral is addressed to {}, not to this agency",
            shown_agency(&referral.to_agency)
        ));
    }
    let referral_id = referral.referral_id.clone();
    Ok((Some(referral_id), ItemKind::Delivery { referral, original }))
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// An agency id as a reason may quote it: only if well-formed (anything else could be
/// personal data, or flood the log).
fn shown_agency(s: &str) -> String {
    if subject::is_valid_agency_id(s) {
        format!("{s:?}")
    } else {
        "(an agency id that is not well-formed)".to_owned()
    }
}

/// A subject as logs may show it: as it is if every token is plain (`a-z A-Z 0-9 - _`) and it
/// is not overlong, else not at all.
pub(crate) fn shown_subject(subject: &str) -> String {
    let plain = subject.len() <= 200
        && subject.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if plain {
        subject.to_owned()
    } else {
        "(a subject that is not well-formed)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outgoing::envelope;

    const ME: &str = "cc-1";

    fn referral_envelope() -> v1::Envelope {
        let r = v1::Referral {
            referral_id: "r-1".into(),
            from_agency: "hope-support".into(),
            to_agency: ME.into(),
            ..Default::default()
        };
        envelope(
            "hope-support",
            "orig-1".into(),
            v1::PayloadType::Referral,
            r.encode_to_vec(),
        )
    }

    fn delivery_bytes(original: Option<v1::Envelope>, referral_id: &str) -> Vec<u8> {
        let d = v1::Delivery {
            referral_id: referral_id.into(),
            original,
        };
        envelope(
            BROKER_ID,
            "m-1".into(),
            v1::PayloadType::Delivery,
            d.encode_to_vec(),
        )
        .encode_to_vec()
    }

    fn subj(kind: OutKind) -> String {
        subject::outbound(ME, kind)
    }

    #[test]
    fn delivery() {
        let sent = referral_envelope();
        let bytes = delivery_bytes(Some(sent.clone()), "r-1");
        let d = decode(ME, &subj(OutKind::Delivery), &bytes, None).unwrap();
        assert_eq!(d.message_id, "m-1");
        assert_eq!(d.referral_id.as_deref(), Some("r-1"));
        let ItemKind::Delivery { referral, original } = d.kind else {
            panic!("not a delivery");
        };
        assert_eq!(referral.from_agency, "hope-support");
        assert_eq!(original, sent);
    }

    #[test]
    fn notification_and_rejection() {
        let n = v1::Notification {
            referral_id: "r-2".into(),
            state: v1::ReferralState::Delivered as i32,
            ..Default::default()
        };
        let bytes = envelope(
            BROKER_ID,
            "m-2".into(),
            v1::PayloadType::Notification,
            n.encode_to_vec(),
        )
        .encode_to_vec();
        let d = decode(ME, &subj(OutKind::Notification), &bytes, None).unwrap();
        assert_eq!(d.referral_id.as_deref(), Some("r-2"));
        assert!(matches!(d.kind, ItemKind::Notification(_)));

        let r = v1::Rejection {
            code: v1::ReasonCode::MalformedEnvelope as i32,
            ..Default::default()
        };
        let bytes = envelope(
            BROKER_ID,
            "m-3".into(),
            v1::PayloadType::Rejection,
            r.encode_to_vec(),
        )
        .encode_to_vec();
        let d = decode(ME, &subj(OutKind::Rejection), &bytes, None).unwrap();
        assert_eq!(d.referral_id, None);
        assert!(matches!(d.kind, ItemKind::Rejection(_)));
    }

    #[test]
    fn refusals() {
        let good = delivery_bytes(Some(referral_envelope()), "r-1");
        let cases: Vec<(Vec<u8>, String, &str)> = vec![
            (
                b"\xff\xfe garbage".to_vec(),
                subj(OutKind::Delivery),
                "not a yeongye.v1.Envelope",
            ),
            (good.clone(), subj(OutKind::Notification), "expected"),
            (
                good.clone(),
                subject::outbound("cc-2", OutKind::Delivery),
                "expected",
            ),
            (
                delivery_bytes(None, "r-1"),
                subj(OutKind::Delivery),
                "no original",
            ),
            (
                delivery_bytes(Some(referral_envelope()), "r-9"),
                subj(OutKind::Delivery),
                "differs",
            ),
            (
                envelope("cc-9", "m".into(), v1::PayloadType::Delivery, vec![]).encode_to_vec(),
                subj(OutKind::Delivery),
                "sender",
            ),
            (
                envelope(BROKER_ID, String::new(), v1::PayloadType::Delivery, vec![])
                    .encode_to_vec(),
                subj(OutKind::Delivery),
                "no message_id",
            ),
            (
                envelope(BROKER_ID, "m".into(), v1::PayloadType::StatusReply, vec![])
                    .encode_to_vec(),
                subj(OutKind::Delivery),
                "not one an agency receives",
            ),
            (
                envelope(
                    BROKER_ID,
                    "m".into(),
                    v1::PayloadType::Delivery,
                    vec![0xff; 4],
                )
                .encode_to_vec(),
                subj(OutKind::Delivery),
                "does not decode",
            ),
        ];
        for (bytes, subject, reason) in cases {
            let e = decode(ME, &subject, &bytes, None).unwrap_err();
            assert!(e.contains(reason), "{reason}: {e}");
        }
    }
}
