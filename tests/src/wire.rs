//! Talking the wire protocol directly (`docs/PROTOCOL.md`), without the adapter: [`WireClient`]
//! publishes envelopes as one agency (including the odd ones tests need: repeats, other
//! `Nats-Msg-Id` headers, garbage bytes) and asks the broker for a referral's status; and the
//! [`ReferralBuilder`] makes valid referrals.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, publish::PublishAck};
use prost::Message as _;
use uuid::Uuid;
use yeongye_proto::subject::{self, InKind};
use yeongye_proto::v1;

/// How long a publish or query keeps retrying (through broker or server restarts) before the
/// test fails.
const RETRY_FOR: Duration = Duration::from_secs(60);

/// The namespace of every derived Yeongye id (PROTOCOL.md, "Ids, ordering, retries,
/// deduplication").
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c3a52_7e0b_4d8e_9a43_2b5d7c1e9f10);

/// The message id of the `RECEIVED` receipt an adapter sends for a delivery, as the protocol
/// derives it: `UUIDv5(namespace, "<delivery message id>/received")`.
pub fn receipt_message_id(delivery_message_id: &str) -> String {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("{delivery_message_id}/received").as_bytes(),
    )
    .to_string()
}

/// A fresh message or referral id: a UUIDv7 in canonical lowercase text.
pub fn new_id() -> String {
    Uuid::now_v7().to_string()
}

/// An envelope from `sender` holding `payload`, with a fresh message id, signed with the
/// sender's test key (see [`crate::registry::test_key`]). To send it unsigned or tampered,
/// change it after; to re-sign a change, use [`sign`].
pub fn envelope(sender: &str, payload_type: v1::PayloadType, payload: Vec<u8>) -> v1::Envelope {
    let mut e = v1::Envelope {
        message_id: new_id(),
        sender: sender.to_owned(),
        sent_at_ms: crate::now_ms(),
        payload_type: payload_type.into(),
        payload,
        signature: Vec::new(),
        key_id: String::new(),
    };
    sign(&mut e);
    e
}

/// Signs `e` with its sender's test key (after changing it on purpose).
pub fn sign(e: &mut v1::Envelope) {
    crate::registry::test_key(&e.sender).sign(e);
}

/// One agency's raw connection to NATS.
#[derive(Clone)]
pub struct WireClient {
    agency: String,
    client: async_nats::Client,
    js: jetstream::Context,
}

