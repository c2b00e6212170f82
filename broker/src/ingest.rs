//! Reading one inbound message: subject and bytes in, an [`Inbound`] out — what it asks for, or
//! why it cannot be applied. Pure (the registry and limits come in as arguments): the checks
//! that need the store (dedup, existing referral, legal transition) happen in the event loop.

use prost::Message;
use yeongye_proto::subject::{self, InKind};
use yeongye_proto::v1::{self, ReasonCode};
use yeongye_proto::{rules, seal};

use yeongye_proto::signing::SignatureError;

use crate::consent::{Basis, Consent};
use crate::convert;
use crate::referral::{Millis, NewReferral, Status, Urgency};
use crate::registry::Registry;

/// Longest free-text note on a status update.
pub const MAX_NOTE_CHARS: usize = 4000;
/// Longest sealed note's ciphertext: the longest note in UTF-8 (4 bytes a character at most)
/// and the tag.
pub const MAX_SEALED_NOTE_BYTES: usize = MAX_NOTE_CHARS * 4 + 16;
/// What the loop needs to know of a message to deduplicate and answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `<agency token>/<message id>`, or `seq:<n>` when the envelope could not be read.
    pub dedup_key: String,
    /// The envelope's message id; empty when it could not be read.
    pub message_id: String,
    /// The registered agency to answer, if the subject names one.
    pub reply_to: Option<String>,
    /// The subject as [`shown_subject`] shows it: what rejections, dead letters and logs carry.
    /// A served subject is kept as it is; any other is rejected on its subject alone, so a
    /// dead letter's replay from this subject reaches the same verdict as from the original.
    pub subject: String,
    /// What the message means ([`meaning_digest`]), once its envelope has been read: a resend
    /// under the same id that differs only in `sent_at_ms` (and so its signature) has the same.
    pub meaning: Option<[u8; 32]>,
    /// The message is refused and carries a client's personal data in clear where the broker
    /// does not accept plaintext ([`holds_clear_personal_data`]): it leaves no copy of its bytes.
    pub clear_personal_data: bool,
}

/// The digest the broker keeps for an applied message id and compares a resend's with: the
/// sender, the payload type and the payload bytes — what the message means — and not
/// `sent_at_ms`, `signature` or `key_id`, which a sender rebuilding the same message after a
/// crash (a receipt under its derived id, a retry) changes without changing its meaning.
pub fn meaning_digest(envelope: &v1::Envelope) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"yeongye.v1.message-meaning\0");
    h.update((envelope.sender.len() as u32).to_be_bytes());
    h.update(envelope.sender.as_bytes());
    h.update(envelope.payload_type.to_be_bytes());
    h.update((envelope.payload.len() as u32).to_be_bytes());
    h.update(&envelope.payload);
    h.finalize().into()
}

impl Request {
    /// The referral this request is about, when it names one.
    pub fn referral_id(&self) -> &str {
        match self {
            Request::Submit(n) | Request::Refuse(n, _) => &n.id,
            Request::Status { referral_id, .. } | Request::Purged { referral_id, .. } => {
                referral_id
            }
            Request::Reject(r) => &r.referral_id,
            Request::Grant(_) | Request::Revoke { .. } => "",
        }
    }
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
        /// The note sealed to the other party (an encoded `v1::Sealed`; empty: none).
        sealed_note: Vec<u8>,
        /// The update's `ReasonCode` number (0: none).
        reason: i32,
    },
    /// A consent to record.
    Grant(Consent),
    /// A consent withdrawn by the client, as recorded by agency `by`; `at` None: now.
    Revoke {
        consent_id: String,
        at: Option<Millis>,
        by: String,
    },
    /// A recipient confirms it purged a withdrawn referral's data.
    Purged {
        referral_id: String,
        consent_id: String,
        by: String,
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
    /// Refuse unsigned messages (a signature that is present is always checked).
    pub require_signatures: bool,
    /// How far `sent_at_ms` may be ahead of the arrival, and how long before it.
    pub max_skew_ms: Millis,
    pub max_age_ms: Millis,
    /// Accept referrals whose client data is not sealed (adapters from before sealing).
    pub accept_plaintext: bool,
}

