//! Scale figures: the broker with many referrals stored — resident memory, store size on disk
//! per referral, and the time from start to ready.
//!
//! Pushing a million referrals through NATS would take most of an hour here, so the store is
//! filled through the broker library instead: each referral is made by the broker's own state
//! machine (`submit`, then `DeliveryConfirmed`, then the recipient's `RECEIVED`), with the
//! audit entries (chained by `audit::chain`), applied message ids and deadlines the event loop
//! would write for it, and committed with `SledStore::commit` in change sets of
//! [`FILL_BATCH`] referrals. What a referral weighs on disk this way is checked against the
//! end-to-end run's store, which went through the real broker.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use prost::Message as _;
use yeongye_broker::audit;
use yeongye_broker::consent::Basis;
use yeongye_broker::referral::{self, DeadlineKind, Effect, Event, NewReferral, Status, Urgency};
use yeongye_broker::store::{ChangeSet, Deadline, SledStore, Store};
use yeongye_broker::view::Summary;
use yeongye_proto::v1;

use crate::procs::{self, Broker, Keys, Nats, Sync};

/// Referrals per store commit while filling.
const FILL_BATCH: u64 = 500;
/// Set on a signal: the fill (a blocking task the runtime would wait for) stops at its next
/// change set.
pub(crate) static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
const DAY_MS: i64 = 24 * 3600 * 1000;
/// Time between two filled referrals: a million end a few hours before the run, so that their
/// acceptance deadlines (10 days) are all still ahead, as in a store in steady use.
const STEP_MS: i64 = 20;

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ScalePoint {
    pub(crate) profile: Profile,
    pub(crate) referrals: u64,
    /// Referrals not ended (RECEIVED) among them.
    pub(crate) open: u64,
    pub(crate) store_bytes: u64,
    pub(crate) store_bytes_per_referral: f64,
    /// Broker process spawned → `/readyz` answered 200.
    pub(crate) start_to_ready_secs: f64,
    /// Resident memory once ready and settled, bytes.
    pub(crate) rss_bytes: u64,
    /// Peak resident memory of the first start, through its first prune, bytes.
    pub(crate) hwm_bytes: u64,
    /// Peak resident memory of the restarted broker, bytes.
    pub(crate) restart_hwm_bytes: u64,
    /// The most of both: the broker's peak over the whole run, bytes.
    pub(crate) peak_rss_bytes: u64,
    /// The first prune (every applied id past retention): ready → done, seconds.
    pub(crate) prune_secs: f64,
    /// Its steps between turns.
    pub(crate) prune_steps: u64,
    /// The longest any background step held the event loop in either run, seconds.
    pub(crate) longest_step_secs: f64,
    /// The same broker stopped and started again: spawned → ready, seconds.
    pub(crate) restart_to_ready_secs: f64,
    /// Resident memory of the restarted broker once ready and settled, bytes.
    pub(crate) restart_rss_bytes: u64,
    /// How long filling up to this point took (library fill), seconds.
    pub(crate) fill_secs: f64,
}

/// A UUID-shaped id, unique per (n, salt). With `at` (Unix ms), laid out as a UUIDv7 (time
/// first, so ids made later sort later, as the agencies' UUIDv7 referral and message ids do);
/// without, as scattered as a UUIDv5 (the derived receipt ids).
fn uuid_like(at: Option<i64>, n: u64, salt: u64) -> String {
    let mix = (n ^ salt.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let hi = match at {
        Some(ms) => (u64::try_from(ms).unwrap_or(0) << 16) | (n & 0xfff),
        None => mix,
    };
    let lo = mix.rotate_left(17) ^ n;
    let version = if at.is_some() { 7 } else { 5 };
    format!(
        "{:08x}-{:04x}-{version}{:03x}-8{:03x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xfff,
        (lo >> 48) & 0xfff,
        lo & 0xffff_ffff_ffff
    )
}

/// The sender's envelope of referral `id`, about `bytes` long.
fn envelope(id: &str, message_id: &str, from: &str, to: &str, at: i64, bytes: usize) -> Vec<u8> {
    let mut r = v1::Referral {
        referral_id: id.to_owned(),
        from_agency: from.to_owned(),
        to_agency: to.to_owned(),
        client: Some(v1::Client {
            pseudonym_id: format!("client-{}", &id[id.len() - 12..]),
            name: "홍길동".to_owned(),
            birth_date: "1958-03-14".to_owned(),
            phone: "010-0000-0000".to_owned(),
            address: "한빛구 한빛로 123, 101동 1001호".to_owned(),
            household: "1인 가구, 월세 체납 3개월, 기초연금 수급".to_owned(),
        }),
        field: v1::FieldOfNeed::Livelihood.into(),
        urgency: v1::Urgency::Routine.into(),
        reason: String::new(),
        legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(
            v1::StatutoryBasis {
                statute: v1::Statute::SocialSecurityBenefitsAct.into(),
                justification: "위기가구 발굴 (benchmark)".to_owned(),
            },
        )),
        data_categories: vec![1, 2, 3],
        purpose: v1::Purpose::CaseManagement.into(),
        ..Default::default()
    };
    let wrap = |r: &v1::Referral| v1::Envelope {
        message_id: message_id.to_owned(),
        sender: from.to_owned(),
        sent_at_ms: at,
        payload_type: v1::PayloadType::Referral.into(),
        payload: r.encode_to_vec(),
        signature: Vec::new(),
        key_id: String::new(),
    };
    let base = wrap(&r).encoded_len();
    r.reason = ".".repeat(bytes.saturating_sub(base + 3));
    wrap(&r).encode_to_vec()
}

