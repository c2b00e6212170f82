//! Messages in canonical proto3 JSON, as the command line takes them (referrals, consent
//! grants), and the pretty rendering of what it prints and hands over.
//!
//! The serde impls are pbjson's, generated in `yeongye-proto`: field names in lowerCamelCase
//! (snake_case accepted too), enums by name (`"URGENCY_CRISIS"`), int64 as strings or numbers,
//! and unknown fields refused. This module adds a size limit and errors that say what is wrong
//! and where. serde_json's recursion limit (128) stops hostile nesting.

use yeongye_proto::v1;

use crate::error::{Error, Result};

/// Largest JSON document accepted: the NATS default `max_payload` (1 MiB); a referral near it
/// could not be published anyway.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

/// Parses one `Referral` from proto3 JSON bytes. Nothing but whitespace may follow it.
pub fn parse_referral_json(bytes: &[u8]) -> Result<v1::Referral> {
    parse_json(bytes, "referral", "Referral")
}

/// Parses one `ConsentGrant` from proto3 JSON bytes. Nothing but whitespace may follow it.
pub fn parse_consent_grant_json(bytes: &[u8]) -> Result<v1::ConsentGrant> {
    parse_json(bytes, "consent grant", "ConsentGrant")
}

/// Parses one message of type `T` (named `type_name` in errors; `what` in prose).
fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    type_name: &str,
) -> Result<T> {
    if bytes.len() > MAX_JSON_BYTES {
        return Err(Error::InvalidInput(format!(
            "{what} JSON is {} bytes; the limit is {MAX_JSON_BYTES}",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Error::InvalidInput(format!(
            "{what} JSON is not UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    serde_json::from_str::<T>(text).map_err(|e| {
        let problem = match e.classify() {
            serde_json::error::Category::Syntax => "malformed JSON".to_owned(),
            serde_json::error::Category::Eof => "JSON ends too early".to_owned(),
            serde_json::error::Category::Data => format!("not a valid {type_name}"),
            serde_json::error::Category::Io => "unreadable".to_owned(),
        };
        Error::InvalidInput(format!("{what} JSON: {problem}: {e}"))
    })
}

/// A message as pretty proto3 JSON (for files handed to the agency system and for output).
pub fn to_pretty_json<T: serde::Serialize>(message: &T) -> Result<Vec<u8>> {
    let mut out = serde_json::to_vec_pretty(message)
        .map_err(|e| Error::Protocol(format!("cannot render message as JSON: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

/// A message the broker sends, as proto3 JSON, with enum values this build does not know
/// written as their numbers (as proto3 JSON writes them) instead of failing. pbjson refuses
/// to write an unknown enum value; a newer broker may send a state or a reason code this
/// adapter does not know yet, and the item must still reach the agency system — not come
/// back for ever.
pub fn item_json<T: KnownEnums>(message: &T) -> Result<serde_json::Value> {
    let mut copy = message.clone();
    let mut unknown = Vec::new();
    copy.clear_unknown_enums(&mut unknown);
    let mut value = serde_json::to_value(&copy)
        .map_err(|e| Error::Protocol(format!("cannot render message as JSON: {e}")))?;
    for (path, number) in unknown {
        // `path` is a field, or `parent/field`: the parent is there (it held the value).
        let (parent, field) = path.rsplit_once('/').unwrap_or(("", path));
        let target = if parent.is_empty() {
            Some(&mut value)
        } else {
            value.get_mut(parent)
        };
        if let Some(serde_json::Value::Object(map)) = target {
            map.insert(field.to_owned(), number);
        }
    }
    Ok(value)
}

/// Messages whose enum fields [`item_json`] checks.
pub trait KnownEnums: serde::Serialize + Clone {
    /// Sets every enum field whose value this build does not know to 0 (left out of the
    /// JSON), noting its JSON path and the value to write there instead.
    fn clear_unknown_enums(&mut self, unknown: &mut Vec<(&'static str, serde_json::Value)>);
}

/// Clears `value` if `E` does not know it, noting it under `path`.
fn check<E: TryFrom<i32>>(
    value: &mut i32,
    path: &'static str,
    unknown: &mut Vec<(&'static str, serde_json::Value)>,
) {
    if E::try_from(*value).is_err() {
        unknown.push((path, serde_json::Value::from(*value)));
        *value = 0;
    }
}

impl KnownEnums for v1::Referral {
    fn clear_unknown_enums(&mut self, unknown: &mut Vec<(&'static str, serde_json::Value)>) {
        check::<v1::FieldOfNeed>(&mut self.field, "field", unknown);
        check::<v1::Urgency>(&mut self.urgency, "urgency", unknown);
        check::<v1::Purpose>(&mut self.purpose, "purpose", unknown);
        if let Some(v1::referral::LegalBasis::StatutoryBasis(b)) = &mut self.legal_basis {
            check::<v1::Statute>(&mut b.statute, "statutoryBasis/statute", unknown);
        }
        if self
            .data_categories
            .iter()
            .any(|c| v1::DataCategory::try_from(*c).is_err())
        {
            // The whole list, each value by name where known, else by number.
            let list = self
                .data_categories
                .iter()
                .map(|c| match v1::DataCategory::try_from(*c) {
                    Ok(k) => serde_json::Value::from(k.as_str_name()),
                    Err(_) => serde_json::Value::from(*c),
                })
                .collect();
            unknown.push(("dataCategories", serde_json::Value::Array(list)));
            self.data_categories.clear();
        }
    }
}

impl KnownEnums for v1::Notification {
    fn clear_unknown_enums(&mut self, unknown: &mut Vec<(&'static str, serde_json::Value)>) {
        check::<v1::ReferralState>(&mut self.state, "state", unknown);
        check::<v1::ReferralState>(&mut self.previous, "previous", unknown);
    }
}

impl KnownEnums for v1::Rejection {
    fn clear_unknown_enums(&mut self, unknown: &mut Vec<(&'static str, serde_json::Value)>) {
        check::<v1::ReasonCode>(&mut self.code, "code", unknown);
    }
}

impl KnownEnums for v1::Escalation {
    fn clear_unknown_enums(&mut self, unknown: &mut Vec<(&'static str, serde_json::Value)>) {
        check::<v1::DeadlineKind>(&mut self.kind, "kind", unknown);
        check::<v1::ReferralState>(&mut self.state, "state", unknown);
    }
}

impl KnownEnums for v1::Withdrawal {
    fn clear_unknown_enums(&mut self, _: &mut Vec<(&'static str, serde_json::Value)>) {}
}

#[cfg(test)]
mod roundtrip;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_enum_values_are_written_as_numbers_not_refused() {
        let n = v1::Notification {
            referral_id: "r-1".into(),
            state: 99,
            previous: v1::ReferralState::Received.into(),
            ..Default::default()
        };
        assert!(serde_json::to_value(&n).is_err(), "pbjson refuses it");
        let v = item_json(&n).unwrap();
        assert_eq!(v["state"], 99);
        assert_eq!(v["previous"], "REFERRAL_STATE_RECEIVED");
        assert_eq!(v["referralId"], "r-1");

        let r = v1::Rejection {
            code: 4242,
            ..Default::default()
        };
        assert_eq!(item_json(&r).unwrap()["code"], 4242);

        let e = v1::Escalation {
            kind: 7,
            state: v1::ReferralState::Expired.into(),
            ..Default::default()
        };
        let v = item_json(&e).unwrap();
        assert_eq!(
            (v["kind"].clone(), v["state"].clone()),
            (
                serde_json::json!(7),
                serde_json::json!("REFERRAL_STATE_EXPIRED")
            )
        );

        let referral = v1::Referral {
            referral_id: "r-2".into(),
            urgency: 77,
            legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(
                v1::StatutoryBasis {
                    statute: 55,
                    justification: "j".into(),
                },
            )),
            data_categories: vec![v1::DataCategory::Identity.into(), 66],
            ..Default::default()
        };
        let v = item_json(&referral).unwrap();
        assert_eq!(v["urgency"], 77);
        assert_eq!(v["statutoryBasis"]["statute"], 55);
        assert_eq!(v["statutoryBasis"]["justification"], "j");
        assert_eq!(
            v["dataCategories"],
            serde_json::json!(["DATA_CATEGORY_IDENTITY", 66])
        );
        // Known values come out exactly as pbjson writes them.
        let known = v1::Referral {
            referral_id: "r-3".into(),
            urgency: v1::Urgency::Crisis.into(),
            data_categories: vec![v1::DataCategory::Contact.into()],
            ..Default::default()
        };
        assert_eq!(
            item_json(&known).unwrap(),
            serde_json::to_value(&known).unwrap()
        );
        assert!(
            to_pretty_json(&item_json(&referral).unwrap())
                .unwrap()
                .ends_with(b"\n")
        );
    }

    const GOOD: &str = r#"{
        "toAgency": "hope-support",
        "client": {"pseudonymId": "p-7f3a", "name": "홍길동", "birthDate": "1950-01-02"},
        "field": "FIELD_OF_NEED_LIVELIHOOD",
        "urgency": "URGENCY_CRISIS",
        "reason": "단전 3개월",
        "consentId": "consent-1",
        "dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT"],
        "receiveByMs": "1767225600000"
    }"#;

    fn err(json: &str) -> String {
        let e = parse_referral_json(json.as_bytes()).unwrap_err();
        assert!(e.is_input_error());
        e.to_string()
    }

    #[test]
    fn good() {
        let r = parse_referral_json(GOOD.as_bytes()).unwrap();
        assert_eq!(r.to_agency, "hope-support");
        assert_eq!(r.urgency, v1::Urgency::Crisis as i32);
        assert_eq!(r.client.as_ref().unwrap().pseudonym_id, "p-7f3a");
        assert_eq!(
            r.legal_basis,
            Some(v1::referral::LegalBasis::ConsentId("consent-1".into()))
        );
        assert_eq!(r.data_categories.len(), 2);
        assert_eq!(r.receive_by_ms, 1_767_225_600_000);
        // Round trip through the same mapping.
        let back = parse_referral_json(&to_pretty_json(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn snake_case_is_accepted() {
        let r = parse_referral_json(br#"{"to_agency":"x","urgency":1}"#).unwrap();
        assert_eq!(r.to_agency, "x");
        assert_eq!(r.urgency, v1::Urgency::Routine as i32);
    }

    #[test]
    fn malformed() {
        let e = err(r#"{"toAgency": "x",}"#);
        assert!(e.contains("malformed JSON") && e.contains("line 1"), "{e}");
        let e = err(r#"{"toAgency": "x""#);
        assert!(e.contains("ends too early"), "{e}");
        let e = err(r#"{"toAgency": "x"} trailing"#);
        assert!(e.contains("trailing"), "{e}");
        let e = err("");
        assert!(e.contains("ends too early"), "{e}");
        let e = parse_referral_json(b"{\"toAgency\": \"\xff\"}").unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }

    #[test]
    fn unknown_field() {
        let e = err(r#"{"toAgency": "x", "clientName": "y"}"#);
        assert!(e.contains("unknown field `clientName`"), "{e}");
        let e = err(r#"{"client": {"pseudonymId": "p", "ssn": "1"}}"#);
        assert!(e.contains("unknown field `ssn`"), "{e}");
    }

    #[test]
    fn wrong_type() {
        let e = err(r#"{"toAgency": 5}"#);
        assert!(
            e.contains("not a valid Referral") && e.contains("invalid type"),
            "{e}"
        );
        let e = err(r#"{"urgency": "URGENCY_VERY"}"#);
        assert!(e.contains("URGENCY_VERY"), "{e}");
        let e = err(r#"{"dataCategories": "DATA_CATEGORY_IDENTITY"}"#);
        assert!(e.contains("invalid type"), "{e}");
        let e = err(r#"{"receiveByMs": "soon"}"#);
        assert!(e.contains("not a valid Referral"), "{e}");
        let e = err("null");
        assert!(e.contains("invalid type"), "{e}");
        let e = err("[]");
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn hostile_huge_string() {
        let huge = format!(r#"{{"reason": "{}"}}"#, "가".repeat(MAX_JSON_BYTES));
        let e = err(&huge);
        assert!(e.contains("limit"), "{e}");
        // Just under the limit is parsed (and left to the publish size check).
        let big = format!(r#"{{"reason": "{}"}}"#, "a".repeat(MAX_JSON_BYTES - 20));
        assert!(parse_referral_json(big.as_bytes()).is_ok());
    }

    const GRANT: &str = r#"{
        "clientPseudonymId": "p-7f3a",
        "recipientAgencies": ["hope-support"],
        "recipientKinds": ["mental_health_centre"],
        "purposes": ["PURPOSE_CASE_MANAGEMENT"],
        "dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_HOUSEHOLD"],
        "validFromMs": "1767225600000",
        "validUntilMs": 1798761600000,
        "formReference": "동의서-2025-0042"
    }"#;

    fn grant_err(json: &str) -> String {
        let e = parse_consent_grant_json(json.as_bytes()).unwrap_err();
        assert!(e.is_input_error());
        e.to_string()
    }

    #[test]
    fn consent_grant_good() {
        let g = parse_consent_grant_json(GRANT.as_bytes()).unwrap();
        assert_eq!(g.client_pseudonym_id, "p-7f3a");
        assert_eq!(g.purposes, vec![v1::Purpose::CaseManagement as i32]);
        assert_eq!(g.data_categories.len(), 2);
        assert_eq!(g.valid_from_ms, 1_767_225_600_000);
        assert_eq!(g.valid_until_ms, 1_798_761_600_000);
        let back = parse_consent_grant_json(&to_pretty_json(&g).unwrap()).unwrap();
        assert_eq!(back, g);
        let g =
            parse_consent_grant_json(br#"{"client_pseudonym_id": "p", "purposes": [1]}"#).unwrap();
        assert_eq!(g.purposes, vec![1]);
    }

    #[test]
    fn consent_grant_hostile() {
        let e = grant_err(r#"{"clientPseudonymId": "p",}"#);
        assert!(e.contains("consent grant JSON: malformed JSON"), "{e}");
        let e = grant_err(r#"{"clientPseudonymId": "p""#);
        assert!(e.contains("ends too early"), "{e}");
        let e = grant_err(r#"{"clientName": "홍길동"}"#);
        assert!(e.contains("unknown field `clientName`"), "{e}");
        let e = grant_err(r#"{"purposes": "PURPOSE_CASE_MANAGEMENT"}"#);
        assert!(
            e.contains("not a valid ConsentGrant") && e.contains("invalid type"),
            "{e}"
        );
        let e = grant_err(r#"{"purposes": ["PURPOSE_WHATEVER"]}"#);
        assert!(e.contains("PURPOSE_WHATEVER"), "{e}");
        let e = grant_err(r#"{"validUntilMs": "tomorrow"}"#);
        assert!(e.contains("not a valid ConsentGrant"), "{e}");
        let e = grant_err(r#"{"validUntilMs": 1e400}"#);
        assert!(e.contains("ConsentGrant") || e.contains("number"), "{e}");
        let e = grant_err(r#"{"recipientAgencies": [1, 2]}"#);
        assert!(e.contains("invalid type"), "{e}");
        let e = grant_err(r#"{"consentId": "a", "consentId": "b"}"#);
        assert!(e.contains("duplicate field"), "{e}");
        let e = grant_err("[]");
        assert!(e.contains("invalid type"), "{e}");
        let e = parse_consent_grant_json(b"{\"formReference\": \"\xc3\"}").unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
        let huge = format!(r#"{{"formReference": "{}"}}"#, "x".repeat(MAX_JSON_BYTES));
        assert!(grant_err(&huge).contains("limit"));
        let deep = format!(
            r#"{{"purposes": {}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        grant_err(&deep);
    }

    #[test]
    fn hostile_deep_nesting() {
        let depth = 100_000;
        let deep = format!(
            r#"{{"dataCategories": {}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let e = err(&deep);
        assert!(
            e.contains("not a valid Referral") || e.contains("recursion"),
            "{e}"
        );
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let e = err(&deep);
        assert!(e.contains("invalid type") || e.contains("recursion"), "{e}");
        let deep = format!(
            r#"{{"client": {}"#,
            r#"{"pseudonymId": {"x": "#.repeat(10_000)
        );
        err(&deep);
    }
}