impl Limits<'_> {
    /// Limits for tests of pure logic: generous, signatures not required, plaintext accepted.
    #[cfg(test)]
    pub(crate) fn for_tests(deadlines: &dyn Fn(Urgency, i32) -> (Millis, Millis)) -> Limits<'_> {
        Limits {
            max_message_bytes: 64 * 1024,
            deadlines,
            require_signatures: false,
            max_skew_ms: Millis::MAX / 4,
            max_age_ms: Millis::MAX / 4,
            accept_plaintext: true,
        }
    }
}

fn signature_code(e: &SignatureError) -> ReasonCode {
    match e {
        SignatureError::Missing => ReasonCode::SignatureMissing,
        SignatureError::Invalid => ReasonCode::SignatureInvalid,
        SignatureError::UnknownKey(_) => ReasonCode::SignatureUnknownKey,
        SignatureError::KeyExpired(_) => ReasonCode::SignatureKeyExpired,
    }
}

fn refusal(code: ReasonCode, detail: impl Into<String>, referral_id: &str) -> Refusal {
    Refusal {
        code,
        detail: detail.into(),
        referral_id: referral_id.to_owned(),
    }
}

/// How an inbound subject may be shown in a log or a detail: as it is if it is one the broker
/// serves (`yeongye.in.<agency id>.<kind>`), else without its tokens after the agency (which a
/// sender chooses freely within its permissions, and could fill with personal data).
pub fn shown_subject(subject: &str) -> String {
    match subject::parse_inbound(subject) {
        Some(p) if p.kind.is_some() && subject::is_valid_agency_id(p.agency) => subject.to_owned(),
        Some(p) if subject::is_valid_agency_id(p.agency) => {
            format!("yeongye.in.{}.(a kind that is not served)", p.agency)
        }
        _ => "(a subject that is not well-formed)".to_owned(),
    }
}

pub(crate) fn valid_id(id: &str) -> bool {
    rules::is_valid_id(id)
}

/// The detail for an id field that breaks the id syntax.
fn id_syntax(field: &str) -> String {
    format!("{field} must be {}", rules::ID_SYNTAX)
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
        subject: shown_subject(subject),
        meaning: None,
        clear_personal_data: false,
    };
    let request = match read_checked(&mut origin, subject, bytes, now, registry, limits) {
        Ok(request) => request,
        Err(refused) => Request::Reject(refused),
    };
    // Only what is refused needs the look (a second decode): an accepted message is kept anyway.
    let refused = matches!(request, Request::Reject(_) | Request::Refuse(..));
    origin.clear_personal_data =
        refused && !limits.accept_plaintext && holds_clear_personal_data(bytes);
    Inbound { origin, request }
}

/// The checks of [`read`], in order, each filling in what it learns of `origin`: the subject,
/// then the envelope, then when it was sent and who signed it; then the payload, by kind.
/// `Err`: the message is rejected before its payload is read.
fn read_checked(
    origin: &mut Origin,
    subject: &str,
    bytes: &[u8],
    now: Millis,
    registry: &Registry,
    limits: &Limits<'_>,
) -> Result<Request, Refusal> {
    let (token, kind) = addressed(origin, subject, bytes.len(), registry, limits)?;
    let envelope = open_envelope(origin, bytes, token, kind)?;
    check_sent_at(&envelope, now, limits)?;
    if (limits.require_signatures || !envelope.signature.is_empty())
        && let Err(e) = registry.keys().verify(token, &envelope, now)
    {
        return Err(rejected(signature_code(&e), e.to_string()));
    }
    Ok(match kind {
        InKind::Referral => read_referral(token, &envelope.payload, bytes, now, registry, limits),
        InKind::Status => read_status(token, &envelope.payload),
        InKind::Consent if envelope.payload_type == v1::PayloadType::ConsentGrant as i32 => {
            read_grant(token, &envelope.payload, now, registry)
        }
        InKind::Consent => read_revocation(token, &envelope.payload, now),
        InKind::Purge => read_purge(token, &envelope.payload),
    })
}

