//! Test harness: a real `nats-server` per test (free port, temporary store, killed on drop), the
//! streams and consumer the broker would create, and helpers to publish as the broker and read
//! what the adapter stored.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull, stream};
use prost::Message as _;
use yeongye_adapter::v1;
use yeongye_proto::subject::{self, OutKind};

pub(crate) const ME: &str = "cc-1";

pub(crate) struct NatsServer {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    pub(crate) fn start() -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn_server(port, store.path());
        NatsServer {
            child,
            port,
            _store: store,
        }
    }

    /// Kills the server and starts it again on the same port and store.
    pub(crate) fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_server(self.port, self._store.path());
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL): until [`start_again`](Self::start_again), no hub.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again after [`kill`](Self::kill), same port and store.
    pub(crate) fn start_again(&mut self) {
        self.child = spawn_server(self.port, self._store.path());
    }
}

fn spawn_server(port: u16, store: &Path) -> Child {
    let bin = std::env::var_os("YEONGYE_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/nats/bin/nats-server")
        });
    assert!(
        bin.exists(),
        "nats-server not found at {}: run ./deploy/install-nats.sh (or set YEONGYE_NATS_SERVER)",
        bin.display()
    );
    let child = Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until the server has processed everything `client` sent before this call, its
/// subscriptions included, by sending itself a message and receiving it. `Client::flush` only
/// writes the socket: a request another connection makes next can reach the server first and
/// find no responder (a flake seen in CI under load).
pub(crate) async fn synced(client: &async_nats::Client) {
    use futures::StreamExt as _;
    let probe = client.new_inbox();
    let mut echo = client.subscribe(probe.clone()).await.unwrap();
    client.publish(probe, "sync".into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), echo.next())
        .await
        .expect("the server echoes within 10 s")
        .expect("the probe comes back");
}

/// What the broker sets up: both streams and the agency's consumer.
pub(crate) struct Broker {
    pub(crate) js: jetstream::Context,
    pub(crate) client: async_nats::Client,
    pub(crate) inbound: stream::Stream,
}

impl Broker {
    /// `in_dup_window` is short in tests that watch receipts being published again.
    pub(crate) async fn setup(
        server: &NatsServer,
        in_dup_window: Duration,
        ack_wait: Duration,
    ) -> Broker {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let inbound = js
            .create_stream(stream::Config {
                name: subject::IN_STREAM.into(),
                subjects: vec![subject::IN_SUBJECTS.into()],
                duplicate_window: in_dup_window,
                ..Default::default()
            })
            .await
            .unwrap();
        let out = js
            .create_stream(stream::Config {
                name: subject::OUT_STREAM.into(),
                subjects: vec![subject::OUT_SUBJECTS.into()],
                ..Default::default()
            })
            .await
            .unwrap();
        out.create_consumer(pull::Config {
            durable_name: Some(subject::agency_consumer(ME)),
            filter_subject: subject::outbound_filter(ME),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait,
            ..Default::default()
        })
        .await
        .unwrap();
        Broker {
            js,
            client,
            inbound,
        }
    }

    /// Connects to streams that exist already (after a restart).
    pub(crate) async fn reconnect(server: &NatsServer) -> Broker {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let inbound = js.get_stream(subject::IN_STREAM).await.unwrap();
        Broker {
            js,
            client,
            inbound,
        }
    }

