//! Who may talk to the operators' endpoint at all, checked before any route: the `Host` must be
//! one of `http_allowed_hosts` (with or without the bound port) — a web page that rebinds its
//! own DNS name to 127.0.0.1 still sends its own name, and is refused 421 — and a request that
//! changes state must not carry an `Origin` other than those hosts (403): a browser page on
//! another site cannot post to it. Requests without `Origin` (the CLI, curl, scrapers) pass
//! that second check; the bearer token ([`super::auth`]) is what authenticates them.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::problem::refusal;
use axum::http::StatusCode;

/// `name[:port]`, `[v6]` or `[v6]:port` → the name (lowercase kept as given) and the port.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let (name, rest) = s.split_at(end + 1);
        return match rest {
            "" => Some((name, None)),
            _ => Some((name, Some(rest.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match s.rsplit_once(':') {
        Some((name, port)) => Some((name, Some(port.parse().ok()?))),
        None => Some((s, None)),
    }
}

fn is_name(name: &str) -> bool {
    if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// Whether `entry` may stand in `http_allowed_hosts`: a host name, IPv4 address or `[IPv6]`
/// address, optionally with `:port`.
pub fn is_valid_host_entry(entry: &str) -> bool {
    split_host_port(entry).is_some_and(|(name, _)| is_name(name))
}

/// The allowed hosts and the port the endpoint is bound to.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    entries: Vec<(String, Option<u16>)>,
    port: u16,
}

impl AllowedHosts {
    /// Entries that are not valid are left out (config validation refuses them before).
    pub fn new(entries: &[String], port: u16) -> AllowedHosts {
        AllowedHosts {
            entries: entries
                .iter()
                .filter_map(|e| {
                    let (name, port) = split_host_port(e.trim())?;
                    is_name(name).then(|| (name.to_ascii_lowercase(), port))
                })
                .collect(),
            port,
        }
    }

    /// Whether a `Host` header value (or an origin's authority) names this endpoint.
    pub fn allows(&self, host: &str) -> bool {
        let Some((name, port)) = split_host_port(host.trim()) else {
            return false;
        };
        self.entries.iter().any(|(allowed, allowed_port)| {
            allowed.eq_ignore_ascii_case(name)
                && match (allowed_port, port) {
                    (Some(a), Some(p)) => *a == p,
                    (Some(_), None) => false,
                    (None, None) => true,
                    (None, Some(p)) => p == self.port,
                }
        })
    }

    /// Whether an `Origin` header value is this endpoint (`http(s)://<allowed host>`).
    pub fn allows_origin(&self, origin: &str) -> bool {
        let Some(authority) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        !authority.contains('/') && self.allows(authority)
    }
}

/// The middleware: 421 for a foreign `Host`, 403 for a foreign `Origin` on a state change.
pub(crate) async fn check(
    State(hosts): State<Arc<AllowedHosts>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
    if !host.as_deref().is_some_and(|h| hosts.allows(h)) {
        tracing::warn!(
            path = %request.uri().path(),
            "request for a host this endpoint does not answer to refused"
        );
        return refusal(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected-request",
            "this endpoint does not answer to that Host (http_allowed_hosts)",
        );
    }
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !safe && let Some(origin) = request.headers().get(header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|o| hosts.allows_origin(o));
        if !allowed {
            tracing::warn!(
                path = %request.uri().path(),
                "cross-origin state change refused"
            );
            return refusal(
                StatusCode::FORBIDDEN,
                "forbidden-origin",
                "a state-changing request from another origin is refused",
            );
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> AllowedHosts {
        let entries: Vec<String> = crate::config::DEFAULT_ALLOWED_HOSTS
            .iter()
            .map(|s| (*s).to_owned())
            .chain(["ops.example:443".to_owned()])
            .collect();
        AllowedHosts::new(&entries, 8470)
    }

    #[test]
    fn hosts_with_or_without_the_bound_port() {
        let h = hosts();
        for ok in [
            "localhost",
            "LOCALHOST:8470",
            "127.0.0.1",
            "127.0.0.1:8470",
            "[::1]",
            "[::1]:8470",
            "ops.example:443",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for refused in [
            "",
            "evil.example",
            "evil.example:8470",
            "localhost:8471",
            "127.0.0.2:8470",
            "localhost.evil.example",
            "[::1]:x",
            "::1",
            "ops.example",
            "ops.example:8470",
            "127.0.0.1:8470:1",
        ] {
            assert!(!h.allows(refused), "{refused}");
        }
    }

    #[test]
    fn origins() {
        let h = hosts();
        assert!(h.allows_origin("http://127.0.0.1:8470"));
        assert!(h.allows_origin("http://localhost"));
        assert!(h.allows_origin("https://ops.example:443"));
        for refused in [
            "null",
            "http://evil.example",
            "http://localhost:9999",
            "file://",
            "127.0.0.1:8470",
            "http://127.0.0.1:8470/x",
        ] {
            assert!(!h.allows_origin(refused), "{refused}");
        }
    }

    #[test]
    fn entries() {
        for ok in [
            "localhost",
            "[::1]",
            "broker.district.go.kr:443",
            "10.0.0.5",
        ] {
            assert!(is_valid_host_entry(ok), "{ok}");
        }
        for bad in ["", "a b", "evil/x", "[]", "host:port", "*"] {
            assert!(!is_valid_host_entry(bad), "{bad}");
        }
    }
}
