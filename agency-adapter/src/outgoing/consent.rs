//! Consent messages an agency sends: grants and revocations (`yeongye.in.<me>.consent`) and
//! purge confirmations for withdrawn referrals (`yeongye.in.<me>.purge`), checked and wrapped.
//!
//! Pure, like the rest of `outgoing`. A grant's recipients are checked by format only: whether
//! an agency (or kind of agency) is registered is the broker's to say.

use prost::Message as _;
use yeongye_proto::subject::{self, InKind};
use yeongye_proto::v1;

use super::{Outgoing, check_agency, check_categories, check_enum, check_id, envelope};
use crate::error::{Error, Result};
use crate::ids;

/// Longest kind of agency named in a grant (`mental_health_centre`, ...).
const MAX_KIND_LEN: usize = 64;
/// How far in the future a revocation time may be (clock skew), as the broker allows.
const REVOKED_AT_SKEW_MS: i64 = 60_000;

/// Checks a grant, fills `consent_id` (fresh UUIDv7) and `collected_by` (`me`) when empty, and
/// wraps it for `yeongye.in.<me>.consent`.
pub(crate) fn consent_grant(me: &str, mut grant: v1::ConsentGrant) -> Result<Outgoing> {
    if grant.consent_id.is_empty() {
        grant.consent_id = ids::new_id();
    } else {
        check_id("consent_id", &grant.consent_id)?;
    }
    if grant.collected_by.is_empty() {
        grant.collected_by = me.to_owned();
    } else if grant.collected_by != me {
        return Err(Error::invalid(
            "collected_by",
            format!(
                "is not this adapter's agency {me:?}: a consent is recorded by the agency that collected it"
            ),
        ));
    }
    if grant.client_pseudonym_id.trim().is_empty() {
        return Err(Error::missing("client_pseudonym_id", "is required"));
    }
    if grant.recipient_agencies.is_empty() && grant.recipient_kinds.is_empty() {
        return Err(Error::missing(
            "recipient_agencies",
            "or recipient_kinds must name at least one recipient",
        ));
    }
    for (i, agency) in grant.recipient_agencies.iter().enumerate() {
        check_agency(&format!("recipient_agencies[{i}]"), agency)?;
    }
    for (i, kind) in grant.recipient_kinds.iter().enumerate() {
        let ok = !kind.is_empty()
            && kind.len() <= MAX_KIND_LEN
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(Error::invalid(
                format!("recipient_kinds[{i}]"),
                format!(
                    "is not a kind of agency (1-{MAX_KIND_LEN} characters of a-z, 0-9, '_' and '-')"
                ),
            ));
        }
    }
    if grant.purposes.is_empty() {
        return Err(Error::missing(
            "purposes",
            "must name at least one Purpose, e.g. PURPOSE_CASE_MANAGEMENT",
        ));
    }
    for (i, p) in grant.purposes.iter().enumerate() {
        check_enum::<v1::Purpose>(
            &format!("purposes[{i}]"),
            *p,
            "a Purpose, e.g. PURPOSE_CASE_MANAGEMENT",
        )?;
    }
    check_categories("data_categories", &grant.data_categories, true)?;
    if grant.valid_from_ms < 0 {
        return Err(Error::invalid("valid_from_ms", "must not be negative"));
    }
    if grant.valid_until_ms < 0 {
        return Err(Error::invalid(
            "valid_until_ms",
            "must not be negative (0: no end)",
        ));
    }
    if grant.valid_until_ms != 0 && grant.valid_until_ms <= grant.valid_from_ms {
        return Err(Error::invalid(
            "valid_until_ms",
            "must be after valid_from_ms (or 0: no end)",
        ));
    }
    if grant.form_reference.trim().is_empty() {
        return Err(Error::missing(
            "form_reference",
            "is required: the reference of the signed consent form",
        ));
    }
    let consent_id = grant.consent_id.clone();
    Ok(Outgoing {
        subject: subject::inbound(me, InKind::Consent),
        referral_id: String::new(),
        consent_id,
        envelope: envelope(
            me,
            ids::new_id(),
            v1::PayloadType::ConsentGrant,
            grant.encode_to_vec(),
        ),
    })
}

