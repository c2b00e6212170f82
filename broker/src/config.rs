//! Broker configuration: TOML file, then `REFERRAL_*` environment overrides, then `validate()`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use yeongye_proto::credentials::{Credentials, redact_url};
use yeongye_proto::signing::PrivateKey;

use crate::error::{Error, Result};
use crate::referral::Urgency;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS servers; several for a cluster.
    pub nats_urls: Vec<String>,
    /// The sled database directory.
    pub store_dir: PathBuf,
    /// The agency registry (see `deploy/agencies.toml`).
    pub registry: PathBuf,
    /// The broker's NATS credentials: a TOML file with `user` and `password`
    /// (`referral-broker init` writes `<secrets>/broker/nats.creds`). Absent: no credentials.
    pub nats_credentials_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the NATS servers' certificates. Set: every
    /// connection must be TLS, and only this CA is trusted.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// A client certificate (PEM), for servers that verify clients; with the key below.
    pub nats_tls_client_cert_file: Option<PathBuf>,
    pub nats_tls_client_key_file: Option<PathBuf>,
    /// How long the inbound stream keeps messages (the broker replays from it).
    pub inbound_retention_days: u32,
    pub outbound_retention_days: u32,
    /// How long the broker remembers applied message ids (must outlast the inbound retention).
    pub dedup_retention_days: u32,
    /// Most inbound messages applied in one store batch.
    pub batch_size: usize,
    /// Longest message accepted on an inbound subject, bytes.
    pub max_message_bytes: usize,
    /// How long a recipient has to acknowledge (RECEIVED) a referral, by urgency.
    pub receipt_deadline_secs: UrgencyDeadlines,
    /// How long a recipient has, once RECEIVED, to accept or decline, by urgency.
    pub acceptance_deadline_secs: UrgencyDeadlines,
    /// Tighter deadlines for some fields of need (the tighter of this and the urgency's wins),
    /// keyed by field name: `livelihood`, `housing`, `health`, `mental_health`, `employment`,
    /// `care`, `child`, `addiction`, `child_protection`, `debt`, `other`.
    pub field_deadline_secs: BTreeMap<String, FieldDeadlines>,
    /// The agency told of every escalation besides the sender: the district's Hope Welfare
    /// Support Group.
    pub coordinator: Option<String>,
    /// The operators' HTTP endpoint (health, metrics, API, dashboard). Loopback by default;
    /// an address beyond loopback is refused unless `http_allow_remote` is set.
    pub http_addr: SocketAddr,
    /// Allow `http_addr` beyond loopback. The endpoint speaks plain HTTP: put a reverse proxy
    /// that terminates TLS in front of it (the broker says so at every start). The JSON API's
    /// reads then need an operator token too.
    pub http_allow_remote: bool,
    /// Host names the endpoint answers to (the `Host` header, with or without the bound port;
    /// an entry `name:port` matches only that port). Anything else is refused (421): a web page
    /// cannot reach the endpoint through DNS rebinding. A state-changing request whose
    /// `Origin` is not one of them is refused (403).
    pub http_allowed_hosts: Vec<String>,
    /// The operators file (`referral-broker operator add` writes it): names and token digests
    /// of who may replay or discard dead letters and reload the registry. Read at every such
    /// request. Absent: every operator action is refused.
    pub operators_file: Option<PathBuf>,
    /// Timeouts and connection cap of the HTTP endpoint (`[http_limits]`).
    pub http_limits: yeongye_http::Limits,
    /// Testing only: a file holding milliseconds added to the wall clock, re-read at every
    /// tick, so that tests can move time forward without sleeping. Never set in production.
    pub testing_clock_offset_file: Option<PathBuf>,
    /// Testing only: a takeover waits this many milliseconds before its first append, as a
    /// slow catch-up or a large first snapshot does (0..=60000). Never set in production.
    pub testing_takeover_delay_ms: u64,
    /// Testing only: a leader's turn holding inbound messages waits, before its commit, until
    /// the broker is asked to stop, and then this many milliseconds more (0..=60000; 0: off),
    /// as a long turn in hand at a SIGTERM does. Never set in production.
    pub testing_stop_delay_ms: u64,
    /// Testing only: a standby reopens its store (so that sled writes its recovery snapshot)
    /// once this many bytes of records were applied since it opened it, instead of 1 GiB
    /// (1..). Never set in production.
    pub testing_store_reopen_after_bytes: Option<u64>,
    /// Testing only: sled's background flusher off, so that a leader's commits (not flushed:
    /// the state log holds them) stay in memory until the store closes, and a `kill -9`
    /// loses them from the store for certain. Never set in production.
    pub testing_store_without_background_flush: bool,
    /// Refuse inbound messages without a valid signature by a key of the sender's in the
    /// registry. On by default; turn off only for a closed test bench.
    pub require_signatures: bool,
    /// The broker's own signing key file (`referral-broker init` writes it): everything the
    /// broker publishes is signed with it.
    pub signing_key_file: Option<PathBuf>,
    /// How far an envelope's `sent_at_ms` may be ahead of its arrival.
    pub max_clock_skew_secs: u64,
    /// How long before its arrival an envelope may have been built.
    pub max_message_age_secs: u64,
    /// What to do with a referral whose client data is not sealed to its recipient (an
    /// adapter from before sealing, docs/PROTOCOL.md "Sealed client data"): `refuse` it
    /// (`PLAINTEXT_REFUSED`; the default), or `accept` it for a migration period.
    pub plaintext_referrals: PlaintextReferrals,
    /// Replicas of the streams (and so of their consumers) the broker creates: 1 on a single
    /// NATS server; 3 on a three-node JetStream cluster, so that a node's death loses nothing
    /// and stops nothing (NATS's own Raft keeps them). An existing stream is updated to it.
    pub stream_replicas: usize,
    /// This broker's name in its group (the state log's `leader` records, the lease, status and
    /// metrics): distinct for every broker sharing the streams. Default: `broker`.
    pub broker_name: String,
    /// How long the leader's lease outlives its last renewal (renewed every third of it): a
    /// standby takes over about this long after a leader dies.
    pub lease_ttl_secs: u64,
    /// The leader stores a snapshot of its state every this many state-log records (a turn
    /// is one record), and the log is trimmed behind the older of the two newest.
    pub snapshot_every_records: u64,
    /// The pace of a leader's snapshot upload, MiB a second: nats-server writes what it is sent
    /// and the kernel writes that back ~30 s later all at once, which stalls every write on the
    /// disk (the leader's commits included) for ~0.6 ms per MB (measured); paced, each of the
    /// kernel's passes carries a few seconds' worth. Default 8.
    pub snapshot_upload_mib_per_sec: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextReferrals {
    Refuse,
    Accept,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrgencyDeadlines {
    pub crisis: u64,
    pub priority: u64,
    pub routine: u64,
}

impl UrgencyDeadlines {
    pub fn for_urgency(&self, urgency: Urgency) -> Duration {
        Duration::from_secs(match urgency {
            Urgency::Crisis => self.crisis,
            Urgency::Priority => self.priority,
            Urgency::Routine => self.routine,
        })
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FieldDeadlines {
    pub receipt: Option<u64>,
    pub acceptance: Option<u64>,
}

/// Field names accepted in `field_deadline_secs`, with their `yeongye.v1.FieldOfNeed` numbers.
pub const FIELD_NAMES: [(&str, i32); 11] = [
    ("livelihood", 1),
    ("housing", 2),
    ("health", 3),
    ("mental_health", 4),
    ("employment", 5),
    ("care", 6),
    ("child", 7),
    ("addiction", 8),
    ("child_protection", 9),
    ("debt", 10),
    ("other", 15),
];

/// Receipt and acceptance durations for one referral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub receipt: Duration,
    pub acceptance: Duration,
}

/// Everything but secrets: the NATS URLs' user info is hidden, secret files are shown by path.
/// Every field is named here (no `..`), so that a new field is a decision about what it shows.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Config {
            nats_urls: _,
            store_dir,
            registry,
            nats_credentials_file,
            nats_tls_ca_file,
            nats_tls_client_cert_file,
            nats_tls_client_key_file,
            inbound_retention_days,
            outbound_retention_days,
            dedup_retention_days,
            batch_size,
            max_message_bytes,
            receipt_deadline_secs,
            acceptance_deadline_secs,
            field_deadline_secs,
            coordinator,
            http_addr,
            http_allow_remote,
            http_allowed_hosts,
            operators_file,
            http_limits,
            testing_clock_offset_file,
            testing_takeover_delay_ms,
            testing_stop_delay_ms,
            testing_store_reopen_after_bytes,
            testing_store_without_background_flush,
            require_signatures,
            signing_key_file,
            max_clock_skew_secs,
            max_message_age_secs,
            plaintext_referrals,
            stream_replicas,
            broker_name,
            lease_ttl_secs,
            snapshot_every_records,
            snapshot_upload_mib_per_sec,
        } = self;
        f.debug_struct("Config")
            .field("nats_urls", &self.redacted_urls())
            .field("store_dir", store_dir)
            .field("registry", registry)
            .field("nats_credentials_file", nats_credentials_file)
            .field("nats_tls_ca_file", nats_tls_ca_file)
            .field("nats_tls_client_cert_file", nats_tls_client_cert_file)
            .field("nats_tls_client_key_file", nats_tls_client_key_file)
            .field("inbound_retention_days", inbound_retention_days)
            .field("outbound_retention_days", outbound_retention_days)
            .field("dedup_retention_days", dedup_retention_days)
            .field("batch_size", batch_size)
            .field("max_message_bytes", max_message_bytes)
            .field("receipt_deadline_secs", receipt_deadline_secs)
            .field("acceptance_deadline_secs", acceptance_deadline_secs)
            .field("field_deadline_secs", field_deadline_secs)
            .field("coordinator", coordinator)
            .field("http_addr", http_addr)
            .field("http_allow_remote", http_allow_remote)
            .field("http_allowed_hosts", http_allowed_hosts)
            // A path; the file holds names and token digests, never a token.
            .field("operators_file", operators_file)
            .field("http_limits", http_limits)
            .field("testing_clock_offset_file", testing_clock_offset_file)
            .field("testing_takeover_delay_ms", testing_takeover_delay_ms)
            .field("testing_stop_delay_ms", testing_stop_delay_ms)
            .field(
                "testing_store_reopen_after_bytes",
                testing_store_reopen_after_bytes,
            )
            .field(
                "testing_store_without_background_flush",
                testing_store_without_background_flush,
            )
            .field("require_signatures", require_signatures)
            .field("signing_key_file", signing_key_file)
            .field("max_clock_skew_secs", max_clock_skew_secs)
            .field("max_message_age_secs", max_message_age_secs)
            .field("plaintext_referrals", plaintext_referrals)
            .field("stream_replicas", stream_replicas)
            .field("broker_name", broker_name)
            .field("lease_ttl_secs", lease_ttl_secs)
            .field("snapshot_every_records", snapshot_every_records)
            .field("snapshot_upload_mib_per_sec", snapshot_upload_mib_per_sec)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_urls: vec!["nats://127.0.0.1:4222".to_owned()],
            store_dir: PathBuf::from("broker-store"),
            registry: PathBuf::from("deploy/agencies.toml"),
            nats_credentials_file: None,
            nats_tls_ca_file: None,
            nats_tls_client_cert_file: None,
            nats_tls_client_key_file: None,
            inbound_retention_days: 7,
            outbound_retention_days: 7,
            dedup_retention_days: 14,
            batch_size: 256,
            max_message_bytes: 256 * 1024,
            // A household in crisis must be reached within the hour; others within a working
            // day or three.
            receipt_deadline_secs: UrgencyDeadlines {
                crisis: 3600,
                priority: DAY,
                routine: 3 * DAY,
            },
            // Integrated case management's reference: intake decided within about 10 days of
            // discovery; a crisis within a day.
            acceptance_deadline_secs: UrgencyDeadlines {
                crisis: DAY,
                priority: 3 * DAY,
                routine: 10 * DAY,
            },
            field_deadline_secs: BTreeMap::from([(
                "child_protection".to_owned(),
                FieldDeadlines {
                    receipt: Some(3600),
                    acceptance: Some(DAY),
                },
            )]),
            coordinator: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8470)),
            http_allow_remote: false,
            http_allowed_hosts: DEFAULT_ALLOWED_HOSTS.map(str::to_owned).to_vec(),
            operators_file: None,
            http_limits: yeongye_http::Limits::default(),
            testing_clock_offset_file: None,
            testing_takeover_delay_ms: 0,
            testing_stop_delay_ms: 0,
            testing_store_reopen_after_bytes: None,
            testing_store_without_background_flush: false,
            require_signatures: true,
            signing_key_file: None,
            max_clock_skew_secs: 300,
            max_message_age_secs: DAY,
            plaintext_referrals: PlaintextReferrals::Refuse,
            stream_replicas: 1,
            broker_name: "broker".to_owned(),
            lease_ttl_secs: 3,
            snapshot_every_records: 10_000,
            snapshot_upload_mib_per_sec: 8,
        }
    }
}