/// A message rejected before its payload says which referral it is about.
fn rejected(code: ReasonCode, detail: impl Into<String>) -> Refusal {
    refusal(code, detail, "")
}

/// Whom the subject names, and what kind of message it announces: a registered agency (then
/// answered: `origin.reply_to`) and a kind the broker serves, for a message within the size
/// limit.
fn addressed<'s>(
    origin: &mut Origin,
    subject: &'s str,
    len: usize,
    registry: &Registry,
    limits: &Limits<'_>,
) -> Result<(&'s str, InKind), Refusal> {
    let Some(parsed) = subject::parse_inbound(subject) else {
        return Err(rejected(
            ReasonCode::UnknownSubject,
            "subject is not yeongye.in.<agency>.<kind>",
        ));
    };
    let token = parsed.agency;
    if !registry.contains(token) {
        return Err(rejected(
            ReasonCode::UnknownSender,
            "the subject's agency is not registered",
        ));
    }
    origin.reply_to = Some(token.to_owned());
    if len > limits.max_message_bytes {
        return Err(rejected(
            ReasonCode::TooLarge,
            format!(
                "{len} bytes is over the limit of {}",
                limits.max_message_bytes
            ),
        ));
    }
    let Some(kind) = parsed.kind else {
        return Err(rejected(
            ReasonCode::UnknownSubject,
            "the subject's kind is not one the broker serves (referral, status, consent, purge)",
        ));
    };
    Ok((token, kind))
}

/// The envelope, once it decodes, has a well-formed message id (from here on the message is
/// deduplicated by it and by what it means), comes from the subject's agency and carries a
/// payload type that fits the subject's kind.
fn open_envelope(
    origin: &mut Origin,
    bytes: &[u8],
    token: &str,
    kind: InKind,
) -> Result<v1::Envelope, Refusal> {
    let envelope = v1::Envelope::decode(bytes).map_err(|e| {
        rejected(
            ReasonCode::MalformedEnvelope,
            format!("not an Envelope: {e}"),
        )
    })?;
    if !valid_id(&envelope.message_id) {
        return Err(rejected(
            ReasonCode::MalformedEnvelope,
            id_syntax("message_id"),
        ));
    }
    origin.dedup_key = format!("{token}/{}", envelope.message_id);
    origin.message_id = envelope.message_id.clone();
    origin.meaning = Some(meaning_digest(&envelope));
    if envelope.sender != token {
        return Err(rejected(
            ReasonCode::SenderMismatch,
            "envelope sender is not the subject's agency",
        ));
    }
    let expected = payload_types(kind);
    if !expected.iter().any(|t| *t as i32 == envelope.payload_type) {
        return Err(rejected(
            ReasonCode::WrongPayloadType,
            format!(
                "payload_type {} does not fit the subject (expected {})",
                envelope.payload_type,
                expected
                    .iter()
                    .map(|t| t.as_str_name())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        ));
    }
    Ok(envelope)
}

/// The payload types a subject's kind carries.
fn payload_types(kind: InKind) -> &'static [v1::PayloadType] {
    match kind {
        InKind::Referral => &[v1::PayloadType::Referral],
        InKind::Status => &[v1::PayloadType::StatusUpdate],
        InKind::Consent => &[
            v1::PayloadType::ConsentGrant,
            v1::PayloadType::ConsentRevocation,
        ],
        InKind::Purge => &[v1::PayloadType::PurgeConfirmation],
    }
}

