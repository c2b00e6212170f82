//! [`AdapterConfig`]: who this adapter is, which NATS servers it uses and where it keeps state.
//!
//! Loaded from TOML ([`AdapterConfig::load`]), then overridden from the environment
//! (`YEONGYE_AGENCY`, `YEONGYE_NATS_URLS` comma-separated, `YEONGYE_STATE_DIR`), then validated.
//!
//! ```toml
//! agency = "cc-haengbok1"
//! nats_urls = ["nats://127.0.0.1:4222"]
//! state_dir = "/var/lib/yeongye/adapter/cc-haengbok1"
//! # dedup_retention_days = 14
//! nats_credentials_file = "/etc/yeongye/secrets/cc-haengbok1/nats.creds"  # `agency add` writes it
//! tls_ca_file = "/etc/yeongye/nats-ca.pem"     # set: TLS required, only this CA trusted
//!
//! [http]                       # only for `agency-adapter serve`; see `config/http.rs`
//! token_file = "/etc/yeongye/cc-haengbok1.token"
//! ```

mod http;

use std::fmt;
use std::path::{Path, PathBuf};

use async_nats::ServerAddr;
use serde::Deserialize;
use yeongye_proto::subject;

use crate::error::{Error, Result};

pub use http::{
    DEFAULT_BIND, DEFAULT_BODY_LIMIT, DeliveryMode, HttpConfig, MIN_SECRET_LEN, WebhookTarget,
};
pub use yeongye_proto::credentials::Credentials;
use yeongye_proto::credentials::{redact_url, redact_urls_in, without_user_info};
use yeongye_proto::signing::{KeyRing, PrivateKey};

/// Environment variable overriding [`AdapterConfig::agency`].
pub const ENV_AGENCY: &str = "YEONGYE_AGENCY";
/// Environment variable overriding [`AdapterConfig::nats_urls`] (comma-separated).
pub const ENV_NATS_URLS: &str = "YEONGYE_NATS_URLS";
/// Environment variable overriding [`AdapterConfig::state_dir`].
pub const ENV_STATE_DIR: &str = "YEONGYE_STATE_DIR";

/// How long handled message ids are remembered by default. PROTOCOL.md asks for at least the
/// broker's stream retention (7 days by default).
pub const DEFAULT_DEDUP_RETENTION_DAYS: u32 = 14;

/// The adapter's configuration. Build it with [`AdapterConfig::new`] or load it with
/// [`AdapterConfig::load`]; [`Adapter::connect`](crate::Adapter::connect) validates it again.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// This agency's id (see `deploy/agencies.toml`).
    pub agency: String,
    /// The NATS servers to use, one URL each (`nats://host:port`).
    pub nats_urls: Vec<String>,
    /// Directory for the adapter's own state: the dedup store, undecodable messages.
    pub state_dir: PathBuf,
    /// How many days handled message ids are remembered (at least 1).
    #[serde(default = "default_retention")]
    pub dedup_retention_days: u32,
    /// The agency's NATS credentials file (TOML `user` and `password`; `referral-broker agency
    /// add` writes `<secrets>/<agency>/nats.creds`). Absent: connect without credentials.
    #[serde(default)]
    pub nats_credentials_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the NATS servers' certificates. Set: the connection
    /// must be TLS and only this CA is trusted.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The agency's Ed25519 signing key file (`referral-broker agency add` writes
    /// `<secrets>/<agency>/signing.key`): every envelope the adapter sends is signed with it.
    /// Absent: nothing is signed, and a broker that requires signatures refuses it all.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// The agency registry (public keys only are read): set, every delivery's relayed
    /// signature is checked against its sender's keys before it is handed over, and every
    /// referral and status note is sealed to its reader's current sealing key (docs/PROTOCOL.md
    /// "Sealed client data"). Absent: sent in clear, which a broker refuses by default.
    #[serde(default)]
    pub registry: Option<PathBuf>,
    /// The agency's X25519 sealing keys (`referral-broker agency add` writes
    /// `<secrets>/<agency>/sealing.key`): what was sealed to this agency opens with them.
    /// Absent: a sealed referral delivered here cannot be opened and is declined.
    #[serde(default)]
    pub sealing_key_file: Option<PathBuf>,
    /// The local HTTP/JSON API (`agency-adapter serve`); absent: not configured.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    /// The outbox: messages accepted while the hub is unreachable (`[outbox]`).
    #[serde(default)]
    pub outbox: OutboxConfig,
}

