//! What an agency sends: referrals, status updates, consents and purge confirmations, checked
//! and wrapped in envelopes.
//!
//! Pure: no I/O. An [`Outgoing`] has its message id fixed when it is built, so publishing it
//! again after a failure is a retry of the same message (deduplicated by the stream and the
//! broker), never a second message. The checks mirror the broker's own field checks
//! (PROTOCOL.md) that need no registry, so that bad input fails here, clearly, with nothing sent;
//! whether an agency is registered, and whether a consent covers a referral, only the broker
//! knows (it answers with a `Rejection`).

mod consent;

use std::fmt;

use prost::Message as _;
use yeongye_proto::rules;
use yeongye_proto::subject::{self, InKind};
use yeongye_proto::v1;

use crate::error::{Error, Result};
use crate::ids;

pub(crate) use consent::{consent_grant, consent_revocation, purge_confirmation};

/// Longest referral (or consent) id the adapter sends (`yeongye_proto::rules`).
pub const MAX_REFERRAL_ID_LEN: usize = rules::MAX_ID_LEN;
/// Longest note on a status update, in characters (the broker's limit).
pub const MAX_NOTE_CHARS: usize = 4000;

/// A message built and ready to publish with [`Adapter::publish`](crate::Adapter::publish).
#[derive(Clone, PartialEq)]
pub struct Outgoing {
    subject: String,
    referral_id: String,
    consent_id: String,
    envelope: v1::Envelope,
}

impl Outgoing {
    /// A referral from agency `me`, checked, with `referral_id` (fresh UUIDv7) and
    /// `from_agency` (`me`) filled when empty, wrapped for `yeongye.in.<me>.referral`.
    pub fn referral(me: &str, referral: v1::Referral) -> Result<Outgoing> {
        check_sender(me)?;
        self::referral(me, referral)
    }

    /// [`referral`](Self::referral), its personal fields sealed to the recipient with
    /// `sealing`'s registry keys (in clear if it has no registry).
    pub fn sealed_referral(
        me: &str,
        referral: v1::Referral,
        sealing: &crate::sealing::Sealing,
    ) -> Result<Outgoing> {
        check_sender(me)?;
        self::sealed_referral(me, referral, sealing)
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

    /// A consent grant collected by agency `me`, checked, with `consent_id` (fresh UUIDv7) and
    /// `collected_by` (`me`) filled when empty, for `yeongye.in.<me>.consent`.
    pub fn consent_grant(me: &str, grant: v1::ConsentGrant) -> Result<Outgoing> {
        check_sender(me)?;
        consent::consent_grant(me, grant)
    }

    /// A consent revocation recorded by agency `me` (`revoked_at_ms` `None`: when the broker
    /// records it), for `yeongye.in.<me>.consent`.
    pub fn consent_revocation(
        me: &str,
        consent_id: &str,
        revoked_at_ms: Option<i64>,
    ) -> Result<Outgoing> {
        check_sender(me)?;
        consent_revocation(me, consent_id, revoked_at_ms, ids::now_ms())
    }

    /// A purge confirmation from agency `me`, for `yeongye.in.<me>.purge`: under the id derived
    /// from the withdrawal it answers when `withdrawal_message_id` is given (so that a repeat is
    /// recognised), else under a fresh id.
    pub fn purge_confirmation(
        me: &str,
        referral_id: &str,
        consent_id: &str,
        withdrawal_message_id: Option<&str>,
    ) -> Result<Outgoing> {
        check_sender(me)?;
        consent::purge_confirmation(me, referral_id, consent_id, withdrawal_message_id)
    }

    /// The envelope's message id (also the `Nats-Msg-Id` header).
    pub fn message_id(&self) -> &str {
        &self.envelope.message_id
    }

    /// The referral the message is about (empty for consent grants and revocations).
    pub fn referral_id(&self) -> &str {
        &self.referral_id
    }

    /// The consent the message is about (empty for referrals and status updates).
    pub fn consent_id(&self) -> &str {
        &self.consent_id
    }

    /// The subject it is published on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The envelope as it goes on the wire.
    pub fn envelope(&self) -> &v1::Envelope {
        &self.envelope
    }

    /// Puts a message back together from what [`subject`](Self::subject),
    /// [`referral_id`](Self::referral_id), [`consent_id`](Self::consent_id) and
    /// [`envelope`](Self::envelope) returned (for a message kept durably between attempts).
    pub(crate) fn from_parts(
        subject: String,
        referral_id: String,
        consent_id: String,
        envelope: v1::Envelope,
    ) -> Outgoing {
        Outgoing {
            subject,
            referral_id,
            consent_id,
            envelope,
        }
    }
}

/// Ids only: the payload may hold personal data.
impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing")
            .field("subject", &self.subject)
            .field("message_id", &self.envelope.message_id)
            .field("referral_id", &self.referral_id)
            .field("consent_id", &self.consent_id)
            .finish_non_exhaustive()
    }
}