/// When it was built must be near when it arrived (`now`): a message from far in the past is a
/// replay, one from the future a broken clock or a forgery.
fn check_sent_at(envelope: &v1::Envelope, now: Millis, limits: &Limits<'_>) -> Result<(), Refusal> {
    if envelope.sent_at_ms > now.saturating_add(limits.max_skew_ms)
        || envelope.sent_at_ms < now.saturating_sub(limits.max_age_ms)
    {
        return Err(rejected(
            ReasonCode::TimestampSkew,
            format!(
                "sent_at_ms is {} ms from its arrival: allowed is {} ms ahead, {} ms behind",
                envelope.sent_at_ms.saturating_sub(now),
                limits.max_skew_ms,
                limits.max_age_ms
            ),
        ));
    }
    Ok(())
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
            return Request::Reject(rejected(
                ReasonCode::MalformedPayload,
                format!("not a Referral: {e}"),
            ));
        }
    };
    if !valid_id(&r.referral_id) {
        return Request::Reject(rejected(ReasonCode::InvalidField, id_syntax("referral_id")));
    }
    if r.from_agency != sender {
        return Request::Reject(refusal(
            ReasonCode::SenderMismatch,
            "from_agency is not the envelope's sender",
            &r.referral_id,
        ));
    }
    // From here on the referral has a usable id: one that cannot be accepted is recorded as
    // refused, so that an operator can look it up and replay it.
    let new = new_referral(&r, sender, envelope_bytes, now, registry, limits);
    let fault = check_parties(&r, sender, registry)
        .and_then(|()| check_fields(&r, now))
        .and_then(|()| check_basis(&r))
        .and_then(|()| check_privacy(&r, limits.accept_plaintext));
    match fault {
        Ok(()) => Request::Submit(new),
        Err((code, detail)) => Request::Refuse(new, refusal(code, detail, &r.referral_id)),
    }
}

/// Why a referral with a usable id is refused: its reason code and detail.
type Fault = (ReasonCode, String);

fn invalid(detail: impl Into<String>) -> Fault {
    (ReasonCode::InvalidField, detail.into())
}

/// The referral as the broker records it, whether it is then submitted or refused: its
/// receive-by from the urgency's deadline when the sender set none, its recipient kept only if
/// it has the shape of an agency id.
fn new_referral(
    r: &v1::Referral,
    sender: &str,
    envelope_bytes: &[u8],
    now: Millis,
    registry: &Registry,
    limits: &Limits<'_>,
) -> NewReferral {
    let urgency = urgency_from(r).unwrap_or(Urgency::Routine);
    let (receipt, acceptance) = (limits.deadlines)(urgency, r.field);
    let receive_by = if r.receive_by_ms == 0 {
        now.saturating_add(receipt)
    } else {
        r.receive_by_ms
    };
    let kind_of = |agency: &str| {
        registry
            .get(agency)
            .map(|a| a.kind.clone())
            .unwrap_or_default()
    };
    NewReferral {
        id: r.referral_id.clone(),
        from: sender.to_owned(),
        from_kind: kind_of(sender),
        // Kept (and shown to operators, written to the audit log) only if it is an agency id:
        // a refused referral's recipient is the sender's free text otherwise.
        to: if subject::is_valid_agency_id(&r.to_agency) {
            r.to_agency.clone()
        } else {
            String::new()
        },
        to_kind: kind_of(&r.to_agency),
        client: r
            .client
            .as_ref()
            .map(|c| c.pseudonym_id.clone())
            .unwrap_or_default(),
        basis: basis_of(r),
        purpose: r.purpose,
        categories: r.data_categories.clone(),
        urgency,
        receive_by,
        accept_within: acceptance,
        envelope: envelope_bytes.to_vec(),
    }
}

/// The legal basis the referral cites (an empty consent id when it cites none: it is refused).
/// A statute's justification is free text about the case (inside the seal of a sealed
/// referral): the broker checks that a plaintext one has it, and keeps no copy of it.
fn basis_of(r: &v1::Referral) -> Basis {
    match &r.legal_basis {
        Some(v1::referral::LegalBasis::ConsentId(c)) => Basis::Consent(c.clone()),
        Some(v1::referral::LegalBasis::StatutoryBasis(b)) => Basis::Statute {
            statute: b.statute,
            name: v1::Statute::try_from(b.statute)
                .map(|s| s.as_str_name().to_owned())
                .unwrap_or_default(),
            justification: String::new(),
        },
        None => Basis::Consent(String::new()),
    }
}

