//! Errors of the operators' endpoint as RFC 9457 problem documents
//! (`application/problem+json`), shaped like the adapter's: `type` is
//! `urn:yeongye:problem:<slug>`, `title` the status's reason, `status`, and a `detail` that
//! never holds a token or personal data.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The media type of problem documents.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    type_uri: String,
    title: &'a str,
    status: u16,
    detail: String,
}

/// A problem document with `status`, `urn:yeongye:problem:<slug>` and `detail`. A 401 also
/// carries `WWW-Authenticate: Bearer`.
pub(crate) fn problem(status: StatusCode, slug: &str, detail: impl Into<String>) -> Response {
    let body = Problem {
        type_uri: format!("urn:yeongye:problem:{slug}"),
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail: detail.into(),
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = (status, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// A refusal sent before the request's body was read: the problem document, and
/// `Connection: close`, since the unread body leaves the connection unusable for another
/// request (a client must not put it back in its pool).
pub(crate) fn refusal(status: StatusCode, slug: &str, detail: impl Into<String>) -> Response {
    let mut response = problem(status, slug, detail);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The slug of a plain status (the API's handlers' errors).
pub(crate) fn slug(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad-request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "internal",
    }
}
