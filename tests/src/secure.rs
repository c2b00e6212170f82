//! Secured systems, for the security tests: identities made by the real `referral-broker init`
//! and `referral-broker agency add`, a nats-server started with the NATS configuration those
//! commands generate (optionally TLS, with certificates made here), the broker and adapters
//! configured with their credentials files, and raw NATS connections as one agency that record
//! every error the server reports (permission violations arrive only that way).
//!
//! ```text
//! <tmp>/pki/{ca.pem, server.pem, server.key}            with TLS
//! <tmp>/registry.toml  <tmp>/secrets/<who>/{signing.key, nats.creds}  <tmp>/nats-auth.conf
//! <tmp>/nats/{nats.conf, nats.log, js/}
//! <tmp>/broker/...   <tmp>/adapters/<agency>/...
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use yeongye_proto::credentials::Credentials;

use crate::adapter::{AdapterConfig, AdapterProcess};
use crate::broker::BrokerConfig;
use crate::process;

/// How long a starting server or broker may take.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A certificate authority and a server certificate it signed, for `127.0.0.1` and
/// `localhost`, as PEM files.
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    /// Makes a CA and a server certificate in `dir`.
    pub fn generate(dir: &Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).expect("create pki dir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Yeongye test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca, ca_key);

        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "yeongye-test-nats");
        server.use_authority_key_identifier_extension = true;
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .expect("sign the server certificate");

        let pki = Pki {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        };
        std::fs::write(&pki.ca_cert, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&pki.server_cert, server_cert.pem()).expect("write server.pem");
        std::fs::write(&pki.server_key, server_key.serialize_pem()).expect("write server.key");
        pki
    }
}

/// The files `referral-broker init` and `agency add` wrote.
#[derive(Debug, Clone)]
pub struct Identities {
    pub registry: PathBuf,
    pub secrets: PathBuf,
    pub nats_conf: PathBuf,
}

impl Identities {
    /// Runs `referral-broker init` (with the server certificate of `pki`, if given) and
    /// `referral-broker agency add` for each agency, in `dir`.
    pub fn generate(dir: &Path, agencies: &[&str], pki: Option<&Pki>) -> Identities {
        let ids = Identities {
            registry: dir.join("registry.toml"),
            secrets: dir.join("secrets"),
            nats_conf: dir.join("nats-auth.conf"),
        };
        let mut init = vec!["init".to_owned()];
        init.extend(ids.file_args());
        if let Some(pki) = pki {
            init.extend([
                "--tls-cert".to_owned(),
                pki.server_cert.display().to_string(),
                "--tls-key".to_owned(),
                pki.server_key.display().to_string(),
            ]);
        }
        ids.run(&init);
        for agency in agencies {
            let mut add = vec![
                "agency".to_owned(),
                "add".to_owned(),
                (*agency).to_owned(),
                "--name".to_owned(),
                format!("시험 기관 {agency}"),
                "--kind".to_owned(),
                "other".to_owned(),
            ];
            add.extend(ids.file_args());
            ids.run(&add);
        }
        ids
    }

    fn file_args(&self) -> Vec<String> {
        vec![
            "--registry".to_owned(),
            self.registry.display().to_string(),
            "--secrets".to_owned(),
            self.secrets.display().to_string(),
            "--nats-conf".to_owned(),
            self.nats_conf.display().to_string(),
        ]
    }