/// Checks a referral, fills `referral_id` (fresh UUIDv7) and `from_agency` (`me`) when empty,
/// and wraps it for `yeongye.in.<me>.referral`. The legal basis, purpose and data categories
/// are the caller's to state: they are checked, never filled in.
pub(crate) fn referral(me: &str, mut referral: v1::Referral) -> Result<Outgoing> {
    if referral.referral_id.is_empty() {
        referral.referral_id = ids::new_id();
    } else {
        check_id("referral_id", &referral.referral_id)?;
    }
    if referral.from_agency.is_empty() {
        referral.from_agency = me.to_owned();
    } else if referral.from_agency != me {
        return Err(Error::invalid(
            "from_agency",
            format!("is not this adapter's agency {me:?}"),
        ));
    }
    check_referral_fields(me, &referral, ids::now_ms())?;
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
        consent_id: String::new(),
        envelope,
    })
}

/// [`referral`], its personal fields then sealed to the recipient by `sealing` (in clear if
/// it has no registry): checked in clear first, so that an error names the field.
pub(crate) fn sealed_referral(
    me: &str,
    referral: v1::Referral,
    sealing: &crate::sealing::Sealing,
) -> Result<Outgoing> {
    let checked = self::referral(me, referral)?;
    if !sealing.seals() {
        return Ok(checked);
    }
    let mut r = v1::Referral::decode(checked.envelope.payload.as_slice())
        .map_err(|_| Error::invalid("referral", "could not be re-read to seal it"))?;
    sealing.seal_referral(&mut r)?;
    let mut out = checked;
    out.envelope.payload = r.encode_to_vec();
    Ok(out)
}

/// The field checks of a referral whose ids are already filled in.
fn check_referral_fields(me: &str, r: &v1::Referral, now_ms: i64) -> Result<()> {
    check_agency("to_agency", &r.to_agency)?;
    if r.to_agency == me {
        return Err(Error::invalid("to_agency", "is this adapter's own agency"));
    }
    let Some(client) = r.client.as_ref() else {
        return Err(Error::missing(
            "client.pseudonym_id",
            "is required (client is missing)",
        ));
    };
    if client.pseudonym_id.trim().is_empty() {
        return Err(Error::missing("client.pseudonym_id", "is required"));
    }
    check_enum::<v1::FieldOfNeed>(
        "field",
        r.field,
        "a FieldOfNeed, e.g. FIELD_OF_NEED_HOUSING",
    )?;
    check_enum::<v1::Urgency>(
        "urgency",
        r.urgency,
        "URGENCY_ROUTINE, URGENCY_PRIORITY or URGENCY_CRISIS",
    )?;
    check_enum::<v1::Purpose>(
        "purpose",
        r.purpose,
        "a Purpose, e.g. PURPOSE_CASE_MANAGEMENT",
    )?;
    match &r.legal_basis {
        None => {
            return Err(Error::missing(
                "legal_basis",
                "is required: give consent_id (a recorded consent) or statutory_basis",
            ));
        }
        Some(v1::referral::LegalBasis::ConsentId(id)) => check_id("consent_id", id)?,
        Some(v1::referral::LegalBasis::StatutoryBasis(b)) => {
            check_enum::<v1::Statute>(
                "statutory_basis.statute",
                b.statute,
                "a Statute, e.g. STATUTE_CHILD_WELFARE_ACT",
            )?;
            if b.justification.trim().is_empty() {
                return Err(Error::missing(
                    "statutory_basis.justification",
                    "is required with a statutory basis",
                ));
            }
        }
    }
    check_categories("data_categories", &r.data_categories, false)?;
    // What the client block carries must be declared (the broker checks consent against it).
    if let Some((category, fields)) = rules::undeclared_category(client, &r.data_categories) {
        return Err(Error::invalid(
            "data_categories",
            format!(
                "must include {} because {fields} is set",
                category.as_str_name()
            ),
        ));
    }
    if r.receive_by_ms != 0 && !rules::receive_by_in_range(r.receive_by_ms, now_ms) {
        return Err(Error::invalid(
            "receive_by_ms",
            "must be 0 (the default for the urgency) or in the future, at most 90 days ahead",
        ));
    }
    if !r.parent_referral_id.is_empty() {
        check_id("parent_referral_id", &r.parent_referral_id)?;
    }
    Ok(())
}