    /// Publishes as the broker. `msg_id: None` simulates a repeat after the duplicate window.
    pub(crate) async fn publish_out(&self, kind: OutKind, bytes: Vec<u8>, msg_id: Option<&str>) {
        let mut headers = HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        self.js
            .publish_with_headers(subject::outbound(ME, kind), headers, bytes.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Waits until the inbound stream holds `n` messages and returns message `seq`.
    pub(crate) async fn inbound_message(&self, seq: u64) -> jetstream::message::StreamMessage {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(m) = self.inbound.get_raw_message(seq).await {
                return m;
            }
            assert!(Instant::now() < deadline, "no inbound message {seq}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn inbound_count(&self) -> u64 {
        let mut s = self.js.get_stream(subject::IN_STREAM).await.unwrap();
        s.info().await.unwrap().state.messages
    }
}

pub(crate) fn envelope(
    sender: &str,
    id: &str,
    t: v1::PayloadType,
    payload: Vec<u8>,
) -> v1::Envelope {
    v1::Envelope {
        message_id: id.into(),
        sender: sender.into(),
        sent_at_ms: 1,
        payload_type: t as i32,
        payload,
        ..Default::default()
    }
}

/// A referral carrying personal data (to check it never reaches logs or stdout).
pub(crate) fn referral(id: &str) -> v1::Referral {
    v1::Referral {
        referral_id: id.into(),
        from_agency: "hope-support".into(),
        to_agency: ME.into(),
        client: Some(v1::Client {
            pseudonym_id: "p-1".into(),
            name: "홍길동".into(),
            phone: "010-1234-5678".into(),
            ..Default::default()
        }),
        urgency: v1::Urgency::Crisis as i32,
        ..Default::default()
    }
}

pub(crate) fn delivery_bytes(message_id: &str, referral_id: &str) -> Vec<u8> {
    let original = envelope(
        "hope-support",
        "orig",
        v1::PayloadType::Referral,
        referral(referral_id).encode_to_vec(),
    );
    let d = v1::Delivery {
        referral_id: referral_id.into(),
        original: Some(original),
    };
    envelope(
        yeongye_proto::BROKER_ID,
        message_id,
        v1::PayloadType::Delivery,
        d.encode_to_vec(),
    )
    .encode_to_vec()
}

pub(crate) fn notification_bytes(message_id: &str, referral_id: &str) -> Vec<u8> {
    let n = v1::Notification {
        referral_id: referral_id.into(),
        state: v1::ReferralState::Delivered as i32,
        previous: v1::ReferralState::Submitted as i32,
        by_agency: "broker".into(),
        at_ms: 42,
        ..Default::default()
    };
    envelope(
        yeongye_proto::BROKER_ID,
        message_id,
        v1::PayloadType::Notification,
        n.encode_to_vec(),
    )
    .encode_to_vec()
}

/// The status update in an inbound stream message, with its `Nats-Msg-Id`.
pub(crate) fn status_update_of(
    m: &jetstream::message::StreamMessage,
) -> (String, v1::StatusUpdate) {
    let env = v1::Envelope::decode(m.payload.as_ref()).unwrap();
    let id = m.headers.get("Nats-Msg-Id").unwrap().to_string();
    assert_eq!(id, env.message_id);
    assert_eq!(env.payload_type, v1::PayloadType::StatusUpdate as i32);
    (id, v1::StatusUpdate::decode(env.payload.as_ref()).unwrap())
}

pub(crate) fn withdrawal_bytes(message_id: &str, referral_id: &str, consent_id: &str) -> Vec<u8> {
    let w = v1::Withdrawal {
        referral_id: referral_id.into(),
        consent_id: consent_id.into(),
        client_pseudonym_id: "p-1".into(),
        at_ms: 77,
    };
    envelope(
        yeongye_proto::BROKER_ID,
        message_id,
        v1::PayloadType::Withdrawal,
        w.encode_to_vec(),
    )
    .encode_to_vec()
}

/// A referral as an agency would send it: with field, purpose and a legal basis.
pub(crate) fn outgoing_referral(pseudonym: &str) -> v1::Referral {
    v1::Referral {
        to_agency: "hope-support".into(),
        client: Some(v1::Client {
            pseudonym_id: pseudonym.into(),
            ..Default::default()
        }),
        field: v1::FieldOfNeed::Livelihood as i32,
        urgency: v1::Urgency::Routine as i32,
        purpose: v1::Purpose::CaseManagement as i32,
        legal_basis: Some(v1::referral::LegalBasis::ConsentId("c-1".into())),
        ..Default::default()
    }
}

/// The envelope and `Nats-Msg-Id` of an inbound stream message.
pub(crate) fn inbound_envelope(m: &jetstream::message::StreamMessage) -> (String, v1::Envelope) {
    let env = v1::Envelope::decode(m.payload.as_ref()).unwrap();
    let id = m.headers.get("Nats-Msg-Id").unwrap().to_string();
    assert_eq!(id, env.message_id);
    (id, env)
}