    /// Runs `referral-broker <args>` and returns its output; panics if it fails.
    pub fn run(&self, args: &[String]) -> std::process::Output {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "referral-broker {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `referral-broker <args>` and returns its output, whatever the exit status.
    pub fn try_run(&self, args: &[String]) -> std::process::Output {
        Command::new(crate::workspace_bin("referral-broker"))
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("REFERRAL_CONFIG")
            .output()
            .unwrap_or_else(|e| panic!("cannot run referral-broker {args:?}: {e}"))
    }

    /// `<secrets>/<who>/nats.creds`.
    pub fn creds(&self, who: &str) -> PathBuf {
        self.secrets.join(who).join("nats.creds")
    }

    /// `<secrets>/<who>/signing.key`.
    pub fn signing_key(&self, who: &str) -> PathBuf {
        self.secrets.join(who).join("signing.key")
    }

    /// `<secrets>/<who>/sealing.key` (agencies only).
    pub fn sealing_key(&self, who: &str) -> PathBuf {
        self.secrets.join(who).join("sealing.key")
    }
}

/// A nats-server whose configuration includes the generated authorization (and TLS) config;
/// monitoring on loopback only. nats-server resolves `include` relative to the including file
/// (absolute paths are not taken), so its config is written beside the generated one.
pub struct SecureNats {
    dir: PathBuf,
    port: u16,
    http_port: u16,
    child: Option<Child>,
}

impl SecureNats {
    pub async fn start(dir: &Path, ids: &Identities) -> SecureNats {
        std::fs::create_dir_all(dir).expect("create nats dir");
        let auth_name = ids.nats_conf.file_name().expect("a file name");
        let config_path = ids.nats_conf.with_file_name("nats-server.conf");
        let mut server = SecureNats {
            dir: dir.to_path_buf(),
            port: 0,
            http_port: 0,
            child: None,
        };
        for attempt in 1..=5 {
            server.port = process::free_port();
            server.http_port = process::free_port();
            let config = format!(
                "# Written by the yeongye test harness (security tests).\n\
                 listen: 127.0.0.1:{port}\n\
                 # The monitoring port has no authentication: loopback only.\n\
                 http: 127.0.0.1:{http}\n\
                 max_payload: 1MB\n\
                 jetstream {{\n  store_dir: \"{js}\"\n  sync_interval: always\n}}\n\
                 include \"{auth}\"\n",
                port = server.port,
                http = server.http_port,
                js = dir.join("js").display(),
                auth = auth_name.display(),
            );
            std::fs::write(&config_path, config).expect("write nats-server.conf");
            let mut cmd = Command::new(crate::NatsServer::binary());
            cmd.arg("-c").arg(&config_path);
            let before = server.ready_lines();
            server.child = Some(process::spawn_logged(&mut cmd, &server.log_path()));
            if server.wait_ready(before).await {
                return server;
            }
            eprintln!(
                "nats-server did not start (attempt {attempt})\n{}",
                server.log_tail()
            );
            server.kill9();
        }
        panic!("nats-server would not start\n{}", server.log_tail());
    }

    fn ready_lines(&self) -> usize {
        std::fs::read_to_string(self.log_path())
            .map(|s| s.matches("Server is ready").count())
            .unwrap_or(0)
    }

    async fn wait_ready(&mut self, before: usize) -> bool {
        let start = Instant::now();
        while start.elapsed() < READY_TIMEOUT {
            let Some(child) = self.child.as_mut() else {
                return false;
            };
            if process::exited(child).is_some() {
                self.child = None;
                return false;
            }
            if self.ready_lines() > before
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The streams and their consumers as the server's monitoring endpoint (`/jsz`) reports
    /// them: an observer that needs no NATS identity, so the tests can check what happened to
    /// the streams without giving anyone (the broker included) more rights than it has.
    pub async fn streams(&self) -> Vec<StreamState> {
        let url = format!(
            "http://127.0.0.1:{}/jsz?streams=true&consumers=true",
            self.http_port
        );
        let jsz: serde_json::Value = tokio::task::spawn_blocking(move || {
            let mut response = ureq::get(&url).call().expect("GET /jsz");
            response.body_mut().read_json().expect("/jsz is JSON")
        })
        .await
        .expect("the blocking /jsz call");
        let mut out = Vec::new();
        for account in jsz["account_details"].as_array().into_iter().flatten() {
            for stream in account["stream_detail"].as_array().into_iter().flatten() {
                let consumers = stream["consumer_detail"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| ConsumerState {
                        name: c["name"].as_str().unwrap_or_default().to_owned(),
                        num_pending: c["num_pending"].as_u64().unwrap_or(0),
                        ack_pending: c["num_ack_pending"].as_u64().unwrap_or(0),
                    })
                    .collect();
                out.push(StreamState {
                    name: stream["name"].as_str().unwrap_or_default().to_owned(),
                    messages: stream["state"]["messages"].as_u64().unwrap_or(0),
                    first_seq: stream["state"]["first_seq"].as_u64().unwrap_or(0),
                    last_seq: stream["state"]["last_seq"].as_u64().unwrap_or(0),
                    consumers,
                });
            }
        }
        out
    }

    /// One stream's state by name, panicking if the server has no such stream.
    pub async fn stream(&self, name: &str) -> StreamState {
        self.streams()
            .await
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("the server has no stream {name}"))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    pub fn log_tail(&self) -> String {
        process::tail(&self.log_path(), 4000)
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill9(&mut child);
        }
    }
}

impl Drop for SecureNats {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// A stream as `/jsz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    pub name: String,
    pub messages: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub consumers: Vec<ConsumerState>,
}

impl StreamState {
    pub fn consumer(&self, name: &str) -> Option<&ConsumerState> {
        self.consumers.iter().find(|c| c.name == name)
    }
}

/// A consumer as `/jsz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerState {
    pub name: String,
    /// Messages not yet delivered to it.
    pub num_pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
}

/// A raw NATS connection as one user, with every error the server sent it.
#[derive(Clone)]
pub struct Conn {
    pub client: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
}

/// How to connect a [`Conn`].
#[derive(Debug, Clone, Default)]
pub struct ConnectAs {
    /// The credentials file to log in with (none: anonymous).
    pub creds: Option<PathBuf>,
    /// The inbox prefix (`_INBOX_<agency>` for an agency; none: the shared `_INBOX`).
    pub inbox_prefix: Option<String>,
    /// The CA to trust (TLS required); none: the system's roots, TLS only if the server asks.
    pub ca: Option<PathBuf>,
}

impl ConnectAs {
    /// An agency as its adapter connects: its credentials and its own inbox prefix.
    pub fn agency(ids: &Identities, agency: &str) -> ConnectAs {
        ConnectAs {
            creds: Some(ids.creds(agency)),
            inbox_prefix: Some(yeongye_proto::subject::inbox_prefix(agency)),
            ca: None,
        }
    }