impl WireClient {
    /// Connects as `agency`, reconnecting for ever if the server goes away.
    pub async fn connect(url: &str, agency: &str) -> WireClient {
        let client = async_nats::ConnectOptions::new()
            .name(format!("yeongye-test-{agency}"))
            // As an agency's adapter does: the broker answers queries only on this prefix.
            .custom_inbox_prefix(subject::inbox_prefix(agency))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url} as {agency}: {e}"));
        let js = jetstream::new(client.clone());
        WireClient {
            agency: agency.to_owned(),
            client,
            js,
        }
    }

    pub fn agency(&self) -> &str {
        &self.agency
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes `payload` to `subject` with JetStream and waits for the PubAck, with
    /// `Nats-Msg-Id: msg_id` if given. Retries with the same id (as the protocol requires)
    /// until it succeeds or [`RETRY_FOR`] passes.
    pub async fn publish(
        &self,
        subject: &str,
        payload: Vec<u8>,
        msg_id: Option<&str>,
    ) -> PublishAck {
        let start = Instant::now();
        loop {
            let mut publish = PublishMessage::build().payload(payload.clone().into());
            if let Some(id) = msg_id {
                publish = publish.message_id(id);
            }
            let result = match self.js.send_publish(subject.to_owned(), publish).await {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(ack) => return ack,
                Err(e) if start.elapsed() < RETRY_FOR => {
                    eprintln!("publish to {subject} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("publish to {subject} failed for {RETRY_FOR:?}: {e}"),
            }
        }
    }

    /// Publishes an envelope on `yeongye.in.<this agency>.<kind>` with its message id as the
    /// `Nats-Msg-Id`.
    pub async fn publish_envelope(&self, kind: InKind, envelope: &v1::Envelope) -> PublishAck {
        self.publish(
            &subject::inbound(&self.agency, kind),
            envelope.encode_to_vec(),
            Some(&envelope.message_id),
        )
        .await
    }

    /// The envelope that carries `referral` from this agency, its personal fields sealed to
    /// the recipient's test sealing key ([`crate::registry::test_sealing_key`]) as an adapter
    /// seals them (unless it is sealed already).
    pub fn referral_envelope(&self, referral: &v1::Referral) -> v1::Envelope {
        envelope(
            &self.agency,
            v1::PayloadType::Referral,
            sealed(referral).encode_to_vec(),
        )
    }

    /// The envelope that carries `referral` in clear, as an adapter from before sealing sent
    /// it (a broker refuses it unless `plaintext_referrals = "accept"`).
    pub fn plaintext_referral_envelope(&self, referral: &v1::Referral) -> v1::Envelope {
        envelope(
            &self.agency,
            v1::PayloadType::Referral,
            referral.encode_to_vec(),
        )
    }

    /// The envelope that carries a status update from this agency.
    pub fn status_envelope(
        &self,
        referral_id: &str,
        status: v1::Status,
        note: &str,
    ) -> v1::Envelope {
        let update = v1::StatusUpdate {
            referral_id: referral_id.to_owned(),
            status: status.into(),
            note: note.to_owned(),
            ..Default::default()
        };
        envelope(
            &self.agency,
            v1::PayloadType::StatusUpdate,
            update.encode_to_vec(),
        )
    }

    /// Sends a referral; returns the message id once the stream has it.
    pub async fn send_referral(&self, referral: &v1::Referral) -> String {
        let envelope = self.referral_envelope(referral);
        self.publish_envelope(InKind::Referral, &envelope).await;
        envelope.message_id
    }

    /// Sends a status update; returns the message id once the stream has it.
    pub async fn update_status(&self, referral_id: &str, status: v1::Status, note: &str) -> String {
        let envelope = self.status_envelope(referral_id, status, note);
        self.publish_envelope(InKind::Status, &envelope).await;
        envelope.message_id
    }

    /// One status query; `None` if no reply came within `timeout` (no broker, or a slow one).
    /// Panics on a reply that is not a status reply envelope.
    pub async fn try_query(&self, referral_id: &str, timeout: Duration) -> Option<v1::StatusReply> {
        let query = v1::StatusQuery {
            referral_id: referral_id.to_owned(),
        };
        let request = envelope(
            &self.agency,
            v1::PayloadType::StatusQuery,
            query.encode_to_vec(),
        );
        let reply = tokio::time::timeout(
            timeout,
            self.client
                .request(subject::query(&self.agency), request.encode_to_vec().into()),
        )
        .await
        .ok()?
        .ok()?;
        let envelope = v1::Envelope::decode(reply.payload.as_ref())
            .unwrap_or_else(|e| panic!("status reply is not an envelope: {e}"));
        assert_eq!(
            envelope.payload_type(),
            v1::PayloadType::StatusReply,
            "status reply envelope's payload type"
        );
        assert_eq!(
            envelope.sender,
            yeongye_proto::BROKER_ID,
            "status reply's sender"
        );
        Some(
            v1::StatusReply::decode(envelope.payload.as_slice())
                .unwrap_or_else(|e| panic!("status reply payload: {e}")),
        )
    }

    /// Asks the broker for a referral's status, retrying until it answers.
    pub async fn query(&self, referral_id: &str) -> v1::StatusReply {
        let start = Instant::now();
        loop {
            if let Some(reply) = self.try_query(referral_id, Duration::from_secs(2)).await {
                return reply;
            }
            assert!(
                start.elapsed() < RETRY_FOR,
                "no status reply from the broker for {referral_id} in {RETRY_FOR:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The referral's state as the broker sees it, or `None` if the query came back with an error.
    pub async fn state(&self, referral_id: &str) -> Option<v1::ReferralState> {
        let reply = self.query(referral_id).await;
        reply.error.is_none().then(|| reply.state())
    }

    /// The states of many referrals (`None` for an error reply), asking up to 32 at a time.
    pub async fn states(&self, referral_ids: &[String]) -> Vec<Option<v1::ReferralState>> {
        let mut states = Vec::with_capacity(referral_ids.len());
        for chunk in referral_ids.chunks(32) {
            let replies = futures::future::join_all(chunk.iter().map(|id| self.state(id))).await;
            states.extend(replies);
        }
        states
    }

    /// Waits until the broker says the referral is in `state`; panics after `timeout` with the
    /// last state seen and `context()`.
    pub async fn wait_state(
        &self,
        referral_id: &str,
        state: v1::ReferralState,
        timeout: Duration,
        context: impl Fn() -> String,
    ) -> v1::StatusReply {
        let start = Instant::now();
        loop {
            let reply = self.query(referral_id).await;
            if reply.error.is_none() && reply.state() == state {
                return reply;
            }
            if start.elapsed() > timeout {
                panic!(
                    "referral {referral_id} not {} after {timeout:?}; the broker says {reply:?}\n{}",
                    state.as_str_name(),
                    context()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every referral in `referral_ids` is in `state` (asking about those that are
    /// not yet, every 250 ms); panics after `timeout` with how many are where.
    pub async fn wait_all_in_state(
        &self,
        referral_ids: &[String],
        state: v1::ReferralState,
        timeout: Duration,
        context: impl Fn() -> String,
    ) {
        let start = Instant::now();
        let mut waiting: Vec<String> = referral_ids.to_vec();
        loop {
            let states = self.states(&waiting).await;
            let mut tally = std::collections::BTreeMap::<String, usize>::new();
            let mut still = Vec::new();
            for (id, s) in waiting.iter().zip(&states) {
                if *s != Some(state) {
                    still.push(id.clone());
                    let name = s.map_or("(error)", |s| s.as_str_name());
                    *tally.entry(name.to_owned()).or_default() += 1;
                }
            }
            waiting = still;
            if waiting.is_empty() {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} of {} referrals not {} after {timeout:?}: {tally:?}; e.g. {}\n{}",
                    waiting.len(),
                    referral_ids.len(),
                    state.as_str_name(),
                    waiting[0],
                    context()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Builds a valid referral with a fresh UUIDv7 id: a routine livelihood referral under the
/// Social Security Benefits Act (crisis household discovery), so that no consent record is needed.
#[derive(Debug, Clone)]
pub struct ReferralBuilder {
    referral: v1::Referral,
}

impl ReferralBuilder {
    pub fn new(from: &str, to: &str) -> ReferralBuilder {
        let id = new_id();
        let referral = v1::Referral {
            client: Some(v1::Client {
                pseudonym_id: format!("client-{}", &id[id.len() - 12..]),
                household: "1인 가구, 월세 체납 3개월".to_owned(),
                ..Default::default()
            }),
            referral_id: id,
            from_agency: from.to_owned(),
            to_agency: to.to_owned(),
            field: v1::FieldOfNeed::Livelihood.into(),
            urgency: v1::Urgency::Routine.into(),
            reason: "긴급 생계지원 연계 요청 (test)".to_owned(),
            legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(
                v1::StatutoryBasis {
                    statute: v1::Statute::SocialSecurityBenefitsAct.into(),
                    justification: "위기가구 발굴 (test)".to_owned(),
                },
            )),
            data_categories: vec![
                v1::DataCategory::Identity.into(),
                v1::DataCategory::Household.into(),
            ],
            receive_by_ms: 0,
            parent_referral_id: String::new(),
            sealed: None,
            purpose: v1::Purpose::CaseManagement.into(),
        };
        ReferralBuilder { referral }
    }

    pub fn urgency(mut self, urgency: v1::Urgency) -> Self {
        self.referral.urgency = urgency.into();
        self
    }

    pub fn field(mut self, field: v1::FieldOfNeed) -> Self {
        self.referral.field = field.into();
        self
    }

    pub fn reason(mut self, reason: &str) -> Self {
        reason.clone_into(&mut self.referral.reason);
        self
    }

    /// The receipt deadline, Unix ms (0: the broker's default for the urgency).
    pub fn receive_by_ms(mut self, at: i64) -> Self {
        self.referral.receive_by_ms = at;
        self
    }

    /// Cites a consent instead of the statutory basis.
    pub fn consent(mut self, consent_id: &str) -> Self {
        self.referral.legal_basis =
            Some(v1::referral::LegalBasis::ConsentId(consent_id.to_owned()));
        self
    }

    /// The referral in clear: [`WireClient::referral_envelope`] seals it as an adapter does,
    /// as the last step before sending.
    pub fn build(self) -> v1::Referral {
        self.referral
    }
}

/// `referral` as an adapter sends it: its personal fields sealed to the recipient's test
/// sealing key. Already sealed: as it is.
pub fn sealed(referral: &v1::Referral) -> v1::Referral {
    let mut r = referral.clone();
    if r.sealed.is_none() {
        let key = crate::registry::test_sealing_key(&r.to_agency).public();
        yeongye_proto::seal::seal_referral(&mut r, &key).expect("seal a test referral");
    }
    r
}

/// `referral` sealed to its recipient's current key in `registry` (a real, onboarded registry).
pub fn sealed_with(referral: &v1::Referral, registry: &std::path::Path) -> v1::Referral {
    let directory =
        yeongye_proto::seal::Directory::load(registry).expect("the registry's sealing keys");
    let key = directory
        .current(&referral.to_agency)
        .expect("the recipient's sealing key");
    let mut r = referral.clone();
    yeongye_proto::seal::seal_referral(&mut r, key).expect("seal a referral");
    r
}