const DAY: u64 = 24 * 3600;

/// The host names the operators' endpoint answers to by default: loopback's.
pub const DEFAULT_ALLOWED_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

impl Config {
    /// Reads `path` (if given), applies environment overrides, validates.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let mut cfg = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
                Config::from_toml(&text).map_err(|message| Error::Config {
                    path: path.to_owned(),
                    message,
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Where snapshots pass through on their way to and from the object store: beside the
    /// store (same disk, same protection), never inside sled's own directory.
    pub fn snapshot_dir(&self) -> PathBuf {
        match self.store_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// The deadlines of a referral of this urgency and field of need (a `FieldOfNeed` number).
    pub fn deadlines(&self, urgency: Urgency, field: i32) -> Deadlines {
        let mut d = Deadlines {
            receipt: self.receipt_deadline_secs.for_urgency(urgency),
            acceptance: self.acceptance_deadline_secs.for_urgency(urgency),
        };
        let name = FIELD_NAMES
            .iter()
            .find(|(_, n)| *n == field)
            .map(|(name, _)| *name);
        if let Some(f) = name.and_then(|n| self.field_deadline_secs.get(n)) {
            if let Some(r) = f.receipt {
                d.receipt = d.receipt.min(Duration::from_secs(r));
            }
            if let Some(a) = f.acceptance {
                d.acceptance = d.acceptance.min(Duration::from_secs(a));
            }
        }
        d
    }

    /// Parses TOML. The error may quote a line of the file: URL credentials in it are hidden.
    pub fn from_toml(text: &str) -> std::result::Result<Config, String> {
        toml::from_str(text).map_err(|e| yeongye_proto::credentials::redact_urls_in(&e.to_string()))
    }

    /// `REFERRAL_NATS_URLS` (comma-separated), `REFERRAL_STORE_DIR`, `REFERRAL_REGISTRY`,
    /// `REFERRAL_NATS_CREDENTIALS_FILE`, `REFERRAL_NATS_TLS_CA_FILE`,
    /// `REFERRAL_BATCH_SIZE`, `REFERRAL_OPERATORS_FILE`, `REFERRAL_BROKER_NAME`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = var("REFERRAL_NATS_URLS") {
            self.nats_urls = v.split(',').map(|s| s.trim().to_owned()).collect();
        }
        if let Some(v) = var("REFERRAL_STORE_DIR") {
            self.store_dir = PathBuf::from(v);
        }
        if let Some(v) = var("REFERRAL_REGISTRY") {
            self.registry = PathBuf::from(v);
        }
        if let Some(v) = var("REFERRAL_NATS_CREDENTIALS_FILE") {
            self.nats_credentials_file = Some(PathBuf::from(v));
        }
        if let Some(v) = var("REFERRAL_NATS_TLS_CA_FILE") {
            self.nats_tls_ca_file = Some(PathBuf::from(v));
        }
        if let Some(v) = var("REFERRAL_OPERATORS_FILE") {
            self.operators_file = Some(PathBuf::from(v));
        }
        if let Some(v) = var("REFERRAL_BROKER_NAME") {
            self.broker_name = v;
        }
        if let Some(v) = var("REFERRAL_BATCH_SIZE") {
            self.batch_size = v.parse().map_err(|_| {
                Error::InvalidConfig(format!("REFERRAL_BATCH_SIZE={v:?} is not a whole number"))
            })?;
        }
        Ok(())
    }

    /// The NATS URLs with their user info hidden, for logs and errors.
    pub fn redacted_urls(&self) -> Vec<String> {
        self.nats_urls.iter().map(|u| redact_url(u)).collect()
    }

    /// The broker's signing key, from [`signing_key_file`](Self::signing_key_file) (`None` if
    /// not configured). A missing, malformed or exposed (readable by others) file is refused.
    pub fn signing_key(&self) -> Result<Option<PrivateKey>> {
        self.signing_key_file
            .as_deref()
            .map(|path| {
                PrivateKey::load(path)
                    .map_err(|e| Error::InvalidConfig(format!("signing_key_file: {e}")))
            })
            .transpose()
    }

    /// Fails unless every configured TLS file can be read and holds PEM, and the client's private
    /// key (a secret) is readable by its owner only.
    pub fn check_tls_files(&self) -> Result<()> {
        if let Some(ca) = &self.nats_tls_ca_file {
            pem_file(ca, "nats_tls_ca_file")?;
        }
        if let Some(cert) = &self.nats_tls_client_cert_file {
            pem_file(cert, "nats_tls_client_cert_file")?;
        }
        if let Some(key) = &self.nats_tls_client_key_file {
            yeongye_proto::credentials::check_private(key)
                .map_err(|e| Error::InvalidConfig(format!("nats_tls_client_key_file: {e}")))?;
            pem_file(key, "nats_tls_client_key_file")?;
        }
        Ok(())
    }

    /// Reads every secret and certificate file the configuration names, as a start would: the
    /// NATS credentials, the signing key, the TLS files. The first that is missing, malformed
    /// or readable by others fails (`referral-broker check-config`). Returns what was found,
    /// without secrets.
    pub fn check_files(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        if let Some(path) = &self.nats_credentials_file {
            let creds = Credentials::load(path)
                .map_err(|e| Error::InvalidConfig(format!("nats_credentials_file: {e}")))?;
            found.push(format!("NATS credentials of user {:?}", creds.user));
        }
        match self.signing_key()? {
            Some(key) => found.push(format!("signing key {:?}", key.id)),
            None => {
                found.push("no signing key: the broker's messages would go out unsigned".into())
            }
        }
        self.check_tls_files()?;
        Ok(found)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.nats_urls.is_empty() || self.nats_urls.iter().any(|u| u.trim().is_empty()) {
            return bad("nats_urls must name at least one server, none empty".into());
        }
        // The NATS client ignores a URL's user info (and would log it whole at debug).
        if let Some(u) = self.nats_urls.iter().find(|u| u.contains('@')) {
            return bad(format!(
                "nats_urls {:?} carries credentials: give them in nats_credentials_file instead",
                redact_url(u)
            ));
        }
        if !matches!(self.stream_replicas, 1 | 3 | 5) {
            return bad(format!(
                "stream_replicas {} is not 1, 3 or 5 (a JetStream cluster's quorum needs an odd count)",
                self.stream_replicas
            ));
        }
        // A KV key's value and a header of the state log: plain, short, never free text.
        if self.broker_name.is_empty()
            || self.broker_name.len() > 64
            || !self
                .broker_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(format!(
                "broker_name {:?} must be 1 to 64 of a-z, A-Z, 0-9, '-' and '_'",
                self.broker_name.chars().take(80).collect::<String>()
            ));
        }
        // Whole seconds: JetStream's KV age limit; under 2 s a renewal (every third) races
        // its own expiry, over a minute a dead leader stops referrals that long.
        if !(2..=60).contains(&self.lease_ttl_secs) {
            return bad(format!(
                "lease_ttl_secs {} is not within 2..=60",
                self.lease_ttl_secs
            ));
        }
        if self.testing_takeover_delay_ms > 60_000 {
            return bad(format!(
                "testing_takeover_delay_ms {} is over 60000",
                self.testing_takeover_delay_ms
            ));
        }
        if self.testing_stop_delay_ms > 60_000 {
            return bad(format!(
                "testing_stop_delay_ms {} is over 60000",
                self.testing_stop_delay_ms
            ));
        }
        if self.testing_store_reopen_after_bytes == Some(0) {
            return bad("testing_store_reopen_after_bytes must be at least 1".to_owned());
        }
        if !(10..=100_000_000).contains(&self.snapshot_every_records) {
            return bad(format!(
                "snapshot_every_records {} is not within 10..=100000000",
                self.snapshot_every_records
            ));
        }
        if !(1..=10_000).contains(&self.snapshot_upload_mib_per_sec) {
            return bad(format!(
                "snapshot_upload_mib_per_sec {} is not within 1..=10000",
                self.snapshot_upload_mib_per_sec
            ));
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return bad(format!(
                "batch_size {} is not within 1..=10000",
                self.batch_size
            ));
        }
        if self.inbound_retention_days == 0 || self.outbound_retention_days == 0 {
            return bad("stream retention must be at least one day".into());
        }
        if self.dedup_retention_days < self.inbound_retention_days {
            return bad(format!(
                "dedup_retention_days ({}) must be at least inbound_retention_days ({}), \
                 or a replay could apply a message twice",
                self.dedup_retention_days, self.inbound_retention_days
            ));
        }
        if !(1024..=8 * 1024 * 1024).contains(&self.max_message_bytes) {
            return bad(format!(
                "max_message_bytes {} is not within 1 KiB..=8 MiB",
                self.max_message_bytes
            ));
        }
        let in_range = |secs: u64| (1..=90 * 24 * 3600).contains(&secs);
        for (table, d) in [
            ("receipt_deadline_secs", &self.receipt_deadline_secs),
            ("acceptance_deadline_secs", &self.acceptance_deadline_secs),
        ] {
            for (name, secs) in [
                ("crisis", d.crisis),
                ("priority", d.priority),
                ("routine", d.routine),
            ] {
                if !in_range(secs) {
                    return bad(format!(
                        "{table}.{name} = {secs} is not within 1 s..=90 days"
                    ));
                }
            }
        }
        for (field, f) in &self.field_deadline_secs {
            if !FIELD_NAMES.iter().any(|(n, _)| n == field) {
                return bad(format!(
                    "field_deadline_secs.{field}: unknown field of need"
                ));
            }
            for secs in [f.receipt, f.acceptance].into_iter().flatten() {
                if !in_range(secs) {
                    return bad(format!(
                        "field_deadline_secs.{field} = {secs} is not within 1 s..=90 days"
                    ));
                }
            }
        }
        if let Some(c) = &self.coordinator
            && !yeongye_proto::subject::is_valid_agency_id(c)
        {
            return bad(format!("coordinator {c:?} is not a valid agency id"));
        }
        for (key, path) in [
            ("nats_credentials_file", &self.nats_credentials_file),
            ("nats_tls_ca_file", &self.nats_tls_ca_file),
            ("nats_tls_client_cert_file", &self.nats_tls_client_cert_file),
            ("nats_tls_client_key_file", &self.nats_tls_client_key_file),
            ("operators_file", &self.operators_file),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return bad(format!("{key} is empty"));
            }
        }
        if self.nats_tls_client_cert_file.is_some() != self.nats_tls_client_key_file.is_some() {
            return bad(
                "nats_tls_client_cert_file and nats_tls_client_key_file go together".into(),
            );
        }
        if !self.http_addr.ip().is_loopback() && !self.http_allow_remote {
            return bad(format!(
                "http_addr {} is not a loopback address: the operators' API would be reachable \
                 from the network. Bind it to 127.0.0.1, or set http_allow_remote = true and put \
                 a reverse proxy that terminates TLS in front of it",
                self.http_addr
            ));
        }
        if self.http_allowed_hosts.is_empty() {
            return bad("http_allowed_hosts is empty: no request could be answered".into());
        }
        for host in &self.http_allowed_hosts {
            if !crate::http::guard::is_valid_host_entry(host) {
                return bad(format!(
                    "http_allowed_hosts: {host:?} is not a host name, IPv4 address or [IPv6] \
                     address (optionally with :port)"
                ));
            }
        }
        self.http_limits
            .validate("http_limits")
            .map_err(Error::InvalidConfig)?;
        Ok(())
    }
}

