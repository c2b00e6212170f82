//! [`BrokerProcess`]: the real `referral-broker` binary, run as `referral-broker --config <file>
//! run`, with its configuration ([`BrokerConfig`]) written by the harness.
//!
//! The broker's stdout and stderr go to `broker.log` in its directory (appended across restarts).
//! Ready means: the broker has created its consumer `broker` on `YEONGYE_IN` and every registered
//! agency's consumer on `YEONGYE_OUT`, and it answers a status query.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use yeongye_proto::subject;

use crate::process;
use crate::wire::WireClient;

/// The operator every test broker knows (its `operators_file` is written by the harness).
pub const TEST_OPERATOR: &str = "test-operator";
/// That operator's bearer token (in `<broker dir>/operator.token`, mode 0600).
pub const TEST_OPERATOR_TOKEN: &str = "yop_test-operator-token-0123456789abcdefghijklmno";
/// The token file's name in the broker's directory, beside `broker.toml` ([`crate::ops::broker_cli`]
/// passes it as `REFERRAL_OPERATOR_TOKEN_FILE`).
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";

/// Writes `<dir>/operators.toml` listing [`TEST_OPERATOR`] and its 0600 token file (once).
pub fn write_test_operator(dir: &Path) -> PathBuf {
    use sha2::Digest;
    let token_file = dir.join(OPERATOR_TOKEN_FILE);
    if !token_file.exists() {
        yeongye_proto::credentials::write_private(
            &token_file,
            format!("{TEST_OPERATOR_TOKEN}\n").as_bytes(),
        )
        .expect("write the operator token");
    }
    let file = dir.join("operators.toml");
    let digest = hex_of(&sha2::Sha256::digest(TEST_OPERATOR_TOKEN.as_bytes()));
    std::fs::write(
        &file,
        format!("[[operator]]\nname = \"{TEST_OPERATOR}\"\ntoken_sha256 = \"{digest}\"\n"),
    )
    .expect("write operators.toml");
    file
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long a starting broker may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a broker may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Receipt deadlines by urgency, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptDeadlines {
    pub crisis: i64,
    pub priority: i64,
    pub routine: i64,
}

/// The broker's configuration file. `extra` holds anything else (or overrides a field above by
/// name): it is written last, as given.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub nats_urls: Vec<String>,
    pub store_dir: PathBuf,
    pub registry: PathBuf,
    pub inbound_retention_days: i64,
    pub outbound_retention_days: i64,
    pub dedup_retention_days: i64,
    pub batch_size: i64,
    pub receipt_deadline_secs: ReceiptDeadlines,
    /// The operators' HTTP endpoint: a free loopback port of its own, so brokers of tests
    /// running at once never clash.
    pub http_addr: String,
    pub extra: toml::Table,
    /// The network namespace of a [`crate::netns::Lab`] the broker runs in (`None`: the
    /// test's own); its `http_addr` must then be on the place's address. Not in the file.
    pub place: Option<String>,
}

impl BrokerConfig {
    /// The broker reads its clock offset from `clock-offset-ms` beside its store (the testing
    /// clock): [`BrokerProcess::set_clock_offset`] moves its time on without sleeping.
    pub fn with_test_clock(&mut self) -> &mut Self {
        let dir = self
            .store_dir
            .parent()
            .unwrap_or(&self.store_dir)
            .to_path_buf();
        self.extra.insert(
            "testing_clock_offset_file".into(),
            dir.join("clock-offset-ms").display().to_string().into(),
        );
        self
    }

