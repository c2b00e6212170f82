//! [`Adapter`]: one agency's connection to Yeongye, and the calls its agency system makes —
//! send a referral, update a referral's status, look a referral up, record and revoke consents,
//! confirm purges, and read what arrives.
//!
//! The NATS connection is named after the agency, authenticates with the agency's credentials
//! file and trusts only the configured CA (TLS required) when those are configured, uses a
//! private inbox prefix (`_INBOX_<agency>`, so that NATS permissions can give each agency its
//! own reply subjects) and logs every connection event (permission violations arrive only that
//! way).

pub(crate) mod publish;
mod query;

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, Event};
use tokio::sync::OnceCell;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Span, error, info, instrument, warn};
use yeongye_proto::signing::KeyRing;
use yeongye_proto::subject;
use yeongye_proto::v1;

use crate::config::AdapterConfig;
use crate::error::{Error, Result};
use crate::outbox::{self, Outbox, OutboxStatus, Sent};
use crate::outgoing::{self, Outgoing};
use crate::sealing::Sealing;
use crate::storage::Storage;
use publish::Publisher;

/// How long a send waits before it tries again to open a store another process held.
const LOCKED_RETRY: Duration = Duration::from_secs(5);
/// How long a send waits for the store's lock: long enough for this process's previous
/// handle (an adapter just dropped) to let go of it, short enough for a one-shot command
/// beside a running adapter.
const SEND_OPEN_WAIT: Duration = Duration::from_millis(250);

/// How long [`Adapter::status`] waits for the broker's reply by default.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Options for [`Adapter`]; start with [`Adapter::builder`].
#[derive(Debug, Clone)]
pub struct AdapterBuilder {
    cfg: AdapterConfig,
    retry_on_initial_connect: bool,
    publish_budget: Duration,
    query_timeout: Duration,
}

impl AdapterBuilder {
    /// Keep trying to connect in the background instead of failing when no server is up at
    /// start (for long-running adapters; off by default, so one-shot calls fail fast).
    pub fn retry_on_initial_connect(mut self, yes: bool) -> Self {
        self.retry_on_initial_connect = yes;
        self
    }

    /// Total time one publish may take, retries included (default 30 s).
    pub fn publish_retry_budget(mut self, budget: Duration) -> Self {
        self.publish_budget = budget;
        self
    }

