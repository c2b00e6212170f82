//! An in-process agency client built on the `yeongye_adapter` SDK (the library the
//! `agency-adapter` binary is made of), for tests that drive the SDK's API directly.
//!
//! Each client gets its own state directory (`<system>/sdk/<agency>`): the SDK's dedup store is
//! locked by whoever reads the agency's queue, so do not also run the adapter process of the
//! same agency if the test calls `incoming()`.

use std::path::Path;
use std::time::Duration;

use yeongye_adapter::{Adapter, AdapterConfig, ItemKind};
use yeongye_proto::v1;

use crate::System;

/// Connects the SDK as `agency` to the server at `url`, with state in `state_dir`.
pub async fn connect_to(url: &str, agency: &str, state_dir: &Path) -> Adapter {
    connect_to_all(&[url.to_owned()], agency, state_dir).await
}

/// Connects the SDK as `agency` to any of the servers at `urls` (a cluster), with state in
/// `state_dir`.
pub async fn connect_to_all(urls: &[String], agency: &str, state_dir: &Path) -> Adapter {
    let url = urls.join(",");
    let mut cfg = AdapterConfig::new(agency, urls.iter().cloned(), state_dir);
    let key = state_dir.with_extension("signing.key");
    crate::registry::write_test_key(agency, &key);
    cfg.signing_key_file = Some(key);
    let sealing = state_dir.with_extension("sealing.key");
    crate::registry::write_test_sealing_key(agency, &sealing);
    cfg.sealing_key_file = Some(sealing);
    let registry = state_dir.with_extension("registry.toml");
    crate::registry::write(&registry, &crate::registry::local_agencies(agency));
    cfg.registry = Some(registry);
    Adapter::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("SDK connect as {agency} to {url}: {e}"))
}

/// Connects the SDK as `agency` to the system's nats-server.
pub async fn connect(system: &System, agency: &str) -> Adapter {
    let state = system.dir().join("sdk").join(agency);
    connect_to(&system.url(), agency, &state).await
}

/// What an SDK client took from its queue, in order (the items are marked done).
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// Referral ids of deliveries.
    pub deliveries: Vec<String>,
    /// (referral id, state) of notifications.
    pub notifications: Vec<(String, v1::ReferralState)>,
    pub rejections: Vec<v1::Rejection>,
}

/// Reads the agency's queue through the SDK, handing each item over (recording it) and marking
/// it done, until `until` holds or `timeout` passes (then panics with what came).
pub async fn receive_until(
    adapter: &Adapter,
    timeout: Duration,
    until: impl Fn(&Received) -> bool,
) -> Received {
    let mut incoming = adapter
        .incoming()
        .await
        .unwrap_or_else(|e| panic!("SDK incoming(): {e}"));
    let mut got = Received::default();
    let deadline = tokio::time::Instant::now() + timeout;
    while !until(&got) {
        let next = tokio::time::timeout_at(deadline, incoming.next())
            .await
            .unwrap_or_else(|_| panic!("SDK: timed out after {timeout:?}; received {got:#?}"))
            .unwrap_or_else(|| panic!("SDK: incoming ended; received {got:#?}"))
            .unwrap_or_else(|e| panic!("SDK: incoming error {e}; received {got:#?}"));
        match next.kind() {
            ItemKind::Delivery { referral, .. } => {
                got.deliveries.push(referral.referral_id.clone());
            }
            ItemKind::Notification(n) => {
                got.notifications.push((n.referral_id.clone(), n.state()));
            }
            ItemKind::Rejection(r) => got.rejections.push(r.clone()),
            _ => {}
        }
        next.done()
            .await
            .unwrap_or_else(|e| panic!("SDK: done(): {e}"));
    }
    got
}