/// A revocation of `consent_id` recorded by `me`, for `yeongye.in.<me>.consent`. `revoked_at_ms`
/// `None` (or `Some(0)`): when the broker records it; otherwise not before 1970 and not after
/// `now_ms` (plus a minute of clock skew).
pub(crate) fn consent_revocation(
    me: &str,
    consent_id: &str,
    revoked_at_ms: Option<i64>,
    now_ms: i64,
) -> Result<Outgoing> {
    check_id("consent_id", consent_id)?;
    let at = revoked_at_ms.unwrap_or(0);
    if at < 0 {
        return Err(Error::invalid(
            "revoked_at_ms",
            "must not be negative (0: now)",
        ));
    }
    if at > now_ms.saturating_add(REVOKED_AT_SKEW_MS) {
        return Err(Error::invalid("revoked_at_ms", "is in the future"));
    }
    let revocation = v1::ConsentRevocation {
        consent_id: consent_id.to_owned(),
        revoked_at_ms: at,
        recorded_by: me.to_owned(),
    };
    Ok(Outgoing {
        subject: subject::inbound(me, InKind::Consent),
        referral_id: String::new(),
        consent_id: consent_id.to_owned(),
        envelope: envelope(
            me,
            ids::new_id(),
            v1::PayloadType::ConsentRevocation,
            revocation.encode_to_vec(),
        ),
    })
}

