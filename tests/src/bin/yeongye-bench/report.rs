//! The result of a run: the JSON file, the table printed at the end, and the block of
//! `docs/PERFORMANCE.md` between the markers, which the run regenerates.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::e2e::E2eResult;
use crate::load::PhaseResult;
use crate::procs::Sync;
use crate::scale::ScalePoint;

pub(crate) const BEGIN: &str = "<!-- yeongye-bench:begin (generated: do not edit by hand) -->";
pub(crate) const END: &str = "<!-- yeongye-bench:end -->";

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory_gb: f64,
    pub(crate) kernel: String,
    pub(crate) nats_server: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Settings {
    pub(crate) command: String,
    pub(crate) agencies: usize,
    pub(crate) message_bytes: usize,
    pub(crate) batch_size: usize,
    pub(crate) window: usize,
    pub(crate) warmup_secs: u64,
    pub(crate) measure_secs: u64,
    pub(crate) fraction: f64,
    pub(crate) adapter_inbox: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct SyncRun {
    pub(crate) sync: Sync,
    pub(crate) baseline: PhaseResult,
    pub(crate) e2e: Vec<E2eRun>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct E2eRun {
    #[serde(flatten)]
    pub(crate) result: E2eResult,
    /// End-to-end referrals/s over raw round trips/s.
    pub(crate) ratio: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Report {
    pub(crate) date: String,
    pub(crate) machine: Machine,
    pub(crate) settings: Settings,
    pub(crate) runs: Vec<SyncRun>,
    pub(crate) scale: Vec<ScalePoint>,
}

/// `YYYY-MM-DD HH:MM UTC` from the system clock (civil-from-days, no date library).
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

pub(crate) fn machine(nats_bin: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let nats_server = std::process::Command::new(nats_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        memory_gb: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        nats_server,
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// The generated block: settings and the result tables, in Markdown.
pub(crate) fn markdown(r: &Report) -> String {
    let s = &r.settings;
    let m = &r.machine;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run {date} on {cores} cores ({cpu}), {mem} GB, Linux {kernel}, {nats} — shared and noisy: \
         compare the ratio, not absolute figures.\n",
        date = r.date,
        cores = m.cores,
        cpu = m.cpu,
        mem = m.memory_gb,
        kernel = m.kernel,
        nats = m.nats_server,
    );
    let _ = writeln!(
        out,
        "Settings: {} agencies (one `agency-adapter run` each{}), {}-byte referrals, broker \
         `batch_size` {}, closed loop of {} in flight for the maximum, open loop at {:.0}% of \
         it for latency, {} s warm-up + {} s measured per phase. Command: `{}`.\n",
        s.agencies,
        if s.adapter_inbox {
            ", with `--inbox`"
        } else {
            ", no inbox"
        },
        s.message_bytes,
        s.batch_size,
        s.window,
        s.fraction * 100.0,
        s.warmup_secs,
        s.measure_secs,
        s.command
    );
    if !r.runs.is_empty() {
        out.push_str(
            "| `sync_interval` | receivers | raw JetStream round trip, msgs/s (p50 / p99 ms) | end-to-end to RECEIVED, referrals/s (p50 / p99 ms) | ratio | open loop at the fraction: referrals/s, p50 / p99 / p99.9 ms | lost |\n",
        );
        out.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
        for run in &r.runs {
            let b = &run.baseline;
            for e2e in &run.e2e {
                let e = &e2e.result.max;
                let partial = e2e.result.partial.as_ref().map_or_else(
                    || "—".to_owned(),
                    |p| {
                        format!(
                            "{:.0}: {:.1} / **{:.1}** / {:.1}",
                            p.throughput, p.latency_ms.p50, p.latency_ms.p99, p.latency_ms.p999
                        )
                    },
                );
                let lost = e.lost + e2e.result.partial.as_ref().map_or(0, |p| p.lost);
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} ({:.1} / {:.1}) | {:.0} ({:.1} / {:.1}) | **{:.0}%** | {partial} | {lost} |",
                    run.sync,
                    e2e.result.receivers,
                    b.throughput,
                    b.latency_ms.p50,
                    b.latency_ms.p99,
                    e.throughput,
                    e.latency_ms.p50,
                    e.latency_ms.p99,
                    e2e.ratio * 100.0,
                );
            }
        }
        out.push_str(
            "\nCPU time per referral at the maximum (ms, all processes of a kind), and the broker afterwards:\n\n",
        );
        out.push_str("| `sync_interval` | receivers | broker | nats-server | adapter processes | bench (SDK senders and receivers, tap) | broker RSS (peak) | store on disk per referral |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for run in &r.runs {
            for e2e in &run.e2e {
                let e = &e2e.result;
                let c = &e.max_cpu;
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} ({}) | {:.0} B ({} referrals) |",
                    run.sync,
                    e.receivers,
                    c.broker_ms,
                    c.nats_ms,
                    c.adapters_ms,
                    c.bench_ms,
                    mb(e.broker_rss_bytes),
                    mb(e.broker_hwm_bytes),
                    e.store_bytes_per_referral,
                    e.referrals_stored,
                );
            }
        }
    }
    if !r.scale.is_empty() {
        out.push_str("\nWith referrals stored (filled through the library, each `RECEIVED`):\n\n");
        out.push_str("| referrals stored | store on disk | per referral | start → ready | broker RSS when ready | peak RSS |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- |\n");
        for p in &r.scale {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} B | {:.2} s | {} | {} |",
                p.referrals,
                mb(p.store_bytes),
                p.store_bytes_per_referral,
                p.start_to_ready_secs,
                mb(p.rss_bytes),
                mb(p.hwm_bytes),
            );
        }
    }
    out
}

/// Replaces the generated block of `doc` (between [`BEGIN`] and [`END`]) with `block`.
pub(crate) fn write_doc(doc: &Path, block: &str) -> Result<()> {
    let text = std::fs::read_to_string(doc).with_context(|| format!("read {}", doc.display()))?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!(
            "{} has no generated block ({BEGIN} ... {END})",
            doc.display()
        );
    };
    if e < b {
        bail!(
            "{}: the end marker comes before the begin marker",
            doc.display()
        );
    }
    let mut new = String::with_capacity(text.len() + block.len());
    new.push_str(&text[..b + BEGIN.len()]);
    new.push_str("\n\n");
    new.push_str(block.trim_end());
    new.push_str("\n\n");
    new.push_str(&text[e..]);
    std::fs::write(doc, new).with_context(|| format!("write {}", doc.display()))
}