/// What the filled store looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Profile {
    /// Every referral RECEIVED and awaiting acceptance, all sent within the last hours: the
    /// most a store can hold in memory per referral (record, deadline, both applied ids).
    Open,
    /// A district's store after years: referrals spread over the time the store covers, all
    /// but the last [`STEADY_OPEN`] of them ACCEPTED, IN_PROGRESS and COMPLETED, applied ids
    /// past retention pruned (the broker prunes daily).
    Steady,
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Profile::Open => "open",
            Profile::Steady => "steady",
        })
    }
}

/// In the steady profile, how many of the newest referrals are still open (RECEIVED).
const STEADY_OPEN: u64 = 10_000;
/// In the steady profile, time between two referrals: a million cover about a year.
const STEADY_STEP_MS: i64 = 31_536;
/// The broker's default `dedup_retention_days`.
const RETENTION_MS: i64 = 14 * DAY_MS;
/// What the measured broker is told: retention one day, its clock two days ahead (the
/// `testing_clock_offset_file`), so that its first prune forgets every applied id in the
/// store, as a broker back after a long absence does, while no deadline falls due (the
/// earliest, an acceptance, is more than 6 days after the newest open referral's receipt).
const BROKER_RETENTION: &str = "inbound_retention_days = 1\ndedup_retention_days = 1\n";
const CLOCK_AHEAD_MS: i64 = 2 * DAY_MS;

impl Profile {
    fn step_ms(self) -> i64 {
        match self {
            Profile::Open => STEP_MS,
            Profile::Steady => STEADY_STEP_MS,
        }
    }
}

