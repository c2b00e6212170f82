//! The end-to-end run: the real `referral-broker` and one `agency-adapter run` process per
//! agency, on the same nats-server as the baseline. Each agency system sends referrals to the
//! next agency through the adapter SDK in-process (`Adapter::prepare_referral` + `publish`:
//! the PubAck is awaited, as the SDK does); the recipient's adapter process takes the delivery,
//! records it and sends the `RECEIVED` receipt; the broker records `RECEIVED` and notifies the
//! sender. A referral counts as done when that `RECEIVED` notification is published, seen by
//! a core-NATS tap on `yeongye.out.*.notification` (it does not consume anything).
//!
//! Why the SDK in-process for sending: `agency-adapter` has no long-running send mode (its
//! `send` command is one process per referral), so an agency system that sends at a rate uses
//! the SDK; receiving goes through the real adapter processes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::Semaphore;
use yeongye_adapter::{Adapter, AdapterConfig, Incoming, ItemKind, v1};

use crate::load::{self, Offer, PhaseResult, Plan, SendFn, Tracker};
use crate::procs::{self, AdapterProc, Broker, ProcStats};

/// Who reads the agencies' consumers (takes deliveries, sends receipts, takes notifications).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Receivers {
    /// One `agency-adapter run` process per agency: what an agency deploys. It hands over one
    /// item at a time (record, flush, receipt and its PubAck, ack round trip).
    Processes,
    /// The agency systems in-process, on the SDK (`Adapter::incoming`), marking up to
    /// [`SDK_IN_FLIGHT`] items done at once: the broker's limit without the adapter's
    /// one-at-a-time loop in front of it.
    Sdk,
}

impl std::fmt::Display for Receivers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Receivers::Processes => "adapter processes",
            Receivers::Sdk => "SDK in-process",
        })
    }
}

/// Items an in-process agency system marks done at once.
pub(crate) const SDK_IN_FLIGHT: usize = 256;

pub(crate) struct Settings<'a> {
    pub(crate) receivers: Receivers,
    /// Whether to run the latency phase at a fraction of the maximum.
    pub(crate) partial: bool,
    pub(crate) dir: &'a Path,
    pub(crate) nats_url: &'a str,
    pub(crate) nats_pid: u32,
    pub(crate) agencies: usize,
    pub(crate) message_bytes: usize,
    pub(crate) batch_size: usize,
    pub(crate) adapter_inbox: bool,
    pub(crate) max: Plan,
    /// The latency phase runs open-loop at this fraction of the measured maximum.
    pub(crate) fraction: f64,
}

/// CPU time each kind of process spent per referral completed in a phase, milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct CpuPerReferral {
    pub(crate) broker_ms: f64,
    pub(crate) nats_ms: f64,
    pub(crate) adapters_ms: f64,
    pub(crate) bench_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct E2eResult {
    pub(crate) receivers: Receivers,
    pub(crate) max: PhaseResult,
    pub(crate) max_cpu: CpuPerReferral,
    pub(crate) partial: Option<PhaseResult>,
    pub(crate) broker_rss_bytes: u64,
    pub(crate) broker_hwm_bytes: u64,
    /// Store size on disk after the run, per referral stored.
    pub(crate) store_bytes_per_referral: f64,
    pub(crate) referrals_stored: u64,
    /// Deliveries the recipients' adapters printed (a cross-check of the tap).
    pub(crate) adapter_deliveries: u64,
}

/// A referral of about `bytes` bytes on the wire (the envelope), under the Social Security
/// Benefits Act (no consent record needed), for case management, declaring exactly the data
/// categories its client fields carry.
fn referral(to: &str, reason: &str) -> v1::Referral {
    v1::Referral {
        to_agency: to.to_owned(),
        client: Some(v1::Client {
            pseudonym_id: "bench-client-7f3a".to_owned(),
            name: "홍길동".to_owned(),
            birth_date: "1958-03-14".to_owned(),
            phone: "010-0000-0000".to_owned(),
            address: "한빛구 한빛로 123, 101동 1001호".to_owned(),
            household: "1인 가구, 월세 체납 3개월, 기초연금 수급".to_owned(),
        }),
        field: v1::FieldOfNeed::Livelihood.into(),
        urgency: v1::Urgency::Routine.into(),
        reason: reason.to_owned(),
        legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(v1::StatutoryBasis {
            statute: v1::Statute::SocialSecurityBenefitsAct.into(),
            justification: "위기가구 발굴 (benchmark)".to_owned(),
        })),
        data_categories: vec![
            v1::DataCategory::Identity.into(),
            v1::DataCategory::Contact.into(),
            v1::DataCategory::Household.into(),
        ],
        purpose: v1::Purpose::CaseManagement.into(),
        ..Default::default()
    }
}

