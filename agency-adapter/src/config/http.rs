//! [`HttpConfig`]: the `[http]` section of the adapter's configuration, for `agency-adapter
//! serve` (the local HTTP/JSON API and webhook delivery).
//!
//! ```toml
//! [http]
//! bind = "127.0.0.1:8480"                       # loopback by default
//! token_file = "/etc/yeongye/cc-haengbok1.token" # bearer token, one line, 16+ characters
//! # body_limit_bytes = 1048576
//! delivery = "webhook"                          # or "pull" (GET /v1/inbox)
//! webhook_url = "http://127.0.0.1:9000/yeongye"
//! webhook_secret_file = "/etc/yeongye/cc-haengbok1.webhook-secret"
//! # webhook_timeout_secs = 10
//! # webhook_max_backoff_secs = 300
//! # idempotency_retention_hours = 168
//! # [http.limits]                               # the server's timeouts and connection cap
//! # header_timeout_secs = 10
//! # body_timeout_secs = 30
//! # idle_timeout_secs = 60
//! # max_connections = 256
//! ```
//!
//! Secrets live in files, never in the configuration itself, so the configuration can be
//! logged. The files are read when the server starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::Uri;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Where the API listens by default: loopback only.
pub const DEFAULT_BIND: &str = "127.0.0.1:8480";
/// The largest request body accepted by default (the NATS default `max_payload`).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// Shortest bearer token or webhook secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// How incoming items reach the agency system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// The agency system fetches items with `GET /v1/inbox` and acknowledges each.
    #[default]
    Pull,
    /// The adapter POSTs each item to `webhook_url`, retrying until a 2xx.
    Webhook,
}

/// The `[http]` section. Paths and addresses only: [`Debug`] shows everything.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on (default `127.0.0.1:8480`).
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// File holding the bearer token clients must send (`Authorization: Bearer <token>`).
    pub token_file: PathBuf,
    /// Largest request body, in bytes (larger: 413).
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    /// Webhook or pull (default pull).
    #[serde(default)]
    pub delivery: DeliveryMode,
    /// Where webhooks go: an `http://` URL (required for webhook delivery).
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// File holding the HMAC-SHA256 key that signs webhook bodies (required for webhooks).
    #[serde(default)]
    pub webhook_secret_file: Option<PathBuf>,
    /// How long one webhook call may take.
    #[serde(default = "default_webhook_timeout")]
    pub webhook_timeout_secs: u64,
    /// The longest wait between webhook retries (they back off from 1 s, doubling).
    #[serde(default = "default_max_backoff")]
    pub webhook_max_backoff_secs: u64,
    /// How long an `Idempotency-Key` is remembered.
    #[serde(default = "default_idempotency_hours")]
    pub idempotency_retention_hours: u64,
    /// The server's header, body and idle timeouts and its connection cap (`[http.limits]`).
    #[serde(default)]
    pub limits: yeongye_http::Limits,
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8480))
}
fn default_body_limit() -> usize {
    DEFAULT_BODY_LIMIT
}
fn default_webhook_timeout() -> u64 {
    10
}
fn default_max_backoff() -> u64 {
    300
}
fn default_idempotency_hours() -> u64 {
    168
}

impl HttpConfig {
    /// A pull-mode section with the defaults and the given token file.
    pub fn new(token_file: impl Into<PathBuf>) -> HttpConfig {
        HttpConfig {
            bind: default_bind(),
            token_file: token_file.into(),
            body_limit_bytes: DEFAULT_BODY_LIMIT,
            delivery: DeliveryMode::Pull,
            webhook_url: None,
            webhook_secret_file: None,
            webhook_timeout_secs: default_webhook_timeout(),
            webhook_max_backoff_secs: default_max_backoff(),
            idempotency_retention_hours: default_idempotency_hours(),
            limits: yeongye_http::Limits::default(),
        }
    }