/// The `[outbox]` section: how long a send waits for JetStream before it answers "queued",
/// and how much the outbox may hold (past it, a send is refused: nothing is ever dropped).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Entries at most (default 100,000).
    #[serde(default = "default_outbox_entries")]
    pub max_entries: u64,
    /// Bytes of signed envelopes at most (default 256 MiB).
    #[serde(default = "default_outbox_bytes")]
    pub max_bytes: u64,
    /// How long a send waits for its PubAck before answering "queued" (default 2000 ms).
    #[serde(default = "default_queue_after")]
    pub queue_after_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> OutboxConfig {
        OutboxConfig {
            max_entries: default_outbox_entries(),
            max_bytes: default_outbox_bytes(),
            queue_after_ms: default_queue_after(),
        }
    }
}

impl OutboxConfig {
    /// [`queue_after_ms`](Self::queue_after_ms) as a duration.
    pub fn queue_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.queue_after_ms)
    }
}

fn default_outbox_entries() -> u64 {
    100_000
}

fn default_outbox_bytes() -> u64 {
    256 * 1024 * 1024
}

fn default_queue_after() -> u64 {
    2000
}

fn default_retention() -> u32 {
    DEFAULT_DEDUP_RETENTION_DAYS
}

impl AdapterConfig {
    /// A configuration with the default dedup retention. Call [`validate`](Self::validate)
    /// (or let `connect` do it).
    pub fn new(
        agency: impl Into<String>,
        nats_urls: impl IntoIterator<Item = impl Into<String>>,
        state_dir: impl Into<PathBuf>,
    ) -> AdapterConfig {
        AdapterConfig {
            agency: agency.into(),
            nats_urls: nats_urls.into_iter().map(Into::into).collect(),
            state_dir: state_dir.into(),
            dedup_retention_days: DEFAULT_DEDUP_RETENTION_DAYS,
            nats_credentials_file: None,
            tls_ca_file: None,
            signing_key_file: None,
            registry: None,
            sealing_key_file: None,
            http: None,
            outbox: OutboxConfig::default(),
        }
    }