/// The reason text that makes a referral's envelope `bytes` long.
fn padding_for(adapter: &Adapter, to: &str, bytes: usize) -> Result<String> {
    let size = |reason: &str| -> Result<usize> {
        let out = adapter.prepare_referral(referral(to, reason))?;
        Ok(out.envelope().encoded_len())
    };
    let mut reason = String::from("긴급 생계지원 연계 요청 (benchmark) ");
    let base = size(&reason)?;
    if base < bytes {
        reason.push_str(&".".repeat(bytes - base));
        // Longer fields take longer length prefixes: trim back to the target.
        while size(&reason)? > bytes && reason.ends_with('.') {
            reason.pop();
        }
    }
    Ok(reason)
}

fn sum_stats(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| procs::proc_stats(*p).ok())
        .map(|s| s.cpu_secs)
        .sum()
}

pub(crate) async fn run(s: Settings<'_>) -> Result<E2eResult> {
    let agencies: Vec<String> = (1..=s.agencies).map(|i| format!("bench-{i:02}")).collect();
    std::fs::create_dir_all(s.dir)?;
    let registry = s.dir.join("registry.toml");
    procs::write_registry(&registry, &agencies)?;
    let store = s.dir.join("broker/store");
    let mut broker = Broker::spawn(
        &s.dir.join("broker"),
        s.nats_url,
        &store,
        &registry,
        s.batch_size,
    )?;
    broker.wait_ready(Duration::from_secs(60)).await?;

    let mut adapters = Vec::new();
    if s.receivers == Receivers::Processes {
        for a in &agencies {
            adapters.push(AdapterProc::spawn(
                &s.dir.join("adapters").join(a),
                a,
                s.nats_url,
                s.adapter_inbox,
            )?);
        }
        for a in &mut adapters {
            a.wait_receiving(Duration::from_secs(60)).await?;
        }
    }

    // The agency systems' SDK handles: they send; with `Receivers::Sdk` they also receive.
    let mut senders = Vec::new();
    for a in &agencies {
        let cfg = AdapterConfig::new(a.clone(), [s.nats_url], s.dir.join("sdk").join(a));
        senders.push(Adapter::connect(cfg).await.context("SDK connect")?);
    }
    let sdk_deliveries = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    if s.receivers == Receivers::Sdk {
        for adapter in &senders {
            let incoming = adapter.incoming().await.context("SDK incoming")?;
            receivers.push(tokio::spawn(receive(incoming, Arc::clone(&sdk_deliveries))));
        }
    }
    let reason = padding_for(&senders[0], &agencies[1 % agencies.len()], s.message_bytes)?;

    let tracker = Tracker::new()?;
    let tap = {
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(s.nats_url)
            .await?;
        let mut sub = client.subscribe("yeongye.out.*.notification").await?;
        let tracker = Arc::clone(&tracker);
        tokio::spawn(async move {
            let _keep = client;
            while let Some(m) = sub.next().await {
                let Ok(env) = v1::Envelope::decode(m.payload.as_ref()) else {
                    continue;
                };
                let Ok(n) = v1::Notification::decode(env.payload.as_slice()) else {
                    continue;
                };
                if n.state == v1::ReferralState::Received as i32 {
                    tracker.complete(&n.referral_id);
                }
            }
        })
    };

    let send: Arc<SendFn> = {
        let senders = senders.clone();
        let agencies = agencies.clone();
        Arc::new(move |n| {
            let i = usize::try_from(n)? % senders.len();
            let to = &agencies[(i + 1) % agencies.len()];
            let out = senders[i].prepare_referral(referral(to, &reason))?;
            let key = out.referral_id().to_owned();
            let adapter = senders[i].clone();
            let fut = async move {
                adapter.publish(&out).await?;
                Ok(())
            };
            Ok((key, Box::pin(fut) as _))
        })
    };

    let adapter_pids: Vec<u32> = adapters.iter().map(AdapterProc::pid).collect();
    let cpu_before = (
        sum_stats(&[broker.pid()]),
        sum_stats(&[s.nats_pid]),
        sum_stats(&adapter_pids),
        sum_stats(&[std::process::id()]),
    );
    let max = load::run(
        &format!("end-to-end max, {}", s.receivers),
        &tracker,
        s.max,
        Arc::clone(&send),
    )
    .await?;
    let per = |after: f64, before: f64| (after - before) * 1000.0 / (max.completed.max(1) as f64);
    let max_cpu = CpuPerReferral {
        broker_ms: per(sum_stats(&[broker.pid()]), cpu_before.0),
        nats_ms: per(sum_stats(&[s.nats_pid]), cpu_before.1),
        adapters_ms: per(sum_stats(&adapter_pids), cpu_before.2),
        bench_ms: per(sum_stats(&[std::process::id()]), cpu_before.3),
    };
    check_rejections(&adapters)?;
    if max.throughput < 1.0 {
        bail!(
            "no referral reached RECEIVED; see {}",
            broker.log.display()
        );
    }
    let partial = if s.partial {
        let rate = max.throughput * s.fraction;
        let partial_plan = Plan {
            offer: Offer::Open { rate },
            ..s.max
        };
        let name = format!("end-to-end {:.0}%, {}", s.fraction * 100.0, s.receivers);
        let partial = load::run(&name, &tracker, partial_plan, Arc::clone(&send)).await?;
        check_rejections(&adapters)?;
        Some(partial)
    } else {
        None
    };

    let stats: ProcStats = procs::proc_stats(broker.pid())?;
    tap.abort();
    for a in &senders {
        let _ = a.drain().await;
    }
    for r in receivers {
        r.abort();
    }
    let adapter_deliveries = adapters
        .iter()
        .map(|a| a.lines.deliveries.load(Ordering::Relaxed))
        .sum::<u64>()
        + sdk_deliveries.load(Ordering::Relaxed);
    drop(adapters);
    broker.stop();
    let referrals_stored = max.sent + partial.as_ref().map_or(0, |p| p.sent);
    let disk = procs::disk_usage(&store);
    Ok(E2eResult {
        receivers: s.receivers,
        max,
        max_cpu,
        partial,
        broker_rss_bytes: stats.rss,
        broker_hwm_bytes: stats.hwm,
        store_bytes_per_referral: disk as f64 / referrals_stored.max(1) as f64,
        referrals_stored,
        adapter_deliveries,
    })
}

/// An agency system on the SDK: takes each item (holding nothing: the bench keeps no data)
/// and marks it done, up to [`SDK_IN_FLIGHT`] at once.
async fn receive(mut incoming: Incoming, deliveries: Arc<AtomicU64>) {
    let permits = Arc::new(Semaphore::new(SDK_IN_FLIGHT));
    while let Some(next) = incoming.next().await {
        let item = match next {
            Ok(item) => item,
            Err(e) => {
                eprintln!("SDK incoming: {e}");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        if matches!(item.kind(), ItemKind::Delivery { .. }) {
            deliveries.fetch_add(1, Ordering::Relaxed);
        }
        tokio::spawn(async move {
            if let Err(e) = item.done().await {
                eprintln!("SDK done: {e}");
            }
            drop(permit);
        });
    }
}

fn check_rejections(adapters: &[AdapterProc]) -> Result<()> {
    for a in adapters {
        let n = a.lines.rejections.load(Ordering::Relaxed);
        if n > 0 {
            let first = a
                .lines
                .first_rejection
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_default();
            bail!(
                "the broker rejected {n} message(s) of {}: {first}",
                a.agency
            );
        }
    }
    Ok(())
}