/// A `StatusUpdate` for `yeongye.in.<me>.status`, under a fresh message id.
pub(crate) fn status_update(
    me: &str,
    referral_id: &str,
    status: v1::Status,
    note: &str,
) -> Result<Outgoing> {
    check_id("referral_id", referral_id)?;
    if status == v1::Status::Unspecified {
        return Err(Error::missing("status", "is required"));
    }
    if note.chars().count() > MAX_NOTE_CHARS {
        return Err(Error::invalid(
            "note",
            format!("is longer than {MAX_NOTE_CHARS} characters"),
        ));
    }
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

/// A checked status update under a fresh message id whose note, if `sealed` is given, goes
/// sealed (and not in clear).
pub(crate) fn status_update_with_note(
    me: &str,
    referral_id: &str,
    status: v1::Status,
    note: &str,
    sealed: Option<v1::Sealed>,
) -> Result<Outgoing> {
    let mut out = status_update(me, referral_id, status, note)?;
    if let Some(sealed) = sealed {
        let update = v1::StatusUpdate {
            referral_id: referral_id.to_owned(),
            status: status as i32,
            note: String::new(),
            sealed_note: Some(sealed),
            reason: 0,
        };
        out.envelope.payload = update.encode_to_vec();
    }
    Ok(out)
}

/// The adapter's own decline of a delivered referral it could not take in (a seal that did not
/// open, contents beyond the declared categories), with its reason code and a fixed note naming
/// it: nothing personal. Its message id is derived from the delivery's, like the receipt's, so
/// that a decline sent again after a crash is the same message.
pub(crate) fn adapter_decline(
    me: &str,
    delivery_message_id: &str,
    referral_id: &str,
    reason: v1::ReasonCode,
) -> Outgoing {
    let update = v1::StatusUpdate {
        referral_id: referral_id.to_owned(),
        status: v1::Status::Declined as i32,
        note: format!(
            "declined by the recipient's adapter: {}",
            reason.as_str_name()
        ),
        sealed_note: None,
        reason: reason as i32,
    };
    Outgoing {
        subject: subject::inbound(me, InKind::Status),
        referral_id: referral_id.to_owned(),
        consent_id: String::new(),
        envelope: envelope(
            me,
            ids::decline_message_id(delivery_message_id),
            v1::PayloadType::StatusUpdate,
            update.encode_to_vec(),
        ),
    }
}

/// The party of a referral other than `me`.
pub(crate) fn other_party<'a>(me: &str, from: &'a str, to: &'a str) -> &'a str {
    if from == me { to } else { from }
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
        sealed_note: None,
        reason: 0,
    };
    Outgoing {
        subject: subject::inbound(me, InKind::Status),
        referral_id: referral_id.to_owned(),
        consent_id: String::new(),
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

/// Whether `id` is a valid referral, consent or message id (`yeongye_proto::rules`).
pub fn is_valid_id(id: &str) -> bool {
    rules::is_valid_id(id)
}

/// A referral or consent id is 1 to 128 characters of `A-Z a-z 0-9 - _`.
pub(crate) fn check_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::missing(field, "is required"));
    }
    if !is_valid_id(id) {
        return Err(Error::invalid(
            field,
            format!("must be {}", rules::ID_SYNTAX),
        ));
    }
    Ok(())
}

