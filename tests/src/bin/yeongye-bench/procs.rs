//! The processes a benchmark run starts: a `nats-server` with JetStream on file storage (either
//! `sync_interval`), the real `referral-broker`, and `agency-adapter run` per agency; and what
//! is read from them (readiness, resident memory, CPU time, store size on disk).
//!
//! Everything is killed when its handle drops. Logs go to files in the run's directory.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use yeongye_proto::signing::PrivateKey;

/// The JetStream `sync_interval` a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Sync {
    /// `sync_interval: always`: the server fsyncs every write before acknowledging it.
    Always,
    /// The server's default (2 minutes): writes reach the OS page cache.
    Default,
}

impl fmt::Display for Sync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sync::Always => "always",
            Sync::Default => "default",
        })
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range.
pub(crate) fn free_port() -> Result<u16> {
    yeongye_tests::process::try_free_port().context("find a free port")
}

fn log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open log {}", path.display()))
}

/// The binaries of the workspace: next to this executable (`target/<profile>/`).
pub(crate) fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("the executable has no directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the workspace's binaries in the same profile first \
             (cargo build --release --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// The pinned nats-server: `$YEONGYE_NATS_SERVER`, else `<repo>/.tools/nats/bin/nats-server`,
/// installed with `deploy/install-nats.sh` if missing.
pub(crate) fn nats_server_bin(repo: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("YEONGYE_NATS_SERVER").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = repo.join(".tools/nats/bin/nats-server");
    if !path.is_file() {
        eprintln!("nats-server not installed: running deploy/install-nats.sh");
        let status = Command::new(repo.join("deploy/install-nats.sh"))
            .stdout(Stdio::null())
            .status()
            .context("run deploy/install-nats.sh")?;
        if !status.success() || !path.is_file() {
            bail!("deploy/install-nats.sh failed ({status})");
        }
    }
    Ok(path)
}

/// Stops a child: SIGTERM (through `kill`, the workspace forbids unsafe code), then SIGKILL
/// after `grace`.
fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let start = Instant::now();
    while start.elapsed() < grace {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// What `/proc/<pid>` says about a process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct ProcStats {
    /// Resident memory now, bytes (`VmRSS`).
    pub(crate) rss: u64,
    /// Peak resident memory, bytes (`VmHWM`).
    pub(crate) hwm: u64,
    /// User + system CPU time so far, seconds.
    pub(crate) cpu_secs: f64,
}

pub(crate) fn proc_stats(pid: u32) -> Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kb = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ") state".
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let clk = 100.0; // USER_HZ on Linux
    Ok(ProcStats {
        rss: kb("VmRSS:"),
        hwm: kb("VmHWM:"),
        cpu_secs: (ticks(11) + ticks(12)) as f64 / clk,
    })
}

