//! What an agency sends: referrals and status updates, checked and wrapped in envelopes.
//!
//! Pure: no I/O. An [`Outgoing`] has its message id fixed when it is built, so publishing it
//! again after a failure is a retry of the same message (deduplicated by the stream and the
//! broker), never a second message.

use std::fmt;

use prost::Message as _;
use yeongye_proto::subject::{self, InKind};
use yeongye_proto::v1;

use crate::error::{Error, Result};
use crate::ids;

/// Longest referral id the adapter sends.
pub const MAX_REFERRAL_ID_LEN: usize = 128;

/// A message built and ready to publish with [`Adapter::publish`](crate::Adapter::publish).
#[derive(Clone, PartialEq)]
pub struct Outgoing {
    subject: String,
    referral_id: String,
    envelope: v1::Envelope,
}

impl Outgoing {
    /// A referral from agency `me`, checked, with `referral_id` (fresh UUIDv7) and
    /// `from_agency` (`me`) filled when empty, wrapped for `yeongye.in.<me>.referral`.
    pub fn referral(me: &str, referral: v1::Referral) -> Result<Outgoing> {
        check_sender(me)?;
        self::referral(me, referral)
    }

    /// A status update from agency `me` under a fresh message id, for `yeongye.in.<me>.status`.
    pub fn status_update(
        me: &str,
        referral_id: &str,
        status: v1::Status,
        note: &str,
    ) -> Result<Outgoing> {
        check_sender(me)?;
        self::status_update(me, referral_id, status, note)
    }

    /// The envelope's message id (also the `Nats-Msg-Id` header).
    pub fn message_id(&self) -> &str {
        &self.envelope.message_id
    }

    /// The referral the message is about.
    pub fn referral_id(&self) -> &str {
        &self.referral_id
    }

    /// The subject it is published on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The envelope as it goes on the wire.
    pub fn envelope(&self) -> &v1::Envelope {
        &self.envelope
    }
}

/// Ids only: the payload may hold personal data.
impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing")
            .field("subject", &self.subject)
            .field("message_id", &self.envelope.message_id)
            .field("referral_id", &self.referral_id)
            .finish_non_exhaustive()
    }
}

/// Checks a referral, fills `referral_id` (fresh UUIDv7) and `from_agency` (`me`) when empty,
/// and wraps it for `yeongye.in.<me>.referral`.
pub(crate) fn referral(me: &str, mut referral: v1::Referral) -> Result<Outgoing> {
    if referral.referral_id.is_empty() {
        referral.referral_id = ids::new_id();
    } else {
        check_referral_id("referral_id", &referral.referral_id)?;
    }
    if referral.from_agency.is_empty() {
        referral.from_agency = me.to_owned();
    } else if referral.from_agency != me {
        return Err(invalid(format!(
            "from_agency {:?} is not this adapter's agency {me:?}",
            referral.from_agency
        )));
    }
    if !subject::is_valid_agency_id(&referral.to_agency) {
        return Err(invalid(format!(
            "to_agency {:?} is not a valid agency id",
            referral.to_agency
        )));
    }
    match v1::Urgency::try_from(referral.urgency) {
        Ok(v1::Urgency::Unspecified) => {
            return Err(invalid(
                "urgency is not set (URGENCY_ROUTINE, URGENCY_PRIORITY or URGENCY_CRISIS)",
            ));
        }
        Ok(_) => {}
        Err(_) => {
            return Err(invalid(format!(
                "urgency {} is not a known value",
                referral.urgency
            )));
        }
    }
    if referral
        .client
        .as_ref()
        .is_none_or(|c| c.pseudonym_id.trim().is_empty())
    {
        return Err(invalid("client.pseudonym_id is required"));
    }
    if referral.receive_by_ms < 0 {
        return Err(invalid("receive_by_ms must not be negative"));
    }
    if !referral.parent_referral_id.is_empty() {
        check_referral_id("parent_referral_id", &referral.parent_referral_id)?;
    }
    let referral_id = referral.referral_id.clone();
    let envelope = envelope(
        me,
        ids::new_id(),
        v1::PayloadType::Referral,
        referral.encode_to_vec(),
    );
    Ok(Outgoing {
        subject: subject::inbound(me, InKind::Referral),
        referral_id,
        envelope,
    })
}

/// A `StatusUpdate` for `yeongye.in.<me>.status`, under a fresh message id.
pub(crate) fn status_update(
    me: &str,
    referral_id: &str,
    status: v1::Status,
    note: &str,
) -> Result<Outgoing> {
    if status == v1::Status::Unspecified {
        return Err(invalid("status is not set"));
    }
    check_referral_id("referral_id", referral_id)?;
    Ok(status_update_with_id(
        me,
        ids::new_id(),
        referral_id,
        status,
        note,
    ))
}

/// The `RECEIVED` receipt for a delivery, under its derived message id. The referral id is
/// echoed as the broker sent it, unchecked.
pub(crate) fn receipt(me: &str, delivery_message_id: &str, referral_id: &str) -> Outgoing {
    status_update_with_id(
        me,
        ids::receipt_message_id(delivery_message_id),
        referral_id,
        v1::Status::Received,
        "",
    )
}