/// An agency id, by its format only (whether it is registered, only the broker knows).
pub(crate) fn check_agency(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::missing(field, "is required"));
    }
    if !subject::is_valid_agency_id(id) {
        return Err(Error::invalid(
            field,
            format!(
                "is not a valid agency id (1-{} characters of a-z, 0-9 and '-')",
                subject::MAX_AGENCY_ID_LEN
            ),
        ));
    }
    Ok(())
}

/// An enum field that must be set to a value this build knows.
pub(crate) fn check_enum<E>(field: &str, value: i32, expected: &str) -> Result<()>
where
    E: TryFrom<i32>,
{
    if value == 0 {
        return Err(Error::missing(field, format!("is required: {expected}")));
    }
    if E::try_from(value).is_err() {
        return Err(Error::invalid(
            field,
            format!("{value} is not a known value; expected {expected}"),
        ));
    }
    Ok(())
}

/// A list of data categories: each known, none UNSPECIFIED; at least one if `required`.
pub(crate) fn check_categories(field: &str, categories: &[i32], required: bool) -> Result<()> {
    if required && categories.is_empty() {
        return Err(Error::missing(
            field,
            "must name at least one DataCategory, e.g. DATA_CATEGORY_IDENTITY",
        ));
    }
    for (i, c) in categories.iter().enumerate() {
        check_enum::<v1::DataCategory>(
            &format!("{field}[{i}]"),
            *c,
            "a DataCategory, e.g. DATA_CATEGORY_IDENTITY",
        )?;
    }
    Ok(())
}

