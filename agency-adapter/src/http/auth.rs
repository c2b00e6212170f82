//! Bearer-token authentication for the API (`Authorization: Bearer <token>`, the token from
//! `http.token_file`). Compared as SHA-256 digests, so the comparison's time does not depend on
//! how much of the token a caller guessed.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::warn;

use super::problem::{Problem, ProblemType};
use super::signature::sha256;

/// The expected token, as its digest.
#[derive(Clone)]
pub(crate) struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub(crate) fn new(token: &str) -> TokenDigest {
        TokenDigest(sha256(token.as_bytes()))
    }

    /// Whether an `Authorization` header value carries the token.
    pub(crate) fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(given) = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
        else {
            return false;
        };
        let given = sha256(given.trim_ascii());
        // Digests compared in full (no early exit on the first differing byte).
        given
            .iter()
            .zip(self.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// The middleware: 401 problem unless the request carries the token.
pub(crate) async fn require_token(
    State(expected): State<TokenDigest>,
    request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if expected.accepts(authorization) {
        return next.run(request).await;
    }
    warn!(
        path = %request.uri().path(),
        has_header = authorization.is_some(),
        "request without a valid bearer token refused"
    );
    Problem::new(
        ProblemType::Unauthorized,
        "send Authorization: Bearer <token> (the token in the adapter's http.token_file)",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = TokenDigest::new("0123456789abcdef");
        assert!(t.accepts(Some(b"Bearer 0123456789abcdef")));
        assert!(t.accepts(Some(b"bearer 0123456789abcdef ")));
        assert!(!t.accepts(Some(b"Bearer 0123456789abcdeg")));
        assert!(!t.accepts(Some(b"Basic 0123456789abcdef")));
        assert!(!t.accepts(Some(b"0123456789abcdef")));
        assert!(!t.accepts(Some(b"Bearer ")));
        assert!(!t.accepts(None));
    }
}