    /// Reads `path`, applies the environment overrides and validates.
    pub fn load(path: &Path) -> Result<AdapterConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        let mut cfg = AdapterConfig::from_toml_str(&text)
            .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))?;
        cfg.apply_env_overrides(process_env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML only: no environment, no validation. The error may quote a line of the
    /// file: URL credentials in it are hidden.
    pub fn from_toml_str(text: &str) -> Result<AdapterConfig> {
        toml::from_str(text).map_err(|e| Error::Config(redact_urls_in(e.to_string().trim_end())))
    }

    /// Applies `YEONGYE_*` overrides looked up through `lookup` (the process environment in
    /// [`load`](Self::load); a map in tests).
    pub fn apply_env_overrides<F>(&mut self, lookup: F) -> Result<()>
    where
        F: Fn(&str) -> Result<Option<String>>,
    {
        if let Some(agency) = lookup(ENV_AGENCY)? {
            self.agency = agency.trim().to_owned();
        }
        if let Some(urls) = lookup(ENV_NATS_URLS)? {
            self.nats_urls = urls
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(dir) = lookup(ENV_STATE_DIR)? {
            self.state_dir = PathBuf::from(dir);
        }
        Ok(())
    }

    /// Checks every field; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<()> {
        if !subject::is_valid_agency_id(&self.agency) {
            return Err(Error::Config(format!(
                "agency {:?} is not a valid agency id (1-{} characters of a-z, 0-9 and '-', not starting with '-')",
                self.agency,
                subject::MAX_AGENCY_ID_LEN
            )));
        }
        if self.agency == yeongye_proto::BROKER_ID {
            return Err(Error::Config(
                "agency \"broker\" is reserved for the referral broker".into(),
            ));
        }
        self.server_addrs()?;
        if self.state_dir.as_os_str().is_empty() {
            return Err(Error::Config("state_dir is empty".into()));
        }
        if self.dedup_retention_days == 0 {
            return Err(Error::Config(
                "dedup_retention_days must be at least 1 (and should cover the broker's stream retention)".into(),
            ));
        }
        for (key, path) in [
            ("nats_credentials_file", &self.nats_credentials_file),
            ("tls_ca_file", &self.tls_ca_file),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(Error::Config(format!("{key} is empty")));
            }
        }
        if let Some(http) = &self.http {
            http.validate()?;
        }
        if self.outbox.max_entries == 0 || self.outbox.max_bytes == 0 {
            return Err(Error::Config(
                "outbox.max_entries and outbox.max_bytes must be at least 1".into(),
            ));
        }
        if self.outbox.queue_after_ms > 600_000 {
            return Err(Error::Config(
                "outbox.queue_after_ms must be at most 600000 (10 minutes)".into(),
            ));
        }
        Ok(())
    }

    /// The NATS credentials, read from [`nats_credentials_file`](Self::nats_credentials_file)
    /// (`None` if not configured). A file others may read is refused.
    pub fn credentials(&self) -> Result<Option<Credentials>> {
        let Some(path) = self.nats_credentials_file.as_deref() else {
            return Ok(None);
        };
        let creds = Credentials::load(path)
            .map_err(|e| Error::Config(format!("nats_credentials_file: {e}")))?;
        Ok(Some(creds))
    }

    /// The NATS credentials to connect with: from
    /// [`nats_credentials_file`](Self::nats_credentials_file), or else from the user info of
    /// [`nats_urls`](Self::nats_urls) (`nats://user:password@host`, the same in every URL), which
    /// the NATS client itself ignores. Both at once is an error.
    pub fn connect_credentials(&self) -> Result<Option<Credentials>> {
        let mut in_urls: Option<Credentials> = None;
        for addr in self.server_addrs()? {
            let Some(user) = addr.username() else {
                continue;
            };
            let found = Credentials {
                user: percent_decode(user),
                password: addr.password().map(percent_decode).unwrap_or_default(),
            };
            match &in_urls {
                Some(earlier) if *earlier != found => {
                    return Err(Error::Config(
                        "nats_urls carry different credentials: give one user and password (or nats_credentials_file)".into(),
                    ));
                }
                _ => in_urls = Some(found),
            }
        }
        match (self.credentials()?, in_urls) {
            (Some(_), Some(_)) => Err(Error::Config(
                "credentials both in nats_credentials_file and in nats_urls: give one".into(),
            )),
            (file, urls) => Ok(file.or(urls)),
        }
    }

    /// The signing key, read from [`signing_key_file`](Self::signing_key_file) (`None` if not
    /// configured). A missing, malformed or exposed (readable by others) file is refused.
    pub fn signing_key(&self) -> Result<Option<PrivateKey>> {
        self.signing_key_file
            .as_deref()
            .map(|path| {
                PrivateKey::load(path).map_err(|e| Error::Config(format!("signing_key_file: {e}")))
            })
            .transpose()
    }

    /// The registry's public keys (`None` if [`registry`](Self::registry) is not set).
    pub fn key_ring(&self) -> Result<Option<KeyRing>> {
        self.registry
            .as_deref()
            .map(|path| KeyRing::load(path).map_err(|e| Error::Config(format!("registry: {e}"))))
            .transpose()
    }

    /// Reads every file the configuration names, as the adapter would when it starts: NATS
    /// credentials, signing key, the registry's keys, the TLS CA, and the HTTP bearer token and
    /// webhook secret. The first that is missing, malformed or readable by others fails (for
    /// `agency-adapter check-config`). Returns what was found, without secrets.
    pub fn check_files(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        if let Some(c) = self.connect_credentials()? {
            if c.user != self.agency {
                return Err(Error::Config(format!(
                    "nats_credentials_file is for user {:?}, not agency {:?}",
                    c.user, self.agency
                )));
            }
            found.push(format!("NATS credentials of user {:?}", c.user));
        }
        match self.signing_key()? {
            Some(k) => found.push(format!("signing key {:?}", k.id)),
            None => found.push("no signing key: envelopes would go out unsigned".into()),
        }
        if self.key_ring()?.is_some() {
            found.push("registry keys: deliveries' signatures are checked".into());
        }
        let sealing = crate::sealing::Sealing::open(
            self.registry.as_deref(),
            self.sealing_key_file.as_deref(),
        )?;
        if sealing.seals() {
            found.push("registry sealing keys: referrals and notes are sealed".into());
        } else {
            found.push(
                "no registry: referrals would go out in clear, which a broker refuses by default"
                    .into(),
            );
        }
        match sealing.key_ids().as_slice() {
            [] if sealing.registry_has_key_of(&self.agency) => {
                return Err(Error::Config(format!(
                    "the registry lists a sealing key of {:?}, so others seal to it, but \
                     sealing_key_file is not set: nothing sealed to this agency could be opened",
                    self.agency
                )));
            }
            [] => found
                .push("no sealing key: sealed referrals to this agency cannot be opened".into()),
            ids => found.push(format!("sealing keys {ids:?}")),
        }
        if let Some(ca) = &self.tls_ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| Error::Config(format!("tls_ca_file {}: {e}", ca.display())))?;
            if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(Error::Config(format!(
                    "tls_ca_file {} is not a PEM file",
                    ca.display()
                )));
            }
            found.push("TLS CA".into());
        }
        if let Some(http) = &self.http {
            http.load_token()?;
            found.push("HTTP bearer token".into());
            if http.load_webhook_secret()?.is_some() {
                found.push("webhook secret".into());
            }
        }
        Ok(found)
    }

    /// The servers as `async-nats` addresses, one per URL.
    pub fn server_addrs(&self) -> Result<Vec<ServerAddr>> {
        if self.nats_urls.is_empty() {
            return Err(Error::Config(
                "nats_urls is empty: give at least one server, e.g. [\"nats://127.0.0.1:4222\"]"
                    .into(),
            ));
        }
        self.nats_urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                if url.contains(',') {
                    return Err(Error::Config(format!(
                        "nats_urls[{i}] contains a comma: list each server as its own string"
                    )));
                }
                url.parse::<ServerAddr>().map_err(|e| {
                    Error::Config(format!(
                        "nats_urls[{i}] {:?} is not a NATS URL: {e}",
                        redact_url(url)
                    ))
                })
            })
            .collect()
    }

    /// The servers to connect to, without user info: credentials in a URL are passed to the
    /// NATS client separately ([`connect_credentials`](Self::connect_credentials)), so that
    /// its own logs (at debug, if `RUST_LOG` asks for them) never hold the password.
    pub fn connect_addrs(&self) -> Result<Vec<ServerAddr>> {
        self.server_addrs()?;
        self.nats_urls
            .iter()
            .map(|url| {
                without_user_info(url).parse::<ServerAddr>().map_err(|e| {
                    Error::Config(format!("{:?} is not a NATS URL: {e}", redact_url(url)))
                })
            })
            .collect()
    }

    /// The server URLs with any password replaced by `***`, for logs and errors.
    pub fn redacted_urls(&self) -> Vec<String> {
        self.nats_urls.iter().map(|u| redact_url(u)).collect()
    }

    /// Where the sled dedup store lives.
    pub fn dedup_dir(&self) -> PathBuf {
        self.state_dir.join("dedup")
    }

    /// Where messages that could not be decoded are kept, by stream sequence.
    pub fn undecodable_dir(&self) -> PathBuf {
        self.state_dir.join("undecodable")
    }
}