    pub fn with_ca(mut self, ca: &Path) -> ConnectAs {
        self.ca = Some(ca.to_path_buf());
        self
    }

    /// Connects once (no retries); the error as text if it fails.
    pub async fn try_connect(&self, url: &str) -> Result<Conn, String> {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&errors);
        let mut options = async_nats::ConnectOptions::new()
            .name("yeongye-security-test")
            .max_reconnects(Some(1))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let sink = Arc::clone(&sink);
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        sink.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(e.to_string());
                    }
                }
            });
        if let Some(path) = &self.creds {
            let c = Credentials::load(path).map_err(|e| e.to_string())?;
            options = options.user_and_password(c.user, c.password);
        }
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = options.connect(url).await.map_err(|e| e.to_string())?;
        // A refused login may surface only after the handshake: make a round trip.
        client.flush().await.map_err(|e| e.to_string())?;
        Ok(Conn { client, errors })
    }

    pub async fn connect(&self, url: &str) -> Conn {
        self.try_connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url} as {self:?}: {e}"))
    }
}

impl Conn {
    /// Every error the server sent so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until the server reported a permissions violation on a subject that starts with
    /// `subject` (for a publish or a subscription); panics after 10 s with the errors seen.
    pub async fn wait_violation(&self, subject: &str) {
        let needle = format!("\"{}", subject.to_lowercase());
        let hit = |e: &String| {
            let e = e.to_lowercase();
            e.contains("permissions violation") && e.contains(&needle)
        };
        crate::wait_until(
            &format!("a permissions violation for {subject}"),
            Duration::from_secs(10),
            || self.errors().iter().any(hit),
            || format!("server errors so far: {:#?}", self.errors()),
        )
        .await;
    }

    /// The JetStream context of this connection (replies on its inbox prefix).
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        let mut js = async_nats::jetstream::new(self.client.clone());
        js.set_timeout(Duration::from_secs(3));
        js
    }
}

/// The broker process, configured with its credentials (and the CA, with TLS).
pub struct SecureBroker {
    dir: PathBuf,
    /// The operators' HTTP endpoint, `host:port`.
    pub http_addr: String,
    child: Option<Child>,
}

impl SecureBroker {
    pub async fn start(dir: &Path, url: &str, ids: &Identities, ca: Option<&Path>) -> SecureBroker {
        SecureBroker::start_logged(dir, url, ids, ca, None).await
    }