/// Adds referrals `from..to` (of `total`) to the store at `dir`, the `i`th submitted at
/// `base_at + i * step`, each taken as far as `profile` says.
pub(crate) fn fill(
    dir: &Path,
    agencies: &[String],
    (from, to, total): (u64, u64, u64),
    base_at: i64,
    bytes: usize,
    profile: Profile,
    after_crash: bool,
) -> Result<()> {
    let store = SledStore::open(dir).map_err(|e| anyhow!("open store {}: {e}", dir.display()))?;
    let mut head = store.audit_head().map_err(|e| anyhow!("{e}"))?;
    let mut counts = store.counts().map_err(|e| anyhow!("{e}"))?;
    let mut n = from;
    // When the fill last pruned, in the store's time.
    let mut pruned_at = i64::MIN;
    while n < to {
        if STOP.load(std::sync::atomic::Ordering::Relaxed) {
            anyhow::bail!("stopped");
        }
        let end = (n + FILL_BATCH).min(to);
        let mut changes = ChangeSet::default();
        let mut drafts = Vec::new();
        let mut last_at = 0;
        for i in n..end {
            let at = base_at + i64::try_from(i)? * profile.step_ms();
            last_at = at;
            let k = usize::try_from(i)? % agencies.len();
            let (from_agency, to_agency) = (&agencies[k], &agencies[(k + 1) % agencies.len()]);
            let id = uuid_like(Some(at), i, 1);
            let submit_id = uuid_like(Some(at), i, 2);
            let new = NewReferral {
                id: id.clone(),
                from: from_agency.clone(),
                from_kind: "community_service_centre".to_owned(),
                to: to_agency.clone(),
                to_kind: "community_service_centre".to_owned(),
                client: format!("client-{}", &id[id.len() - 12..]),
                basis: Basis::Statute {
                    statute: v1::Statute::SocialSecurityBenefitsAct.into(),
                    name: v1::Statute::SocialSecurityBenefitsAct
                        .as_str_name()
                        .to_owned(),
                    justification: "위기가구 발굴 (benchmark)".to_owned(),
                },
                purpose: v1::Purpose::CaseManagement.into(),
                categories: vec![1, 2, 3],
                urgency: Urgency::Routine,
                receive_by: at + 3 * DAY_MS,
                accept_within: 10 * DAY_MS,
                envelope: envelope(&id, &submit_id, from_agency, to_agency, at, bytes),
            };
            let basis = new.basis.label();
            changes
                .seen
                .push((format!("{from_agency}/{submit_id}"), at, [0; 32]));
            // The referral's life: DELIVERED (the broker), RECEIVED, and in the steady
            // profile on to COMPLETED (the recipient), each 20 ms after the one before.
            let mut statuses = vec![Status::Received];
            if profile == Profile::Steady && i + STEADY_OPEN < total {
                statuses.extend([Status::Accepted, Status::InProgress, Status::Completed]);
            }
            let steps = std::iter::once(None).chain(statuses.into_iter().map(Some));
            // (transition, state before, actor, cause, time), in order.
            let mut life = vec![(
                referral::submit(new, &submit_id, at),
                "",
                from_agency.as_str(),
                submit_id.clone(),
                at,
            )];
            for (step, status) in (0u64..).zip(steps) {
                let t_at = at + 5 + 20 * i64::try_from(step)?;
                let (event, actor, cause) = match status {
                    None => (Event::DeliveryConfirmed, "broker", String::new()),
                    Some(status) => (
                        Event::Status {
                            by: to_agency.clone(),
                            status,
                            note: String::new(),
                        },
                        to_agency.as_str(),
                        uuid_like(None, i, 3 + step),
                    ),
                };
                let last = &life[life.len() - 1].0.referral;
                let next =
                    referral::apply(last, &event, &cause, t_at).map_err(|e| anyhow!("{e}"))?;
                if !cause.is_empty() {
                    changes
                        .seen
                        .push((format!("{actor}/{cause}"), t_at, [0; 32]));
                }
                let before = last.state.as_str();
                life.push((next, before, actor, cause, t_at));
            }
            for (t, from_state, actor, cause, t_at) in &life {
                let event = if from_state.is_empty() {
                    "referral.submitted"
                } else {
                    "referral.state"
                };
                drafts.push(
                    audit::Entry::draft(event, *t_at)
                        .referral(&id)
                        .actor(actor)
                        .agency(to_agency)
                        .states(from_state, t.referral.state.as_str())
                        .message(cause)
                        .basis(&basis),
                );
                let deadline = |kind: &DeadlineKind, at: &i64| Deadline {
                    at: *at,
                    kind: *kind,
                    referral_id: id.clone(),
                };
                for e in &t.effects {
                    match e {
                        Effect::Schedule { kind, at } => {
                            changes.deadlines_put.push(deadline(kind, at));
                        }
                        Effect::Unschedule { kind, at } => {
                            let d = deadline(kind, at);
                            changes.deadlines_put.retain(|x| *x != d);
                        }
                        _ => {}
                    }
                }
            }
            let t = life.pop().context("a referral's life")?.0;
            counts.change(None, &Summary::of(&t.referral));
            changes.referrals.push(t.referral);
        }
        let (entries, new_head) = audit::chain(head, drafts);
        changes.audit = entries;
        changes.counts = Some(counts.clone());
        head = new_head;
        // Not reopened for sled's snapshot as it goes: a leading broker's store is not.
        store.commit(&changes).map_err(|e| anyhow!("commit: {e}"))?;
        if profile == Profile::Steady && last_at.saturating_sub(pruned_at) >= DAY_MS {
            // As the broker's pruning would have left it, once a day of the store's time
            // (a prune sweeps every bucket of applied ids: done every batch, it was most of
            // the fill's time).
            store
                .prune_seen(last_at - RETENTION_MS)
                .map_err(|e| anyhow!("prune: {e}"))?;
            pruned_at = last_at;
        }
        n = end;
    }
    // As a broker stopped by SIGTERM does once its loop has stopped, so that the first start
    // is a start after a stop. Without it (`--scale-after-crash`) the first start replays
    // everything the fill wrote: a broker killed after leading that long without a restart.
    if !after_crash {
        store
            .snapshot_if_due()
            .map_err(|e| anyhow!("snapshot: {e}"))?;
    }
    Ok(())
}

/// fsyncs every file under `dir`, and the directories.
fn sync_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_files(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("sync {}", path.display()))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("sync {}", dir.display()))
}

