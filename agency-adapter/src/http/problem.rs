//! [`Problem`]: every error of the HTTP API, as an RFC 9457 problem document
//! (`application/problem+json`).
//!
//! ```json
//! {"type": "urn:yeongye:problem:unknown-field", "title": "Unknown field", "status": 422,
//!  "detail": "client.ssn is not a field of this message", "field": "client.ssn"}
//! ```
//!
//! `type` is a stable URN per kind of problem ([`ProblemType`]); `field`, when present, is the
//! offending field's path in the request body (lowerCamelCase, `client.pseudonymId`,
//! `dataCategories[1]`) or the path parameter's name; `code` carries the broker's reason code
//! when the broker gave one. Details never hold personal data.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::{error, warn};

use crate::error::{Error, FieldIssue};

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The kinds of problem the API reports. Their URNs and statuses are part of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// 400: the body is not JSON (syntax, truncated, not UTF-8).
    MalformedJson,
    /// 400: a header or path/query parameter is not acceptable.
    InvalidParameter,
    /// 401: no or a wrong bearer token.
    Unauthorized,
    /// 404: no such resource (or the broker does not know it / will not say).
    NotFound,
    /// 405: the resource does not support the method.
    MethodNotAllowed,
    /// 413: the body is larger than the limit.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 422: the body names a field the message does not have.
    UnknownField,
    /// 422: a field has the wrong JSON type (or the body is not an object).
    WrongType,
    /// 422: a required field is absent or empty.
    MissingField,
    /// 422: a field's value is not acceptable.
    InvalidField,
    /// 422: the `Idempotency-Key` was used before with a different request.
    IdempotencyKeyReused,
    /// 503: NATS or the broker did not answer in time; retrying is safe.
    Unavailable,
    /// 503: the outbox is at its bound (the hub has been unreachable a while); nothing was
    /// accepted.
    OutboxFull,
    /// 500: the adapter failed (its store); see its log.
    Internal,
}

impl ProblemType {
    pub fn slug(self) -> &'static str {
        match self {
            ProblemType::MalformedJson => "malformed-json",
            ProblemType::InvalidParameter => "invalid-parameter",
            ProblemType::Unauthorized => "unauthorized",
            ProblemType::NotFound => "not-found",
            ProblemType::MethodNotAllowed => "method-not-allowed",
            ProblemType::PayloadTooLarge => "payload-too-large",
            ProblemType::UnsupportedMediaType => "unsupported-media-type",
            ProblemType::UnknownField => "unknown-field",
            ProblemType::WrongType => "wrong-type",
            ProblemType::MissingField => "missing-field",
            ProblemType::InvalidField => "invalid-field",
            ProblemType::IdempotencyKeyReused => "idempotency-key-reused",
            ProblemType::Unavailable => "unavailable",
            ProblemType::OutboxFull => "outbox-full",
            ProblemType::Internal => "internal",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            ProblemType::MalformedJson => "Malformed JSON",
            ProblemType::InvalidParameter => "Invalid parameter",
            ProblemType::Unauthorized => "Unauthorized",
            ProblemType::NotFound => "Not found",
            ProblemType::MethodNotAllowed => "Method not allowed",
            ProblemType::PayloadTooLarge => "Payload too large",
            ProblemType::UnsupportedMediaType => "Unsupported media type",
            ProblemType::UnknownField => "Unknown field",
            ProblemType::WrongType => "Wrong type",
            ProblemType::MissingField => "Missing field",
            ProblemType::InvalidField => "Invalid field",
            ProblemType::IdempotencyKeyReused => "Idempotency key reused",
            ProblemType::Unavailable => "Service unavailable",
            ProblemType::OutboxFull => "Outbox full",
            ProblemType::Internal => "Internal error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProblemType::MalformedJson | ProblemType::InvalidParameter => StatusCode::BAD_REQUEST,
            ProblemType::Unauthorized => StatusCode::UNAUTHORIZED,
            ProblemType::NotFound => StatusCode::NOT_FOUND,
            ProblemType::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProblemType::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemType::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProblemType::UnknownField
            | ProblemType::WrongType
            | ProblemType::MissingField
            | ProblemType::InvalidField
            | ProblemType::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemType::Unavailable | ProblemType::OutboxFull => StatusCode::SERVICE_UNAVAILABLE,
            ProblemType::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `urn:yeongye:problem:<slug>`.
    pub fn uri(self) -> String {
        format!("urn:yeongye:problem:{}", self.slug())
    }
}

/// One problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip)]
    kind: Option<ProblemType>,
}

impl Problem {
    pub fn new(kind: ProblemType, detail: impl Into<String>) -> Problem {
        Problem {
            type_uri: kind.uri(),
            title: kind.title(),
            status: kind.status().as_u16(),
            detail: detail.into(),
            field: None,
            code: None,
            kind: Some(kind),
        }
    }