/// A purge confirmation for `yeongye.in.<me>.purge`: under
/// [`ids::purge_message_id`] of the withdrawal if given, else a fresh id.
pub(crate) fn purge_confirmation(
    me: &str,
    referral_id: &str,
    consent_id: &str,
    withdrawal_message_id: Option<&str>,
) -> Result<Outgoing> {
    check_id("referral_id", referral_id)?;
    check_id("consent_id", consent_id)?;
    let message_id = match withdrawal_message_id {
        Some("") => {
            return Err(Error::missing("withdrawal_message_id", "is empty"));
        }
        Some(w) => ids::purge_message_id(w),
        None => ids::new_id(),
    };
    let confirmation = v1::PurgeConfirmation {
        referral_id: referral_id.to_owned(),
        consent_id: consent_id.to_owned(),
    };
    Ok(Outgoing {
        subject: subject::inbound(me, InKind::Purge),
        referral_id: referral_id.to_owned(),
        consent_id: consent_id.to_owned(),
        envelope: envelope(
            me,
            message_id,
            v1::PayloadType::PurgeConfirmation,
            confirmation.encode_to_vec(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldIssue;

    fn good() -> v1::ConsentGrant {
        v1::ConsentGrant {
            client_pseudonym_id: "p-1".into(),
            recipient_agencies: vec!["hope-support".into()],
            purposes: vec![v1::Purpose::CaseManagement as i32],
            data_categories: vec![v1::DataCategory::Identity as i32],
            form_reference: "form-2025-001".into(),
            ..Default::default()
        }
    }

    #[test]
    fn grant_fills_ids_and_wraps() {
        let out = consent_grant("cc-1", good()).unwrap();
        assert_eq!(out.subject(), "yeongye.in.cc-1.consent");
        assert_eq!(
            out.envelope().payload_type,
            v1::PayloadType::ConsentGrant as i32
        );
        let g = v1::ConsentGrant::decode(out.envelope().payload.as_ref()).unwrap();
        assert_eq!(g.collected_by, "cc-1");
        assert_eq!(g.consent_id, out.consent_id());
        assert_eq!(
            uuid::Uuid::parse_str(&g.consent_id)
                .unwrap()
                .get_version_num(),
            7
        );
        assert_eq!(out.referral_id(), "");

        let mut given = good();
        given.consent_id = "consent-1".into();
        given.collected_by = "cc-1".into();
        given.recipient_agencies.clear();
        given.recipient_kinds = vec!["mental_health_centre".into()];
        assert_eq!(
            consent_grant("cc-1", given).unwrap().consent_id(),
            "consent-1"
        );
    }

    #[test]
    fn grant_rejects() {
        use FieldIssue::{Invalid, Missing};
        type Case = (fn(&mut v1::ConsentGrant), &'static str, FieldIssue);
        let cases: Vec<Case> = vec![
            (|g| g.collected_by = "other".into(), "collected_by", Invalid),
            (|g| g.consent_id = "a b".into(), "consent_id", Invalid),
            (
                |g| g.client_pseudonym_id = " ".into(),
                "client_pseudonym_id",
                Missing,
            ),
            (
                |g| g.recipient_agencies.clear(),
                "recipient_agencies",
                Missing,
            ),
            (
                |g| g.recipient_agencies.push("Bad".into()),
                "recipient_agencies[1]",
                Invalid,
            ),
            (
                |g| g.recipient_kinds = vec!["a.b".into()],
                "recipient_kinds[0]",
                Invalid,
            ),
            (|g| g.purposes.clear(), "purposes", Missing),
            (|g| g.purposes = vec![0], "purposes[0]", Missing),
            (|g| g.purposes = vec![1, 42], "purposes[1]", Invalid),
            (|g| g.data_categories.clear(), "data_categories", Missing),
            (
                |g| g.data_categories = vec![42],
                "data_categories[0]",
                Invalid,
            ),
            (|g| g.valid_from_ms = -1, "valid_from_ms", Invalid),
            (|g| g.valid_until_ms = -1, "valid_until_ms", Invalid),
            (
                |g| {
                    g.valid_from_ms = 10;
                    g.valid_until_ms = 10;
                },
                "valid_until_ms",
                Invalid,
            ),
            (|g| g.form_reference.clear(), "form_reference", Missing),
        ];
        for (mutate, field, issue) in cases {
            let mut g = good();
            mutate(&mut g);
            match consent_grant("cc-1", g) {
                Err(Error::InvalidField {
                    field: f, issue: i, ..
                }) => assert_eq!((f.as_str(), i), (field, issue)),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn revocations() {
        let now = 1_000_000;
        let out = consent_revocation("cc-1", "c-1", None, now).unwrap();
        assert_eq!(out.subject(), "yeongye.in.cc-1.consent");
        assert_eq!(out.consent_id(), "c-1");
        let r = v1::ConsentRevocation::decode(out.envelope().payload.as_ref()).unwrap();
        assert_eq!((r.revoked_at_ms, r.recorded_by.as_str()), (0, "cc-1"));
        let out = consent_revocation("cc-1", "c-1", Some(now - 5), now).unwrap();
        let r = v1::ConsentRevocation::decode(out.envelope().payload.as_ref()).unwrap();
        assert_eq!(r.revoked_at_ms, now - 5);
        for (id, at) in [
            ("", None),
            ("c 1", None),
            ("c-1", Some(-1)),
            ("c-1", Some(now + 120_000)),
        ] {
            assert!(
                consent_revocation("cc-1", id, at, now)
                    .unwrap_err()
                    .is_input_error()
            );
        }
    }

    #[test]
    fn purge_confirmations() {
        let a = purge_confirmation("cc-1", "r-1", "c-1", Some("w-1")).unwrap();
        let b = purge_confirmation("cc-1", "r-1", "c-1", Some("w-1")).unwrap();
        assert_eq!(a.message_id(), b.message_id());
        assert_eq!(a.message_id(), ids::purge_message_id("w-1"));
        assert_eq!(a.subject(), "yeongye.in.cc-1.purge");
        assert_eq!(
            a.envelope().payload_type,
            v1::PayloadType::PurgeConfirmation as i32
        );
        let p = v1::PurgeConfirmation::decode(a.envelope().payload.as_ref()).unwrap();
        assert_eq!(
            (p.referral_id.as_str(), p.consent_id.as_str()),
            ("r-1", "c-1")
        );
        let fresh = purge_confirmation("cc-1", "r-1", "c-1", None).unwrap();
        assert_ne!(fresh.message_id(), a.message_id());
        assert!(purge_confirmation("cc-1", "", "c-1", None).is_err());
        assert!(purge_confirmation("cc-1", "r-1", "c 1", None).is_err());
        assert!(purge_confirmation("cc-1", "r-1", "c-1", Some("")).is_err());
    }
}
