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

fn broker_consumer_config(cfg: &Config, from: u64) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subject::BROKER_CONSUMER.to_owned()),
        filter_subject: subject::IN_SUBJECTS.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: i64::try_from(cfg.batch_size * 8).unwrap_or(i64::MAX),
        deliver_policy: if from <= 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            }
        },
        ..Default::default()
    }
}

/// What a broker that begins to lead does with its inbound consumer.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Kept as it is.
    Keep,
    /// Recreated to deliver from this stream sequence on (1: the whole stream).
    From(u64),
}

/// The consumer as found: its ack floor (the stream sequence up to which every message was
/// acknowledged) and how many messages it gave out unacknowledged.
#[derive(Debug, Clone, Copy)]
struct Found {
    ack_floor: u64,
    outstanding: u64,
}

/// Where the inbound consumer must start for a leader whose store is at `checkpoint` (the
/// highest inbound sequence it applied, which is not a floor: a message below it may have been
/// given to a previous leader and never applied).
///
/// Only the consumer's ack floor says what may be missing below the checkpoint. Without a
/// consumer, nothing does: the whole stream is read again, and each message applied before is
/// recognised by its id (`dedup_retention_days` is at least `inbound_retention_days`, so every
/// message still in the stream has its id kept).
fn consumer_start(found: Option<Found>, checkpoint: u64) -> Start {
    match found {
        Some(f) if f.ack_floor <= checkpoint && f.outstanding == 0 => Start::Keep,
        Some(f) => Start::From(f.ack_floor.min(checkpoint) + 1),
        None => Start::From(1),
    }
}

/// The inbound consumer as the server has it: None if there is none. Any other failure to
/// read it (a timeout while the consumer's group elects) is an error, never taken for "none":
/// a consumer recreated from the store's checkpoint instead of its ack floor would skip the
/// messages a previous leader was given and did not apply (seen in a partition test: five
/// receipts lost that way, each sender's message stored and never applied).
async fn found_consumer(inbound: &stream::Stream) -> Result<Option<Found>> {
    match inbound.consumer_info(subject::BROKER_CONSUMER).await {
        Ok(info) => Ok(Some(Found {
            ack_floor: info.ack_floor.stream_sequence,
            outstanding: u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
        })),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Nats(format!(
            "reading the inbound consumer {}: {e}",
            subject::BROKER_CONSUMER
        ))),
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
/// replayed from the stream. See [`consumer_start`] for a consumer that is not there.
pub async fn broker_consumer(
    js: &jetstream::Context,
    cfg: &Config,
    checkpoint: u64,
) -> Result<consumer::PullConsumer> {
    let inbound = js
        .get_stream(subject::IN_STREAM)
        .await
        .map_err(Error::nats)?;
    let found = found_consumer(&inbound).await?;
    let mut from = match consumer_start(found, checkpoint) {
        Start::Keep => {
            return inbound
                .get_consumer(subject::BROKER_CONSUMER)
                .await
                .map_err(Error::nats);
        }
        Start::From(from) => from,
    };
    match found {
        Some(f) if f.ack_floor > checkpoint => tracing::warn!(
            acked = f.ack_floor,
            checkpoint,
            "the store is behind what the broker acknowledged: replaying the inbound stream from the checkpoint"
        ),
        Some(f) => tracing::info!(
            acked = f.ack_floor,
            outstanding = f.outstanding,
            "taking over messages given to a previous leader: from the ack floor on"
        ),
        None if checkpoint > 0 => tracing::warn!(
            checkpoint,
            "the inbound consumer is not there: reading the inbound stream again from its start \
             (messages applied before are recognised by their ids)"
        ),
        None => {}
    }
    if found.is_some() {
        inbound
            .delete_consumer(subject::BROKER_CONSUMER)
            .await
            .map_err(Error::nats)?;
    }
    // A consumer deleted on a cluster can still be there for a moment (a node that missed the
    // deletion retries it: "not cleaned up"): the create is then taken as an update of it, which
    // may not move the start (10012). Seen after a partition: the broker stepped down on it and
    // took the lease again at once, thousands of times. Deleted again, and waited for; its ack
    // floor is read again first (it may be lower than the one read above), and a consumer that
    // cannot be read is not deleted blind.
    let started = Instant::now();
    loop {
        match inbound
            .create_consumer(broker_consumer_config(cfg, from))
            .await
        {
            Ok(consumer) => return Ok(consumer),
            Err(e) if is_consumer_create_conflict(&e) && started.elapsed() < RECREATE_BUDGET => {
                tracing::warn!(cause = %e, "the inbound consumer is still there: deleting it again");
                match found_consumer(&inbound).await {
                    Ok(lingering) => {
                        if let Some(f) = lingering {
                            from = from.min(f.ack_floor + 1);
                        }
                        let _ = inbound.delete_consumer(subject::BROKER_CONSUMER).await;
                    }
                    Err(e) => tracing::warn!(
                        cause = %e,
                        "the inbound consumer that is still there could not be read: not deleted before it is"
                    ),
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn found(ack_floor: u64, outstanding: u64) -> Option<Found> {
        Some(Found {
            ack_floor,
            outstanding,
        })
    }

    #[test]
    fn a_consumer_is_kept_only_when_nothing_is_outstanding_and_the_store_holds_its_floor() {
        assert_eq!(consumer_start(found(40, 0), 40), Start::Keep);
        assert_eq!(consumer_start(found(21, 0), 40), Start::Keep);
        assert_eq!(consumer_start(found(0, 0), 0), Start::Keep);
    }

    #[test]
    fn messages_given_out_and_unacknowledged_come_again_from_the_ack_floor() {
        // The CI case: a leader applied 27-40, 22-26 were given to it and never applied.
        assert_eq!(consumer_start(found(21, 5), 40), Start::From(22));
        assert_eq!(consumer_start(found(0, 3), 40), Start::From(1));
    }

    #[test]
    fn a_store_behind_the_ack_floor_replays_from_its_checkpoint() {
        assert_eq!(consumer_start(found(50, 0), 40), Start::From(41));
        assert_eq!(consumer_start(found(50, 2), 0), Start::From(1));
    }

    #[test]
    fn without_a_consumer_the_whole_stream_is_read_never_from_the_checkpoint() {
        assert_eq!(consumer_start(None, 0), Start::From(1));
        assert_eq!(consumer_start(None, 40), Start::From(1));
    }

    #[test]
    fn the_start_becomes_the_deliver_policy() {
        let cfg = Config::default();
        assert!(matches!(
            broker_consumer_config(&cfg, 1).deliver_policy,
            consumer::DeliverPolicy::All
        ));
        assert!(matches!(
            broker_consumer_config(&cfg, 22).deliver_policy,
            consumer::DeliverPolicy::ByStartSequence { start_sequence: 22 }
        ));
    }
}
