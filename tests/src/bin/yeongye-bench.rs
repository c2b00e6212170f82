//! `yeongye-bench`: end-to-end referral throughput and latency, as a ratio to raw JetStream
//! measured in the same run, and the broker's scale figures. Not a test: nothing here asserts
//! a speed. Method and results: `docs/PERFORMANCE.md`.
//!
//! ```text
//! cargo build --release --bins && target/release/yeongye-bench --write-doc docs/PERFORMANCE.md
//! ```
//!
//! For each `sync_interval` (`always`, then the server's default) it starts a nats-server with
//! JetStream on file storage and runs, in order:
//! 1. the raw baseline (`baseline`): publish → durable pull consumer → publish → durable pull
//!    consumer, closed loop, at its maximum;
//! 2. the real broker and one `agency-adapter run` per agency (`e2e`): referrals at the
//!    maximum the system sustains (closed loop), then open-loop at a fraction of that for
//!    latency.
//!
//! With `--topology cluster` (or `single,cluster`) the same runs on three nats-server nodes in
//! one JetStream cluster on loopback, every stream R3 and the broker configured
//! `stream_replicas = 3`, and then (`failover`) a second broker stands by and the leading one
//! is killed under load, `--failovers` times.
//!
//! Then (`scale`) it fills a broker store to 100k and 1M referrals and measures the broker's
//! resident memory, the store's size on disk and the time from start to ready.
//!
//! # Layout
//! - `yeongye-bench/procs.rs`: nats-server, broker and adapter processes; `/proc` readings.
//! - `yeongye-bench/load.rs`: the load driver (open/closed loop, HDR histogram, progress bar).
//! - `yeongye-bench/baseline.rs`, `e2e.rs`, `scale.rs`: the three measurements;
//!   `failover.rs`: the failover time on a cluster.
//! - `yeongye-bench/report.rs`: the JSON result and the generated part of PERFORMANCE.md.

#[path = "yeongye-bench/baseline.rs"]
mod baseline;
#[path = "yeongye-bench/e2e.rs"]
mod e2e;
#[path = "yeongye-bench/failover.rs"]
mod failover;
#[path = "yeongye-bench/load.rs"]
mod load;
#[path = "yeongye-bench/procs.rs"]
mod procs;
#[path = "yeongye-bench/report.rs"]
mod report;
#[path = "yeongye-bench/scale.rs"]
mod scale;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use load::{Offer, Plan};
use procs::Sync;