    /// Checks every field (not the files: [`load_token`](Self::load_token) and
    /// [`load_webhook_secret`](Self::load_webhook_secret) read them).
    pub fn validate(&self) -> Result<()> {
        if self.token_file.as_os_str().is_empty() {
            return Err(cfg("http.token_file is empty"));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.body_limit_bytes) {
            return Err(cfg(
                "http.body_limit_bytes must be between 1024 and 16777216",
            ));
        }
        if self.webhook_timeout_secs == 0 || self.webhook_max_backoff_secs == 0 {
            return Err(cfg(
                "http.webhook_timeout_secs and http.webhook_max_backoff_secs must be at least 1",
            ));
        }
        if self.idempotency_retention_hours == 0 {
            return Err(cfg("http.idempotency_retention_hours must be at least 1"));
        }
        self.limits.validate("http.limits").map_err(cfg)?;
        match self.delivery {
            DeliveryMode::Pull => {
                if self.webhook_url.is_some() {
                    return Err(cfg(
                        "http.webhook_url is set but http.delivery is \"pull\": set delivery = \"webhook\" (or remove the URL)",
                    ));
                }
            }
            DeliveryMode::Webhook => {
                let Some(url) = &self.webhook_url else {
                    return Err(cfg("http.delivery = \"webhook\" needs http.webhook_url"));
                };
                WebhookTarget::parse(url)?;
                if self.webhook_secret_file.is_none() {
                    return Err(cfg(
                        "http.delivery = \"webhook\" needs http.webhook_secret_file (the HMAC key)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The bearer token, read from [`token_file`](Self::token_file).
    pub fn load_token(&self) -> Result<String> {
        read_secret(&self.token_file, "http.token_file")
    }

    /// The webhook's HMAC key, read from [`webhook_secret_file`](Self::webhook_secret_file);
    /// `None` in pull mode.
    pub fn load_webhook_secret(&self) -> Result<Option<String>> {
        match (&self.delivery, &self.webhook_secret_file) {
            (DeliveryMode::Webhook, Some(path)) => {
                read_secret(path, "http.webhook_secret_file").map(Some)
            }
            _ => Ok(None),
        }
    }

    /// How long one webhook call may take.
    pub fn webhook_timeout(&self) -> Duration {
        Duration::from_secs(self.webhook_timeout_secs)
    }

    /// The longest wait between webhook retries.
    pub fn webhook_max_backoff(&self) -> Duration {
        Duration::from_secs(self.webhook_max_backoff_secs)
    }

    /// How long idempotency keys are kept, in ms.
    pub fn idempotency_retention_ms(&self) -> i64 {
        i64::try_from(self.idempotency_retention_hours.saturating_mul(3_600_000))
            .unwrap_or(i64::MAX)
    }
}

/// A webhook URL taken apart: `http://host[:port]/path?query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    /// `host:port`, for connecting and the `Host` header.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Path and query (at least `/`).
    pub path: String,
}

impl WebhookTarget {
    /// Parses an `http://` URL. `https` is not supported: webhooks go to the agency system on
    /// the same host or network (terminate TLS in front of it if it is elsewhere).
    pub fn parse(url: &str) -> Result<WebhookTarget> {
        let uri: Uri = url
            .parse()
            .map_err(|e| cfg(format!("http.webhook_url {url:?} is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(cfg(
                    "http.webhook_url: https is not supported; use http to a local endpoint (or a local TLS-terminating proxy)",
                ));
            }
            _ => {
                return Err(cfg(format!(
                    "http.webhook_url {url:?} must start with http://"
                )));
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| cfg(format!("http.webhook_url {url:?} has no host")))?;
        if authority.as_str().contains('@') {
            return Err(cfg("http.webhook_url must not carry credentials"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(cfg(format!("http.webhook_url {url:?} has no host")));
        }
        let port = authority.port_u16().unwrap_or(80);
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Ok(WebhookTarget {
            authority: authority.as_str().to_owned(),
            host: host.to_owned(),
            port,
            path: if path.is_empty() { "/".into() } else { path },
        })
    }
}

/// Reads a one-line secret, refusing a file that others than its owner may read.
fn read_secret(path: &Path, field: &str) -> Result<String> {
    yeongye_proto::credentials::check_private(path).map_err(|e| cfg(format!("{field}: {e}")))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| cfg(format!("{field}: cannot read {}: {e}", path.display())))?;
    let secret = text.trim();
    if secret.len() < MIN_SECRET_LEN {
        return Err(cfg(format!(
            "{field}: {} holds fewer than {MIN_SECRET_LEN} characters",
            path.display()
        )));
    }
    if secret.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(cfg(format!(
            "{field}: {} must hold one line without spaces",
            path.display()
        )));
    }
    Ok(secret.to_owned())
}

fn cfg(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HttpConfig> {
        let c: HttpConfig = toml::from_str(text).map_err(|e| cfg(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults() {
        let c = parse("token_file = \"/t\"").unwrap();
        assert_eq!(c, HttpConfig::new("/t"));
        assert_eq!(c.bind.to_string(), DEFAULT_BIND);
        assert_eq!(c.delivery, DeliveryMode::Pull);
    }

    #[test]
    fn webhook() {
        let c = parse(
            "token_file = \"/t\"\ndelivery = \"webhook\"\nwebhook_url = \"http://127.0.0.1:9000/hook?a=1\"\nwebhook_secret_file = \"/s\"",
        )
        .unwrap();
        let t = WebhookTarget::parse(c.webhook_url.as_deref().unwrap()).unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.path.as_str(),
                t.authority.as_str()
            ),
            ("127.0.0.1", 9000, "/hook?a=1", "127.0.0.1:9000")
        );
        let t = WebhookTarget::parse("http://localhost").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
    }

    #[test]
    fn refusals() {
        for (text, expect) in [
            ("", "token_file"),
            ("token_file = \"/t\"\nbind = \"nowhere\"", "bind"),
            ("token_file = \"/t\"\nport = 1", "unknown field"),
            (
                "token_file = \"/t\"\nbody_limit_bytes = 10",
                "body_limit_bytes",
            ),
            (
                "token_file = \"/t\"\ndelivery = \"carrier-pigeon\"",
                "delivery",
            ),
            ("token_file = \"/t\"\ndelivery = \"webhook\"", "webhook_url"),
            (
                "token_file = \"/t\"\ndelivery = \"webhook\"\nwebhook_url = \"http://h/\"",
                "webhook_secret_file",
            ),
            (
                "token_file = \"/t\"\ndelivery = \"webhook\"\nwebhook_url = \"https://h/\"\nwebhook_secret_file = \"/s\"",
                "https",
            ),
            (
                "token_file = \"/t\"\ndelivery = \"webhook\"\nwebhook_url = \"ftp://h/\"\nwebhook_secret_file = \"/s\"",
                "http://",
            ),
            (
                "token_file = \"/t\"\nwebhook_url = \"http://h/\"",
                "delivery",
            ),
            (
                "token_file = \"/t\"\nwebhook_timeout_secs = 0",
                "at least 1",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expect), "{text}: {e}");
        }
    }

    #[test]
    fn secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        yeongye_proto::credentials::write_private(&token, b"0123456789abcdef-token\n").unwrap();
        let c = HttpConfig::new(&token);
        assert_eq!(c.load_token().unwrap(), "0123456789abcdef-token");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |m| std::fs::set_permissions(&token, std::fs::Permissions::from_mode(m));
            mode(0o644).unwrap();
            let e = c.load_token().unwrap_err().to_string();
            assert!(
                e.contains("http.token_file") && e.contains("chmod 600"),
                "{e}"
            );
            mode(0o600).unwrap();
        }
        assert_eq!(c.load_webhook_secret().unwrap(), None);
        std::fs::write(&token, "short").unwrap();
        assert!(
            c.load_token()
                .unwrap_err()
                .to_string()
                .contains("fewer than")
        );
        std::fs::write(&token, "0123456789 abcdef-token").unwrap();
        assert!(c.load_token().unwrap_err().to_string().contains("one line"));
        let missing = HttpConfig::new(dir.path().join("missing"));
        assert!(
            missing
                .load_token()
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
    }
}
