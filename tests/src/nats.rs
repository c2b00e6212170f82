//! [`NatsServer`]: a real nats-server with JetStream on file storage, one per test.
//!
//! The binary is `$YEONGYE_NATS_SERVER`, else `<repo>/.tools/nats/bin/nats-server` (installed by
//! `deploy/install-nats.sh`); never one found on `PATH`, so that every run uses the pinned version.
//! The server gets its own temporary directory: the config file, the JetStream store (`js/`,
//! `sync_interval: always`, as in production) and its log (`nats.log`). A restart keeps the port
//! and the store.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process;

/// Where servers listen unless placed in a [`crate::netns::Lab`].
const LOOPBACK: &str = "127.0.0.1";

/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct NatsServer {
    /// `None` only while dropping.
    dir: Option<TempDir>,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    /// "Server is ready" lines in the log before the current process was spawned.
    ready_before: usize,
    /// Its place in a cluster ([`NatsCluster`]); `None`: a single server.
    cluster: Option<Node>,
    /// The address it listens on (client and route ports): loopback, or its place's address.
    host: String,
    /// Its network namespace in a [`crate::netns::Lab`]; `None`: the test's own.
    place: Option<String>,
}

/// A cluster node's name, its route port, and every node's route port.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    route_port: u16,
    routes: Vec<u16>,
    /// Every node's host, in the order of `routes`.
    hosts: Vec<String>,
}

