//! The end-to-end test harness: real `nats-server` processes and the real `referral-broker` and
//! `agency-adapter` binaries, driven from `tests/it/*.rs` (one integration-test binary).
//!
//! Nothing here is mocked. Each test starts its own nats-server (a fresh port and store in a
//! temporary directory), writes a registry and configuration files, spawns the binaries and then
//! talks to them the way agencies do: over NATS ([`wire`]), through the adapter's command line
//! ([`adapter::cli`]) or through the SDK ([`sdk`]).
//!
//! Run everything with `./tests/run.sh`, which installs the pinned nats-server and builds the
//! binaries first. `cargo test -p yeongye-tests` alone works too once those exist; the harness
//! panics with the command to run when they do not.
//!
//! # Layout
//! - [`nats`]: [`NatsServer`], a nats-server with JetStream on file storage.
//! - [`broker`]: [`BrokerProcess`] and its [`BrokerConfig`].
//! - [`adapter`]: [`AdapterProcess`] (the adapter's `run` loop, its stdout lines and inbox) and the
//!   one-shot command line.
//! - [`registry`]: writing agency registries.
//! - [`wire`]: [`WireClient`], a raw protocol client (envelopes, odd publishes, status queries), and
//!   the [`ReferralBuilder`].
//! - [`sdk`]: an in-process client built on the `yeongye_adapter` SDK.
//! - [`system`]: [`System`], all of the above wired together.
//! - [`http`]: the adapter's local HTTP API: [`http::ServeProcess`] (`agency-adapter serve`), a
//!   raw HTTP client and a webhook endpoint.
//! - [`ops`]: the broker's operator side: [`ops::OpsHttp`] (`/readyz`, `/metrics`, `/api/v1`),
//!   the `referral-broker` operator commands, Chromium and promtool.
//! - [`netns`]: [`netns::Lab`], network partitions made with network namespaces.
//! - [`process`]: spawning, signalling and log tails shared by the process wrappers.
//! - [`secure`]: [`secure::SecureSystem`], the same against a nats-server configured by
//!   `referral-broker init` / `agency add` (credentials, per-agency permissions, TLS), and raw
//!   connections that record the server's permission violations.
//! - this file: [`wait_until`] and the paths of the tools.

pub mod adapter;
pub mod broker;
pub mod http;
pub mod nats;
pub mod netns;
pub mod ops;
pub mod process;
pub mod registry;
pub mod sdk;
pub mod secure;
pub mod system;
pub mod wire;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use adapter::{AdapterProcess, Line};
pub use broker::{BrokerConfig, BrokerProcess};
pub use nats::{NatsCluster, NatsServer};
pub use system::System;
pub use wire::{ReferralBuilder, WireClient};
pub use yeongye_proto::v1;

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The directory cargo puts the workspace's binaries in: the test executable lives in
/// `target/<profile>/deps/`, the binaries in `target/<profile>/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("the test executable is in a directory");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// A workspace binary, or a panic that says how to build it.
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{name} not built: run cargo build --workspace --bins (./tests/run.sh does it); looked for {}",
        path.display()
    );
    path
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` with `what` and
/// whatever `context` says about the situation (log tails, counts).
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
    context: impl Fn() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_for`] with a synchronous predicate.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    wait_for(
        what,
        timeout,
        || std::future::ready(check().then_some(())),
        context,
    )
    .await;
}

/// Whether to keep a test's temporary directories (logs, stores, inboxes): after a panic, or
/// always when `YEONGYE_KEEP_TEST_DIRS` is set.
pub fn keep_test_dirs() -> bool {
    std::thread::panicking() || std::env::var_os("YEONGYE_KEEP_TEST_DIRS").is_some()
}

/// Milliseconds since the Unix epoch, as the protocol counts time.
pub fn now_ms() -> i64 {
    // The harness's one read of the wall clock (clippy.toml).
    #[allow(clippy::disallowed_methods)]
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since.as_millis()).expect("time fits in i64")
}

/// A small deterministic random source for tests that want random moments (xorshift64*). The
/// seed is printed by whoever makes one, so that a failure can be replayed with
/// `YEONGYE_TEST_SEED`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from `YEONGYE_TEST_SEED` if set, else from the clock. Prints the seed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("YEONGYE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| now_ms().unsigned_abs() ^ u64::from(std::process::id()));
        eprintln!("{test}: YEONGYE_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}
