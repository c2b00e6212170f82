//! Operator authentication: `Authorization: Bearer <token>`, checked against the operators file
//! (`operators_file`, read at every request so that `operator add|remove` take effect at once).
//! A request that passes carries the operator's name ([`Operator`]) to its handler, which
//! records it as `who`. A missing or wrong token is a 401 problem document; the token itself is
//! never logged.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::problem::refusal;
use crate::operators::Operators;

/// The authenticated operator's name, put in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Operator(pub(crate) String);

/// Where the operators are.
#[derive(Debug, Clone)]
pub(crate) struct OperatorsFile(pub(crate) Option<PathBuf>);

/// The token of an `Authorization` header value: `Bearer <token>` (scheme in any case).
pub(crate) fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The middleware: 401 unless the request carries a token of an operator in the file.
pub(crate) async fn require_operator(
    State(file): State<Arc<OperatorsFile>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let Some(file) = file.0.as_deref() else {
        tracing::warn!(
            path,
            "operator request refused: no operators_file is configured"
        );
        return refusal(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no operators are configured: create one with `referral-broker operator add` and \
             set operators_file in the broker's config",
        );
    };
    let operators = match Operators::load(file) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(cause = %e, "the operators file cannot be read");
            return refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the operators file cannot be read; the broker's log has the cause",
            );
        }
    };
    let header = request.headers().get(header::AUTHORIZATION);
    let name = header
        .and_then(|v| bearer(v.as_bytes()))
        .and_then(|token| operators.verify(token))
        .map(str::to_owned);
    match name {
        Some(name) => {
            request.extensions_mut().insert(Operator(name));
            next.run(request).await
        }
        None => {
            tracing::warn!(
                path,
                has_header = header.is_some(),
                "operator request without a valid bearer token refused"
            );
            refusal(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <token> with an operator's token \
                 (referral-broker --token-file <file>; see `referral-broker operator add`)",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer yop_abc"), Some("yop_abc"));
        assert_eq!(bearer(b"bearer  yop_abc "), Some("yop_abc"));
        assert_eq!(bearer(b"Basic yop_abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"yop_abc"), None);
        assert_eq!(bearer(b"Bearer \xff"), None);
    }
}