/// Bytes a directory takes on disk (allocated blocks), recursively.
pub(crate) fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            total += disk_usage(&e.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// A nats-server with JetStream on file storage, in its own directory.
pub(crate) struct Nats {
    child: Child,
    port: u16,
}

impl Nats {
    pub(crate) async fn start(bin: &Path, dir: &Path, sync: Sync) -> Result<Nats> {
        std::fs::create_dir_all(dir)?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let mut nats = Nats::spawn(bin, dir, sync, port, None)?;
            match nats.wait_listening(Duration::from_secs(20)).await {
                Ok(()) => return Ok(nats),
                Err(e) => last = format!("{e:#}"),
            }
            stop_child(&mut nats.child, Duration::from_secs(2));
        }
        bail!(
            "nats-server would not start ({last}); see {}",
            dir.join("nats.log").display()
        )
    }

    /// Writes `<dir>/nats.conf` (client port `port`; with `cluster`, a node of that cluster)
    /// and spawns the server; it does not wait.
    fn spawn(
        bin: &Path,
        dir: &Path,
        sync: Sync,
        port: u16,
        cluster: Option<&ClusterNode>,
    ) -> Result<Nats> {
        let sync_line = match sync {
            Sync::Always => "  sync_interval: always\n",
            Sync::Default => "",
        };
        let mut config = format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 1MB\n\
             jetstream {{\n  store_dir: \"{}\"\n{sync_line}}}\n",
            dir.join("js").display()
        );
        if let Some(node) = cluster {
            config = format!(
                "server_name: {}\n{config}cluster {{\n  name: yeongye-bench\n  \
                 listen: 127.0.0.1:{}\n  routes: [ {} ]\n}}\n",
                node.name,
                node.route_port,
                node.routes
                    .iter()
                    .map(|p| format!("nats-route://127.0.0.1:{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, config)?;
        let log = dir.join("nats.log");
        let out = log_file(&log)?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        Ok(Nats { child, port })
    }

    /// Waits until the client port accepts connections.
    async fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("exited {status}");
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("not listening after {timeout:?}")
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// One node's place in a cluster.
struct ClusterNode {
    name: String,
    route_port: u16,
    /// Every node's route port (its own included, as `deploy/nats` does).
    routes: Vec<u16>,
}

/// Nodes of one JetStream cluster on loopback, each with its own ports and store
/// (`<dir>/n<i>`).
pub(crate) struct NatsCluster {
    pub(crate) nodes: Vec<Nats>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until JetStream answers on every one (a meta leader is
    /// elected).
    pub(crate) async fn start(bin: &Path, dir: &Path, sync: Sync, n: usize) -> Result<NatsCluster> {
        let mut last = String::new();
        for _ in 0..3 {
            let ports = (0..n)
                .map(|_| Ok((free_port()?, free_port()?)))
                .collect::<Result<Vec<(u16, u16)>>>()?;
            let routes: Vec<u16> = ports.iter().map(|(_, r)| *r).collect();
            let mut nodes = Vec::new();
            for (i, (port, route_port)) in ports.iter().enumerate() {
                let ndir = dir.join(format!("n{}", i + 1));
                std::fs::create_dir_all(&ndir)?;
                let node = ClusterNode {
                    name: format!("n{}", i + 1),
                    route_port: *route_port,
                    routes: routes.clone(),
                };
                nodes.push(Nats::spawn(bin, &ndir, sync, *port, Some(&node))?);
            }
            let mut cluster = NatsCluster { nodes };
            match cluster.wait_jetstream(Duration::from_secs(60)).await {
                Ok(()) => return Ok(cluster),
                Err(e) => last = format!("{e:#}"),
            }
        }
        bail!(
            "the nats-server cluster would not start ({last}); see {}/n*/nats.log",
            dir.display()
        )
    }

    async fn wait_jetstream(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.wait_listening(timeout)
                .await
                .with_context(|| format!("node n{}", i + 1))?;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let client = async_nats::connect(node.url())
                .await
                .with_context(|| format!("connect to node n{}", i + 1))?;
            let js = async_nats::jetstream::new(client);
            loop {
                if js.query_account().await.is_ok() {
                    break;
                }
                if start.elapsed() > timeout {
                    bail!(
                        "JetStream not answering on node n{} after {timeout:?}",
                        i + 1
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Nats::url).collect()
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Nats::pid).collect()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// The keys of a run: the broker's and each agency's signing key, and each agency's sealing
/// key, saved as key files (0600) in `dir`, as `referral-broker init` and `agency add` would.
pub(crate) struct Keys {
    pub(crate) broker: PathBuf,
    pub(crate) agencies: Vec<(String, PrivateKey, PathBuf)>,
    broker_key: PrivateKey,
    /// Each agency's sealing key and its file (`<agency>.sealing.key`).
    sealing: Vec<(String, yeongye_proto::seal::PrivateKey, PathBuf)>,
}

impl Keys {
    pub(crate) fn generate(dir: &Path, agencies: &[String]) -> Result<Keys> {
        std::fs::create_dir_all(dir)?;
        let save = |id: &str, key_id: &str| -> Result<(PrivateKey, PathBuf)> {
            let key = PrivateKey::generate(key_id).map_err(|e| anyhow::anyhow!("{e}"))?;
            let path = dir.join(format!("{id}.key"));
            key.save(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((key, path))
        };
        let (broker_key, broker) = save("broker", "broker-1")?;
        let mut list = Vec::new();
        let mut sealing = Vec::new();
        for a in agencies {
            let (key, path) = save(a, &format!("{a}-1"))?;
            list.push((a.clone(), key, path));
            let key = yeongye_proto::seal::PrivateKey::generate(&format!("{a}-seal-1"));
            let path = dir.join(format!("{a}.sealing.key"));
            let file = yeongye_proto::seal::KeyFile {
                keys: vec![key.clone()],
            };
            yeongye_proto::credentials::write_private(&path, file.to_file_text().as_bytes())
                .with_context(|| format!("write {}", path.display()))?;
            sealing.push((a.clone(), key, path));
        }
        Ok(Keys {
            broker,
            agencies: list,
            broker_key,
            sealing,
        })
    }

    /// The sealing key file of `agency`.
    pub(crate) fn sealing_file(&self, agency: &str) -> Option<&Path> {
        self.sealing
            .iter()
            .find(|(a, _, _)| a == agency)
            .map(|(_, _, p)| p.as_path())
    }

    /// The key of `agency`.
    pub(crate) fn of(&self, agency: &str) -> Option<&(String, PrivateKey, PathBuf)> {
        self.agencies.iter().find(|(a, _, _)| a == agency)
    }

    /// Writes the agency registry (`deploy/agencies.toml` format) with every public key.
    pub(crate) fn write_registry(&self, path: &Path) -> Result<()> {
        let mut toml = format!(
            "# Written by yeongye-bench.\n[broker]\n[[broker.keys]]\nid = \"{}\"\npublic_key = \"{}\"\n",
            self.broker_key.id,
            self.broker_key.public_b64()
        );
        for (id, key, _) in &self.agencies {
            let sealing = self
                .sealing
                .iter()
                .find(|(a, _, _)| a == id)
                .map(|(_, k, _)| k.entry())
                .context("a sealing key for every agency")?;
            toml.push_str(&format!(
                "\n[[agency]]\nid = \"{id}\"\nname = \"bench agency {id}\"\n\
                 kind = \"community_service_centre\"\n\
                 sealing_keys = [{{ id = \"{}\", public_key = \"{}\" }}]\n\
                 [[agency.keys]]\nid = \"{}\"\npublic_key = \"{}\"\n",
                sealing.id,
                sealing.public_key,
                key.id,
                key.public_b64()
            ));
        }
        std::fs::write(path, toml).with_context(|| format!("write {}", path.display()))
    }
}

/// The real `referral-broker`, run with a configuration written here.
pub(crate) struct Broker {
    child: Child,
    http: String,
    conf: PathBuf,
    pub(crate) started: Instant,
    pub(crate) log: PathBuf,
}

/// The NATS URLs as a TOML array.
fn toml_urls(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

impl Broker {
    /// Writes `<dir>/broker.toml` and spawns the broker (it does not wait for readiness).
    pub(crate) fn spawn(
        dir: &Path,
        nats_urls: &[String],
        store: &Path,
        registry: &Path,
        signing_key: &Path,
        batch_size: usize,
        extra_config: &str,
    ) -> Result<Broker> {
        std::fs::create_dir_all(dir)?;
        let http = format!("127.0.0.1:{}", free_port()?);
        let config = format!(
            "nats_urls = {}\nstore_dir = \"{}\"\nregistry = \"{}\"\n\
             signing_key_file = \"{}\"\nhttp_addr = \"{http}\"\nbatch_size = {batch_size}\n\
             {extra_config}",
            toml_urls(nats_urls),
            store.display(),
            registry.display(),
            signing_key.display()
        );
        let conf = dir.join("broker.toml");
        std::fs::write(&conf, config)?;
        let log = dir.join("broker.log");
        let (child, started) = Broker::spawn_process(&conf, &log)?;
        Ok(Broker {
            child,
            http,
            conf,
            started,
            log,
        })
    }

    fn spawn_process(conf: &Path, log: &Path) -> Result<(Child, Instant)> {
        let out = log_file(log)?;
        let mut cmd = Command::new(workspace_bin("referral-broker")?);
        cmd.arg("--config")
            .arg(conf)
            .arg("run")
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("YEONGYE_BENCH_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REFERRAL_") {
                cmd.env_remove(key);
            }
        }
        let started = Instant::now();
        let child = cmd.spawn().context("spawn referral-broker")?;
        Ok((child, started))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `/readyz` until it answers 200; returns the time from spawn to ready.
    pub(crate) async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "referral-broker exited ({status}) before it was ready; see {}",
                    self.log.display()
                );
            }
            if http_status(&self.http, "/readyz") == Some(200) {
                return Ok(self.started.elapsed());
            }
            if self.started.elapsed() > timeout {
                bail!(
                    "referral-broker not ready after {timeout:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The broker's role in its group as `/api/v1/cluster` says it (`leader` or `standby`),
    /// if it answered.
    pub(crate) fn role(&self) -> Option<String> {
        let body = http_get(&self.http, "/api/v1/cluster")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v.get("role")?.as_str().map(str::to_owned)
    }

    /// Polls `/api/v1/cluster` every `every` until the broker says `role`, and then (for a
    /// standby) until `/readyz` says it follows the log closely; returns when it did.
    pub(crate) async fn wait_role(
        &mut self,
        role: &str,
        every: Duration,
        timeout: Duration,
    ) -> Result<Instant> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "referral-broker exited ({status}); see {}",
                    self.log.display()
                );
            }
            if self.role().as_deref() == Some(role) {
                let at = Instant::now();
                if role == "leader" || http_status(&self.http, "/readyz") == Some(200) {
                    return Ok(at);
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "referral-broker not {role} after {timeout:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The value of the sample `name` (with its labels, as exposed) on the broker's
    /// `/metrics`, if it answered and has it.
    pub(crate) fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(&self.http, "/metrics")?;
        body.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.split_whitespace().next()?.parse().ok()
        })
    }

    /// SIGTERM and wait (SIGKILL after 20 s).
    pub(crate) fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(20));
    }

    /// SIGKILL, at once (a crash): returns when the signal was sent.
    pub(crate) fn kill(&mut self) -> Result<Instant> {
        self.child.kill().context("kill -9 referral-broker")?;
        let at = Instant::now();
        let _ = self.child.wait();
        Ok(at)
    }

    /// Starts the broker again with the same configuration (store, HTTP port) after it
    /// stopped.
    pub(crate) fn restart(&mut self) -> Result<()> {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            bail!("referral-broker still running: stop it before a restart");
        }
        let (child, started) = Broker::spawn_process(&self.conf, &self.log)?;
        self.child = child;
        self.started = started;
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// A minimal HTTP/1.1 GET on loopback: the status code, or `None` if nothing answered.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A minimal HTTP/1.1 GET on loopback: the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut all = String::new();
    s.read_to_string(&mut all).ok()?;
    let (head, body) = all.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Lines an adapter printed, by kind.
#[derive(Debug, Default)]
pub(crate) struct LineCounts {
    pub(crate) deliveries: AtomicU64,
    pub(crate) notifications: AtomicU64,
    pub(crate) rejections: AtomicU64,
    pub(crate) other: AtomicU64,
    pub(crate) first_rejection: std::sync::Mutex<Option<String>>,
}

/// `agency-adapter run` for one agency: its stdout lines are counted by kind.
pub(crate) struct AdapterProc {
    child: Child,
    pub(crate) agency: String,
    pub(crate) lines: Arc<LineCounts>,
    pub(crate) log: PathBuf,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl AdapterProc {
    pub(crate) fn spawn(
        dir: &Path,
        agency: &str,
        nats_urls: &[String],
        key: &Path,
        sealing_key: &Path,
        registry: &Path,
        inbox: bool,
    ) -> Result<AdapterProc> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("adapter.toml");
        std::fs::write(
            &conf,
            format!(
                "agency = \"{agency}\"\nnats_urls = {}\nstate_dir = \"{}\"\n\
                 signing_key_file = \"{}\"\nsealing_key_file = \"{}\"\nregistry = \"{}\"\n",
                toml_urls(nats_urls),
                dir.join("state").display(),
                key.display(),
                sealing_key.display(),
                registry.display()
            ),
        )?;
        let log = dir.join("adapter.log");
        let mut cmd = Command::new(workspace_bin("agency-adapter")?);
        cmd.arg("--config").arg(&conf).arg("run");
        if inbox {
            cmd.arg("--inbox").arg(dir.join("inbox"));
        }
        cmd.env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("YEONGYE_BENCH_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&log)?);
        let mut child = cmd.spawn().context("spawn agency-adapter")?;
        let stdout = child.stdout.take().context("adapter stdout")?;
        let lines = Arc::new(LineCounts::default());
        let counts = Arc::clone(&lines);
        let reader = std::thread::Builder::new()
            .name(format!("adapter-{agency}"))
            .spawn(move || count_lines(stdout, &counts))?;
        Ok(AdapterProc {
            child,
            agency: agency.to_owned(),
            lines,
            log,
            reader: Some(reader),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the adapter's log says it is receiving (its consumer is bound).
    pub(crate) async fn wait_receiving(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "agency-adapter {} exited ({status}); see {}",
                    self.agency,
                    self.log.display()
                );
            }
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains("receiving") {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "agency-adapter {} not receiving after {timeout:?}; see {}",
                    self.agency,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn count_lines(stdout: impl Read, counts: &LineCounts) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let counter = if line.contains("\"kind\":\"delivery\"") {
            &counts.deliveries
        } else if line.contains("\"kind\":\"notification\"") {
            &counts.notifications
        } else if line.contains("\"kind\":\"rejection\"") {
            let mut first = counts
                .first_rejection
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if first.is_none() {
                *first = Some(line.clone());
            }
            &counts.rejections
        } else {
            &counts.other
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for AdapterProc {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
