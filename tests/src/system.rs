//! [`System`]: one nats-server, a registry, the broker and an adapter per agency, in one
//! temporary directory.
//!
//! ```text
//! <tmp>/registry.toml
//! <tmp>/broker/{broker.toml, broker.log, store/}
//! <tmp>/adapters/<agency>/{adapter.toml, adapter.log, state/, inbox/}
//! ```
//! The nats-server keeps its own directory (see [`NatsServer`]). Everything is killed on drop;
//! on a panic, every process prints the tail of its log.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tempfile::TempDir;

use crate::adapter::AdapterProcess;
use crate::broker::{BrokerConfig, BrokerProcess};
use crate::nats::NatsServer;
use crate::registry;
use crate::wire::WireClient;

type ConfigTweak = Box<dyn FnOnce(&mut BrokerConfig)>;

/// How to start a [`System`].
pub struct SystemBuilder {
    agencies: Vec<String>,
    adapters: Option<Vec<String>>,
    tweak: Option<ConfigTweak>,
}

impl SystemBuilder {
    /// The registered agencies (default [`registry::DEFAULT_AGENCIES`]).
    pub fn agencies(mut self, agencies: &[&str]) -> Self {
        self.agencies = agencies.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Which agencies get a running adapter (default: all of them).
    pub fn adapters(mut self, agencies: &[&str]) -> Self {
        self.adapters = Some(agencies.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// Changes the broker's configuration before it starts.
    pub fn broker_config(mut self, tweak: impl FnOnce(&mut BrokerConfig) + 'static) -> Self {
        self.tweak = Some(Box::new(tweak));
        self
    }

    pub async fn start(self) -> System {
        let nats = NatsServer::start().await;
        let dir = tempfile::Builder::new()
            .prefix("yeongye-system-")
            .tempdir()
            .expect("tempdir");
        let registry_path = dir.path().join("registry.toml");
        let ids: Vec<&str> = self.agencies.iter().map(String::as_str).collect();
        registry::write(&registry_path, &ids);
        let broker_dir = dir.path().join("broker");
        let mut config = BrokerConfig::new(&nats.url(), &broker_dir.join("store"), &registry_path);
        if let Some(tweak) = self.tweak {
            tweak(&mut config);
        }
        let broker = BrokerProcess::start(&broker_dir, config).await;
        let mut system = System {
            adapters: BTreeMap::new(),
            broker,
            nats,
            agencies: self.agencies.clone(),
            registry: registry_path,
            dir: Some(dir),
        };
        for agency in self.adapters.unwrap_or(self.agencies) {
            system.start_adapter(&agency);
        }
        system
    }
}

/// A whole running system. Fields drop in order: adapters, broker, nats-server, files.
pub struct System {
    adapters: BTreeMap<String, AdapterProcess>,
    pub broker: BrokerProcess,
    pub nats: NatsServer,
    pub agencies: Vec<String>,
    pub registry: PathBuf,
    /// `None` only while dropping.
    dir: Option<TempDir>,
}

impl System {
    pub fn builder() -> SystemBuilder {
        SystemBuilder {
            agencies: registry::DEFAULT_AGENCIES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            adapters: None,
            tweak: None,
        }
    }

    /// The default system: four agencies, each with its adapter running.
    pub async fn start() -> System {
        System::builder().start().await
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    pub fn dir(&self) -> PathBuf {
        self.root().to_path_buf()
    }

    fn root(&self) -> &std::path::Path {
        self.dir.as_ref().expect("not dropped").path()
    }

    /// The directory an agency's adapter uses (whether or not it is running).
    pub fn adapter_dir(&self, agency: &str) -> PathBuf {
        self.root().join("adapters").join(agency)
    }

    /// Starts the adapter of `agency` (a first start, or again after [`System::remove_adapter`]).
    pub fn start_adapter(&mut self, agency: &str) -> &mut AdapterProcess {
        assert!(
            !self.adapters.contains_key(agency),
            "the adapter of {agency} is already started"
        );
        let mut config = crate::adapter::AdapterConfig {
            agency: agency.to_owned(),
            nats_urls: vec![self.url()],
            state_dir: self.adapter_dir(agency).join("state"),
            extra: toml::Table::new(),
        };
        // The system's registry: the recipients' sealing keys, the senders' signing keys.
        config.extra.insert(
            "registry".into(),
            toml::Value::String(self.registry.display().to_string()),
        );
        let adapter = AdapterProcess::start_with(&self.adapter_dir(agency), config);
        self.adapters.entry(agency.to_owned()).or_insert(adapter)
    }

    pub fn adapter(&self, agency: &str) -> &AdapterProcess {
        self.adapters
            .get(agency)
            .unwrap_or_else(|| panic!("no adapter for {agency}"))
    }

    pub fn adapter_mut(&mut self, agency: &str) -> &mut AdapterProcess {
        self.adapters
            .get_mut(agency)
            .unwrap_or_else(|| panic!("no adapter for {agency}"))
    }

    pub fn adapters(&self) -> impl Iterator<Item = &AdapterProcess> {
        self.adapters.values()
    }

    /// A raw protocol client for `agency`.
    pub async fn wire(&self, agency: &str) -> WireClient {
        WireClient::connect(&self.url(), agency).await
    }

    /// Logs of everything, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = self.broker.log_tail();
        for adapter in self.adapters.values() {
            out.push('\n');
            out.push_str(&adapter.describe());
        }
        out.push('\n');
        out.push_str(&self.nats.log_tail());
        out
    }
}

impl Drop for System {
    /// On a panic (or with `YEONGYE_KEEP_TEST_DIRS` set) the directory and its logs are kept.
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take()
            && crate::keep_test_dirs()
        {
            eprintln!("test system files kept in {}", dir.keep().display());
        }
    }
}