    /// [`start`](Self::start), with `RUST_LOG` set to `rust_log` if given.
    pub async fn start_logged(
        dir: &Path,
        url: &str,
        ids: &Identities,
        ca: Option<&Path>,
        rust_log: Option<&str>,
    ) -> SecureBroker {
        std::fs::create_dir_all(dir).expect("create broker dir");
        let mut config = BrokerConfig::new(url, &dir.join("store"), &ids.registry);
        let s = |p: &Path| toml::Value::String(p.display().to_string());
        config
            .extra
            .insert("nats_credentials_file".into(), s(&ids.creds("broker")));
        config
            .extra
            .insert("signing_key_file".into(), s(&ids.signing_key("broker")));
        if let Some(ca) = ca {
            config.extra.insert("nats_tls_ca_file".into(), s(ca));
        }
        // Snapshots and trims of the state log often, so that every test against the
        // generated permissions exercises them too.
        config
            .extra
            .insert("snapshot_every_records".into(), toml::Value::Integer(10));
        let config_path = dir.join("broker.toml");
        std::fs::write(&config_path, config.to_toml()).expect("write broker.toml");
        let mut cmd = Command::new(crate::workspace_bin("referral-broker"));
        cmd.arg("--config")
            .arg(&config_path)
            .arg("run")
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                rust_log.map_or_else(crate::adapter::test_log, str::to_owned),
            );
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REFERRAL_") {
                cmd.env_remove(key);
            }
        }
        let mut broker = SecureBroker {
            dir: dir.to_path_buf(),
            http_addr: config.http_addr.clone(),
            child: None,
        };
        broker.child = Some(process::spawn_logged(&mut cmd, &broker.log_path()));
        // "broker ready" is logged once the streams and every agency's consumer exist.
        let start = Instant::now();
        loop {
            if let Some(child) = broker.child.as_mut()
                && let Some(status) = process::exited(child)
            {
                panic!(
                    "referral-broker exited ({status}) before it was ready\n{}",
                    broker.log_tail()
                );
            }
            let log = std::fs::read_to_string(broker.log_path()).unwrap_or_default();
            if log.contains("broker ready") {
                return broker;
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "referral-broker not ready after {READY_TIMEOUT:?}\n{}",
                broker.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    pub fn log_tail(&self) -> String {
        process::tail(&self.log_path(), 6000)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| process::exited(c).is_none())
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill9(&mut child);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// An adapter's configuration for `agency`: its credentials file, signing key and the registry
/// (to check relayed signatures), and the CA if given.
pub fn adapter_config(
    dir: &Path,
    agency: &str,
    url: &str,
    ids: &Identities,
    ca: Option<&Path>,
) -> AdapterConfig {
    let s = |p: &Path| toml::Value::String(p.display().to_string());
    let mut extra = toml::Table::new();
    extra.insert("nats_credentials_file".into(), s(&ids.creds(agency)));
    if let Some(ca) = ca {
        extra.insert("tls_ca_file".into(), s(ca));
    }
    extra.insert("signing_key_file".into(), s(&ids.signing_key(agency)));
    extra.insert("sealing_key_file".into(), s(&ids.sealing_key(agency)));
    extra.insert("registry".into(), s(&ids.registry));
    AdapterConfig {
        agency: agency.to_owned(),
        nats_urls: vec![url.to_owned()],
        state_dir: dir.join("state"),
        extra,
    }
}

/// Identities, a nats-server with the generated configuration, and the broker. Adapters are
/// started by the test ([`SecureSystem::start_adapter`]). Dropped in order: adapters, broker,
/// server, files.
pub struct SecureSystem {
    adapters: std::collections::BTreeMap<String, AdapterProcess>,
    pub broker: SecureBroker,
    pub nats: SecureNats,
    pub ids: Identities,
    pub pki: Option<Pki>,
    dir: Option<TempDir>,
    /// `RUST_LOG` of the broker and adapters; `None`: `YEONGYE_TEST_LOG`, else `info`.
    rust_log: Option<String>,
}

impl SecureSystem {
    /// With `tls`, the server requires TLS and everyone trusts the test CA.
    pub async fn start(agencies: &[&str], tls: bool) -> SecureSystem {
        SecureSystem::start_logged(agencies, tls, None).await
    }

    /// [`start`](Self::start), with `RUST_LOG` of the broker and every adapter set to
    /// `rust_log` if given.
    pub async fn start_logged(
        agencies: &[&str],
        tls: bool,
        rust_log: Option<&str>,
    ) -> SecureSystem {
        let dir = tempfile::Builder::new()
            .prefix("yeongye-secure-")
            .tempdir()
            .expect("tempdir");
        let pki = tls.then(|| Pki::generate(&dir.path().join("pki")));
        let ids = Identities::generate(dir.path(), agencies, pki.as_ref());
        let nats = SecureNats::start(&dir.path().join("nats"), &ids).await;
        let ca = pki.as_ref().map(|p| p.ca_cert.clone());
        let broker = SecureBroker::start_logged(
            &dir.path().join("broker"),
            &nats.url(),
            &ids,
            ca.as_deref(),
            rust_log,
        )
        .await;
        SecureSystem {
            adapters: std::collections::BTreeMap::new(),
            broker,
            nats,
            ids,
            pki,
            dir: Some(dir),
            rust_log: rust_log.map(str::to_owned),
        }
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.as_ref().expect("not dropped").path().to_path_buf()
    }

    /// The test CA's certificate, with TLS.
    pub fn ca(&self) -> Option<PathBuf> {
        self.pki.as_ref().map(|p| p.ca_cert.clone())
    }

    /// How `agency` connects (credentials, inbox prefix, and the CA with TLS).
    pub fn connect_as(&self, agency: &str) -> ConnectAs {
        let c = ConnectAs::agency(&self.ids, agency);
        match self.ca() {
            Some(ca) => c.with_ca(&ca),
            None => c,
        }
    }

    /// The directory of an agency's adapter.
    pub fn adapter_dir(&self, agency: &str) -> PathBuf {
        self.dir().join("adapters").join(agency)
    }

    /// The configuration an agency's adapter runs with.
    pub fn adapter_config(&self, agency: &str) -> AdapterConfig {
        adapter_config(
            &self.adapter_dir(agency),
            agency,
            &self.url(),
            &self.ids,
            self.ca().as_deref(),
        )
    }

    /// Starts `agency`'s adapter (`run --inbox`).
    pub fn start_adapter(&mut self, agency: &str) -> &mut AdapterProcess {
        let config = self.adapter_config(agency);
        self.start_adapter_with(config)
    }

    /// Starts an adapter (`run --inbox`) with a configuration of the caller's.
    pub fn start_adapter_with(&mut self, config: AdapterConfig) -> &mut AdapterProcess {
        let agency = config.agency.clone();
        let adapter = AdapterProcess::start_logged(
            &self.adapter_dir(&agency),
            config,
            self.rust_log.as_deref(),
        );
        self.adapters.entry(agency).or_insert(adapter)
    }

    pub fn adapter(&self, agency: &str) -> &AdapterProcess {
        self.adapters
            .get(agency)
            .unwrap_or_else(|| panic!("no adapter for {agency}"))
    }

    /// Stops the broker (SIGTERM, then kill -9 after 10 s) and starts it again on the same
    /// store, configuration and identities, so that it reads a changed registry (the secure
    /// broker has no operators file for `registry reload`). Its earlier log is kept as
    /// `broker.log.<n>`, so that readiness is judged on the new one.
    pub async fn restart_broker(&mut self) {
        self.restart_broker_with(false).await;
    }

    /// [`restart_broker`](Self::restart_broker) on an empty store: the old one is moved to
    /// `store.old`, and the broker restores from the newest snapshot.
    pub async fn restart_broker_on_an_empty_store(&mut self) {
        self.restart_broker_with(true).await;
    }

    async fn restart_broker_with(&mut self, empty_store: bool) {
        if let Some(mut child) = self.broker.child.take() {
            process::signal(child.id(), "TERM");
            if process::wait_exit(&mut child, Duration::from_secs(10)).is_none() {
                process::kill9(&mut child);
            }
        }
        let dir = self.dir().join("broker");
        let mut n = 1;
        while dir.join(format!("broker.log.{n}")).exists() {
            n += 1;
        }
        std::fs::rename(self.broker.log_path(), dir.join(format!("broker.log.{n}")))
            .expect("keep the broker's log");
        if empty_store {
            std::fs::rename(dir.join("store"), dir.join("store.old")).expect("move the store");
        }
        let ca = self.ca();
        self.broker = SecureBroker::start_logged(
            &dir,
            &self.url(),
            &self.ids,
            ca.as_deref(),
            self.rust_log.as_deref(),
        )
        .await;
    }

    /// Logs of everything, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = self.broker.log_tail();
        for a in self.adapters.values() {
            out.push('\n');
            out.push_str(&a.describe());
        }
        out.push('\n');
        out.push_str(&self.nats.log_tail());
        out
    }
}

impl Drop for SecureSystem {
    fn drop(&mut self) {
        self.adapters.clear();
        if let Some(dir) = self.dir.take()
            && crate::keep_test_dirs()
        {
            eprintln!("secure system files kept in {}", dir.keep().display());
        }
    }
}