/// Three (or `n`) real nats-servers on loopback in one JetStream cluster (NATS's own Raft:
/// the tests of replicated streams and node loss run on it). Each node has its own ports,
/// store and log, like a [`NatsServer`], and can be killed and started again alone.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until JetStream answers (its meta leader is elected).
    pub async fn start(n: usize) -> NatsCluster {
        NatsCluster::start_placed(vec![None; n]).await
    }

    /// Starts one node in each of `places` (a [`crate::netns::Lab`]'s place name and address),
    /// on the nats ports 4222 and 6222 of its own address, so that [`crate::netns::Lab::cut`]
    /// can partition it.
    pub async fn start_in(places: Vec<(String, String)>) -> NatsCluster {
        NatsCluster::start_placed(places.into_iter().map(Some).collect()).await
    }

    async fn start_placed(places: Vec<Option<(String, String)>>) -> NatsCluster {
        let n = places.len();
        let bin = NatsServer::binary();
        let hosts: Vec<String> = places
            .iter()
            .map(|p| p.as_ref().map_or(LOOPBACK.to_owned(), |(_, a)| a.clone()))
            .collect();
        let route_ports: Vec<u16> = places
            .iter()
            .map(|p| {
                if p.is_some() {
                    6222
                } else {
                    process::free_port()
                }
            })
            .collect();
        let mut nodes: Vec<NatsServer> = (0..n)
            .map(|i| NatsServer {
                dir: Some(
                    tempfile::Builder::new()
                        .prefix("yeongye-nats-node-")
                        .tempdir()
                        .expect("tempdir"),
                ),
                bin: bin.clone(),
                port: if places[i].is_some() {
                    4222
                } else {
                    process::free_port()
                },
                child: None,
                ready_before: 0,
                cluster: Some(Node {
                    name: format!("n{}", i + 1),
                    route_port: route_ports[i],
                    routes: route_ports.clone(),
                    hosts: hosts.clone(),
                }),
                host: hosts[i].clone(),
                place: places[i].as_ref().map(|(name, _)| name.clone()),
            })
            .collect();
        for node in &mut nodes {
            node.write_config();
            node.spawn();
        }
        for node in &mut nodes {
            assert!(
                node.wait_ready().await,
                "cluster node did not start\n{}",
                node.log_tail()
            );
        }
        let cluster = NatsCluster { nodes };
        cluster.wait_jetstream().await;
        cluster
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Waits until JetStream answers an account query on every running node (a cluster
    /// needs a meta leader before it does).
    pub async fn wait_jetstream(&self) {
        let start = Instant::now();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let client = node.connect().await;
            let js = async_nats::jetstream::new(client);
            loop {
                if js.query_account().await.is_ok() {
                    break;
                }
                assert!(
                    start.elapsed() < READY_TIMEOUT * 2,
                    "JetStream not answering on {}\n{}",
                    node.url(),
                    node.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl NatsServer {
    /// The nats-server binary the tests use, or a panic saying how to install it.
    pub fn binary() -> PathBuf {
        let path = match std::env::var_os("YEONGYE_NATS_SERVER") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => crate::repo_root().join(".tools/nats/bin/nats-server"),
        };
        assert!(
            path.is_file(),
            "nats-server not found: run ./deploy/install-nats.sh (./tests/run.sh does it); looked for {}",
            path.display()
        );
        path
    }

    /// Starts a server on a free port with a fresh store, and waits until it accepts
    /// connections.
    pub async fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("yeongye-nats-")
            .tempdir()
            .expect("tempdir");
        let mut server = NatsServer {
            dir: Some(dir),
            bin: NatsServer::binary(),
            port: 0,
            child: None,
            ready_before: 0,
            cluster: None,
            host: LOOPBACK.to_owned(),
            place: None,
        };
        // The port was free when picked but another test may take it first: try a few.
        for attempt in 1..=5 {
            server.port = process::free_port();
            server.write_config();
            server.spawn();
            if server.wait_ready().await {
                return server;
            }
            eprintln!(
                "nats-server did not start on port {} (attempt {attempt}); retrying\n{}",
                server.port,
                server.log_tail()
            );
            server.kill9();
        }
        panic!("nats-server would not start\n{}", server.log_tail());
    }

    fn root(&self) -> &std::path::Path {
        self.dir.as_ref().expect("not dropped").path()
    }

    /// Its network namespace, if placed in a [`crate::netns::Lab`].
    pub fn place(&self) -> Option<&str> {
        self.place.as_deref()
    }

    /// Its server name in a cluster (`n1`, ...), as JetStream names a stream's leader.
    pub fn name(&self) -> Option<&str> {
        self.cluster.as_ref().map(|node| node.name.as_str())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.root().join("js")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root().join("nats.log")
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        process::tail(&self.log_path(), 4000)
    }

    /// Connects a plain client (no retries beyond the defaults).
    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.url(), self.log_tail()))
    }

    /// SIGKILL: with `sync_interval: always` nothing acknowledged is lost.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill9(&mut child);
        }
    }

    /// SIGTERM (a clean shutdown), waiting for the exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::signal(child.id(), "TERM");
            if process::wait_exit_async(&mut child, Duration::from_secs(15))
                .await
                .is_none()
            {
                process::kill9(&mut child);
                panic!("nats-server ignored SIGTERM for 15 s\n{}", self.log_tail());
            }
        }
    }

    /// Starts the server again on the same port and store (after [`NatsServer::kill9`] or
    /// [`NatsServer::stop`]) and waits until it is ready.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is still running");
        // The old socket may linger for a moment: retry for a while on the same port.
        let start = Instant::now();
        loop {
            self.spawn();
            if self.wait_ready().await {
                return;
            }
            self.kill9();
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "nats-server did not come back on port {}\n{}",
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kill -9 and start again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill9();
        self.start_again().await;
    }

    fn write_config(&self) {
        let js = self.store_dir();
        let mut config = format!(
            "# Written by the yeongye test harness.\n\
             listen: {host}:{port}\n\
             max_payload: 1MB\n\
             jetstream {{\n  store_dir: \"{js}\"\n  sync_interval: always\n}}\n",
            host = self.host,
            port = self.port,
            js = js.display(),
        );
        if let Some(node) = &self.cluster {
            let routes: Vec<String> = node
                .routes
                .iter()
                .zip(&node.hosts)
                .map(|(p, h)| format!("\"nats-route://{h}:{p}\""))
                .collect();
            config.push_str(&format!(
                "server_name: {name}\n\
                 cluster {{\n  name: yeongye-test\n  listen: {host}:{port}\n  routes: [{routes}]\n}}\n",
                name = node.name,
                host = self.host,
                port = node.route_port,
                routes = routes.join(", "),
            ));
        }
        std::fs::write(self.root().join("nats.conf"), config).expect("write nats.conf");
    }

    fn spawn(&mut self) {
        self.ready_before = ready_lines(&self.log_path());
        let mut cmd = crate::netns::command(&self.bin, self.place.as_deref());
        cmd.arg("-c").arg(self.root().join("nats.conf"));
        self.child = Some(process::spawn_logged(&mut cmd, &self.log_path()));
    }

    /// Waits until the server accepts TCP connections and has said it is ready; `false` if it
    /// exited or did not get there in time.
    async fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        let log = self.log_path();
        while start.elapsed() < READY_TIMEOUT {
            let child = self.child.as_mut().expect("spawned");
            if process::exited(child).is_some() {
                self.child = None;
                return false;
            }
            if ready_lines(&log) > self.ready_before
                && std::net::TcpStream::connect((self.host.as_str(), self.port)).is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }
}

/// How many times the log says "Server is ready" (it is appended to across restarts).
fn ready_lines(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .map(|s| s.matches("Server is ready").count())
        .unwrap_or(0)
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        if let Some(dir) = self.dir.take()
            && crate::keep_test_dirs()
        {
            eprintln!("nats-server files kept in {}", dir.keep().display());
        }
    }
}
