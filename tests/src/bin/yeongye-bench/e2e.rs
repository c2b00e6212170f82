//! The end-to-end run: the real `referral-broker` (signatures required, its own signing key,
//! as in production) on the same nats-server as the baseline. Each agency system sends
//! referrals to the next agency through the adapter SDK in-process (`Adapter::prepare_referral`,
//! then `publish`: signed, PubAck awaited, as the SDK does); the recipient takes the delivery and
//! sends the signed `RECEIVED` receipt; the broker records `RECEIVED` and notifies the sender.
//! A referral counts as done when that `RECEIVED` notification is published, seen by a
//! core-NATS tap on `yeongye.out.*.notification` (it consumes nothing).
//!
//! Two kinds of recipients ([`Recipients`]):
//! - `agency-adapter run` processes, one per agency: what an agency deploys. Each handles one
//!   item at a time (dedup record in sled, flush, receipt with its PubAck, ack round trip), so
//!   it caps the rate well below what the broker does; the figure says what a district gets
//!   with today's adapter.
//! - the wire protocol spoken in-process (`docs/PROTOCOL.md`, "Receiving"), batched like the
//!   baseline's relay: a batch from the agency's durable consumer, the receipts of its
//!   deliveries published with their PubAcks in flight together, then the batch acknowledged.
//!   The bench's agency system keeps nothing, so it records nothing. This is the broker's own
//!   limit, and the figure compared with the baseline.
//!
//! Why not the SDK for receiving: each `Item::done` records and flushes on its own (one sled
//! flush per item), so the SDK receives at the adapter process's pace; the batched wire
//! recipient measures the broker instead. (Several `Item::done` at once used to hang in sled
//! 0.34's `flush_async`, found here; the adapter now flushes on the blocking pool.) The SDK
//! sends.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer::PullConsumer, message::PublishMessage};
use futures::{FutureExt, StreamExt};
use prost::Message as _;
use yeongye_adapter::{Adapter, AdapterConfig, v1};
use yeongye_proto::signing::PrivateKey;
use yeongye_proto::subject::{self, InKind};

use crate::load::{self, Offer, PhaseResult, Plan, SendFn, Tracker};
use crate::procs::{self, AdapterProc, Broker, Keys, LineCounts, ProcStats};

/// Who reads the agencies' consumers (takes deliveries, sends receipts, takes notifications).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Recipients {
    /// One `agency-adapter run` process per agency.
    Processes,
    /// The wire protocol in-process, batched.
    Wire,
}

impl std::fmt::Display for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recipients::Processes => "adapter processes",
            Recipients::Wire => "batched wire",
        })
    }
}

/// Largest batch a wire recipient reads and answers at once.
const WIRE_BATCH: usize = 256;

pub(crate) struct Settings<'a> {
    pub(crate) recipients: Recipients,
    /// Whether to run the latency phase at a fraction of the maximum.
    pub(crate) partial: bool,
    pub(crate) dir: &'a Path,
    /// Every NATS node's URL (one, or the three of a cluster), and their processes.
    pub(crate) nats_urls: &'a [String],
    pub(crate) nats_pids: &'a [u32],
    /// The broker's `stream_replicas` (3 on a cluster: then it is broker `a` of a group).
    pub(crate) replicas: usize,
    /// Kill the leading broker under load this way, after the other phases (cluster only).
    pub(crate) failover: Option<FailoverPlan>,
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
    pub(crate) recipients: Recipients,
    pub(crate) max: PhaseResult,
    pub(crate) max_cpu: CpuPerReferral,
    pub(crate) partial: Option<PhaseResult>,
    pub(crate) broker_rss_bytes: u64,
    pub(crate) broker_hwm_bytes: u64,
    /// Store size on disk after the run, per referral stored.
    pub(crate) store_bytes_per_referral: f64,
    pub(crate) referrals_stored: u64,
    /// Deliveries the recipients took (a cross-check of the tap).
    pub(crate) deliveries: u64,
    /// The state log's appends (one per committed turn) in the maximum phase.
    pub(crate) state_log_max: Option<StateLog>,
    /// The failover figures (cluster, first recipients only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failover: Option<crate::failover::FailoverResult>,
}

/// The state log `YEONGYE_STATE` over a phase: records appended (each a committed turn, or a
/// part of one over 256 KiB) per referral completed, and their mean size.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct StateLog {
    pub(crate) records_per_referral: f64,
    pub(crate) bytes_per_record: f64,
}

