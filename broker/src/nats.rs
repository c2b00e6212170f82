//! The broker's NATS side: connecting (as NATS user `broker`, over TLS when configured), and the
//! streams and consumers it owns.
//!
//! The broker creates both streams and every agency's consumer at start-up; agencies never
//! create them. Its own durable consumer is positioned from the store's checkpoint: if the
//! consumer has acknowledged past what the store holds (the store lost its last writes in a power
//! cut, or was deleted), the consumer is recreated to start right after the checkpoint, so the
//! lost part is replayed from the stream.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{ConnectOptions, ServerAddr};
use yeongye_proto::subject;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::registry::Registry;
use yeongye_proto::credentials::{self, Credentials};

const DAY: Duration = Duration::from_secs(24 * 3600);
/// How long a delivered, unacknowledged message waits before redelivery.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

pub async fn connect(cfg: &Config) -> Result<async_nats::Client> {
    let addrs = cfg
        .nats_urls
        .iter()
        .map(|u| {
            u.parse::<ServerAddr>().map_err(|e| {
                Error::InvalidConfig(format!("nats url {:?}: {e}", credentials::redact_url(u)))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let options = ConnectOptions::new();
    secure(options, cfg)?
        .name("referral-broker")
        // Its NATS user may subscribe below this prefix only (onboard/nats_conf.rs).
        .custom_inbox_prefix(subject::inbox_prefix(yeongye_proto::BROKER_ID))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // A partitioned server is silent, not closed: notice it in seconds.
        .ping_interval(yeongye_proto::rules::CLIENT_PING_INTERVAL)
        .event_callback(|event| async move {
            match event {
                // Permission violations arrive only here.
                async_nats::Event::ServerError(e) => {
                    tracing::error!(cause = %e, "nats server error")
                }
                async_nats::Event::ClientError(e) => {
                    tracing::error!(cause = %e, "nats client error")
                }
                async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                async_nats::Event::Connected => tracing::info!("nats connected"),
                other => tracing::info!(event = %other, "nats event"),
            }
        })
        .connect(addrs)
        .await
        .map_err(Error::nats)
}

/// Adds the configured credentials and TLS to `options`: user and password from
/// `nats_credentials_file`; with `nats_tls_ca_file`, TLS required and that CA the only one
/// trusted; a client certificate if configured. Files are checked here, so that a wrong path
/// fails at start instead of in the background reconnect loop. Never logs the password.
pub fn secure(mut options: ConnectOptions, cfg: &Config) -> Result<ConnectOptions> {
    if let Some(path) = &cfg.nats_credentials_file {
        // Refused if others may read it (credentials::check_private).
        let creds = Credentials::load(path)?;
        tracing::info!(user = %creds.user, file = %path.display(), "NATS credentials");
        options = options.user_and_password(creds.user, creds.password);
    }
    cfg.check_tls_files()?;
    if let Some(ca) = &cfg.nats_tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (
        &cfg.nats_tls_client_cert_file,
        &cfg.nats_tls_client_key_file,
    ) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(options)
}

pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .ack_timeout(Duration::from_secs(10))
        .build(client)
}

fn stream_config(
    name: &str,
    subjects: &str,
    days: u32,
    max_msg: usize,
    replicas: usize,
) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: DAY * days,
        duplicate_window: Duration::from_secs(120),
        max_message_size: i32::try_from(max_msg).unwrap_or(i32::MAX),
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Creates or updates `YEONGYE_IN` and `YEONGYE_OUT`.
pub async fn ensure_streams(js: &jetstream::Context, cfg: &Config) -> Result<()> {
    let inbound = stream_config(
        subject::IN_STREAM,
        subject::IN_SUBJECTS,
        cfg.inbound_retention_days,
        cfg.max_message_bytes,
        cfg.stream_replicas,
    );
    // Deliveries carry the sender's whole envelope, so the outbound limit is a little larger.
    let outbound = stream_config(
        subject::OUT_STREAM,
        subject::OUT_SUBJECTS,
        cfg.outbound_retention_days,
        cfg.max_message_bytes + 4096,
        cfg.stream_replicas,
    );
    for config in [inbound, outbound] {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| Error::Nats(format!("stream {name}: {e}")))?;
    }
    Ok(())
}

/// How the broker's streams stand (for operators' metrics): for each, its replicas, how many
/// are up to date, and its leader. A stream NATS does not answer for (no quorum, no leader)
/// counts no current replica and no leader.
pub async fn stream_health(
    js: &jetstream::Context,
    replicas: usize,
) -> Vec<crate::ops::StreamHealth> {
    let mut out = Vec::new();
    let lease = format!("KV_{}", crate::cluster::lease::LEASE_BUCKET);
    let snapshots = format!("OBJ_{}", crate::cluster::snapshot::SNAPSHOT_BUCKET);
    let names = [
        subject::IN_STREAM,
        subject::OUT_STREAM,
        crate::cluster::log::STATE_STREAM,
        lease.as_str(),
        snapshots.as_str(),
    ];
    for name in names {
        let info = match js.get_stream(name).await {
            Ok(mut s) => s.info().await.cloned().ok(),
            Err(_) => None,
        };
        let (current, leader) = match info.as_ref().and_then(|i| i.cluster.clone()) {
            Some(c) => {
                let peers = c
                    .replicas
                    .iter()
                    .filter(|p| p.current && !p.offline)
                    .count();
                (usize::from(c.leader.is_some()) + peers, c.leader)
            }
            // A single server without a cluster: it is the stream.
            None if info.is_some() => (1, Some("(single server)".to_owned())),
            None => (0, None),
        };
        out.push(crate::ops::StreamHealth {
            name: name.to_owned(),
            replicas,
            current,
            leader,
        });
    }
    out
}

/// Creates the durable consumer `agency-<id>` of every registered agency (existing ones are
/// left as they are).
pub async fn ensure_agency_consumers(js: &jetstream::Context, registry: &Registry) -> Result<()> {
    let out = js
        .get_stream(subject::OUT_STREAM)
        .await
        .map_err(Error::nats)?;
    for agency in registry.iter() {
        let name = subject::agency_consumer(&agency.id);
        out.get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subject::outbound_filter(&agency.id),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::Nats(format!("consumer {name}: {e}")))?;
    }
    Ok(())
}

fn broker_consumer_config(cfg: &Config, checkpoint: u64) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subject::BROKER_CONSUMER.to_owned()),
        filter_subject: subject::IN_SUBJECTS.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: i64::try_from(cfg.batch_size * 8).unwrap_or(i64::MAX),
        deliver_policy: if checkpoint == 0 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: checkpoint + 1,
            }
        },
        ..Default::default()
    }
}

