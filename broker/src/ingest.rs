//! Reading one inbound message: subject and bytes in, an [`Inbound`] out — what it asks for, or
//! why it cannot be applied. Pure (the registry and limits come in as arguments): the checks
//! that need the store (dedup, existing referral, legal transition) happen in the event loop.

use prost::Message;
use yeongye_proto::subject::{self, InKind};
use yeongye_proto::v1::{self, ReasonCode};

use crate::convert;
use crate::referral::{Millis, NewReferral, Status, Urgency};
use crate::registry::Registry;

/// Longest id (referral or message) accepted.
pub const MAX_ID_LEN: usize = 128;
/// Longest free-text note on a status update.
pub const MAX_NOTE_CHARS: usize = 4000;
/// Furthest in the future a sender may set a receipt deadline.
pub const MAX_RECEIVE_BY_MS: Millis = 90 * 24 * 3600 * 1000;

/// What the loop needs to know of a message to deduplicate and answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `<agency token>/<message id>`, or `seq:<n>` when the envelope could not be read.
    pub dedup_key: String,
    /// The envelope's message id; empty when it could not be read.
    pub message_id: String,
    /// The registered agency to answer, if the subject names one.
    pub reply_to: Option<String>,
    pub subject: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ReasonCode,
    pub detail: String,
    /// When known.
    pub referral_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Submit(NewReferral),
    /// A referral with a usable id that cannot be accepted: recorded as REFUSED.
    Refuse(NewReferral, Refusal),
    Status {
        referral_id: String,
        by: String,
        status: Status,
        note: String,
    },
    /// Nothing to apply: only answered and kept as a dead letter.
    Reject(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub origin: Origin,
    pub request: Request,
}

pub struct Limits<'a> {
    pub max_message_bytes: usize,
    /// Receipt and acceptance durations, ms, for an urgency and a `FieldOfNeed` number.
    pub deadlines: &'a dyn Fn(Urgency, i32) -> (Millis, Millis),
}

