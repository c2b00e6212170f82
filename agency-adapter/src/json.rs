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

#[cfg(test)]
mod roundtrip;

#[cfg(test)]
mod tests {
    use super::*;

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