/// The state log's last sequence and the bytes it has taken in so far (`None`: no answer).
async fn state_log(js: &jetstream::Context) -> Option<(u64, u64)> {
    let mut stream = js.get_stream("YEONGYE_STATE").await.ok()?;
    let info = stream.info().await.ok()?;
    // A snapshot trims the log from the front: a trim inside a phase makes its bytes an
    // underestimate (the records count from the sequence, which a trim leaves alone).
    Some((info.state.last_sequence, info.state.bytes))
}

/// How the failover is measured: `rounds` kills of the leading broker, each under an open
/// loop at `fraction` of the measured maximum, `settle` after the load began; the load goes
/// on for `after` past the kill.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailoverPlan {
    pub(crate) rounds: usize,
    pub(crate) fraction: f64,
    pub(crate) settle: Duration,
    pub(crate) after: Duration,
}

/// The broker's `[cluster]`-related configuration lines for broker `name`, or none on a
/// single server (the default group of one, unchanged).
pub(crate) fn cluster_config(replicas: usize, name: &str) -> String {
    if replicas > 1 {
        format!("stream_replicas = {replicas}\nbroker_name = \"{name}\"\n")
    } else {
        String::new()
    }
}

/// A client of every node (the client picks one, and moves on if it dies).
pub(crate) async fn connect(urls: &[String], capacity: usize) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .subscription_capacity(capacity)
        .connect(urls)
        .await
        .context("connect to NATS")
}

/// A referral under the Social Security Benefits Act (no consent record needed), for case
/// management, declaring exactly the data categories its client fields carry.
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
        legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(
            v1::StatutoryBasis {
                statute: v1::Statute::SocialSecurityBenefitsAct.into(),
                justification: "위기가구 발굴 (benchmark)".to_owned(),
            },
        )),
        data_categories: vec![
            v1::DataCategory::Identity.into(),
            v1::DataCategory::Contact.into(),
            v1::DataCategory::Household.into(),
        ],
        purpose: v1::Purpose::CaseManagement.into(),
        ..Default::default()
    }
}

/// The reason text that makes a referral's signed envelope `bytes` long.
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

fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| procs::proc_stats(*p).ok())
        .map(|s| s.cpu_secs)
        .sum()
}

