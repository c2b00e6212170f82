//! Request bodies: the size limit (413), the media type (415), and JSON parsed in the canonical
//! proto3 mapping (pbjson's serde impls, unknown fields refused) into a message — or a
//! [`Problem`] that names the offending field.
//!
//! Parse errors are rewritten so that a detail never echoes a value the client sent (it may be
//! personal data in the wrong place): only field names, types and expected values appear.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::problem::{Problem, ProblemType};

/// Reads the body, refusing more than `limit` bytes (413) and, when there is a body (or
/// `required`), anything but `application/json` (415). An absent optional body is empty.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    required: bool,
) -> Result<Bytes, Problem> {
    let too_large = || {
        Problem::new(
            ProblemType::PayloadTooLarge,
            format!("the body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(too_large());
    }
    let has_type = headers.contains_key(header::CONTENT_TYPE);
    if (required || has_type || declared.is_some_and(|n| n > 0)) && !is_json(headers) {
        return Err(Problem::new(
            ProblemType::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        ));
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())?;
    if !bytes.is_empty() && !is_json(headers) {
        return Err(Problem::new(
            ProblemType::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        ));
    }
    if required && bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::new(
            ProblemType::MalformedJson,
            "the body is empty: send a JSON object",
        ));
    }
    Ok(bytes)
}

/// `application/json` or `application/<x>+json`, parameters allowed.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses `bytes` as one JSON value of type `T` (nothing but whitespace after it).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Problem::new(
            ProblemType::MalformedJson,
            format!("the body is not UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        problem_for(&path, e.inner())
    })?;
    de.end().map_err(|e| problem_for(".", &e))?;
    Ok(value)
}

/// The problem for a serde_json error at `path` (`.` for the document itself).
fn problem_for(path: &str, err: &serde_json::Error) -> Problem {
    use serde_json::error::Category;
    let position = format!("line {} column {}", err.line(), err.column());
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            let msg = strip_position(&err.to_string());
            return Problem::new(
                ProblemType::MalformedJson,
                format!("the body is not valid JSON: {msg} at {position}"),
            );
        }
        Category::Data => {}
    }
    let msg = strip_position(&err.to_string());
    let field = field_name(path);
    let at = |f: &Option<String>| f.clone().unwrap_or_else(|| "the body".to_owned());
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or("");
        let full = match &field {
            Some(parent) if !parent.ends_with(name) => format!("{parent}.{name}"),
            Some(parent) => parent.clone(),
            None => name.to_owned(),
        };
        let expected = rest
            .split_once(", expected ")
            .map(|(_, e)| format!("; expected {e}"))
            .unwrap_or_default();
        return Problem::new(
            ProblemType::UnknownField,
            format!("{full} is not a field of this message{expected}"),
        )
        .field(full);
    }
    if msg.starts_with("invalid type:") {
        let expected = msg
            .split_once(", expected ")
            .map_or("another type", |(_, e)| e);
        let mut p = Problem::new(
            ProblemType::WrongType,
            match &field {
                Some(f) => format!("{f} has the wrong type: expected {expected}"),
                None => format!("the body has the wrong type: expected {expected} (a JSON object)"),
            },
        );
        if let Some(f) = field {
            p = p.field(f);
        }
        return p;
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or("");
        let full = match &field {
            Some(parent) => format!("{parent}.{name}"),
            None => name.to_owned(),
        };
        return Problem::new(ProblemType::MissingField, format!("{full} is required")).field(full);
    }
    if let Some(rest) = msg.strip_prefix("duplicate field `") {
        let name = rest.split('`').next().unwrap_or("");
        let full = match &field {
            Some(parent) if !parent.ends_with(name) => format!("{parent}.{name}"),
            Some(parent) => parent.clone(),
            None => name.to_owned(),
        };
        return Problem::new(
            ProblemType::InvalidField,
            format!(
                "{full} is given twice (or together with the other member of its oneof, e.g. consentId and statutoryBasis)"
            ),
        )
        .field(full);
    }
    // Invalid values: unknown enum names, numbers out of range, malformed int64 strings. The
    // value itself is not echoed.
    let expected = msg
        .split_once("expected ")
        .map(|(_, e)| format!(": expected {e}"))
        .unwrap_or_default();
    let kind = if msg.starts_with("unknown variant") {
        "is not a known value"
    } else {
        "has an invalid value"
    };
    let mut p = Problem::new(
        ProblemType::InvalidField,
        format!("{} {kind}{expected}", at(&field)),
    );
    if let Some(f) = field {
        p = p.field(f);
    }
    p
}

/// The path as the problem's `field`: `None` for the document itself.
fn field_name(path: &str) -> Option<String> {
    let trimmed = path.trim_end_matches(".?").trim_end_matches('?');
    (!trimmed.is_empty() && trimmed != ".").then(|| trimmed.to_owned())
}