/// Fails unless `path` can be read and holds PEM.
fn pem_file(path: &std::path::Path, key: &str) -> Result<()> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::InvalidConfig(format!("{key} {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Error::InvalidConfig(format!(
            "{key} {} is not a PEM file",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn urls_with_credentials_are_refused_and_never_shown() {
        let cfg = Config {
            nats_urls: vec!["nats://broker:s3cret@127.0.0.1:4222".into()],
            ..Config::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("nats_credentials_file") && !e.contains("s3cret"),
            "{e}"
        );
        let shown = format!("{cfg:?}");
        assert!(
            shown.contains("broker:***@127.0.0.1") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn parses_a_full_file() {
        let cfg = Config::from_toml(
            r#"
            nats_urls = ["nats://a:4222", "nats://b:4222"]
            store_dir = "/tmp/x"
            registry = "r.toml"
            batch_size = 10
            coordinator = "hope-support"
            http_addr = "127.0.0.1:0"
            nats_credentials_file = "/etc/yeongye/secrets/broker/nats.creds"
            nats_tls_ca_file = "/etc/yeongye/ca.pem"
            [receipt_deadline_secs]
            crisis = 60
            priority = 120
            routine = 180
            [field_deadline_secs.child_protection]
            receipt = 30
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.nats_urls.len(), 2);
        assert_eq!(cfg.receipt_deadline_secs.crisis, 60);
        assert_eq!(cfg.acceptance_deadline_secs.routine, 10 * DAY);
    }

    #[test]
    fn rejects_bad_files() {
        for (text, needle) in [
            ("nats_urls = [", "nats_urls"),
            ("unknown_key = 1", "unknown field"),
            (
                "testing_store_without_background_flush = 1",
                "testing_store_without_background_flush",
            ),
            ("batch_size = \"ten\"", "batch_size"),
            ("batch_size = -1", "batch_size"),
            (
                "testing_takeover_delay_ms = -1",
                "testing_takeover_delay_ms",
            ),
            ("testing_stop_delay_ms = -1", "testing_stop_delay_ms"),
            (
                "testing_takeover_delay_ms = \"5s\"",
                "testing_takeover_delay_ms",
            ),
            (
                "testing_store_reopen_after_bytes = -1",
                "testing_store_reopen_after_bytes",
            ),
            (
                "testing_store_reopen_after_bytes = \"1GB\"",
                "testing_store_reopen_after_bytes",
            ),
            ("[receipt_deadline_secs]\nweekly = 3", "weekly"),
            ("[receipt_deadline_secs]\ncrisis = 3", "missing field"),
            ("http_addr = \"localhost\"", "http_addr"),
        ] {
            let err = Config::from_toml(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        for text in [
            "nats_urls = []",
            "batch_size = 0",
            "testing_store_reopen_after_bytes = 0",
            "dedup_retention_days = 1",
            "[receipt_deadline_secs]\ncrisis = 0\npriority = 1\nroutine = 1",
            "[field_deadline_secs.weather]\nreceipt = 5",
            "[field_deadline_secs.child]\nreceipt = 0",
            "coordinator = \"Hope\"",
            "nats_credentials_file = \"\"",
            "nats_tls_client_cert_file = \"c.pem\"",
            "max_message_bytes = 10",
            "http_addr = \"0.0.0.0:8470\"",
            "http_allowed_hosts = []",
            "stream_replicas = 0",
            "stream_replicas = 2",
            "stream_replicas = 7",
            "broker_name = \"\"",
            "broker_name = \"a.b\"",
            "broker_name = \"x y\"",
            "broker_name = \"a>\"",
            "lease_ttl_secs = 1",
            "lease_ttl_secs = 61",
            "snapshot_every_records = 9",
            "snapshot_upload_mib_per_sec = 0",
            "snapshot_upload_mib_per_sec = 10001",
            "testing_takeover_delay_ms = 60001",
            "testing_stop_delay_ms = 60001",
            "http_allowed_hosts = [\"evil.example/x\"]",
            "[http_limits]\nheader_timeout_secs = 0",
            "operators_file = \"\"",
        ] {
            let cfg = Config::from_toml(text).unwrap();
            assert!(cfg.validate().is_err(), "{text:?} should not validate");
        }
    }

    #[test]
    fn plaintext_referrals_takes_only_refuse_or_accept_and_defaults_to_refuse() {
        assert_eq!(
            Config::from_toml("").unwrap().plaintext_referrals,
            PlaintextReferrals::Refuse
        );
        assert_eq!(
            Config::from_toml("plaintext_referrals = \"accept\"")
                .unwrap()
                .plaintext_referrals,
            PlaintextReferrals::Accept
        );
        for bad in ["\"Accept\"", "\"yes\"", "true", "1", "\"\""] {
            assert!(
                Config::from_toml(&format!("plaintext_referrals = {bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_example_file_is_valid() {
        let cfg =
            Config::from_toml(include_str!("../../deploy/config/broker.example.toml")).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.http_limits, yeongye_http::Limits::default());
        assert_eq!(cfg.http_allowed_hosts, DEFAULT_ALLOWED_HOSTS);
        // Every default is written out in it.
        let d = Config::default();
        assert_eq!(
            (
                cfg.broker_name,
                cfg.lease_ttl_secs,
                cfg.snapshot_every_records,
                cfg.snapshot_upload_mib_per_sec
            ),
            (
                d.broker_name,
                d.lease_ttl_secs,
                d.snapshot_every_records,
                d.snapshot_upload_mib_per_sec
            )
        );
        let cluster = Config::from_toml(include_str!(
            "../../deploy/config/broker.cluster.example.toml"
        ))
        .unwrap();
        cluster.validate().unwrap();
        assert_eq!((cluster.stream_replicas, cluster.nats_urls.len()), (3, 3));
    }

    #[test]
    fn remote_binding_needs_the_opt_in() {
        let cfg = Config::from_toml("http_addr = \"0.0.0.0:8470\"").unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("http_allow_remote"), "{e}");
        let cfg =
            Config::from_toml("http_addr = \"0.0.0.0:8470\"\nhttp_allow_remote = true").unwrap();
        cfg.validate().unwrap();
        let cfg = Config::from_toml("[http_limits]\nmax_connections = 3").unwrap();
        assert_eq!(cfg.http_limits.max_connections, 3);
        assert_eq!(cfg.http_limits.header_timeout_secs, 10);
    }

    #[test]
    fn deadlines_by_urgency_and_field() {
        let cfg = Config::default();
        let crisis = cfg.deadlines(Urgency::Crisis, 1);
        assert_eq!(crisis.receipt, Duration::from_secs(3600));
        assert_eq!(crisis.acceptance, Duration::from_secs(DAY));
        let routine = cfg.deadlines(Urgency::Routine, 1);
        assert_eq!(routine.acceptance, Duration::from_secs(10 * DAY));
        // Child protection is tight whatever the urgency says.
        let cp = cfg.deadlines(Urgency::Routine, 9);
        assert_eq!(
            (cp.receipt, cp.acceptance),
            (Duration::from_secs(3600), Duration::from_secs(DAY))
        );
    }

    #[test]
    fn env_overrides() {
        let mut cfg = Config::default();
        cfg.apply_env(|k| match k {
            "REFERRAL_NATS_URLS" => Some("nats://x:1, nats://y:2".into()),
            "REFERRAL_BATCH_SIZE" => Some("7".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.nats_urls, ["nats://x:1", "nats://y:2"]);
        assert_eq!(cfg.batch_size, 7);
        let err = cfg
            .apply_env(|k| (k == "REFERRAL_BATCH_SIZE").then(|| "lots".to_owned()))
            .unwrap_err();
        assert!(err.to_string().contains("REFERRAL_BATCH_SIZE"));
        // A broker name from the environment is checked like the file's: a subject wildcard or
        // a header-breaking character is refused (the name goes into the state log's message
        // ids and the lease's value).
        for (name, ok) in [
            ("broker-2", true),
            ("a.b", false),
            ("a*", false),
            ("a\r\nNats-Expected-Last-Sequence: 0", false),
        ] {
            let mut cfg = Config::default();
            cfg.apply_env(|k| (k == "REFERRAL_BROKER_NAME").then(|| name.to_owned()))
                .unwrap();
            assert_eq!(cfg.validate().is_ok(), ok, "{name:?}");
        }
    }
}