fn status_update_with_id(
    me: &str,
    message_id: String,
    referral_id: &str,
    status: v1::Status,
    note: &str,
) -> Outgoing {
    let update = v1::StatusUpdate {
        referral_id: referral_id.to_owned(),
        status: status as i32,
        note: note.to_owned(),
    };
    Outgoing {
        subject: subject::inbound(me, InKind::Status),
        referral_id: referral_id.to_owned(),
        envelope: envelope(
            me,
            message_id,
            v1::PayloadType::StatusUpdate,
            update.encode_to_vec(),
        ),
    }
}

/// An envelope from `me`, stamped now. Signatures are not produced yet (PROTOCOL.md).
pub(crate) fn envelope(
    me: &str,
    message_id: String,
    payload_type: v1::PayloadType,
    payload: Vec<u8>,
) -> v1::Envelope {
    v1::Envelope {
        message_id,
        sender: me.to_owned(),
        sent_at_ms: ids::now_ms(),
        payload_type: payload_type as i32,
        payload,
        signature: Default::default(),
        key_id: String::new(),
    }
}

/// A referral id is 1 to 128 printable ASCII characters without spaces.
pub(crate) fn check_referral_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_REFERRAL_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(format!(
            "{field} must be 1-{MAX_REFERRAL_ID_LEN} printable ASCII characters without spaces"
        )));
    }
    Ok(())
}

fn check_sender(me: &str) -> Result<()> {
    if subject::is_valid_agency_id(me) {
        Ok(())
    } else {
        Err(invalid(format!("{me:?} is not a valid agency id")))
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> v1::Referral {
        v1::Referral {
            to_agency: "hope-support".into(),
            client: Some(v1::Client {
                pseudonym_id: "p-123".into(),
                ..Default::default()
            }),
            urgency: v1::Urgency::Crisis as i32,
            ..Default::default()
        }
    }

    #[test]
    fn fills_ids_and_wraps() {
        let out = referral("cc-1", good()).unwrap();
        assert_eq!(out.subject(), "yeongye.in.cc-1.referral");
        assert_eq!(out.envelope().sender, "cc-1");
        assert_eq!(
            out.envelope().payload_type,
            v1::PayloadType::Referral as i32
        );
        let r = v1::Referral::decode(out.envelope().payload.as_ref()).unwrap();
        assert_eq!(r.from_agency, "cc-1");
        assert_eq!(r.referral_id, out.referral_id());
        assert_eq!(
            uuid::Uuid::parse_str(&r.referral_id)
                .unwrap()
                .get_version_num(),
            7
        );
        assert_ne!(out.message_id(), out.referral_id());
    }

    #[test]
    fn keeps_given_ids() {
        let mut r = good();
        r.referral_id = "given-1".into();
        r.from_agency = "cc-1".into();
        assert_eq!(referral("cc-1", r).unwrap().referral_id(), "given-1");
    }

    #[test]
    fn rejects() {
        type Case = (fn(&mut v1::Referral), &'static str);
        let cases: Vec<Case> = vec![
            (|r| r.from_agency = "other".into(), "from_agency"),
            (|r| r.to_agency = "".into(), "to_agency"),
            (|r| r.to_agency = "Bad Id".into(), "to_agency"),
            (|r| r.urgency = 0, "urgency"),
            (|r| r.urgency = 99, "urgency"),
            (|r| r.client = None, "pseudonym_id"),
            (
                |r| r.client.as_mut().unwrap().pseudonym_id = " ".into(),
                "pseudonym_id",
            ),
            (|r| r.referral_id = "has space".into(), "referral_id"),
            (|r| r.referral_id = "x".repeat(129), "referral_id"),
            (|r| r.receive_by_ms = -1, "receive_by_ms"),
        ];
        for (mutate, field) in cases {
            let mut r = good();
            mutate(&mut r);
            let e = referral("cc-1", r).unwrap_err();
            assert!(e.is_input_error());
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn status_updates() {
        let out = status_update("cc-1", "r-1", v1::Status::Accepted, "ok").unwrap();
        assert_eq!(out.subject(), "yeongye.in.cc-1.status");
        let u = v1::StatusUpdate::decode(out.envelope().payload.as_ref()).unwrap();
        assert_eq!(u.status, v1::Status::Accepted as i32);
        assert!(status_update("cc-1", "", v1::Status::Accepted, "").is_err());
        assert!(status_update("cc-1", "r-1", v1::Status::Unspecified, "").is_err());
    }

    #[test]
    fn receipts_are_derived() {
        let a = receipt("cc-1", "m-1", "r-1");
        let b = receipt("cc-1", "m-1", "r-1");
        assert_eq!(a.message_id(), b.message_id());
        assert_eq!(a.message_id(), ids::receipt_message_id("m-1"));
        let u = v1::StatusUpdate::decode(a.envelope().payload.as_ref()).unwrap();
        assert_eq!(u.status, v1::Status::Received as i32);
        assert_eq!(u.referral_id, "r-1");
    }
}