fn check_sender(me: &str) -> Result<()> {
    if subject::is_valid_agency_id(me) {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "{me:?} is not a valid agency id"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldIssue;

    fn good() -> v1::Referral {
        v1::Referral {
            to_agency: "hope-support".into(),
            client: Some(v1::Client {
                pseudonym_id: "p-123".into(),
                ..Default::default()
            }),
            field: v1::FieldOfNeed::Livelihood as i32,
            urgency: v1::Urgency::Crisis as i32,
            purpose: v1::Purpose::CaseManagement as i32,
            legal_basis: Some(v1::referral::LegalBasis::ConsentId("c-1".into())),
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
        // The legal basis, purpose and categories are the caller's: passed on as given.
        assert_eq!(r.legal_basis, good().legal_basis);
        assert_eq!(r.purpose, v1::Purpose::CaseManagement as i32);
        assert!(r.data_categories.is_empty());
    }

    #[test]
    fn keeps_given_ids() {
        let mut r = good();
        r.referral_id = "given-1".into();
        r.from_agency = "cc-1".into();
        assert_eq!(referral("cc-1", r).unwrap().referral_id(), "given-1");
    }

    #[test]
    fn statutory_basis_is_a_legal_basis() {
        let mut r = good();
        r.legal_basis = Some(v1::referral::LegalBasis::StatutoryBasis(
            v1::StatutoryBasis {
                statute: v1::Statute::ChildWelfareAct as i32,
                justification: "아동학대 의심 신고".into(),
            },
        ));
        referral("cc-1", r).unwrap();
    }

    #[test]
    fn rejects() {
        type Case = (fn(&mut v1::Referral), &'static str, FieldIssue);
        use FieldIssue::{Invalid, Missing};
        let cases: Vec<Case> = vec![
            (|r| r.from_agency = "other".into(), "from_agency", Invalid),
            (|r| r.to_agency = "".into(), "to_agency", Missing),
            (|r| r.to_agency = "Bad Id".into(), "to_agency", Invalid),
            (|r| r.to_agency = "cc-1".into(), "to_agency", Invalid),
            (|r| r.urgency = 0, "urgency", Missing),
            (|r| r.urgency = 99, "urgency", Invalid),
            (|r| r.field = 0, "field", Missing),
            (|r| r.purpose = 0, "purpose", Missing),
            (|r| r.purpose = 77, "purpose", Invalid),
            (|r| r.legal_basis = None, "legal_basis", Missing),
            (
                |r| r.legal_basis = Some(v1::referral::LegalBasis::ConsentId("a b".into())),
                "consent_id",
                Invalid,
            ),
            (
                |r| {
                    r.legal_basis = Some(v1::referral::LegalBasis::StatutoryBasis(
                        v1::StatutoryBasis {
                            statute: v1::Statute::ChildWelfareAct as i32,
                            justification: " ".into(),
                        },
                    ))
                },
                "statutory_basis.justification",
                Missing,
            ),
            (
                |r| {
                    r.legal_basis = Some(v1::referral::LegalBasis::StatutoryBasis(
                        v1::StatutoryBasis {
                            statute: 0,
                            justification: "x".into(),
                        },
                    ))
                },
                "statutory_basis.statute",
                Missing,
            ),
            (
                |r| r.data_categories = vec![0],
                "data_categories[0]",
                Missing,
            ),
            (
                |r| r.data_categories = vec![1, 99],
                "data_categories[1]",
                Invalid,
            ),
            (
                |r| r.client.as_mut().unwrap().phone = "010".into(),
                "data_categories",
                Invalid,
            ),
            (|r| r.client = None, "client.pseudonym_id", Missing),
            (
                |r| r.client.as_mut().unwrap().pseudonym_id = " ".into(),
                "client.pseudonym_id",
                Missing,
            ),
            (
                |r| r.referral_id = "has space".into(),
                "referral_id",
                Invalid,
            ),
            (|r| r.referral_id = "x".repeat(129), "referral_id", Invalid),
            (|r| r.referral_id = "a/b".into(), "referral_id", Invalid),
            (|r| r.receive_by_ms = -1, "receive_by_ms", Invalid),
            (|r| r.receive_by_ms = 1, "receive_by_ms", Invalid),
            (|r| r.receive_by_ms = i64::MAX, "receive_by_ms", Invalid),
            (
                |r| r.parent_referral_id = "../x".into(),
                "parent_referral_id",
                Invalid,
            ),
        ];
        for (mutate, field, issue) in cases {
            let mut r = good();
            mutate(&mut r);
            let e = referral("cc-1", r).unwrap_err();
            assert!(e.is_input_error());
            match &e {
                Error::InvalidField {
                    field: f, issue: i, ..
                } => {
                    assert_eq!((f.as_str(), *i), (field, issue), "{e}");
                }
                other => panic!("{field}: {other}"),
            }
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn declared_categories_pass() {
        let mut r = good();
        let c = r.client.as_mut().unwrap();
        c.name = "홍길동".into();
        c.phone = "010".into();
        r.data_categories = vec![
            v1::DataCategory::Identity as i32,
            v1::DataCategory::Contact as i32,
        ];
        referral("cc-1", r).unwrap();
    }

    #[test]
    fn errors_carry_no_personal_data() {
        let mut r = good();
        r.client.as_mut().unwrap().name = "홍길동-marker".into();
        let e = referral("cc-1", r).unwrap_err();
        assert!(!e.to_string().contains("marker"), "{e}");
    }

    #[test]
    fn status_updates() {
        let out = status_update("cc-1", "r-1", v1::Status::Accepted, "ok").unwrap();
        assert_eq!(out.subject(), "yeongye.in.cc-1.status");
        let u = v1::StatusUpdate::decode(out.envelope().payload.as_ref()).unwrap();
        assert_eq!(u.status, v1::Status::Accepted as i32);
        assert!(status_update("cc-1", "", v1::Status::Accepted, "").is_err());
        assert!(status_update("cc-1", "r-1", v1::Status::Unspecified, "").is_err());
        let long = "가".repeat(MAX_NOTE_CHARS + 1);
        let e = status_update("cc-1", "r-1", v1::Status::Accepted, &long).unwrap_err();
        assert!(e.to_string().contains("note"), "{e}");
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

    #[test]
    fn rebuilt_from_parts_is_the_same_message() {
        let out = referral("cc-1", good()).unwrap();
        let back = Outgoing::from_parts(
            out.subject().to_owned(),
            out.referral_id().to_owned(),
            out.consent_id().to_owned(),
            out.envelope().clone(),
        );
        assert_eq!(back, out);
    }
}