/// `%XX` escapes decoded (a URL's user info); anything else kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Looks a variable up in the process environment; a value that is not UTF-8 is an error.
fn process_env(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::Config(format!(
            "environment variable {name} is not valid UTF-8"
        ))),
    }
}

/// Shows everything except secrets (URL user info; secret files' paths, never their content).
/// Everything but secrets (URL user info hidden; secret files shown by path). Every field is
/// named here, without `..`, so that a new field does not compile until someone decides what its
/// `Debug` shows.
impl fmt::Debug for AdapterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let AdapterConfig {
            agency,
            nats_urls: _,
            state_dir,
            dedup_retention_days,
            nats_credentials_file,
            tls_ca_file,
            signing_key_file,
            registry,
            sealing_key_file,
            http,
            outbox,
        } = self;
        f.debug_struct("AdapterConfig")
            .field("agency", agency)
            .field("nats_urls", &self.redacted_urls())
            .field("state_dir", state_dir)
            .field("dedup_retention_days", dedup_retention_days)
            .field("nats_credentials_file", nats_credentials_file)
            .field("tls_ca_file", tls_ca_file)
            .field("signing_key_file", signing_key_file)
            .field("registry", registry)
            .field("sealing_key_file", sealing_key_file)
            .field("http", http)
            .field("outbox", outbox)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ErrorKind;

    const GOOD: &str = r#"
