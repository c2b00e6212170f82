//! Broker configuration: TOML file, then `REFERRAL_*` environment overrides, then `validate()`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::referral::Urgency;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS servers; several for a cluster.
    pub nats_urls: Vec<String>,
    /// The sled database directory.
    pub store_dir: PathBuf,
    /// The agency registry (see `deploy/agencies.toml`).
    pub registry: PathBuf,
    /// How long the inbound stream keeps messages (the broker replays from it).
    pub inbound_retention_days: u32,
    pub outbound_retention_days: u32,
    /// How long the broker remembers applied message ids (must outlast the inbound retention).
    pub dedup_retention_days: u32,
    /// Most inbound messages applied in one store batch.
    pub batch_size: usize,
    /// Longest message accepted on an inbound subject, bytes.
    pub max_message_bytes: usize,
    pub receipt_deadline_secs: ReceiptDeadlines,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptDeadlines {
    pub crisis: u64,
    pub priority: u64,
    pub routine: u64,
}

impl Default for ReceiptDeadlines {
    fn default() -> Self {
        // A household in crisis must be reached within the hour; others within a working day
        // or three.
        ReceiptDeadlines {
            crisis: 3600,
            priority: 24 * 3600,
            routine: 72 * 3600,
        }
    }
}

impl ReceiptDeadlines {
    pub fn for_urgency(&self, urgency: Urgency) -> Duration {
        Duration::from_secs(match urgency {
            Urgency::Crisis => self.crisis,
            Urgency::Priority => self.priority,
            Urgency::Routine => self.routine,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_urls: vec!["nats://127.0.0.1:4222".to_owned()],
            store_dir: PathBuf::from("broker-store"),
            registry: PathBuf::from("deploy/agencies.toml"),
            inbound_retention_days: 7,
            outbound_retention_days: 7,
            dedup_retention_days: 14,
            batch_size: 256,
            max_message_bytes: 256 * 1024,
            receipt_deadline_secs: ReceiptDeadlines::default(),
        }
    }
}

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

    pub fn from_toml(text: &str) -> std::result::Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// `REFERRAL_NATS_URLS` (comma-separated), `REFERRAL_STORE_DIR`, `REFERRAL_REGISTRY`,
    /// `REFERRAL_BATCH_SIZE`.
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
        if let Some(v) = var("REFERRAL_BATCH_SIZE") {
            self.batch_size = v.parse().map_err(|_| {
                Error::InvalidConfig(format!("REFERRAL_BATCH_SIZE={v:?} is not a whole number"))
            })?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.nats_urls.is_empty() || self.nats_urls.iter().any(|u| u.trim().is_empty()) {
            return bad("nats_urls must name at least one server, none empty".into());
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
        let d = &self.receipt_deadline_secs;
        for (name, secs) in [
            ("crisis", d.crisis),
            ("priority", d.priority),
            ("routine", d.routine),
        ] {
            if !(1..=90 * 24 * 3600).contains(&secs) {
                return bad(format!(
                    "receipt_deadline_secs.{name} = {secs} is not within 1 s..=90 days"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn parses_a_full_file() {
        let cfg = Config::from_toml(
            r#"
            nats_urls = ["nats://a:4222", "nats://b:4222"]
            store_dir = "/tmp/x"
            registry = "r.toml"
            batch_size = 10
            [receipt_deadline_secs]
            crisis = 60
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.nats_urls.len(), 2);
        assert_eq!(cfg.receipt_deadline_secs.crisis, 60);
        assert_eq!(cfg.receipt_deadline_secs.routine, 72 * 3600);
    }

    #[test]
    fn rejects_bad_files() {
        for (text, needle) in [
            ("nats_urls = [", "nats_urls"),
            ("unknown_key = 1", "unknown field"),
            ("batch_size = \"ten\"", "batch_size"),
            ("batch_size = -1", "batch_size"),
            ("[receipt_deadline_secs]\nweekly = 3", "weekly"),
        ] {
            let err = Config::from_toml(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        for text in [
            "nats_urls = []",
            "batch_size = 0",
            "dedup_retention_days = 1",
            "[receipt_deadline_secs]\ncrisis = 0",
            "max_message_bytes = 10",
        ] {
            let cfg = Config::from_toml(text).unwrap();
            assert!(cfg.validate().is_err(), "{text:?} should not validate");
        }
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
    }
}