    /// Names the offending field.
    pub fn field(mut self, field: impl Into<String>) -> Problem {
        self.field = Some(field.into());
        self
    }

    /// Carries the broker's reason code.
    pub fn code(mut self, code: impl Into<String>) -> Problem {
        self.code = Some(code.into());
        self
    }

    /// The kind of problem.
    pub fn kind(&self) -> Option<ProblemType> {
        self.kind
    }

    /// The problem for an SDK error: input errors are 422 (naming the field), NATS and broker
    /// trouble 503, the rest 500 (logged, without personal data: errors carry none).
    pub fn from_error(err: &Error) -> Problem {
        match err {
            Error::InvalidField {
                field,
                issue,
                detail,
            } => {
                let json_field = json_path(field);
                let kind = match issue {
                    FieldIssue::Missing => ProblemType::MissingField,
                    _ => ProblemType::InvalidField,
                };
                Problem::new(kind, format!("{json_field} {detail}")).field(json_field)
            }
            Error::InvalidInput(detail) => Problem::new(ProblemType::InvalidField, detail.clone()),
            Error::Publish { .. } => {
                warn!(cause = %err, "publish failed; answering 503");
                Problem::new(
                    ProblemType::Unavailable,
                    "NATS did not acknowledge the message in time; nothing is known to be sent. Retry with the same Idempotency-Key.",
                )
            }
            Error::OutboxFull { .. } => {
                warn!(cause = %err, "outbox full; answering 503");
                Problem::new(ProblemType::OutboxFull, err.to_string())
            }
            Error::NoteNeedsBroker { .. } => {
                warn!(cause = %err, "a note cannot be sealed offline; answering 503");
                Problem::new(ProblemType::Unavailable, err.to_string()).field("note")
            }
            Error::Timeout { .. } | Error::Request { .. } | Error::Connect { .. } => {
                warn!(cause = %err, "broker query failed; answering 503");
                Problem::new(
                    ProblemType::Unavailable,
                    "the broker did not answer in time; retry later",
                )
            }
            _ => {
                error!(cause = %err, "request failed; answering 500");
                Problem::new(
                    ProblemType::Internal,
                    "the adapter failed; its log has the cause",
                )
            }
        }
    }

    /// A 404 for a broker reply's `error` (a `Rejection`).
    pub fn from_rejection(r: &yeongye_proto::v1::Rejection) -> Problem {
        let code = yeongye_proto::v1::ReasonCode::try_from(r.code)
            .map(|c| c.as_str_name().to_owned())
            .unwrap_or_else(|_| r.code.to_string());
        let detail = if r.detail.is_empty() {
            format!("the broker answered {code}")
        } else {
            r.detail.clone()
        };
        Problem::new(ProblemType::NotFound, detail).code(code)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<Error> for Problem {
    fn from(err: Error) -> Problem {
        Problem::from_error(&err)
    }
}

/// A protobuf field path (`client.pseudonym_id`, `data_categories[1]`) in its proto3 JSON
/// spelling (`client.pseudonymId`, `dataCategories[1]`).
pub fn json_path(proto_path: &str) -> String {
    let mut out = String::with_capacity(proto_path.len());
    let mut upper = false;
    for c in proto_path.chars() {
        match c {
            '_' => upper = true,
            '.' | '[' => {
                upper = false;
                out.push(c);
            }
            c if upper => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths() {
        assert_eq!(json_path("client.pseudonym_id"), "client.pseudonymId");
        assert_eq!(json_path("data_categories[1]"), "dataCategories[1]");
        assert_eq!(
            json_path("statutory_basis.justification"),
            "statutoryBasis.justification"
        );
        assert_eq!(json_path("to_agency"), "toAgency");
    }

    #[test]
    fn documents() {
        let p = Problem::from_error(&Error::missing("client.pseudonym_id", "is required"));
        assert_eq!(p.kind(), Some(ProblemType::MissingField));
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "urn:yeongye:problem:missing-field",
                "title": "Missing field",
                "status": 422,
                "detail": "client.pseudonymId is required",
                "field": "client.pseudonymId",
            })
        );
        let r = p.into_response();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);

        let r = Problem::new(ProblemType::Unauthorized, "x").into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");

        let p = Problem::from_rejection(&yeongye_proto::v1::Rejection {
            code: yeongye_proto::v1::ReasonCode::UnknownReferral as i32,
            ..Default::default()
        });
        assert_eq!(p.status, 404);
        assert_eq!(p.code.as_deref(), Some("REASON_CODE_UNKNOWN_REFERRAL"));
    }
}