/// The recipient is a registered agency other than the sender.
fn check_parties(r: &v1::Referral, sender: &str, registry: &Registry) -> Result<(), Fault> {
    if !registry.contains(&r.to_agency) {
        return Err((
            ReasonCode::UnknownRecipient,
            "to_agency is not a registered agency".to_owned(),
        ));
    }
    if r.to_agency == sender {
        return Err(invalid("to_agency is the sender itself"));
    }
    Ok(())
}

/// Every field holds a known value.
fn check_fields(r: &v1::Referral, now: Millis) -> Result<(), Fault> {
    if urgency_from(r).is_none() {
        return Err(invalid("urgency must be ROUTINE, PRIORITY or CRISIS"));
    }
    if r.client
        .as_ref()
        .is_none_or(|c| c.pseudonym_id.trim().is_empty())
    {
        return Err(invalid("client.pseudonym_id is required"));
    }
    if r.field == 0 || v1::FieldOfNeed::try_from(r.field).is_err() {
        return Err(invalid("field must be a known FieldOfNeed"));
    }
    if r.receive_by_ms != 0 && !rules::receive_by_in_range(r.receive_by_ms, now) {
        return Err(invalid(
            "receive_by_ms must be in the future, at most 90 days ahead",
        ));
    }
    if r.purpose == 0 || v1::Purpose::try_from(r.purpose).is_err() {
        return Err(invalid("purpose must be a known Purpose"));
    }
    if let Some(bad) = r
        .data_categories
        .iter()
        .find(|c| **c == 0 || v1::DataCategory::try_from(**c).is_err())
    {
        return Err(invalid(format!(
            "data_categories holds an unknown category {bad}"
        )));
    }
    Ok(())
}

/// The client's personal data is sealed to the recipient (docs/PROTOCOL.md "Sealed client
/// data"): nothing personal in clear beside the seal, and a seal of the right shape (the broker
/// cannot open it: the recipient's adapter checks what is inside). A referral in clear is
/// refused unless the broker accepts plaintext (adapters from before sealing); then what its
/// client block carries must be declared in `data_categories`, so that consent is checked
/// against what is actually sent.
fn check_privacy(r: &v1::Referral, accept_plaintext: bool) -> Result<(), Fault> {
    let malformed = |detail: &str| Err((ReasonCode::SealedMalformed, detail.to_owned()));
    match &r.sealed {
        Some(_) if seal::has_clear_personal_data(r) => malformed(
            "a sealed referral carries personal data in clear: the client beyond pseudonym_id, \
             reason and a statutory justification belong inside the seal",
        ),
        Some(s) => check_seal_shape(s, "sealed").map_err(|d| (ReasonCode::SealedMalformed, d)),
        None if !accept_plaintext => Err((
            ReasonCode::PlaintextRefused,
            "the referral is not sealed to its recipient, and this broker accepts only sealed \
             referrals"
                .to_owned(),
        )),
        None => match r
            .client
            .as_ref()
            .and_then(|c| rules::undeclared_category(c, &r.data_categories))
        {
            Some((category, fields)) => Err(invalid(format!(
                "{fields} is set, so data_categories must include {}",
                category.as_str_name()
            ))),
            None => Ok(()),
        },
    }
}

/// Whether `raw` (an inbound message as received) carries a client's personal data in clear:
/// an envelope whose payload is a referral with personal fields beside (or without) a seal.
/// Unless the broker accepts plaintext (a migration), it keeps no copy of such a message when
/// it refuses it — neither the refused referral's envelope nor the dead letter's bytes —
/// whatever the reason it was refused for. (Free-text notes in clear are kept: the adapters'
/// own fixed notes travel in clear.)
pub fn holds_clear_personal_data(raw: &[u8]) -> bool {
    let Ok(envelope) = v1::Envelope::decode(raw) else {
        return false;
    };
    envelope.payload_type == v1::PayloadType::Referral as i32
        && v1::Referral::decode(envelope.payload.as_slice())
            .is_ok_and(|r| seal::has_clear_personal_data(&r))
}