/// serde_json appends " at line L column C" to its messages.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use yeongye_proto::v1;

    use super::*;

    fn problem(json: &str) -> Problem {
        parse_json::<v1::Referral>(json.as_bytes()).unwrap_err()
    }

    fn check(json: &str, kind: ProblemType, field: Option<&str>) -> Problem {
        let p = problem(json);
        assert_eq!(p.kind(), Some(kind), "{json}: {p:?}");
        assert_eq!(p.field.as_deref(), field, "{json}: {p:?}");
        p
    }

    #[test]
    fn good() {
        let r: v1::Referral =
            parse_json(br#"{"toAgency": "x", "client": {"pseudonymId": "p"}} "#).unwrap();
        assert_eq!(r.to_agency, "x");
    }

    #[test]
    fn malformed() {
        let p = check(r#"{"toAgency": "x",}"#, ProblemType::MalformedJson, None);
        assert!(p.detail.contains("line 1 column"), "{p:?}");
        check(r#"{"toAgency": "x""#, ProblemType::MalformedJson, None);
        check(
            r#"{"toAgency": "x"} trailing"#,
            ProblemType::MalformedJson,
            None,
        );
        check(r#"{"toAgency": "x"}{}"#, ProblemType::MalformedJson, None);
        let p = parse_json::<v1::Referral>(b"{\"reason\": \"\xff\"}").unwrap_err();
        assert_eq!(p.kind(), Some(ProblemType::MalformedJson));
        // Hostile nesting is refused early (wrong type, or serde_json's recursion limit),
        // never a stack overflow.
        for deep in [
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!(
                r#"{{"dataCategories": {}{}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            format!(
                r#"{{"client": {}"#,
                r#"{"pseudonymId": {"x": "#.repeat(10_000)
            ),
        ] {
            let p = problem(&deep);
            assert!((400..500).contains(&p.status), "{:?}", p.kind());
        }
    }

    #[test]
    fn unknown_fields() {
        let p = check(
            r#"{"toAgency": "x", "clientName": "홍길동"}"#,
            ProblemType::UnknownField,
            Some("clientName"),
        );
        assert!(!p.detail.contains("홍길동"), "{p:?}");
        check(
            r#"{"client": {"pseudonymId": "p", "ssn": "1"}}"#,
            ProblemType::UnknownField,
            Some("client.ssn"),
        );
        check(
            r#"{"statutoryBasis": {"statute": "STATUTE_CHILD_WELFARE_ACT", "why": "x"}}"#,
            ProblemType::UnknownField,
            Some("statutoryBasis.why"),
        );
    }

    #[test]
    fn wrong_types() {
        let p = check(
            r#"{"toAgency": 5}"#,
            ProblemType::WrongType,
            Some("toAgency"),
        );
        assert!(p.detail.contains("expected"), "{p:?}");
        let p = check(
            r#"{"client": {"name": ["홍길동"]}}"#,
            ProblemType::WrongType,
            Some("client.name"),
        );
        assert!(!p.detail.contains("홍길동"), "{p:?}");
        check(
            r#"{"dataCategories": "DATA_CATEGORY_IDENTITY"}"#,
            ProblemType::WrongType,
            Some("dataCategories"),
        );
        check("[]", ProblemType::WrongType, None);
        check("null", ProblemType::WrongType, None);
        check("\"홍길동\"", ProblemType::WrongType, None);
        let p = check(
            r#"{"reason": {"x": 1}}"#,
            ProblemType::WrongType,
            Some("reason"),
        );
        assert_eq!(p.status, 422);
    }

    #[test]
    fn invalid_values() {
        let p = check(
            r#"{"urgency": "URGENCY_VERY"}"#,
            ProblemType::InvalidField,
            Some("urgency"),
        );
        assert!(p.detail.contains("urgency"), "{p:?}");
        check(
            r#"{"dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_SECRETS"]}"#,
            ProblemType::InvalidField,
            Some("dataCategories[1]"),
        );
        let p = check(
            r#"{"receiveByMs": "010-1234-5678"}"#,
            ProblemType::InvalidField,
            Some("receiveByMs"),
        );
        assert!(!p.detail.contains("5678"), "{p:?}");
        check(
            r#"{"consentId": "c", "statutoryBasis": {}}"#,
            ProblemType::InvalidField,
            Some("statutoryBasis"),
        );
        check(
            r#"{"toAgency": "a", "to_agency": "b"}"#,
            ProblemType::InvalidField,
            Some("toAgency"),
        );
    }

    fn headers(content_type: Option<&str>, length: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = content_type {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(t).unwrap());
        }
        if let Some(n) = length {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        h
    }

    #[tokio::test]
    async fn limits_and_media_types() {
        let json = Some("application/json; charset=utf-8");
        let ok = read_body(&headers(json, None), Body::from("{}"), 10, true)
            .await
            .unwrap();
        assert_eq!(&ok[..], b"{}");
        let p = read_body(&headers(json, Some(11)), Body::from("{}"), 10, true)
            .await
            .unwrap_err();
        assert_eq!(p.kind(), Some(ProblemType::PayloadTooLarge));
        // No Content-Length (chunked): still limited.
        let p = read_body(&headers(json, None), Body::from("x".repeat(11)), 10, true)
            .await
            .unwrap_err();
        assert_eq!(p.kind(), Some(ProblemType::PayloadTooLarge));
        for bad in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let p = read_body(&headers(bad, None), Body::from("{}"), 10, true)
                .await
                .unwrap_err();
            assert_eq!(p.kind(), Some(ProblemType::UnsupportedMediaType), "{bad:?}");
        }
        let ok = read_body(
            &headers(Some("application/merge-patch+json"), None),
            Body::from("{}"),
            10,
            true,
        )
        .await
        .unwrap();
        assert_eq!(ok.len(), 2);
        let p = read_body(&headers(json, None), Body::from(" "), 10, true)
            .await
            .unwrap_err();
        assert_eq!(p.kind(), Some(ProblemType::MalformedJson));
        // An optional body may be absent, without a media type.
        let ok = read_body(&headers(None, None), Body::empty(), 10, false)
            .await
            .unwrap();
        assert!(ok.is_empty());
        let p = read_body(&headers(None, None), Body::from("{}"), 10, false)
            .await
            .unwrap_err();
        assert_eq!(p.kind(), Some(ProblemType::UnsupportedMediaType));
    }
}