/// Fills a store to each size in `sizes` (ascending) and measures the broker on it.
pub(crate) async fn run(
    nats_bin: &Path,
    dir: &Path,
    sizes: &[u64],
    message_bytes: usize,
    profile: Profile,
    after_crash: bool,
) -> Result<Vec<ScalePoint>> {
    let agencies: Vec<String> = (1..=8).map(|i| format!("bench-{i:02}")).collect();
    let keys = Keys::generate(&dir.join("keys"), &agencies)?;
    let registry = dir.join("registry.toml");
    keys.write_registry(&registry)?;
    let store = dir.join("store");
    let mut points = Vec::new();
    let mut filled = 0;
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let base_at = yeongye_adapter::ids::now_ms() - i64::try_from(largest)? * profile.step_ms();
    let mut fill_secs = 0.0;
    for &size in sizes {
        let started = Instant::now();
        eprintln!("scale ({profile}): filling the store to {size} referrals");
        let (store_c, agencies_c) = (store.clone(), agencies.clone());
        tokio::task::spawn_blocking(move || {
            fill(
                &store_c,
                &agencies_c,
                (filled, size, largest),
                base_at,
                message_bytes,
                profile,
                after_crash,
            )
        })
        .await
        .context("fill task")??;
        // The fill's files on disk before the broker starts: the kernel writes gigabytes of
        // dirty pages back ~30 s after they were written, in the middle of the broker's first
        // prune, and a disk busy with that stalls any sled write (a turn's commit as much as a
        // prune step: 0.3-0.6 s with 3 GB of another file's pages written back, measured).
        // The fill is the bench's setup, not the broker's run.
        let store_c = store.clone();
        tokio::task::spawn_blocking(move || sync_files(&store_c))
            .await
            .context("sync task")??;
        fill_secs += started.elapsed().as_secs_f64();
        filled = size;
        let store_bytes = procs::disk_usage(&store);

        // A fresh nats-server each time: the broker's streams and consumers are created anew,
        // as on a first start against this store.
        let nats = Nats::start(nats_bin, &dir.join(format!("nats-{size}")), Sync::Default).await?;
        let offset_file = dir.join(format!("clock-offset-{size}"));
        std::fs::write(&offset_file, CLOCK_AHEAD_MS.to_string())?;
        let extra = format!(
            "{BROKER_RETENTION}testing_clock_offset_file = \"{}\"\n",
            offset_file.display()
        );
        let first = measure(
            dir,
            &format!("broker-{size}"),
            &nats,
            &store,
            &registry,
            &keys,
            &extra,
        )
        .await?;
        // A restart: sled 0.34 writes its snapshot only when it opens a store, so the first
        // start above replayed every write since the store was last opened (the fill); a
        // restart replays only what came after.
        let restart = measure(
            dir,
            &format!("broker-{size}-restart"),
            &nats,
            &store,
            &registry,
            &keys,
            &extra,
        )
        .await?;
        drop(nats);
        let point = ScalePoint {
            profile,
            referrals: size,
            open: match profile {
                Profile::Open => size,
                Profile::Steady => size.saturating_sub(largest.saturating_sub(STEADY_OPEN)),
            },
            store_bytes,
            store_bytes_per_referral: store_bytes as f64 / size.max(1) as f64,
            start_to_ready_secs: first.ready.as_secs_f64(),
            rss_bytes: first.rss,
            hwm_bytes: first.hwm,
            restart_hwm_bytes: restart.hwm,
            peak_rss_bytes: first.hwm.max(restart.hwm),
            prune_secs: first.prune.as_secs_f64(),
            prune_steps: first.prune_steps,
            longest_step_secs: first.longest_step.max(restart.longest_step),
            restart_to_ready_secs: restart.ready.as_secs_f64(),
            restart_rss_bytes: restart.rss,
            fill_secs,
        };
        eprintln!(
            "scale ({profile}): {size} referrals: ready in {:.2} s, RSS {:.0} MB (peak {:.0} MB through the first prune: {:.1} s, {} steps); restarted: ready in {:.2} s, RSS {:.0} MB (peak {:.0} MB); longest background step {:.1} ms; {:.0} bytes/referral on disk",
            point.start_to_ready_secs,
            point.rss_bytes as f64 / 1e6,
            point.hwm_bytes as f64 / 1e6,
            point.prune_secs,
            point.prune_steps,
            point.restart_to_ready_secs,
            point.restart_rss_bytes as f64 / 1e6,
            point.restart_hwm_bytes as f64 / 1e6,
            point.longest_step_secs * 1e3,
            point.store_bytes_per_referral
        );
        points.push(point);
    }
    Ok(points)
}