/// A seal (the wire's `field`) the reader could open: a well-formed key id, a 32-byte
/// encapsulated key, a ciphertext at least as long as its tag. Its detail never quotes the seal.
fn check_seal_shape(s: &v1::Sealed, field: &str) -> Result<(), String> {
    if !yeongye_proto::signing::is_well_formed_key_id(&s.key_id) {
        Err(format!("{field}.key_id is not a well-formed key id"))
    } else if s.enc.len() != 32 {
        Err(format!("{field}.enc is not 32 bytes"))
    } else if s.ciphertext.len() < 16 {
        Err(format!(
            "{field}.ciphertext is shorter than its authentication tag"
        ))
    } else {
        Ok(())
    }
}

/// The referral cites a well-formed consent id, or a known statute with a justification (in
/// clear, or inside the seal, where the recipient's adapter sees it).
fn check_basis(r: &v1::Referral) -> Result<(), Fault> {
    match &r.legal_basis {
        None => Err((
            ReasonCode::NoLegalBasis,
            "the referral cites neither a consent nor a statute".to_owned(),
        )),
        Some(v1::referral::LegalBasis::ConsentId(c)) if !valid_id(c) => {
            Err(invalid(id_syntax("consent_id")))
        }
        Some(v1::referral::LegalBasis::StatutoryBasis(b))
            if b.statute == 0
                || v1::Statute::try_from(b.statute).is_err()
                || (r.sealed.is_none() && b.justification.trim().is_empty()) =>
        {
            Err((
                ReasonCode::StatutoryBasisInvalid,
                "a statutory basis needs a known statute and a justification".to_owned(),
            ))
        }
        _ => Ok(()),
    }
}

fn read_grant(sender: &str, payload: &[u8], now: Millis, registry: &Registry) -> Request {
    let g = match v1::ConsentGrant::decode(payload) {
        Ok(g) => g,
        Err(e) => {
            return Request::Reject(refusal(
                ReasonCode::MalformedPayload,
                format!("not a ConsentGrant: {e}"),
                "",
            ));
        }
    };
    if let Err(refused) = check_grant(&g, sender, registry) {
        return Request::Reject(refused);
    }
    Request::Grant(Consent {
        id: g.consent_id,
        client: g.client_pseudonym_id,
        collected_by: g.collected_by,
        recipient_agencies: g.recipient_agencies,
        recipient_kinds: g.recipient_kinds,
        purposes: g.purposes,
        categories: g.data_categories,
        valid_from: g.valid_from_ms,
        valid_until: (g.valid_until_ms != 0).then_some(g.valid_until_ms),
        form_reference: g.form_reference,
        granted_at: now,
        revoked: None,
        referrals: Vec::new(),
        purges: Vec::new(),
    })
}

/// A grant names a client, at least one recipient (every named agency registered), known
/// purposes and categories, a validity that ends after it starts, and the signed form.
fn check_grant(g: &v1::ConsentGrant, sender: &str, registry: &Registry) -> Result<(), Refusal> {
    let bad = |detail: &str| Err(rejected(ReasonCode::InvalidField, detail));
    if !valid_id(&g.consent_id) {
        return bad(&id_syntax("consent_id"));
    }
    if g.collected_by != sender {
        return Err(rejected(
            ReasonCode::SenderMismatch,
            "collected_by is not the envelope's sender",
        ));
    }
    if g.client_pseudonym_id.trim().is_empty() {
        return bad("client_pseudonym_id is required");
    }
    if g.recipient_agencies.is_empty() && g.recipient_kinds.is_empty() {
        return bad("name at least one recipient agency or kind of agency");
    }
    if let Some(a) = g.recipient_agencies.iter().find(|a| !registry.contains(a)) {
        // Quoted only if it has the shape of an agency id: anything else could be personal data.
        let named = if subject::is_valid_agency_id(a) {
            format!("an unregistered agency {a:?}")
        } else {
            "an agency id that is not well-formed".to_owned()
        };
        return Err(rejected(
            ReasonCode::UnknownRecipient,
            format!("recipient_agencies names {named}"),
        ));
    }
    if g.purposes.is_empty()
        || g.purposes
            .iter()
            .any(|p| *p == 0 || v1::Purpose::try_from(*p).is_err())
    {
        return bad("purposes must name at least one known Purpose");
    }
    if g.data_categories.is_empty()
        || g.data_categories
            .iter()
            .any(|c| *c == 0 || v1::DataCategory::try_from(*c).is_err())
    {
        return bad("data_categories must name at least one known DataCategory");
    }
    if g.valid_until_ms != 0 && g.valid_until_ms <= g.valid_from_ms {
        return bad("valid_until_ms must be after valid_from_ms");
    }
    if g.form_reference.trim().is_empty() {
        return bad("form_reference (the signed consent form's reference) is required");
    }
    Ok(())
}