    /// How long a status query waits for the broker (default 5 s).
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// Validates the configuration and connects.
    pub async fn connect(self) -> Result<Adapter> {
        self.cfg.validate()?;
        let addrs = self.cfg.connect_addrs()?;
        // Secret files before the network: a missing, malformed or exposed (readable by
        // others) key stops here.
        let signer = self.cfg.signing_key()?.map(Arc::new);
        if signer.is_none() {
            warn!(agency = %self.cfg.agency, "no signing_key_file: envelopes go out unsigned");
        }
        let keys = self.cfg.key_ring()?;
        let sealing = Sealing::open(
            self.cfg.registry.as_deref(),
            self.cfg.sealing_key_file.as_deref(),
        )?;
        if sealing.key_ids().is_empty() && sealing.registry_has_key_of(&self.cfg.agency) {
            error!(agency = %self.cfg.agency, "the registry lists this agency's sealing key but sealing_key_file is not set: sealed referrals to it will be declined");
        }
        if !sealing.seals() {
            warn!(agency = %self.cfg.agency, "no registry: referrals go out in clear (a broker refuses them by default)");
        }
        let agency = self.cfg.agency.clone();
        let events_agency = agency.clone();
        let mut options = ConnectOptions::new()
            .name(&agency)
            .custom_inbox_prefix(subject::inbox_prefix(&agency))
            // A partitioned server is silent, not closed: notice it in seconds.
            .ping_interval(yeongye_proto::rules::CLIENT_PING_INTERVAL)
            .event_callback(move |event| {
                let agency = events_agency.clone();
                async move { log_event(&agency, event) }
            });
        if let Some(creds) = self.cfg.connect_credentials()? {
            if creds.user != agency {
                return Err(Error::Config(format!(
                    "the NATS credentials are for user {:?}, not agency {agency:?}: NATS \
                     permissions would not match",
                    creds.user
                )));
            }
            options = options.user_and_password(creds.user, creds.password);
        }
        if let Some(ca) = &self.cfg.tls_ca_file {
            if !ca.is_file() {
                return Err(Error::Config(format!(
                    "tls_ca_file {} is not a readable file",
                    ca.display()
                )));
            }
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if self.retry_on_initial_connect {
            options = options.retry_on_initial_connect();
        }
        let client = options
            .connect(addrs)
            .await
            .map_err(|source| Error::Connect {
                urls: self.cfg.redacted_urls().join(", "),
                source,
            })?;
        let publisher = Publisher::new(
            async_nats::jetstream::new(client.clone()),
            self.publish_budget,
            signer,
        );
        info!(
            agency = %agency,
            servers = self.cfg.nats_urls.len(),
            state = ?client.connection_state(),
            "adapter ready"
        );
        Ok(Adapter {
            inner: Arc::new(Inner {
                cfg: self.cfg,
                client,
                publisher,
                query_timeout: self.query_timeout,
                store: OnceCell::new(),
                locked_at: Mutex::new(None),
                closed: AtomicBool::new(false),
                keys,
                sealing,
            }),
        })
    }
}

/// One agency's handle on Yeongye. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Adapter {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AdapterConfig,
    client: async_nats::Client,
    publisher: Publisher,
    query_timeout: Duration,
    /// Opened by the first [`Adapter::incoming`] or send, not by `connect`: one-shot calls
    /// must work while a long-running adapter holds the store's lock.
    store: OnceCell<Opened>,
    /// When a send last found the store held by another process (it then publishes
    /// directly, without the outbox, and tries the store again after [`LOCKED_RETRY`]).
    locked_at: Mutex<Option<Instant>>,
    closed: AtomicBool,
    /// Senders' public keys, from the registry, to check deliveries' relayed signatures.
    keys: Option<KeyRing>,
    /// The keys to seal to (the registry's) and to open with (the agency's own).
    sealing: Sealing,
}

/// The store, its outbox, and the outbox's forwarder (stopped when the adapter is dropped).
struct Opened {
    storage: Storage,
    outbox: Outbox,
    _forwarder: DropGuard,
}

impl Adapter {
    /// The registry's key ring, when configured (deliveries are then verified).
    pub(crate) fn keys(&self) -> Option<&KeyRing> {
        self.inner.keys.as_ref()
    }

    /// The sealing keys: the registry's, to seal to; the agency's own, to open with.
    pub fn sealing(&self) -> &Sealing {
        &self.inner.sealing
    }

    /// Connects with default options (see [`AdapterBuilder`]).
    pub async fn connect(cfg: AdapterConfig) -> Result<Adapter> {
        Adapter::builder(cfg).connect().await
    }

    /// Options before connecting.
    pub fn builder(cfg: AdapterConfig) -> AdapterBuilder {
        AdapterBuilder {
            cfg,
            retry_on_initial_connect: false,
            publish_budget: publish::DEFAULT_BUDGET,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
        }
    }

    /// This agency's id.
    pub fn agency(&self) -> &str {
        &self.inner.cfg.agency
    }

    /// The configuration in use.
    pub fn config(&self) -> &AdapterConfig {
        &self.inner.cfg
    }

    /// The underlying NATS client (for what this API does not cover).
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Sends a referral and returns its id once JetStream has stored it, or once it waits in
    /// the adapter's durable outbox because the hub did not answer within `queue_after`
    /// ([`submit`](Self::submit) says which).
    ///
    /// Fills `referral_id` (fresh UUIDv7) and `from_agency` (this agency) when empty, checks the
    /// basic fields, and publishes it. On error (a full outbox; without an outbox, the publish
    /// budget spent) the referral may or may not have been stored; to retry without risking
    /// a second message, use [`prepare_referral`](Self::prepare_referral) and
    /// [`submit`](Self::submit) instead.
    #[instrument(skip_all, fields(agency = %self.agency(), referral_id = tracing::field::Empty))]
    pub async fn send(&self, referral: v1::Referral) -> Result<String> {
        let out = self.prepare_referral(referral)?;
        Span::current().record("referral_id", out.referral_id());
        self.publish(&out).await?;
        Ok(out.referral_id().to_owned())
    }