pub(crate) async fn run(s: Settings<'_>) -> Result<E2eResult> {
    std::fs::create_dir_all(s.dir)?;
    let agencies: Vec<String> = (1..=s.agencies).map(|i| format!("bench-{i:02}")).collect();
    let keys = Keys::generate(&s.dir.join("keys"), &agencies)?;
    let registry = s.dir.join("registry.toml");
    keys.write_registry(&registry)?;
    let store = s.dir.join("broker/store");
    let mut broker = Broker::spawn(
        &s.dir.join("broker"),
        s.nats_urls,
        &store,
        &registry,
        &keys.broker,
        s.batch_size,
        &cluster_config(s.replicas, "a"),
    )?;
    broker.wait_ready(Duration::from_secs(60)).await?;
    if s.replicas > 1 {
        // A standby is ready too: measure only once it leads.
        broker
            .wait_role("leader", Duration::from_millis(20), Duration::from_secs(60))
            .await?;
    }

    let mut adapters = Vec::new();
    let wire_counts = Arc::new(LineCounts::default());
    let mut recipients = Vec::new();
    match s.recipients {
        Recipients::Processes => {
            for (a, _, key) in &keys.agencies {
                adapters.push(AdapterProc::spawn(
                    &s.dir.join("adapters").join(a),
                    a,
                    s.nats_urls,
                    key,
                    keys.sealing_file(a).context("a sealing key")?,
                    &registry,
                    s.adapter_inbox,
                )?);
            }
            for a in &mut adapters {
                a.wait_receiving(Duration::from_secs(60)).await?;
            }
        }
        Recipients::Wire => {
            let client = connect(s.nats_urls, 1 << 16).await?;
            let js = jetstream::new(client);
            for (a, key, _) in &keys.agencies {
                let consumer: PullConsumer = js
                    .get_consumer_from_stream(subject::agency_consumer(a), subject::OUT_STREAM)
                    .await
                    .map_err(|e| anyhow::anyhow!("consumer of {a}: {e}"))?;
                recipients.push(tokio::spawn(wire_recipient(
                    js.clone(),
                    consumer,
                    a.clone(),
                    key.clone(),
                    Arc::clone(&wire_counts),
                )));
            }
        }
    }

    // The agency systems' SDK handles, for sending (signed with each agency's key).
    let mut senders = Vec::new();
    for a in &agencies {
        let mut cfg =
            AdapterConfig::new(a.clone(), s.nats_urls.to_vec(), s.dir.join("sdk").join(a));
        cfg.signing_key_file = keys.of(a).map(|(_, _, path)| path.clone());
        // Sealing on, as in production: every referral sealed to its recipient.
        cfg.registry = Some(registry.clone());
        cfg.sealing_key_file = keys.sealing_file(a).map(Path::to_path_buf);
        senders.push(Adapter::connect(cfg).await.context("SDK connect")?);
    }
    let reason = padding_for(&senders[0], &agencies[1 % agencies.len()], s.message_bytes)?;

    let tracker = Tracker::new()?;
    let tap = {
        let client = connect(s.nats_urls, 1 << 20).await?;
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
    let me = std::process::id();
    let info_js = jetstream::new(connect(s.nats_urls, 1024).await?);
    let log_before = state_log(&info_js).await;
    let before = (
        cpu_secs(&[broker.pid()]),
        cpu_secs(s.nats_pids),
        cpu_secs(&adapter_pids),
        cpu_secs(&[me]),
    );
    let max = load::run(
        &format!("end-to-end max, {}", s.recipients),
        &tracker,
        s.max,
        Arc::clone(&send),
    )
    .await?;
    let per = |after: f64, before: f64| (after - before) * 1000.0 / (max.completed.max(1) as f64);
    let max_cpu = CpuPerReferral {
        broker_ms: per(cpu_secs(&[broker.pid()]), before.0),
        nats_ms: per(cpu_secs(s.nats_pids), before.1),
        adapters_ms: per(cpu_secs(&adapter_pids), before.2),
        bench_ms: per(cpu_secs(&[me]), before.3),
    };
    let log_after = state_log(&info_js).await;
    let state_log_max = match (log_before, log_after) {
        (Some(b), Some(a)) if a.0 > b.0 => Some(StateLog {
            records_per_referral: (a.0 - b.0) as f64 / max.completed.max(1) as f64,
            bytes_per_record: a.1.saturating_sub(b.1) as f64 / (a.0 - b.0) as f64,
        }),
        _ => None,
    };
    check_rejections(&adapters, &wire_counts)?;
    if max.throughput < 1.0 {
        bail!("no referral reached RECEIVED; see {}", broker.log.display());
    }
    let partial = if s.partial {
        let rate = max.throughput * s.fraction;
        let plan = Plan {
            offer: Offer::Open { rate },
            ..s.max
        };
        let name = format!("end-to-end {:.0}%, {}", s.fraction * 100.0, s.recipients);
        let partial = load::run(&name, &tracker, plan, Arc::clone(&send)).await?;
        check_rejections(&adapters, &wire_counts)?;
        Some(partial)
    } else {
        None
    };

    let stats: ProcStats = procs::proc_stats(broker.pid())?;
    let failover = match s.failover {
        Some(plan) => Some(
            crate::failover::run(crate::failover::Setup {
                plan,
                rate: max.throughput * plan.fraction,
                leader: &mut broker,
                dir: s.dir,
                nats_urls: s.nats_urls,
                registry: &registry,
                signing_key: &keys.broker,
                batch_size: s.batch_size,
                replicas: s.replicas,
                drain: s.max.drain,
                tracker: &tracker,
                send: Arc::clone(&send),
            })
            .await?,
        ),
        None => None,
    };
    tap.abort();
    for r in recipients {
        r.abort();
    }
    for a in &senders {
        let _ = a.drain().await;
    }
    let deliveries = adapters
        .iter()
        .map(|a| a.lines.deliveries.load(Ordering::Relaxed))
        .sum::<u64>()
        + wire_counts.deliveries.load(Ordering::Relaxed);
    drop(adapters);
    broker.stop();
    // The next run on this server starts from empty streams (a new broker store with the old
    // streams would replay them), and from an empty state log, lease and snapshot bucket (a
    // new broker would restore the old state from them).
    if let Ok(client) = connect(s.nats_urls, 1024).await {
        let js = jetstream::new(client);
        for stream in [
            subject::IN_STREAM,
            subject::OUT_STREAM,
            "YEONGYE_STATE",
            "KV_YEONGYE_LEADER",
            "OBJ_YEONGYE_SNAPSHOTS",
        ] {
            let _ = js.delete_stream(stream).await;
        }
    }
    let referrals_stored = max.sent + partial.as_ref().map_or(0, |p| p.sent);
    let disk = procs::disk_usage(&store);
    Ok(E2eResult {
        recipients: s.recipients,
        max,
        max_cpu,
        partial,
        broker_rss_bytes: stats.rss,
        broker_hwm_bytes: stats.hwm,
        store_bytes_per_referral: disk as f64 / referrals_stored.max(1) as f64,
        referrals_stored,
        deliveries,
        state_log_max,
        failover,
    })
}

/// One agency's system speaking the wire protocol: read a batch from its consumer, publish the
/// signed `RECEIVED` receipt of each delivery (message id derived from the delivery's, as the
/// protocol requires) with the PubAcks in flight together, then acknowledge the batch.
async fn wire_recipient(
    js: jetstream::Context,
    consumer: PullConsumer,
    agency: String,
    key: PrivateKey,
    counts: Arc<LineCounts>,
) -> Result<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(WIRE_BATCH)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    let status_subject = subject::inbound(&agency, InKind::Status);
    loop {
        let Some(first) = messages.next().await else {
            return Ok(());
        };
        let mut batch = vec![first?];
        tokio::task::unconstrained(async {
            while batch.len() < WIRE_BATCH {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    _ => break,
                }
            }
        })
        .await;
        let mut acks = Vec::new();
        for m in &batch {
            let Ok(env) = v1::Envelope::decode(m.payload.as_ref()) else {
                continue;
            };
            if env.payload_type == v1::PayloadType::Rejection as i32 {
                if counts.rejections.fetch_add(1, Ordering::Relaxed) == 0 {
                    let r = v1::Rejection::decode(env.payload.as_slice()).unwrap_or_default();
                    *counts
                        .first_rejection
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(format!("{} {}", r.code().as_str_name(), r.detail));
                }
                continue;
            }
            if env.payload_type != v1::PayloadType::Delivery as i32 {
                continue;
            }
            let Ok(delivery) = v1::Delivery::decode(env.payload.as_slice()) else {
                continue;
            };
            counts.deliveries.fetch_add(1, Ordering::Relaxed);
            let update = v1::StatusUpdate {
                referral_id: delivery.referral_id,
                status: v1::Status::Received.into(),
                note: String::new(),
                ..Default::default()
            };
            let mut receipt = v1::Envelope {
                message_id: yeongye_adapter::ids::receipt_message_id(&env.message_id),
                sender: agency.clone(),
                sent_at_ms: yeongye_adapter::ids::now_ms(),
                payload_type: v1::PayloadType::StatusUpdate.into(),
                payload: update.encode_to_vec(),
                signature: Vec::new(),
                key_id: String::new(),
            };
            key.sign(&mut receipt);
            let publish = PublishMessage::build()
                .payload(receipt.encode_to_vec().into())
                .message_id(&receipt.message_id);
            acks.push(js.send_publish(status_subject.clone(), publish).await?);
        }
        for ack in acks {
            ack.await?;
        }
        for m in &batch {
            let _ = m.ack().await;
        }
    }
}