fn read_revocation(sender: &str, payload: &[u8], now: Millis) -> Request {
    let r = match v1::ConsentRevocation::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            return Request::Reject(refusal(
                ReasonCode::MalformedPayload,
                format!("not a ConsentRevocation: {e}"),
                "",
            ));
        }
    };
    if !valid_id(&r.consent_id) {
        return Request::Reject(refusal(
            ReasonCode::InvalidField,
            id_syntax("consent_id"),
            "",
        ));
    }
    if r.recorded_by != sender {
        return Request::Reject(refusal(
            ReasonCode::SenderMismatch,
            "recorded_by is not the envelope's sender",
            "",
        ));
    }
    if r.revoked_at_ms > now.saturating_add(60_000) {
        return Request::Reject(refusal(
            ReasonCode::InvalidField,
            "revoked_at_ms is in the future",
            "",
        ));
    }
    Request::Revoke {
        consent_id: r.consent_id,
        at: (r.revoked_at_ms != 0).then_some(r.revoked_at_ms),
        by: sender.to_owned(),
    }
}

fn read_purge(sender: &str, payload: &[u8]) -> Request {
    let p = match v1::PurgeConfirmation::decode(payload) {
        Ok(p) => p,
        Err(e) => {
            return Request::Reject(refusal(
                ReasonCode::MalformedPayload,
                format!("not a PurgeConfirmation: {e}"),
                "",
            ));
        }
    };
    if !valid_id(&p.referral_id) || !valid_id(&p.consent_id) {
        return Request::Reject(refusal(
            ReasonCode::InvalidField,
            "referral_id and consent_id are required ids",
            "",
        ));
    }
    Request::Purged {
        referral_id: p.referral_id,
        consent_id: p.consent_id,
        by: sender.to_owned(),
    }
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
            id_syntax("referral_id"),
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
    let sealed_note = match &u.sealed_note {
        None => Vec::new(),
        Some(_) if !u.note.is_empty() => {
            return Request::Reject(refusal(
                ReasonCode::SealedMalformed,
                "a status update has a note in clear and a sealed one",
                &u.referral_id,
            ));
        }
        Some(s) if s.ciphertext.len() > MAX_SEALED_NOTE_BYTES => {
            return Request::Reject(refusal(
                ReasonCode::InvalidField,
                format!("sealed_note is longer than {MAX_SEALED_NOTE_BYTES} bytes"),
                &u.referral_id,
            ));
        }
        Some(s) => match check_seal_shape(s, "sealed_note") {
            Ok(()) => s.encode_to_vec(),
            Err(detail) => {
                return Request::Reject(refusal(
                    ReasonCode::SealedMalformed,
                    detail,
                    &u.referral_id,
                ));
            }
        },
    };
    if u.reason != 0 && ReasonCode::try_from(u.reason).is_err() {
        return Request::Reject(refusal(
            ReasonCode::InvalidField,
            "reason must be a known ReasonCode",
            &u.referral_id,
        ));
    }
    Request::Status {
        referral_id: u.referral_id,
        by: sender.to_owned(),
        status,
        note: u.note,
        sealed_note,
        reason: u.reason,
    }
}

#[cfg(test)]
mod tests;