fn refusal(code: ReasonCode, detail: impl Into<String>, referral_id: &str) -> Refusal {
    Refusal {
        code,
        detail: detail.into(),
        referral_id: referral_id.to_owned(),
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Reads a message that arrived on `subject` with stream sequence `seq` at `now` (its stream
/// timestamp).
pub fn read(
    subject: &str,
    bytes: &[u8],
    seq: u64,
    now: Millis,
    registry: &Registry,
    limits: &Limits<'_>,
) -> Inbound {
    let mut origin = Origin {
        dedup_key: format!("seq:{seq}"),
        message_id: String::new(),
        reply_to: None,
        subject: subject.to_owned(),
    };
    let reject = |origin: Origin, code, detail: String| Inbound {
        origin,
        request: Request::Reject(refusal(code, detail, "")),
    };
    let Some(parsed) = subject::parse_inbound(subject) else {
        return reject(
            origin,
            ReasonCode::UnknownSubject,
            "subject is not yeongye.in.<agency>.<kind>".into(),
        );
    };
    let token = parsed.agency;
    if !registry.contains(token) {
        return reject(
            origin,
            ReasonCode::UnknownSender,
            "the subject's agency is not registered".into(),
        );
    }
    origin.reply_to = Some(token.to_owned());
    if bytes.len() > limits.max_message_bytes {
        return reject(
            origin,
            ReasonCode::TooLarge,
            format!(
                "{} bytes is over the limit of {}",
                bytes.len(),
                limits.max_message_bytes
            ),
        );
    }
    let Some(kind) = parsed.kind else {
        return reject(
            origin,
            ReasonCode::UnknownSubject,
            "the subject's kind is not referral or status".into(),
        );
    };
    let envelope = match v1::Envelope::decode(bytes) {
        Ok(e) => e,
        Err(e) => {
            return reject(
                origin,
                ReasonCode::MalformedEnvelope,
                format!("not an Envelope: {e}"),
            );
        }
    };
    if !valid_id(&envelope.message_id) {
        return reject(
            origin,
            ReasonCode::MalformedEnvelope,
            "message_id must be 1-128 of A-Z a-z 0-9 - _".into(),
        );
    }
    origin.dedup_key = format!("{token}/{}", envelope.message_id);
    origin.message_id = envelope.message_id.clone();
    if envelope.sender != token {
        return reject(
            origin,
            ReasonCode::SenderMismatch,
            "envelope sender is not the subject's agency".into(),
        );
    }
    let expected = match kind {
        InKind::Referral => v1::PayloadType::Referral,
        InKind::Status => v1::PayloadType::StatusUpdate,
    };
    if envelope.payload_type != expected as i32 {
        return reject(
            origin,
            ReasonCode::WrongPayloadType,
            format!(
                "payload_type {} does not fit the subject (expected {})",
                envelope.payload_type,
                expected.as_str_name()
            ),
        );
    }
    let request = match kind {
        InKind::Referral => read_referral(token, &envelope.payload, bytes, now, registry, limits),
        InKind::Status => read_status(token, &envelope.payload),
    };
    Inbound { origin, request }
}

fn read_referral(
    sender: &str,
    payload: &[u8],
    envelope_bytes: &[u8],
    now: Millis,
    registry: &Registry,
    limits: &Limits<'_>,
) -> Request {
    let r = match v1::Referral::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            return Request::Reject(refusal(
                ReasonCode::MalformedPayload,
                format!("not a Referral: {e}"),
                "",
            ));
        }
    };
    if !valid_id(&r.referral_id) {
        return Request::Reject(refusal(
            ReasonCode::InvalidField,
            "referral_id must be 1-128 of A-Z a-z 0-9 - _",
            "",
        ));
    }
    let id = r.referral_id.as_str();
    if r.from_agency != sender {
        return Request::Reject(refusal(
            ReasonCode::SenderMismatch,
            "from_agency is not the envelope's sender",
            id,
        ));
    }
    let urgency = urgency_from(&r);
    let (receipt, acceptance) = (limits.deadlines)(urgency.unwrap_or(Urgency::Routine), r.field);
    let receive_by = if r.receive_by_ms == 0 {
        now.saturating_add(receipt)
    } else {
        r.receive_by_ms
    };
    let new = NewReferral {
        id: id.to_owned(),
        from: sender.to_owned(),
        to: r.to_agency.clone(),
        urgency: urgency.unwrap_or(Urgency::Routine),
        receive_by,
        accept_within: acceptance,
        envelope: envelope_bytes.to_vec(),
    };
    let refuse = |code, detail: &str| Request::Refuse(new.clone(), refusal(code, detail, id));
    if !registry.contains(&r.to_agency) {
        return refuse(
            ReasonCode::UnknownRecipient,
            "to_agency is not a registered agency",
        );
    }
    if r.to_agency == sender {
        return refuse(ReasonCode::InvalidField, "to_agency is the sender itself");
    }
    if urgency.is_none() {
        return refuse(
            ReasonCode::InvalidField,
            "urgency must be ROUTINE, PRIORITY or CRISIS",
        );
    }
    if r.client
        .as_ref()
        .is_none_or(|c| c.pseudonym_id.trim().is_empty())
    {
        return refuse(ReasonCode::InvalidField, "client.pseudonym_id is required");
    }
    if r.field == 0 || v1::FieldOfNeed::try_from(r.field).is_err() {
        return refuse(
            ReasonCode::InvalidField,
            "field must be a known FieldOfNeed",
        );
    }
    if r.receive_by_ms != 0
        && (r.receive_by_ms <= now || r.receive_by_ms > now.saturating_add(MAX_RECEIVE_BY_MS))
    {
        return refuse(
            ReasonCode::InvalidField,
            "receive_by_ms must be in the future, at most 90 days ahead",
        );
    }
    Request::Submit(new)
}

fn urgency_from(r: &v1::Referral) -> Option<Urgency> {
    convert::urgency_from_wire(r.urgency)
}

fn read_status(sender: &str, payload: &[u8]) -> Request {
    let u = match v1::StatusUpdate::decode(payload) {
        Ok(u) => u,
        Err(e) => {
            return Request::Reject(refusal(
                ReasonCode::MalformedPayload,
                format!("not a StatusUpdate: {e}"),
                "",
            ));
        }
    };
    if !valid_id(&u.referral_id) {
        return Request::Reject(refusal(
            ReasonCode::InvalidField,
            "referral_id must be 1-128 of A-Z a-z 0-9 - _",
            "",
        ));
    }
    let Some(status) = convert::status_from_wire(u.status) else {
        return Request::Reject(refusal(
            ReasonCode::InvalidField,
            "status must be a known Status",
            &u.referral_id,
        ));
    };
    if u.note.chars().count() > MAX_NOTE_CHARS {
        return Request::Reject(refusal(
            ReasonCode::InvalidField,
            format!("note is longer than {MAX_NOTE_CHARS} characters"),
            &u.referral_id,
        ));
    }
    Request::Status {
        referral_id: u.referral_id,
        by: sender.to_owned(),
        status,
        note: u.note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::from_toml(
            "[[agency]]\nid = \"a\"\nname = \"에이\"\nkind = \"k\"\n[[agency]]\nid = \"b\"\nname = \"비\"\nkind = \"k\"",
        )
        .unwrap()
    }

    fn limits() -> Limits<'static> {
        Limits {
            max_message_bytes: 64 * 1024,
            deadlines: &|_, _| (1000, 5000),
        }
    }

    fn envelope(sender: &str, ty: v1::PayloadType, payload: Vec<u8>) -> Vec<u8> {
        v1::Envelope {
            message_id: "m-1".into(),
            sender: sender.into(),
            sent_at_ms: 1,
            payload_type: ty as i32,
            payload,
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn referral() -> v1::Referral {
        v1::Referral {
            referral_id: "r-1".into(),
            from_agency: "a".into(),
            to_agency: "b".into(),
            client: Some(v1::Client {
                pseudonym_id: "p1".into(),
                ..Default::default()
            }),
            field: v1::FieldOfNeed::Livelihood as i32,
            urgency: v1::Urgency::Crisis as i32,
            ..Default::default()
        }
    }

    fn code(i: &Inbound) -> Option<ReasonCode> {
        match &i.request {
            Request::Reject(r) | Request::Refuse(_, r) => Some(r.code),
            _ => None,
        }
    }

    fn read_ref(r: v1::Referral) -> Inbound {
        let bytes = envelope("a", v1::PayloadType::Referral, r.encode_to_vec());
        read(
            "yeongye.in.a.referral",
            &bytes,
            9,
            100,
            &registry(),
            &limits(),
        )
    }

    #[test]
    fn a_good_referral_is_submitted_with_the_default_deadline() {
        let i = read_ref(referral());
        assert_eq!(i.origin.dedup_key, "a/m-1");
        let Request::Submit(n) = i.request else {
            panic!("{:?}", i.request)
        };
        assert_eq!(
            (n.id.as_str(), n.to.as_str(), n.receive_by),
            ("r-1", "b", 1100)
        );
    }

    #[test]
    fn garbage_and_truncation_are_answered() {
        let reg = registry();
        let garbage = read(
            "yeongye.in.a.referral",
            b"\xff\xfe garbage",
            3,
            0,
            &reg,
            &limits(),
        );
        assert_eq!(code(&garbage), Some(ReasonCode::MalformedEnvelope));
        assert_eq!(garbage.origin.reply_to.as_deref(), Some("a"));
        assert_eq!(garbage.origin.dedup_key, "seq:3");
        let good = envelope("a", v1::PayloadType::Referral, referral().encode_to_vec());
        for cut in 1..good.len() {
            let i = read(
                "yeongye.in.a.referral",
                &good[..cut],
                3,
                100,
                &reg,
                &limits(),
            );
            assert!(code(&i).is_some(), "a truncation at {cut} was accepted");
        }
        let mut inner = envelope("a", v1::PayloadType::Referral, vec![0x0a, 0x50, 0x01]);
        inner.truncate(inner.len());
        assert_eq!(
            code(&read(
                "yeongye.in.a.referral",
                &inner,
                3,
                100,
                &reg,
                &limits()
            )),
            Some(ReasonCode::MalformedPayload)
        );
    }

    #[test]
    fn each_envelope_check_has_its_code() {
        let reg = registry();
        let r = referral().encode_to_vec();
        let cases = [
            (
                "yeongye.in.zz.referral",
                envelope("zz", v1::PayloadType::Referral, r.clone()),
                ReasonCode::UnknownSender,
            ),
            (
                "yeongye.in.a.bogus",
                envelope("a", v1::PayloadType::Referral, r.clone()),
                ReasonCode::UnknownSubject,
            ),
            (
                "yeongye.in.a.referral",
                envelope("b", v1::PayloadType::Referral, r.clone()),
                ReasonCode::SenderMismatch,
            ),
            (
                "yeongye.in.a.status",
                envelope("a", v1::PayloadType::Referral, r.clone()),
                ReasonCode::WrongPayloadType,
            ),
            (
                "yeongye.in.a.referral",
                vec![0u8; 70_000],
                ReasonCode::TooLarge,
            ),
        ];
        for (subject, bytes, want) in cases {
            let i = read(subject, &bytes, 1, 100, &reg, &limits());
            assert_eq!(code(&i), Some(want), "{subject}");
        }
        let unknown = read("yeongye.in.zz.referral", b"x", 1, 0, &reg, &limits());
        assert_eq!(
            unknown.origin.reply_to, None,
            "an unregistered agency gets no answer"
        );
    }

    #[test]
    fn each_referral_check_has_its_code() {
        type Mutation = fn(&mut v1::Referral);
        let cases: Vec<(Mutation, ReasonCode)> = vec![
            (|r| r.referral_id = String::new(), ReasonCode::InvalidField),
            (|r| r.referral_id = "a.b".into(), ReasonCode::InvalidField),
            (|r| r.from_agency = "b".into(), ReasonCode::SenderMismatch),
            (
                |r| r.to_agency = "nobody".into(),
                ReasonCode::UnknownRecipient,
            ),
            (|r| r.to_agency = "a".into(), ReasonCode::InvalidField),
            (|r| r.urgency = 0, ReasonCode::InvalidField),
            (|r| r.urgency = 77, ReasonCode::InvalidField),
            (|r| r.client = None, ReasonCode::InvalidField),
            (|r| r.field = 0, ReasonCode::InvalidField),
            (|r| r.receive_by_ms = 50, ReasonCode::InvalidField),
            (|r| r.receive_by_ms = i64::MAX, ReasonCode::InvalidField),
        ];
        for (mutate, want) in cases {
            let mut r = referral();
            mutate(&mut r);
            assert_eq!(code(&read_ref(r.clone())), Some(want), "{r:?}");
        }
        // Unknown recipient is recorded (REFUSED), not just rejected.
        let mut r = referral();
        r.to_agency = "nobody".into();
        assert!(matches!(read_ref(r).request, Request::Refuse(..)));
    }

    #[test]
    fn status_updates() {
        let reg = registry();
        let upd = |status: i32, note: String| {
            let p = v1::StatusUpdate {
                referral_id: "r-1".into(),
                status,
                note,
            }
            .encode_to_vec();
            read(
                "yeongye.in.b.status",
                &envelope("b", v1::PayloadType::StatusUpdate, p),
                1,
                0,
                &reg,
                &limits(),
            )
        };
        assert!(matches!(
            upd(2, "ok".into()).request,
            Request::Status {
                status: Status::Accepted,
                ..
            }
        ));
        assert_eq!(code(&upd(0, String::new())), Some(ReasonCode::InvalidField));
        assert_eq!(
            code(&upd(42, String::new())),
            Some(ReasonCode::InvalidField)
        );
        assert_eq!(
            code(&upd(2, "가".repeat(MAX_NOTE_CHARS + 1))),
            Some(ReasonCode::InvalidField)
        );
    }
}