/// One run of the broker on the store, as [`measure`] saw it.
struct Run {
    /// Spawned → `/readyz` 200.
    ready: Duration,
    /// Resident memory two seconds after ready, bytes.
    rss: u64,
    /// Peak resident memory over the whole run (start, first prune), bytes.
    hwm: u64,
    /// Ready → the first prune done.
    prune: Duration,
    prune_steps: u64,
    /// The longest background step of the run (any task), seconds.
    longest_step: f64,
}

/// Starts the broker on `store`, waits for it to be ready and for its first prune to finish
/// (read from its `/metrics`), and stops it: start-up time, memory when ready, and the peak
/// over the whole run.
async fn measure(
    dir: &Path,
    name: &str,
    nats: &Nats,
    store: &Path,
    registry: &Path,
    keys: &Keys,
    extra: &str,
) -> Result<Run> {
    let mut broker = Broker::spawn(
        &dir.join(name),
        &[nats.url()],
        store,
        registry,
        &keys.broker,
        256,
        extra,
    )?;
    let ready = broker.wait_ready(Duration::from_secs(300)).await?;
    let ready_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = procs::proc_stats(broker.pid())?.rss;
    // The prune starts at the loop's first step and is over when the gauge says so.
    let steps = |b: &Broker| b.metric("yeongye_background_steps_total{task=\"prune\"}");
    let prune = loop {
        let pruning = broker.metric("yeongye_background_pruning");
        if pruning == Some(0.0) && steps(&broker).is_some_and(|n| n >= 1.0) {
            break ready_at.elapsed();
        }
        if ready_at.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("{name}: the first prune did not finish in 30 min");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let prune_steps = steps(&broker).unwrap_or(0.0) as u64;
    let longest_step = ["prune", "reopen"]
        .iter()
        .filter_map(|t| {
            broker.metric(&format!(
                "yeongye_background_step_seconds_max{{task=\"{t}\"}}"
            ))
        })
        .fold(0.0, f64::max);
    // Settled after the prune: the peak is the process's own high-water mark.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hwm = procs::proc_stats(broker.pid())?.hwm;
    broker.stop();
    Ok(Run {
        ready,
        rss,
        hwm,
        prune,
        prune_steps,
        longest_step,
    })
}

/// Opens the store at `dir` in this process and says what each step of a broker's start costs
/// in time and resident memory (for looking into the scale figures).
pub(crate) fn probe(dir: &Path) -> Result<()> {
    let rss = || procs::proc_stats(std::process::id()).map_or(0, |s| s.rss) as f64 / 1e6;
    let t = Instant::now();
    eprintln!("probe: before open: RSS {:.0} MB", rss());
    let store = SledStore::open(dir).map_err(|e| anyhow!("open: {e}"))?;
    eprintln!(
        "probe: open: {:.2} s, RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        rss()
    );
    let t = Instant::now();
    let counts = store.counts().map_err(|e| anyhow!("{e}"))?;
    let mut n = 0u64;
    store
        .for_each_watched(&mut |_| n += 1)
        .map_err(|e| anyhow!("{e}"))?;
    eprintln!(
        "probe: counts ({} agencies) and {n} watched summaries: {:.2} s, RSS {:.0} MB",
        counts.agencies.len(),
        t.elapsed().as_secs_f64(),
        rss()
    );
    let t = Instant::now();
    let bytes = yeongye_broker::cluster::snapshot::capture_to(&store, &mut std::io::sink())
        .map_err(|e| anyhow!("{e}"))?;
    eprintln!(
        "probe: a snapshot of the store read ({bytes} bytes, into nothing): {:.2} s, RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        rss()
    );
    let t = Instant::now();
    let n = store.referrals().map_err(|e| anyhow!("{e}"))?.len();
    eprintln!(
        "probe: {n} referrals decoded whole (the start before summaries): {:.2} s, RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        rss()
    );
    let t = Instant::now();
    let mut by_prefix = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for (prefix, len) in store.key_census().map_err(|e| anyhow!("{e}"))? {
        let e = by_prefix.entry(prefix).or_default();
        e.0 += 1;
        e.1 += len;
    }
    for (prefix, (n, bytes)) in &by_prefix {
        eprintln!("probe: {prefix:>4} {n:>9} keys, {bytes:>11} bytes of keys and values");
    }
    eprintln!("probe: census {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let d = store.dead_letters().map_err(|e| anyhow!("{e}"))?.len();
    let o = store.outbox().map_err(|e| anyhow!("{e}"))?.len();
    eprintln!(
        "probe: {d} dead letters, {o} outbox: {:.2} s, RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        rss()
    );
    Ok(())
}
