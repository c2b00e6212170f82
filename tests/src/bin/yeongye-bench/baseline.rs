//! The raw JetStream baseline, no broker logic: publish (PubAck awaited, with a message id) to
//! stream `BENCH_A` → a relay reads it through a durable pull consumer in batches, publishes
//! each message to `BENCH_B` with its PubAcks in flight together, then acknowledges the batch
//! → a sink reads `BENCH_B` through a durable pull consumer and acknowledges. The same message
//! size, storage, retention and duplicate window as the broker's streams, on the same server:
//! what the broker's consume → publish → consume path could do at best.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};

use crate::load::{self, PhaseResult, Plan, SendFn, Tracker};

const IN: &str = "BENCH_A";
const OUT: &str = "BENCH_B";

fn stream_config(name: &str, subject: &str, replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(24 * 3600),
        duplicate_window: Duration::from_secs(120),
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

fn pull_config(name: &str, max_ack_pending: i64) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending,
        ..Default::default()
    }
}

/// Runs the baseline phases in `plans` (in order) on the server at `url`, its streams with
/// `replicas` replicas (3 on a three-node cluster: the raw R3 round trip).
pub(crate) async fn run(
    url: &str,
    replicas: usize,
    message_bytes: usize,
    batch: usize,
    plans: &[(String, Plan)],
) -> Result<Vec<PhaseResult>> {
    let client = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 16)
        .connect(url)
        .await
        .context("connect")?;
    let js = jetstream::new(client.clone());
    let a = js
        .create_stream(stream_config(IN, "bench.a", replicas))
        .await
        .context("create stream BENCH_A")?;
    let b = js
        .create_stream(stream_config(OUT, "bench.b", replicas))
        .await
        .context("create stream BENCH_B")?;
    // As the broker's consumer: max_ack_pending = 8 batches.
    let relay_consumer = a
        .create_consumer(pull_config("relay", i64::try_from(batch * 8)?))
        .await?;
    let sink_consumer = b.create_consumer(pull_config("sink", 1000)).await?;

    let tracker = Tracker::new()?;
    let relay = tokio::spawn(relay(js.clone(), relay_consumer, batch));
    let sink = {
        let tracker = Arc::clone(&tracker);
        tokio::spawn(async move { sink(sink_consumer, &tracker).await })
    };

    let send: Arc<SendFn> = {
        let js = js.clone();
        // Keys (and message ids) stay unique across phases: the duplicate window is 2 minutes.
        let counter = Arc::new(AtomicU64::new(0));
        Arc::new(move |_| {
            let key = format!("b{}", counter.fetch_add(1, Ordering::Relaxed));
            let mut payload = Vec::with_capacity(message_bytes);
            payload.extend_from_slice(key.as_bytes());
            payload.push(b'\n');
            payload.resize(message_bytes.max(payload.len()), b'x');
            let js = js.clone();
            let id = key.clone();
            let fut = async move {
                let msg = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(payload))
                    .message_id(&id);
                js.send_publish("bench.a", msg).await?.await?;
                Ok(())
            };
            Ok((key, Box::pin(fut) as _))
        })
    };

    let mut results = Vec::new();
    for (name, plan) in plans {
        results.push(load::run(name, &tracker, *plan, Arc::clone(&send)).await?);
    }
    relay.abort();
    sink.abort();
    let _ = js.delete_stream(IN).await;
    let _ = js.delete_stream(OUT).await;
    Ok(results)
}

/// Consume a batch → publish each (PubAcks in flight together) → ack the batch.
async fn relay(js: jetstream::Context, c: consumer::PullConsumer, batch: usize) -> Result<()> {
    let mut messages = c
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    loop {
        let Some(first) = messages.next().await else {
            return Ok(());
        };
        let mut inbound = vec![first?];
        // Unconstrained by tokio's cooperative budget, as the broker's loop.
        tokio::task::unconstrained(async {
            while inbound.len() < batch {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => inbound.push(m),
                    _ => break,
                }
            }
        })
        .await;
        let mut acks = Vec::with_capacity(inbound.len());
        for m in &inbound {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
            let msg = jetstream::message::PublishMessage::build()
                .payload(m.payload.clone())
                .message_id(format!("relay-{seq}"));
            acks.push(js.send_publish("bench.b", msg).await?);
        }
        for ack in acks {
            ack.await?;
        }
        for m in &inbound {
            let _ = m.ack().await;
        }
    }
}

async fn sink(c: consumer::PullConsumer, tracker: &Tracker) -> Result<()> {
    let mut messages = c
        .stream()
        .max_messages_per_batch(256)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    while let Some(m) = messages.next().await {
        let m = m?;
        if let Some(end) = m.payload.iter().position(|b| *b == b'\n')
            && let Ok(key) = std::str::from_utf8(&m.payload[..end])
        {
            tracker.complete(key);
        }
        let _ = m.ack().await;
    }
    Ok(())
}

/// Serial appends of `bytes`-byte messages to a stream of `replicas` replicas, each awaiting
/// its PubAck before the next: what the broker's loop waits for per turn when it appends the
/// turn's change set to the state log (same size as the run's mean record).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct AppendProbe {
    pub(crate) replicas: usize,
    pub(crate) bytes: usize,
    pub(crate) appends: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) mean_ms: f64,
    /// CPU time of the nats-server processes per append (all nodes), ms.
    pub(crate) nats_cpu_ms: f64,
}

pub(crate) async fn append_probe(
    url: &str,
    replicas: usize,
    bytes: usize,
    appends: usize,
    nats_pids: &[u32],
) -> Result<AppendProbe> {
    let client = async_nats::connect(url).await.context("connect")?;
    let js = jetstream::new(client);
    let name = format!("BENCH_LOG_R{replicas}");
    let subject = format!("bench.log.r{replicas}");
    let config = stream::Config {
        max_message_size: -1,
        ..stream_config(&name, &subject, replicas)
    };
    js.create_stream(config)
        .await
        .with_context(|| format!("create stream {name}"))?;
    let payload = Bytes::from(vec![b'x'; bytes]);
    let mut ms = Vec::with_capacity(appends);
    let cpu = || -> f64 {
        nats_pids
            .iter()
            .filter_map(|p| crate::procs::proc_stats(*p).ok())
            .map(|s| s.cpu_secs)
            .sum()
    };
    let cpu_before = cpu();
    for _ in 0..appends {
        let started = std::time::Instant::now();
        js.publish(subject.clone(), payload.clone()).await?.await?;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let nats_cpu_ms = (cpu() - cpu_before) * 1e3 / appends.max(1) as f64;
    let _ = js.delete_stream(&name).await;
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(AppendProbe {
        replicas,
        bytes,
        appends,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        nats_cpu_ms,
    })
}