    /// Checks a referral and builds its message, with its ids fixed and its personal fields
    /// sealed to the recipient (when the registry is configured), without sending it.
    pub fn prepare_referral(&self, referral: v1::Referral) -> Result<Outgoing> {
        outgoing::sealed_referral(self.agency(), referral, self.sealing())
    }

    /// [`submit`](Self::submit), without saying whether the message is stored or queued:
    /// either way it is safe. Publishing the same [`Outgoing`] again is safe: it is the same
    /// message.
    pub async fn publish(&self, out: &Outgoing) -> Result<()> {
        self.submit(out).await.map(drop)
    }

    /// Hands a prepared message to JetStream and says what became of it: [`Sent::Stored`] once
    /// JetStream acknowledged it, [`Sent::Queued`] once it waits, flushed to disk, in the
    /// adapter's outbox (the hub did not answer within `[outbox] queue_after_ms`): the outbox
    /// forwards it in order, under its message id, when the hub is back. Nothing to retry then.
    ///
    /// A message goes straight to JetStream while the outbox is empty, and behind what waits
    /// in it otherwise: a message submitted after another one returned is stored after it.
    /// When another process (a running `agency-adapter run` or `serve`) holds the state
    /// directory, there is no outbox here: the message is published with retries for the
    /// publish budget, and an error is returned if it is not acknowledged in time.
    #[instrument(skip_all, fields(referral_id = out.referral_id(), message_id = out.message_id()))]
    pub async fn submit(&self, out: &Outgoing) -> Result<Sent> {
        let Some(outbox) = self.outbox().await? else {
            self.inner.publisher.publish(out).await?;
            info!(subject = out.subject(), "message stored");
            return Ok(Sent::Stored);
        };
        let payload = self.inner.publisher.encode(out.envelope());
        // Asked only when a message is to be queued: a message JetStream could never take
        // must not block the outbox (directly, the server refuses it and the caller is told).
        let max_payload = || match self.inner.client.server_info().max_payload {
            0 => 1024 * 1024,
            max => max,
        };
        let sent = outbox
            .submit(
                &self.inner.publisher,
                self.inner.client.connection_state(),
                out,
                payload,
                max_payload,
            )
            .await?;
        info!(
            subject = out.subject(),
            outcome = sent.as_str(),
            "message accepted"
        );
        Ok(sent)
    }