fn check_rejections(adapters: &[AdapterProc], wire: &LineCounts) -> Result<()> {
    let all = adapters
        .iter()
        .map(|a| (a.agency.as_str(), a.lines.as_ref()))
        .chain([("the wire recipients", wire)]);
    for (agency, lines) in all {
        let n = lines.rejections.load(Ordering::Relaxed);
        if n > 0 {
            let first = lines
                .first_rejection
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_default();
            bail!("the broker rejected {n} message(s) of {agency}: {first}");
        }
    }
    Ok(())
}

/// Seals and opens `n` bench referrals in this process: the CPU sealing adds per referral.
pub(crate) fn seal_cost(n: usize) -> Result<crate::report::SealCost> {
    use yeongye_proto::seal;
    let key = seal::PrivateKey::generate("bench-seal-1");
    let keys = seal::KeyFile {
        keys: vec![key.clone()],
    };
    let public = key.public();
    let mut sealed = Vec::with_capacity(n);
    let started = std::time::Instant::now();
    for i in 0..n {
        let mut r = referral("bench-recipient", "긴급 생계지원 연계 요청 (benchmark)");
        r.referral_id = format!("seal-cost-{i}");
        r.from_agency = "bench-sender".to_owned();
        seal::seal_referral(&mut r, &public).map_err(|e| anyhow::anyhow!("{e}"))?;
        sealed.push(r);
    }
    let seal_us = started.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
    let started = std::time::Instant::now();
    for r in &sealed {
        seal::open_referral(r, &keys, 0)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .context("sealed")?;
    }
    let open_us = started.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
    Ok(crate::report::SealCost {
        seal_us,
        open_us,
        referrals: n,
    })
}