/// The broker's durable consumer on `YEONGYE_IN`, for a broker that begins to lead (at every
/// start, and at a takeover) with its store at `checkpoint`.
///
/// Kept as it is if nothing is outstanding on it and it has acknowledged no further than the
/// store holds. Otherwise recreated to start right after the lower of its ack floor and the
/// checkpoint: messages the previous leader was given but did not acknowledge come again at
/// once, not after `ack_wait` (they are recognised as applied if they were), and if the store
/// is behind what was acknowledged (it lost its last writes, or was deleted), that part is
/// replayed from the stream.
pub async fn broker_consumer(
    js: &jetstream::Context,
    cfg: &Config,
    checkpoint: u64,
) -> Result<consumer::PullConsumer> {
    let inbound = js
        .get_stream(subject::IN_STREAM)
        .await
        .map_err(Error::nats)?;
    let mut start = checkpoint;
    if let Ok(info) = inbound.consumer_info(subject::BROKER_CONSUMER).await {
        let acked = info.ack_floor.stream_sequence;
        if acked <= checkpoint && info.num_ack_pending == 0 {
            return inbound
                .get_consumer(subject::BROKER_CONSUMER)
                .await
                .map_err(Error::nats);
        }
        if acked > checkpoint {
            tracing::warn!(
                acked,
                checkpoint,
                "the store is behind what the broker acknowledged: replaying the inbound stream from the checkpoint"
            );
        } else {
            tracing::info!(
                acked,
                outstanding = info.num_ack_pending,
                "taking over messages given to a previous leader: from the ack floor on"
            );
        }
        start = acked.min(checkpoint);
        inbound
            .delete_consumer(subject::BROKER_CONSUMER)
            .await
            .map_err(Error::nats)?;
    }
    // A consumer deleted on a cluster can still be there for a moment (a node that missed the
    // deletion retries it: "not cleaned up"): the create is then taken as an update of it, which
    // may not move the start (10012). Seen after a partition: the broker stepped down on it and
    // took the lease again at once, thousands of times. Deleted again, and waited for.
    let started = Instant::now();
    loop {
        match inbound
            .create_consumer(broker_consumer_config(cfg, start))
            .await
        {
            Ok(consumer) => return Ok(consumer),
            Err(e) if is_consumer_create_conflict(&e) && started.elapsed() < RECREATE_BUDGET => {
                tracing::warn!(cause = %e, "the inbound consumer is still there: deleting it again");
                let _ = inbound.delete_consumer(subject::BROKER_CONSUMER).await;
                tokio::time::sleep(RECREATE_PAUSE).await;
            }
            Err(e) => return Err(Error::nats(e)),
        }
    }
}

/// How long [`broker_consumer`] tries to recreate a consumer that lingers after its deletion.
const RECREATE_BUDGET: Duration = Duration::from_secs(10);
const RECREATE_PAUSE: Duration = Duration::from_millis(250);

/// Whether a create failed because a consumer of that name (one being deleted) still exists
/// with another configuration.
fn is_consumer_create_conflict(e: &async_nats::jetstream::stream::ConsumerError) -> bool {
    matches!(
        e.kind(),
        async_nats::jetstream::stream::ConsumerErrorKind::JetStream(err)
            if err.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_CREATE
    )
}