    /// The outbox as it is now: messages waiting, the oldest's age, whether the hub answers.
    /// `None` while another process holds the state directory (its `outbox-status.json` in
    /// the state directory then says it).
    pub async fn outbox_status(&self) -> Result<Option<OutboxStatus>> {
        match self.open_store(crate::storage::OPEN_WAIT).await {
            Ok(opened) => Ok(Some(opened.outbox.status())),
            Err(Error::StateDirInUse { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`outbox_status`](Self::outbox_status) if the store is open already (no waiting).
    pub fn outbox_status_now(&self) -> Option<OutboxStatus> {
        self.inner.store.get().map(|o| o.outbox.status())
    }

    /// Whether `message_id` waits in the outbox (the store must be open already).
    pub(crate) fn is_queued(&self, message_id: &str) -> bool {
        self.inner
            .store
            .get()
            .is_some_and(|o| o.outbox.holds(message_id))
    }

    /// The outbox, opening the store without waiting for another process's lock: `None` if
    /// another process holds it.
    async fn outbox(&self) -> Result<Option<Outbox>> {
        if let Some(opened) = self.inner.store.get() {
            return Ok(Some(opened.outbox.clone()));
        }
        {
            let locked = self
                .inner
                .locked_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if locked.is_some_and(|at| at.elapsed() < LOCKED_RETRY) {
                return Ok(None);
            }
        }
        match self.open_store(SEND_OPEN_WAIT).await {
            Ok(opened) => Ok(Some(opened.outbox.clone())),
            Err(Error::StateDirInUse { .. }) => {
                let mut locked = self
                    .inner
                    .locked_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if locked.is_none() {
                    warn!(
                        agency = %self.agency(),
                        "another adapter process holds the state directory: sending without the outbox (an unreachable hub is then an error)"
                    );
                }
                *locked = Some(Instant::now());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens the store (waiting up to `wait` for a lock held) and its outbox, and starts the
    /// outbox's forwarder; once per adapter.
    async fn open_store(&self, wait: Duration) -> Result<&Opened> {
        self.inner
            .store
            .get_or_try_init(|| async {
                let cfg = &self.inner.cfg;
                let storage =
                    Storage::open_async_waiting(cfg.dedup_dir(), cfg.dedup_retention_days, wait)
                        .await?;
                let outbox = Outbox::load(
                    storage.clone(),
                    cfg.outbox.clone(),
                    Some(cfg.state_dir.join(outbox::STATUS_FILE)),
                )
                .await?;
                let cancel = CancellationToken::new();
                tokio::spawn(
                    outbox
                        .clone()
                        .forward(self.inner.publisher.clone(), cancel.clone()),
                );
                Ok(Opened {
                    storage,
                    outbox,
                    _forwarder: cancel.drop_guard(),
                })
            })
            .await
    }

    /// Tells the broker about a referral's progress (recipient: accepted, declined, in
    /// progress, completed; sender: cancelled) and returns the message id once stored. The
    /// broker answers on the agency's consumer: a `Notification`, or a `Rejection` if the change
    /// is not allowed.
    #[instrument(skip_all, fields(agency = %self.agency(), referral_id = %referral_id))]
    pub async fn update_status(
        &self,
        referral_id: &str,
        status: v1::Status,
        note: &str,
    ) -> Result<String> {
        let out = self
            .prepare_status_update(referral_id, status, note)
            .await?;
        self.publish(&out).await?;
        Ok(out.message_id().to_owned())
    }

    /// Checks a status update and builds its message without sending it. A note is sealed to
    /// the referral's other party (when the registry is configured), whom the broker names:
    /// so a note costs a status query first.
    pub async fn prepare_status_update(
        &self,
        referral_id: &str,
        status: v1::Status,
        note: &str,
    ) -> Result<Outgoing> {
        outgoing::status_update(self.agency(), referral_id, status, note)?;
        let sealed = if note.is_empty() || !self.sealing().seals() {
            None
        } else {
            let reply = self.status(referral_id).await.map_err(note_needs_broker)?;
            if let Some(err) = &reply.error {
                return Err(Error::invalid(
                    "referral_id",
                    format!(
                        "the broker does not know it for this agency ({}): the note cannot be sealed",
                        v1::ReasonCode::try_from(err.code)
                            .map(|c| c.as_str_name())
                            .unwrap_or("UNKNOWN")
                    ),
                ));
            }
            let reader = outgoing::other_party(self.agency(), &reply.from_agency, &reply.to_agency);
            self.sealing()
                .seal_note(self.agency(), reader, referral_id, status, note)?
        };
        outgoing::status_update_with_note(self.agency(), referral_id, status, note, sealed)
    }

    /// Asks the broker for a referral's state and history. A reply carrying `error` (unknown
    /// referral, or not one of ours) is returned as `Ok`: look at `reply.error`.
    #[instrument(skip_all, fields(agency = %self.agency(), referral_id = %referral_id))]
    pub async fn status(&self, referral_id: &str) -> Result<v1::StatusReply> {
        outgoing::check_id("referral_id", referral_id)?;
        let query = v1::StatusQuery {
            referral_id: referral_id.to_owned(),
        };
        query::request(
            self,
            v1::PayloadType::StatusQuery,
            &query,
            v1::PayloadType::StatusReply,
        )
        .await
    }

    /// Records a consent the client gave this agency and returns its id once JetStream has
    /// stored the grant. Fills `consent_id` (fresh UUIDv7) and `collected_by` (this agency)
    /// when empty; a grant naming another agency as its collector is refused. The broker
    /// answers a grant it cannot record (e.g. an unregistered recipient, an existing id) with a
    /// `Rejection` on the consumer.
    #[instrument(skip_all, fields(agency = %self.agency(), consent_id = tracing::field::Empty))]
    pub async fn grant_consent(&self, grant: v1::ConsentGrant) -> Result<String> {
        let out = self.prepare_consent_grant(grant)?;
        Span::current().record("consent_id", out.consent_id());
        self.publish(&out).await?;
        Ok(out.consent_id().to_owned())
    }

    /// Checks a consent grant and builds its message, ids fixed, without sending it.
    pub fn prepare_consent_grant(&self, grant: v1::ConsentGrant) -> Result<Outgoing> {
        outgoing::consent_grant(self.agency(), grant)
    }

    /// Records that the client withdrew a consent (`revoked_at_ms`: when, Unix ms; `None`: when
    /// the broker records it) and returns the message id once stored. The broker withdraws
    /// every referral in flight under it and tells their recipients to purge.
    #[instrument(skip_all, fields(agency = %self.agency(), consent_id = %consent_id))]
    pub async fn revoke_consent(
        &self,
        consent_id: &str,
        revoked_at_ms: Option<i64>,
    ) -> Result<String> {
        let out = Outgoing::consent_revocation(self.agency(), consent_id, revoked_at_ms)?;
        self.publish(&out).await?;
        Ok(out.message_id().to_owned())
    }

    /// Confirms that the data of a withdrawn referral is purged, under a fresh message id, and
    /// returns it once stored. When answering a withdrawal you received, prefer
    /// [`Item::confirm_purge`](crate::Item::confirm_purge) or
    /// [`confirm_purge_of`](Self::confirm_purge_of), whose derived id makes a repeat harmless.
    #[instrument(skip_all, fields(agency = %self.agency(), referral_id = %referral_id, consent_id = %consent_id))]
    pub async fn confirm_purge(&self, referral_id: &str, consent_id: &str) -> Result<String> {
        let out = outgoing::purge_confirmation(self.agency(), referral_id, consent_id, None)?;
        self.publish(&out).await?;
        Ok(out.message_id().to_owned())
    }

    /// Confirms the purge asked for by the withdrawal `withdrawal_message_id`, under the id
    /// derived from it (`UUIDv5(ns, "<withdrawal message id>/purged")`), so that confirming
    /// again after a crash is recognised as the same confirmation. Returns the message id.
    #[instrument(skip_all, fields(agency = %self.agency(), referral_id = %referral_id, consent_id = %consent_id))]
    pub async fn confirm_purge_of(
        &self,
        withdrawal_message_id: &str,
        referral_id: &str,
        consent_id: &str,
    ) -> Result<String> {
        let out = outgoing::purge_confirmation(
            self.agency(),
            referral_id,
            consent_id,
            Some(withdrawal_message_id),
        )?;
        self.publish(&out).await?;
        Ok(out.message_id().to_owned())
    }

    /// Asks the broker about a consent: the grant, whether it is revoked, the referrals it
    /// withdrew and the purges still outstanding. Answered to the collecting agency and the
    /// agencies it covers. A reply carrying `error` is returned as `Ok`: look at `reply.error`.
    #[instrument(skip_all, fields(agency = %self.agency(), consent_id = %consent_id))]
    pub async fn consent(&self, consent_id: &str) -> Result<v1::ConsentReply> {
        outgoing::check_id("consent_id", consent_id)?;
        let query = v1::ConsentQuery {
            consent_id: consent_id.to_owned(),
        };
        query::request(
            self,
            v1::PayloadType::ConsentQuery,
            &query,
            v1::PayloadType::ConsentReply,
        )
        .await
    }

    /// The adapter's durable store under `state_dir` (opened on first use, waiting a moment
    /// for a lock just released; shared after). Opening it starts the outbox's forwarder.
    pub(crate) async fn store(&self) -> Result<Storage> {
        let opened = self.open_store(crate::storage::OPEN_WAIT).await?;
        Ok(opened.storage.clone())
    }

    /// Flushes what the client has buffered (acks, publishes) to the server.
    pub async fn flush(&self) -> Result<()> {
        self.inner.client.flush().await.map_err(|e| Error::Request {
            subject: String::new(),
            detail: format!("flush failed: {e}"),
        })
    }

    /// Closes the connection gracefully: pending work is flushed, subscriptions end, and
    /// [`Incoming::next`] returns `None` from then on.
    pub async fn drain(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.client.drain().await.map_err(|e| Error::Request {
            subject: String::new(),
            detail: format!("drain failed: {e}"),
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Publishes the `RECEIVED` receipt for a delivery (derived message id).
    /// Declines a delivered referral this adapter could not take in: its receipt, then its
    /// `DECLINED` with the reason code (both under ids derived from the delivery's, so sending
    /// them again is harmless).
    pub(crate) async fn decline_delivery(
        &self,
        delivery_message_id: &str,
        referral_id: &str,
        reason: v1::ReasonCode,
    ) -> Result<()> {
        self.send_receipt(delivery_message_id, referral_id).await?;
        let out =
            outgoing::adapter_decline(self.agency(), delivery_message_id, referral_id, reason);
        self.inner.publisher.publish(&out).await?;
        warn!(
            referral_id,
            reason = reason.as_str_name(),
            decline_message_id = out.message_id(),
            "declined by this adapter"
        );
        Ok(())
    }

    pub(crate) async fn send_receipt(
        &self,
        delivery_message_id: &str,
        referral_id: &str,
    ) -> Result<()> {
        let out = outgoing::receipt(self.agency(), delivery_message_id, referral_id);
        self.inner.publisher.publish(&out).await?;
        info!(
            referral_id,
            delivery_message_id,
            receipt_message_id = out.message_id(),
            "receipt stored"
        );
        Ok(())
    }

    /// Publishes the purge confirmation for a withdrawal (derived message id) and returns its id.
    /// The ids are echoed as the broker sent them.
    pub(crate) async fn send_purge_confirmation(
        &self,
        withdrawal_message_id: &str,
        referral_id: &str,
        consent_id: &str,
    ) -> Result<String> {
        let out = outgoing::purge_confirmation(
            self.agency(),
            referral_id,
            consent_id,
            Some(withdrawal_message_id),
        )?;
        self.inner.publisher.publish(&out).await?;
        info!(
            referral_id,
            consent_id,
            withdrawal_message_id,
            purge_message_id = out.message_id(),
            "purge confirmation stored"
        );
        Ok(out.message_id().to_owned())
    }
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// A status query for a note's reader that could not be made: say why the note cannot wait.
pub(crate) fn note_needs_broker(e: Error) -> Error {
    match e.kind() {
        crate::ErrorKind::Timeout | crate::ErrorKind::Request | crate::ErrorKind::Connect => {
            Error::NoteNeedsBroker {
                source: Box::new(e),
            }
        }
        _ => e,
    }
}

fn log_event(agency: &str, event: Event) {
    match event {
        Event::Connected => info!(agency = %agency, "connected to NATS"),
        Event::Disconnected => warn!(agency = %agency, "disconnected from NATS; reconnecting"),
        Event::LameDuckMode => warn!(agency = %agency, "NATS server entering lame duck mode"),
        Event::Draining => info!(agency = %agency, "draining NATS connection"),
        Event::Closed => info!(agency = %agency, "NATS connection closed"),
        Event::SlowConsumer(sid) => {
            warn!(agency = %agency, sid, "slow consumer: messages were dropped")
        }
        Event::ServerError(e) => error!(
            agency = %agency,
            cause = %e,
            "NATS server error (permission violations are reported only here)"
        ),
        Event::ClientError(e) => warn!(agency = %agency, cause = %e, "NATS client error"),
    }
}