    /// 7/7/14 days of retention, batches of 256, receipt within 1 h / 24 h / 72 h, the HTTP
    /// endpoint on a free loopback port; everything else the broker's defaults.
    pub fn new(nats_url: &str, store_dir: &Path, registry: &Path) -> BrokerConfig {
        BrokerConfig {
            nats_urls: vec![nats_url.to_owned()],
            store_dir: store_dir.to_path_buf(),
            registry: registry.to_path_buf(),
            inbound_retention_days: 7,
            outbound_retention_days: 7,
            dedup_retention_days: 14,
            batch_size: 256,
            receipt_deadline_secs: ReceiptDeadlines {
                crisis: 3600,
                priority: 86_400,
                routine: 259_200,
            },
            http_addr: format!("127.0.0.1:{}", crate::process::free_port()),
            extra: toml::Table::new(),
            place: None,
        }
    }

    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::new();
        let s = |p: &Path| toml::Value::String(p.display().to_string());
        table.insert(
            "nats_urls".into(),
            toml::Value::Array(
                self.nats_urls
                    .iter()
                    .map(|u| toml::Value::String(u.clone()))
                    .collect(),
            ),
        );
        table.insert("store_dir".into(), s(&self.store_dir));
        table.insert("registry".into(), s(&self.registry));
        table.insert(
            "http_addr".into(),
            toml::Value::String(self.http_addr.clone()),
        );
        for (key, value) in [
            ("inbound_retention_days", self.inbound_retention_days),
            ("outbound_retention_days", self.outbound_retention_days),
            ("dedup_retention_days", self.dedup_retention_days),
            ("batch_size", self.batch_size),
        ] {
            table.insert(key.into(), toml::Value::Integer(value));
        }
        let mut deadlines = toml::Table::new();
        let d = self.receipt_deadline_secs;
        for (key, value) in [
            ("crisis", d.crisis),
            ("priority", d.priority),
            ("routine", d.routine),
        ] {
            deadlines.insert(key.into(), toml::Value::Integer(value));
        }
        table.insert(
            "receipt_deadline_secs".into(),
            toml::Value::Table(deadlines),
        );
        for (key, value) in &self.extra {
            table.insert(key.clone(), value.clone());
        }
        toml::to_string(&table).expect("a TOML table serialises")
    }

    /// The agency ids in the configured registry.
    pub fn agencies(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.registry)
            .unwrap_or_else(|e| panic!("read registry {}: {e}", self.registry.display()));
        let table: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("registry {}: {e}", self.registry.display()));
        table
            .get("agency")
            .and_then(toml::Value::as_array)
            .map(|agencies| {
                agencies
                    .iter()
                    .filter_map(|a| a.get("id").and_then(toml::Value::as_str))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct BrokerProcess {
    dir: PathBuf,
    config: BrokerConfig,
    child: Option<Child>,
    starts: u32,
}

impl BrokerProcess {
    /// Sets the testing clock's offset (milliseconds added to the wall clock); the broker
    /// re-reads it at every tick. Panics unless the config used [`BrokerConfig::with_test_clock`].
    pub fn set_clock_offset(&self, ms: i64) {
        let path = self.config().extra["testing_clock_offset_file"]
            .as_str()
            .expect("the broker was configured with_test_clock");
        std::fs::write(path, ms.to_string()).expect("write the clock offset");
    }

    /// Writes `config` to `<dir>/broker.toml`, starts the broker and waits until it is ready.
    /// Unless `config.extra` names an `operators_file`, the broker gets one listing
    /// [`TEST_OPERATOR`].
    pub async fn start(dir: &Path, config: BrokerConfig) -> BrokerProcess {
        BrokerProcess::start_with(dir, config, true).await
    }

    async fn start_with(dir: &Path, mut config: BrokerConfig, wait_ready: bool) -> BrokerProcess {
        std::fs::create_dir_all(dir).expect("create broker dir");
        if !config.extra.contains_key("operators_file") {
            let file = write_test_operator(dir);
            config.extra.insert(
                "operators_file".into(),
                toml::Value::String(file.display().to_string()),
            );
        }
        if !config.extra.contains_key("signing_key_file") {
            // Sign as the broker, with its test key (the harness's registries list it).
            let key = dir.join("signing.key");
            crate::registry::write_test_key(yeongye_proto::BROKER_ID, &key);
            config.extra.insert(
                "signing_key_file".into(),
                toml::Value::String(key.display().to_string()),
            );
        }
        let mut broker = BrokerProcess {
            dir: dir.to_path_buf(),
            config,
            child: None,
            starts: 0,
        };
        broker.spawn();
        if wait_ready {
            broker.wait_ready().await;
        }
        broker
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("broker.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    /// [`TEST_OPERATOR`]'s token file.
    pub fn operator_token_file(&self) -> PathBuf {
        self.dir.join(OPERATOR_TOKEN_FILE)
    }

    pub fn log_tail(&self) -> String {
        process::tail(&self.log_path(), 6000)
    }

    /// How many times the broker has been started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (reaping it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => process::exited(child).is_none(),
            None => false,
        }
    }

    /// [`BrokerProcess::start`] for a broker that joins a group whose leader is another: waits
    /// until it follows the state log as a standby (a standby answers no queries).
    pub async fn start_standby(dir: &Path, config: BrokerConfig) -> BrokerProcess {
        let mut broker = BrokerProcess::start_with(dir, config, false).await;
        broker.wait_role("standby", READY_TIMEOUT).await;
        broker
    }

    /// SIGSTOP: the broker is frozen (its lease runs out, its connections stay open).
    pub fn freeze(&self) {
        process::signal(self.pid().expect("running"), "STOP");
    }

    /// SIGCONT after [`BrokerProcess::freeze`].
    pub fn thaw(&self) {
        process::signal(self.pid().expect("running"), "CONT");
    }

    /// The broker's `/api/v1/cluster` (None if it does not answer), read as the test operator
    /// (a broker whose endpoint is beyond loopback wants a token for reads too).
    pub async fn cluster(&self) -> Option<serde_json::Value> {
        let ops = crate::ops::OpsHttp::new(&self.config.http_addr).operator();
        let r = ops.try_request("GET", "/api/v1/cluster", None).await.ok()?;
        (r.status == 200).then(|| r.json())
    }

    /// What the broker says it is (`leader` or `standby`) and how far it has applied the state
    /// log, from [`BrokerProcess::cluster`]; None if it does not answer.
    pub async fn role(&self) -> Option<(String, u64)> {
        let c = self.cluster().await?;
        let role = c["role"].as_str()?.to_owned();
        Some((role, c["state_log_position"].as_u64().unwrap_or(0)))
    }

    /// Waits until the broker says it is `role` (`leader` or `standby`); panics with the log's
    /// tail after `timeout` or if it exits.
    pub async fn wait_role(&mut self, role: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = process::exited(child)
            {
                self.child = None;
                panic!("referral-broker exited ({status})\n{}", self.log_tail());
            }
            if self.role().await.is_some_and(|(r, _)| r == role) {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "referral-broker not {role} after {timeout:?}: {:?}\n{}",
                    self.cluster().await,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the broker (it must not be running) with the same configuration and store, and
    /// waits until it is ready. The configuration file is written again, so a test may change
    /// [`BrokerProcess::config_mut`] in between.
    pub async fn start_again(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts the broker again without waiting for anything (a standby is never "ready" in
    /// [`BrokerProcess::wait_ready`]'s sense: wait with [`BrokerProcess::wait_role`]).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        std::fs::write(self.config_path(), self.config.to_toml()).expect("write broker.toml");
        let bin = crate::workspace_bin("referral-broker");
        let mut cmd = crate::netns::command(&bin, self.config.place.as_deref());
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("run")
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("YEONGYE_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            );
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REFERRAL_") {
                cmd.env_remove(key);
            }
        }
        self.starts += 1;
        let marker = format!(
            "\n=== yeongye test harness: broker start #{} ===\n",
            self.starts
        );
        let _ = std::io::Write::write_all(
            &mut process::append_log(&self.log_path()),
            marker.as_bytes(),
        );
        self.child = Some(process::spawn_logged(&mut cmd, &self.log_path()));
    }

    pub fn config_mut(&mut self) -> &mut BrokerConfig {
        &mut self.config
    }

    /// SIGKILL and reap: the broker gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill9(&mut child);
        }
    }

    /// Kill -9, then start again on the same configuration and store.
    pub async fn restart(&mut self) {
        self.kill9();
        self.start_again().await;
    }

    /// SIGTERM, and asserts a clean exit (status 0) within 10 s.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("the broker is running");
        process::signal(child.id(), "TERM");
        match process::wait_exit_async(&mut child, STOP_TIMEOUT).await {
            Some(status) => assert!(
                status.success(),
                "the broker exited with {status} after SIGTERM\n{}",
                self.log_tail()
            ),
            None => {
                process::kill9(&mut child);
                panic!(
                    "the broker did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// Waits until the broker's consumers exist and it answers a status query; panics (with
    /// the log's tail) if it exits or takes longer than 30 s.
    pub async fn wait_ready(&mut self) {
        let agencies = self.config.agencies();
        let url = self.config.nats_urls[0].clone();
        let querier = agencies
            .first()
            .cloned()
            .unwrap_or_else(|| "nobody".to_owned());
        let wire = WireClient::connect(&url, &querier).await;
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = process::exited(child)
            {
                self.child = None;
                panic!(
                    "referral-broker exited ({status}) before it was ready\n{}",
                    self.log_tail()
                );
            }
            let Err(last) = ready(&wire, &agencies).await else {
                return;
            };
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "referral-broker not ready after {READY_TIMEOUT:?}: {last}\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `Ok` once everything the broker creates at start-up exists and it answers queries.
async fn ready(wire: &WireClient, agencies: &[String]) -> Result<(), String> {
    let js = wire.jetstream();
    let inbound = js
        .get_stream(subject::IN_STREAM)
        .await
        .map_err(|e| format!("stream {}: {e}", subject::IN_STREAM))?;
    inbound
        .consumer_info(subject::BROKER_CONSUMER)
        .await
        .map_err(|e| format!("consumer {}: {e}", subject::BROKER_CONSUMER))?;
    let outbound = js
        .get_stream(subject::OUT_STREAM)
        .await
        .map_err(|e| format!("stream {}: {e}", subject::OUT_STREAM))?;
    for agency in agencies {
        let name = subject::agency_consumer(agency);
        outbound
            .consumer_info(&name)
            .await
            .map_err(|e| format!("consumer {name}: {e}"))?;
    }
    wire.try_query(&crate::wire::new_id(), Duration::from_secs(1))
        .await
        .map(|_| ())
        .ok_or_else(|| "no reply to a status query".to_owned())
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}