#[derive(Debug, Parser)]
#[command(
    name = "yeongye-bench",
    about = "End-to-end referral throughput and latency as a ratio to raw JetStream; broker scale figures"
)]
struct Args {
    /// Where the throughput phases run, in order: `single` (one nats-server, R1 streams)
    /// and/or `cluster` (three nodes on loopback, R3 streams, `stream_replicas = 3`, and the
    /// failover time). `--write-doc` regenerates the block of each topology measured.
    #[arg(long, value_delimiter = ',', default_value = "single", value_parser = parse_topology)]
    topology: Vec<Topology>,
    /// Kills of the leading broker on the cluster (0: no failover figures).
    #[arg(long, default_value_t = 3)]
    failovers: usize,
    /// The failover load's rate, as a fraction of the cluster's measured maximum.
    #[arg(long, default_value_t = 0.25)]
    failover_fraction: f64,
    /// Seconds the failover load runs after each kill.
    #[arg(long, default_value_t = 15)]
    failover_after: u64,
    /// JetStream `sync_interval` settings to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "always,default", value_parser = parse_sync)]
    sync: Vec<Sync>,
    /// Agencies, each with its `agency-adapter run` process; each sends to the next.
    #[arg(long, default_value_t = 4)]
    agencies: usize,
    /// Size of a referral's envelope on the wire (and of a baseline message), bytes.
    #[arg(long, default_value_t = 1024)]
    message_bytes: usize,
    /// The broker's `batch_size` (and the baseline relay's batch).
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Items in flight in the closed-loop (maximum throughput) phases.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Offer this many referrals per second instead of finding the maximum (then the
    /// "maximum" phase is this open-loop rate).
    #[arg(long)]
    rate: Option<f64>,
    /// The latency phase's rate, as a fraction of the measured maximum.
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    /// Seconds of warm-up before each measurement.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Seconds measured per phase.
    #[arg(long, default_value_t = 15)]
    measure: u64,
    /// Seconds to wait for items still in flight after a phase.
    #[arg(long, default_value_t = 20)]
    drain: u64,
    /// Store sizes for the scale figures, referrals.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    scale: Vec<u64>,
    /// What the scale figures' stores hold: `open` (every referral RECEIVED, awaiting
    /// acceptance: the most memory per referral) and/or `steady` (a year of referrals, all but
    /// the newest 10,000 completed, applied ids pruned past retention).
    #[arg(long, value_delimiter = ',', default_value = "open,steady")]
    scale_profile: Vec<scale::Profile>,
    /// The scale figures' first start as after a crash: the fill ends without the reopen a
    /// stopped broker does (for sled's recovery snapshot), so the first start replays
    /// everything the fill wrote, as a broker killed after leading that long does.
    #[arg(long)]
    scale_after_crash: bool,
    /// The scale figures only (filling a million referrals takes several minutes).
    #[arg(long, conflicts_with = "with_scale")]
    scale_only: bool,
    /// The throughput phases, then the scale figures.
    #[arg(long)]
    with_scale: bool,
    /// Who reads the agencies' consumers: `wire` (the protocol in-process, batched: the
    /// broker's own limit) and/or `processes` (`agency-adapter run` per agency). The first
    /// gets the latency phase too.
    #[arg(long, value_delimiter = ',', default_value = "wire,processes", value_parser = parse_recipients)]
    recipients: Vec<e2e::Recipients>,
    /// Adapters hand each item to an inbox folder (two fsyncs per item) instead of stdout only.
    #[arg(long)]
    adapter_inbox: bool,
    /// Where the JSON result goes.
    #[arg(long, default_value = "target/yeongye-bench/result.json")]
    out: PathBuf,
    /// Open this broker store, say what a start costs, and exit (for investigating).
    #[arg(long, hide = true)]
    probe_store: Option<PathBuf>,
    /// Regenerate the results block of this Markdown file (docs/PERFORMANCE.md).
    #[arg(long)]
    write_doc: Option<PathBuf>,
    /// Working directory (stores, logs); a fresh temporary one by default, removed at the end.
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn parse_sync(s: &str) -> Result<Sync, String> {
    match s {
        "always" => Ok(Sync::Always),
        "default" => Ok(Sync::Default),
        other => Err(format!("{other:?}: use always or default")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    Single,
    Cluster,
}

fn parse_topology(s: &str) -> Result<Topology, String> {
    match s {
        "single" => Ok(Topology::Single),
        "cluster" => Ok(Topology::Cluster),
        other => Err(format!("{other:?}: use single or cluster")),
    }
}

fn parse_recipients(s: &str) -> Result<e2e::Recipients, String> {
    match s {
        "wire" => Ok(e2e::Recipients::Wire),
        "processes" => Ok(e2e::Recipients::Processes),
        other => Err(format!("{other:?}: use wire or processes")),
    }
}

fn repo_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("the tests crate has a parent")?
        .to_path_buf())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // On a signal the run's future is dropped, and with it every process it started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stopped = tokio::select! {
        r = run(args) => return r,
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    };
    scale::STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    anyhow::bail!(stopped)
}

async fn run(args: Args) -> Result<()> {
    if let Some(dir) = &args.probe_store {
        return scale::probe(dir);
    }
    let repo = repo_root()?;
    let nats_bin = procs::nats_server_bin(&repo)?;
    // Fail early, before minutes of work, if the binaries are missing.
    procs::workspace_bin("referral-broker")?;
    procs::workspace_bin("agency-adapter")?;

    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("yeongye-bench-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    eprintln!("yeongye-bench: working in {}", dir.display());

    let measure = Duration::from_secs(args.measure);
    let warmup = Duration::from_secs(args.warmup);
    let drain = Duration::from_secs(args.drain);
    let offer = match args.rate {
        Some(rate) => Offer::Open { rate },
        None => Offer::Closed {
            window: args.window,
        },
    };
    let plan = Plan {
        offer,
        warmup,
        measure,
        drain,
    };

    let mut runs = Vec::new();
    let mut cluster = Vec::new();
    if !args.scale_only {
        for topology in &args.topology {
            for sync in &args.sync {
                match topology {
                    Topology::Single => {
                        let sdir = dir.join(format!("sync-{sync}"));
                        let nats = procs::Nats::start(&nats_bin, &sdir.join("nats"), *sync).await?;
                        eprintln!("sync_interval {sync}: nats-server at {}", nats.url());
                        runs.push(
                            run_sync(&args, plan, *sync, &sdir, &[nats.url()], &[nats.pid()], 1)
                                .await?,
                        );
                    }
                    Topology::Cluster => {
                        let sdir = dir.join(format!("cluster-sync-{sync}"));
                        let nats =
                            procs::NatsCluster::start(&nats_bin, &sdir.join("nats"), *sync, 3)
                                .await?;
                        eprintln!(
                            "sync_interval {sync}: three-node cluster at {}",
                            nats.urls().join(", ")
                        );
                        cluster.push(
                            run_sync(&args, plan, *sync, &sdir, &nats.urls(), &nats.pids(), 3)
                                .await?,
                        );
                    }
                }
            }
        }
    }
    let mut scale = Vec::new();
    if (args.scale_only || args.with_scale) && !args.scale.is_empty() {
        for profile in &args.scale_profile {
            scale.extend(
                scale::run(
                    &nats_bin,
                    &dir.join(format!("scale-{profile}")),
                    &args.scale,
                    args.message_bytes,
                    *profile,
                    args.scale_after_crash,
                )
                .await?,
            );
        }
    }

    let command = std::env::args()
        .map(|a| {
            if a.contains(char::is_whitespace) {
                format!("{a:?}")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let result = report::Report {
        date: report::utc_now(),
        machine: report::machine(&nats_bin),
        settings: report::Settings {
            command: command.replace(&format!("{}/", repo.display()), ""),
            agencies: args.agencies,
            message_bytes: args.message_bytes,
            batch_size: args.batch_size,
            window: args.window,
            warmup_secs: args.warmup,
            measure_secs: args.measure,
            fraction: args.fraction,
            adapter_inbox: args.adapter_inbox,
        },
        runs,
        cluster,
        scale,
        sealing: Some(e2e::seal_cost(2000)?),
    };
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    let throughput = report::markdown_throughput(&result);
    let cluster = report::markdown_cluster(&result);
    let scale = report::markdown_scale(&result);
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{}{}{}",
        throughput.as_deref().unwrap_or(""),
        cluster.as_deref().unwrap_or(""),
        scale.as_deref().unwrap_or("")
    )?;
    writeln!(stdout, "JSON: {}", args.out.display())?;
    if let Some(doc) = &args.write_doc {
        if let Some(block) = &throughput {
            report::write_doc(doc, report::THROUGHPUT, block)?;
        }
        if let Some(block) = &cluster {
            report::write_doc(doc, report::CLUSTER, block)?;
        }
        if let Some(block) = &scale {
            report::write_doc(doc, report::SCALE, block)?;
        }
        writeln!(stdout, "updated {}", doc.display())?;
    }
    Ok(())
}

/// The throughput phases for one `sync_interval` on the servers at `urls` (one, or a cluster's
/// three), the streams with `replicas` replicas: the raw baseline, end to end for each kind of
/// recipients, the raw round trip at the latency phase's rate, and on a cluster the failover.
async fn run_sync(
    args: &Args,
    plan: Plan,
    sync: Sync,
    sdir: &std::path::Path,
    urls: &[String],
    pids: &[u32],
    replicas: usize,
) -> Result<report::SyncRun> {
    let url = urls.first().context("no NATS server")?;
    let raw = if replicas > 1 {
        format!("raw R{replicas} ({sync})")
    } else {
        format!("raw JetStream ({sync})")
    };
    let baseline = baseline::run(
        url,
        replicas,
        args.message_bytes,
        args.batch_size,
        &[(raw.clone(), plan)],
    )
    .await?
    .into_iter()
    .next()
    .context("no baseline result")?;
    let mut e2e_runs = Vec::new();
    for (i, recipients) in args.recipients.iter().enumerate() {
        let failover =
            (replicas > 1 && i == 0 && args.failovers > 0).then_some(e2e::FailoverPlan {
                rounds: args.failovers,
                fraction: args.failover_fraction,
                settle: plan.warmup.max(Duration::from_secs(2)),
                after: Duration::from_secs(args.failover_after),
            });
        let result = e2e::run(e2e::Settings {
            recipients: *recipients,
            partial: i == 0,
            dir: &sdir.join(format!("e2e-{i}")),
            nats_urls: urls,
            nats_pids: pids,
            replicas,
            failover,
            agencies: args.agencies,
            message_bytes: args.message_bytes,
            batch_size: args.batch_size,
            adapter_inbox: args.adapter_inbox,
            max: plan,
            fraction: args.fraction,
        })
        .await?;
        let ratio = result.max.throughput / baseline.throughput.max(1e-9);
        eprintln!(
            "{raw}, {recipients}: end-to-end {:.0} referrals/s vs raw {:.0} msgs/s: {:.0}%",
            result.max.throughput,
            baseline.throughput,
            ratio * 100.0
        );
        e2e_runs.push(report::E2eRun { result, ratio });
    }
    // The raw round trip offered the latency phase's rate, on the same server: what the same
    // disk and cores give one message at that rate, to read the p99 against.
    let partial_offer = e2e_runs
        .first()
        .and_then(|e| e.result.partial.as_ref())
        .map(|p| p.offer);
    let baseline_at_rate = match partial_offer {
        Some(Offer::Open { rate }) => {
            let plan = Plan {
                offer: Offer::Open { rate },
                ..plan
            };
            let name = format!("{raw} at {rate:.0}/s");
            baseline::run(
                url,
                replicas,
                args.message_bytes,
                args.batch_size,
                &[(name, plan)],
            )
            .await?
            .into_iter()
            .next()
        }
        _ => None,
    };
    // On a cluster: what one state-log append of the run's mean record size waits for, on R1
    // and on R3 streams of the same cluster (the broker's loop waits for one per turn).
    let mut append_probe = Vec::new();
    let record = e2e_runs
        .first()
        .and_then(|e| e.result.state_log_max)
        .map(|l| l.bytes_per_record);
    if let (true, Some(bytes)) = (replicas > 1, record) {
        // Rounded to whole bytes: a mean record size.
        let bytes = bytes.round() as usize;
        for r in [1, replicas] {
            let p = baseline::append_probe(url, r, bytes, 200, pids).await?;
            eprintln!(
                "state-log append probe, R{r}, {bytes} B serially: p50 {:.1} ms, p99 {:.1} ms, mean {:.1} ms, nats-server CPU {:.2} ms each",
                p.p50_ms, p.p99_ms, p.mean_ms, p.nats_cpu_ms
            );
            append_probe.push(p);
        }
    }
    Ok(report::SyncRun {
        sync,
        baseline,
        baseline_at_rate,
        e2e: e2e_runs,
        append_probe,
    })
}