agency = "cc-haengbok1"
nats_urls = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
state_dir = "/var/lib/yeongye/adapter/cc-haengbok1"
"#;

    #[test]
    fn outbox_bounds_refuse_zero_wrong_types_unknown_keys_and_a_wait_past_ten_minutes() {
        let cfg = AdapterConfig::from_toml_str(GOOD).unwrap();
        assert!(cfg.outbox.max_entries > 0 && cfg.outbox.max_bytes > 0);
        for bad in [
            "[outbox]\nmax_entries = 0",
            "[outbox]\nmax_bytes = 0",
            "[outbox]\nqueue_after_ms = 600001",
        ] {
            let cfg = AdapterConfig::from_toml_str(&format!("{GOOD}{bad}")).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("outbox."), "{bad}: {err}");
        }
        for bad in [
            "[outbox]\nmax_entries = -1",
            "[outbox]\nmax_bytes = \"lots\"",
            "[outbox]\nqueue_after_ms = 1.5",
            "[outbox]\nmax_entreis = 5",
            "outbox = 3",
        ] {
            assert!(
                AdapterConfig::from_toml_str(&format!("{GOOD}{bad}")).is_err(),
                "{bad} was taken"
            );
        }
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Result<Option<String>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| Ok(map.get(k).cloned())
    }

    fn err(text: &str) -> String {
        match AdapterConfig::from_toml_str(text).and_then(|c| c.validate()) {
            Ok(()) => panic!("accepted: {text}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Config);
                e.to_string()
            }
        }
    }

    #[test]
    fn good() {
        let cfg = AdapterConfig::from_toml_str(GOOD).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.agency, "cc-haengbok1");
        assert_eq!(cfg.server_addrs().unwrap().len(), 2);
        assert_eq!(cfg.dedup_retention_days, DEFAULT_DEDUP_RETENTION_DAYS);
        assert!(cfg.dedup_dir().ends_with("cc-haengbok1/dedup"));
    }

    #[test]
    fn malformed_toml() {
        let e = err("agency = \"cc-1\nnats_urls = [");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn unknown_field() {
        let e = err(&format!("{GOOD}\nnats_url = \"nats://x\"\n"));
        assert!(e.contains("unknown field `nats_url`"), "{e}");
    }

    #[test]
    fn wrong_type() {
        let e = err(
            "agency = \"cc-1\"\nnats_urls = \"nats://a:4222,nats://b:4222\"\nstate_dir = \"/tmp\"",
        );
        assert!(e.contains("nats_urls") || e.contains("sequence"), "{e}");
    }

    #[test]
    fn missing_field() {
        let e = err("agency = \"cc-1\"\nnats_urls = [\"nats://a\"]");
        assert!(e.contains("state_dir"), "{e}");
    }

    #[test]
    fn bad_agency_id() {
        for bad in ["Hope", "", "-x", "a.b", "a*", "broker"] {
            let e = err(&GOOD.replace("cc-haengbok1\"\nnats", &format!("{bad}\"\nnats")));
            assert!(e.contains("agency"), "{bad}: {e}");
        }
    }

    #[test]
    fn empty_and_bad_urls() {
        let e = err("agency = \"cc-1\"\nnats_urls = []\nstate_dir = \"/tmp\"");
        assert!(e.contains("nats_urls is empty"), "{e}");
        let e =
            err("agency = \"cc-1\"\nnats_urls = [\"nats://a:1,nats://b:2\"]\nstate_dir = \"/t\"");
        assert!(e.contains("comma"), "{e}");
        let e =
            err("agency = \"cc-1\"\nnats_urls = [\"nats://u:secret@[bad\"]\nstate_dir = \"/t\"");
        assert!(e.contains("nats_urls[0]") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn http_section() {
        let cfg = AdapterConfig::from_toml_str(&format!(
            "{GOOD}\n[http]\ntoken_file = \"/etc/t\"\nbind = \"127.0.0.1:9999\"\n"
        ))
        .unwrap();
        cfg.validate().unwrap();
        let http = cfg.http.as_ref().unwrap();
        assert_eq!(http.bind.port(), 9999);
        let e = err(&format!(
            "{GOOD}\n[http]\ntoken_file = \"/t\"\nbody_limit_bytes = 1\n"
        ));
        assert!(e.contains("http.body_limit_bytes"), "{e}");
        assert!(AdapterConfig::from_toml_str(GOOD).unwrap().http.is_none());
    }

    #[test]
    fn zero_retention() {
        let e = err(&format!("{GOOD}dedup_retention_days = 0\n"));
        assert!(e.contains("dedup_retention_days"), "{e}");
    }

    #[test]
    fn credentials_and_tls() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("nats.creds");
        yeongye_proto::credentials::write_private(
            &creds,
            b"user = \"cc-haengbok1\"\npassword = \"pw-secret\"\n",
        )
        .unwrap();
        let cfg = AdapterConfig::from_toml_str(&format!(
            "{GOOD}nats_credentials_file = {:?}\ntls_ca_file = \"/etc/ca.pem\"\n",
            creds.display().to_string()
        ))
        .unwrap();
        cfg.validate().unwrap();
        let c = cfg.credentials().unwrap().unwrap();
        assert_eq!(c.user, "cc-haengbok1");
        assert!(!format!("{cfg:?} {c:?}").contains("pw-secret"));
        let none = AdapterConfig::from_toml_str(GOOD).unwrap();
        assert!(none.credentials().unwrap().is_none() && none.tls_ca_file.is_none());
        let e = err(&format!("{GOOD}tls_ca_file = \"\"\n"));
        assert!(e.contains("tls_ca_file"), "{e}");
        let e = err(&format!("{GOOD}nats_credentials_file = \"\"\n"));
        assert!(e.contains("nats_credentials_file"), "{e}");
    }

    #[test]
    fn env_overrides() {
        let mut cfg = AdapterConfig::from_toml_str(GOOD).unwrap();
        cfg.apply_env_overrides(env(&[
            (ENV_AGENCY, "hope-support"),
            (ENV_NATS_URLS, " nats://a:1 , nats://b:2,,"),
            (ENV_STATE_DIR, "/srv/state"),
        ]))
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.agency, "hope-support");
        assert_eq!(cfg.nats_urls, vec!["nats://a:1", "nats://b:2"]);
        assert_eq!(cfg.state_dir, PathBuf::from("/srv/state"));

        // An override is validated like the file.
        let mut cfg = AdapterConfig::from_toml_str(GOOD).unwrap();
        cfg.apply_env_overrides(env(&[(ENV_NATS_URLS, " , ")]))
            .unwrap();
        assert!(cfg.validate().is_err());

        // No variables: nothing changes.
        let mut cfg = AdapterConfig::from_toml_str(GOOD).unwrap();
        cfg.apply_env_overrides(env(&[])).unwrap();
        assert_eq!(cfg, AdapterConfig::from_toml_str(GOOD).unwrap());
    }

    #[test]
    fn load_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter.toml");
        std::fs::write(&path, GOOD).unwrap();
        // The process environment may hold overrides; only check that loading works.
        let _ = AdapterConfig::load(&path);
        let e = AdapterConfig::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(e.to_string().contains("cannot read config file"), "{e}");
    }

    #[test]
    fn a_toml_error_never_quotes_a_url_password() {
        let e = err("agency = \"cc-1\"\nnats_urls = [\"nats://cc-1:s3cret@h:4222\"\nstate_dir = 1");
        assert!(e.contains("line") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn debug_hides_passwords() {
        let cfg = AdapterConfig::new("cc-1", ["nats://me:s3cret@host:4222"], "/tmp");
        let dbg = format!("{cfg:?}");
        assert!(
            !dbg.contains("s3cret") && dbg.contains("me:***@host"),
            "{dbg}"
        );
    }

    #[test]
    fn check_files_refuses_missing_garbage_and_shared_secrets() {
        use yeongye_proto::credentials::write_private;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signing.key");
        let token = dir.path().join("token");
        write_private(&token, b"0123456789abcdef0123").unwrap();
        let cfg = |key: &Path| {
            AdapterConfig::from_toml_str(&format!(
                "{GOOD}signing_key_file = {:?}\n[http]\ntoken_file = {:?}\n",
                key.display().to_string(),
                token.display().to_string()
            ))
            .unwrap()
        };
        let e = cfg(&key).check_files().unwrap_err().to_string();
        assert!(
            e.contains("signing_key_file") && e.contains("signing.key"),
            "{e}"
        );
        write_private(&key, b"yeongye-ed25519-v1 cc-haengbok1-1 not-base64!").unwrap();
        let e = cfg(&key).check_files().unwrap_err().to_string();
        assert!(e.contains("32 bytes of base64"), "{e}");
        std::fs::remove_file(&key).unwrap();
        PrivateKey::generate("cc-haengbok1-1")
            .unwrap()
            .save(&key)
            .unwrap();
        let found = cfg(&key).check_files().unwrap();
        assert!(
            found.iter().any(|f| f.contains("cc-haengbok1-1")),
            "{found:?}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path, m: u32| {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
            };
            mode(&key, 0o644);
            let e = cfg(&key).check_files().unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {}", key.display())), "{e}");
            mode(&key, 0o600);
            mode(&token, 0o640);
            let e = cfg(&key).check_files().unwrap_err().to_string();
            assert!(
                e.contains("http.token_file")
                    && e.contains(&format!("chmod 600 {}", token.display())),
                "{e}"
            );
        }
    }

    #[test]
    fn credentials_in_urls_are_used_and_never_shown() {
        let cfg = AdapterConfig::new(
            "cc-1",
            ["nats://cc-1:s3cr%40t@a:4222", "nats://cc-1:s3cr%40t@b:4222"],
            "/tmp",
        );
        let c = cfg.connect_credentials().unwrap().unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("cc-1", "s3cr@t"));
        assert!(!format!("{cfg:?} {c:?}").contains("s3cr"));
        let cfg = AdapterConfig::new("cc-1", ["nats://cc-1:x@a", "nats://cc-1:y@b"], "/tmp");
        assert!(cfg.connect_credentials().is_err());
        let none = AdapterConfig::new("cc-1", ["nats://a:4222"], "/tmp");
        assert!(none.connect_credentials().unwrap().is_none());
    }
}
