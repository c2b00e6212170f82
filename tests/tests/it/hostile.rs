//! Hostile input, end to end: every kind of bad message the broker must refuse, interleaved
//! with 1,000 good referrals from several senders — each bad one refused with its own reason
//! code (a rejection to the sender when the subject names a registered agency, and a dead letter
//! operators can list), every good one delivered exactly once and RECEIVED, the broker never
//! restarting. Then the recipient's own check of a delivery's relayed signature, and key rotation
//! with a cutoff.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use prost::Message as _;
use serde_json::Value;
use yeongye_proto::signing::{PrivateKey, SigningKey};
use yeongye_proto::subject::{self, InKind};
use yeongye_tests::adapter::AdapterConfig;
use yeongye_tests::http::HttpClient;
use yeongye_tests::registry::{UNREGISTERED, test_key};
use yeongye_tests::wire::{self, ReferralBuilder, envelope, new_id, sign};
use yeongye_tests::{AdapterProcess, System, WireClient, now_ms, v1};

use crate::{CENTRE, HOPE, MENTAL, SHORT, WELFARE};

/// The good referrals of the interleaved test.
const GOOD: usize = 1000;
/// Who sends to whom: every agency both sends and receives.
const PAIRS: [(&str, &str); 4] = [
    (CENTRE, HOPE),
    (HOPE, MENTAL),
    (MENTAL, WELFARE),
    (WELFARE, CENTRE),
];
/// The broker's `max_message_bytes` in the interleaved test.
const MAX_MESSAGE_BYTES: i64 = 8192;

/// A key no registry lists, deterministic so that a failure replays.
fn rogue_key(id: &str) -> PrivateKey {
    use sha2::Digest as _;
    let seed: [u8; 32] = sha2::Sha256::digest(format!("yeongye-rogue-key/{id}")).into();
    PrivateKey {
        id: id.to_owned(),
        key: SigningKey::from_bytes(&seed),
    }
}

/// The broker's dead letters, by stream sequence.
async fn dead_letters(system: &System) -> BTreeMap<u64, Value> {
    let addr = system
        .broker
        .config()
        .http_addr
        .parse()
        .expect("http_addr is a socket address");
    let response = HttpClient::new(addr, None)
        .get("/api/v1/dead-letters")
        .await;
    let rows = response.json();
    rows.as_array()
        .unwrap_or_else(|| panic!("dead letters are not a list: {rows}"))
        .iter()
        .map(|row| {
            (
                row["seq"].as_u64().expect("a dead letter's seq"),
                row.clone(),
            )
        })
        .collect()
}

/// A dead letter's reason without the `REASON_CODE_` prefix.
/// `agency`'s adapter, started with the registry: it checks the relayed signature of each
/// delivery before handing it over.
fn with_registry(system: &System, agency: &str) -> AdapterProcess {
    AdapterProcess::start_with(
        &system.adapter_dir(agency),
        AdapterConfig {
            agency: agency.to_owned(),
            nats_urls: vec![system.url()],
            state_dir: system.adapter_dir(agency).join("state"),
            extra: toml::Table::from_iter([(
                "registry".to_owned(),
                toml::Value::String(system.registry.display().to_string()),
            )]),
        },
    )
}

fn reason(row: &Value) -> &str {
    let r = row["reason"].as_str().unwrap_or_default();
    r.strip_prefix("REASON_CODE_").unwrap_or(r)
}

/// Flips one ASCII letter's case in the payload (in the client's pseudonym, which stays in
/// clear beside the seal), so that the payload still decodes and only the signature can tell.
fn flip_one_payload_byte(e: &mut v1::Envelope) {
    let at = e
        .payload
        .windows(7)
        .position(|w| w == b"client-")
        .expect("the builder's pseudonym starts with client-");
    e.payload[at] ^= 0x20;
}

/// One hostile message and what the broker must say about it.
struct Hostile {
    what: &'static str,
    subject: String,
    bytes: Vec<u8>,
    /// The `Nats-Msg-Id` to publish with.
    nats_msg_id: String,
    /// Who gets the rejection: the subject's agency when it is registered.
    reply_to: Option<&'static str>,
    /// The message id the rejection names; empty when the envelope cannot be read.
    message_id: String,
    /// A referral in it that must never be delivered.
    referral_id: Option<String>,
    code: &'static str,
}

impl Hostile {
    fn new(what: &'static str, kind: InKind, reply_to: &'static str, e: &v1::Envelope) -> Self {
        Hostile {
            what,
            subject: subject::inbound(reply_to, kind),
            bytes: e.encode_to_vec(),
            nats_msg_id: new_id(),
            reply_to: Some(reply_to),
            message_id: e.message_id.clone(),
            referral_id: v1::Referral::decode(e.payload.as_slice())
                .ok()
                .map(|r| r.referral_id)
                .filter(|id| !id.is_empty()),
            code: "",
        }
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
}

/// Every hostile input of the issue except the oversized one (which JetStream itself refuses),
/// built from fresh referrals. `replayed` is the envelope of a good referral already sent.
fn hostile_inputs(replayed: &v1::Envelope) -> Vec<Hostile> {
    let referral = |from: &str, to: &str| ReferralBuilder::new(from, to).build();
    let referral_envelope = |from: &str, to: &str| {
        envelope(
            from,
            v1::PayloadType::Referral,
            wire::sealed(&referral(from, to)).encode_to_vec(),
        )
    };
    let mut out = Vec::new();

    let mut future = referral_envelope(HOPE, MENTAL);
    future.sent_at_ms = now_ms() + 3_600_000;
    sign(&mut future);
    out.push(
        Hostile::new("sent_at_ms an hour ahead", InKind::Referral, HOPE, &future)
            .code("TIMESTAMP_SKEW"),
    );

    let mut past = referral_envelope(MENTAL, WELFARE);
    past.sent_at_ms = now_ms() - 2 * 86_400_000;
    sign(&mut past);
    out.push(
        Hostile::new("sent_at_ms two days back", InKind::Referral, MENTAL, &past)
            .code("TIMESTAMP_SKEW"),
    );

    // The id of a message already applied, on other content, signed by its rightful sender
    // (a replay past the stream's 2-minute duplicate window: another Nats-Msg-Id).
    let mut reused = referral_envelope(CENTRE, HOPE);
    reused.message_id = replayed.message_id.clone();
    sign(&mut reused);
    out.push(
        Hostile::new(
            "a message id reused with different content",
            InKind::Referral,
            CENTRE,
            &reused,
        )
        .code("REPLAYED_MESSAGE_ID"),
    );

    // HOPE's envelope, signed by HOPE, on WELFARE's subject.
    let spoofed = referral_envelope(HOPE, MENTAL);
    out.push(
        Hostile::new(
            "a sender other than the subject's agency",
            InKind::Referral,
            WELFARE,
            &spoofed,
        )
        .code("SENDER_MISMATCH"),
    );

    let stranger = referral_envelope(UNREGISTERED, HOPE);
    let mut h = Hostile::new(
        "an unregistered agency's subject",
        InKind::Referral,
        CENTRE,
        &stranger,
    )
    .code("UNKNOWN_SENDER");
    h.subject = subject::inbound(UNREGISTERED, InKind::Referral);
    h.reply_to = None;
    h.message_id = String::new();
    out.push(h);

    let status = envelope(
        HOPE,
        v1::PayloadType::StatusUpdate,
        v1::StatusUpdate {
            referral_id: new_id(),
            status: v1::Status::Accepted.into(),
            note: String::new(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    out.push(
        Hostile::new(
            "a status update on the referral subject",
            InKind::Referral,
            HOPE,
            &status,
        )
        .code("WRONG_PAYLOAD_TYPE"),
    );

    let whole = referral_envelope(MENTAL, WELFARE);
    let mut h = Hostile::new("a truncated envelope", InKind::Referral, MENTAL, &whole)
        .code("MALFORMED_ENVELOPE");
    h.bytes.truncate(12); // inside the 36-byte message id
    h.message_id = String::new();
    out.push(h);

    let mut cut = referral_envelope(WELFARE, CENTRE);
    cut.payload.truncate(12);
    sign(&mut cut);
    out.push(
        Hostile::new(
            "a truncated referral payload",
            InKind::Referral,
            WELFARE,
            &cut,
        )
        .code("MALFORMED_PAYLOAD"),
    );

    let mut h = Hostile::new(
        "garbage bytes",
        InKind::Referral,
        CENTRE,
        &v1::Envelope::default(),
    )
    .code("MALFORMED_ENVELOPE");
    h.bytes = b"\xff\xff\xff\xff not protobuf at all \x00\x01\x02".to_vec();
    out.push(h);

    let mut unsigned = referral_envelope(HOPE, MENTAL);
    unsigned.signature.clear();
    unsigned.key_id.clear();
    out.push(
        Hostile::new("no signature", InKind::Referral, HOPE, &unsigned).code("SIGNATURE_MISSING"),
    );

    let mut tampered = referral_envelope(MENTAL, WELFARE);
    flip_one_payload_byte(&mut tampered);
    out.push(
        Hostile::new(
            "one payload byte flipped after signing",
            InKind::Referral,
            MENTAL,
            &tampered,
        )
        .code("SIGNATURE_INVALID"),
    );

    let mut unknown_key = referral_envelope(WELFARE, CENTRE);
    rogue_key("welfare-center-rogue").sign(&mut unknown_key);
    out.push(
        Hostile::new(
            "a key id not in the registry",
            InKind::Referral,
            WELFARE,
            &unknown_key,
        )
        .code("SIGNATURE_UNKNOWN_KEY"),
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_is_refused_with_its_reason_while_1000_good_referrals_flow() {
    let started = Instant::now();
    let mut system = System::builder()
        .broker_config(|c| {
            c.extra.insert(
                "max_message_bytes".into(),
                toml::Value::Integer(MAX_MESSAGE_BYTES),
            );
        })
        .start()
        .await;
    let broker_pid = system.broker.pid().expect("the broker runs");
    let mut wires = BTreeMap::new();
    for (from, _) in PAIRS {
        wires.insert(from, system.wire(from).await);
    }

    // The good referrals' envelopes, made as they are sent (fresh sent_at_ms).
    let mut good: Vec<(&str, &str, String)> = Vec::with_capacity(GOOD);
    let mut first_envelope = None;
    let mut hostile: Vec<Hostile> = Vec::new();
    let mut sent_hostile: Vec<(Hostile, u64)> = Vec::new();
    let mut oversized_result = None;
    let every = GOOD / 14;
    for i in 0..GOOD {
        let (from, to) = PAIRS[i % PAIRS.len()];
        let wire = &wires[from];
        let referral = ReferralBuilder::new(from, to).build();
        let e = wire.referral_envelope(&referral);
        wire.publish_envelope(InKind::Referral, &e).await;
        good.push((from, to, referral.referral_id.clone()));
        if first_envelope.is_none() {
            first_envelope = Some(e.clone());
            hostile = hostile_inputs(&e);
            hostile.reverse();
        }
        if i % every != every / 2 {
            continue;
        }
        if oversized_result.is_none() {
            oversized_result = Some(publish_oversized(&wires[CENTRE]).await);
            continue;
        }
        if let Some(h) = hostile.pop() {
            let ack = wires[CENTRE]
                .publish(&h.subject, h.bytes.clone(), Some(&h.nats_msg_id))
                .await;
            assert!(
                !ack.duplicate,
                "{}: the stream took it as a duplicate",
                h.what
            );
            sent_hostile.push((h, ack.sequence));
        }
    }
    assert!(
        hostile.is_empty(),
        "{} hostile inputs not sent",
        hostile.len()
    );
    // The same replay within the stream's duplicate window, with the original's Nats-Msg-Id:
    // the stream itself drops it (PROTOCOL.md, "Ids, ordering, retries, deduplication").
    let first = first_envelope.expect("a good referral was sent");
    let mut replay = ReferralBuilder::new(CENTRE, HOPE).build();
    replay.reason = "replayed within the window".into();
    let mut same_id = wires[CENTRE].referral_envelope(&replay);
    same_id.message_id = first.message_id.clone();
    sign(&mut same_id);
    let ack = wires[CENTRE]
        .publish_envelope(InKind::Referral, &same_id)
        .await;
    assert!(
        ack.duplicate,
        "a repeated Nats-Msg-Id inside the window: {ack:?}"
    );
    eprintln!(
        "sent {GOOD} good and {} hostile messages in {:?}",
        sent_hostile.len() + 2,
        started.elapsed()
    );

    // Oversized: the stream's max message size is the broker's max_message_bytes, so JetStream
    // refuses the publish itself (the sender's PubAck is an error); were it stored, the broker
    // would answer TOO_LARGE.
    let oversized_message_id = match oversized_result.expect("the oversized one was sent") {
        Ok((message_id, None)) => message_id,
        Ok((message_id, Some(seq))) => {
            system
                .adapter(CENTRE)
                .wait_rejected(&message_id, "TOO_LARGE", SHORT)
                .await;
            eprintln!("the oversized message was stored (seq {seq}) and refused by the broker");
            message_id
        }
        Err(e) => panic!("{e}"),
    };

    // Every good referral delivered once and RECEIVED (the sender notified).
    let per_agency = GOOD / PAIRS.len();
    for (from, to) in PAIRS {
        system
            .adapter(to)
            .wait_lines(
                &format!("{per_agency} deliveries from {from}"),
                crate::REDELIVERY,
                |lines| lines.iter().filter(|l| l.kind() == "delivery").count() >= per_agency,
            )
            .await;
        system
            .adapter(from)
            .wait_lines(
                &format!("{per_agency} RECEIVED notifications"),
                crate::REDELIVERY,
                |lines| {
                    lines
                        .iter()
                        .filter(|l| {
                            l.kind() == "notification" && l.state().as_deref() == Some("RECEIVED")
                        })
                        .count()
                        >= per_agency
                },
            )
            .await;
    }
    eprintln!("all delivered and RECEIVED after {:?}", started.elapsed());
    let mut ids_by_sender: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (from, _, rid) in &good {
        ids_by_sender.entry(from).or_default().push(rid.clone());
    }
    for (from, to) in PAIRS {
        let expected: BTreeSet<&str> = good
            .iter()
            .filter(|(f, _, _)| *f == from)
            .map(|(_, _, id)| id.as_str())
            .collect();
        let recipient = system.adapter(to);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for line in recipient.lines_of("delivery") {
            *counts
                .entry(line.referral_id().unwrap_or("(none)").to_owned())
                .or_default() += 1;
        }
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{to}: delivered more than once: {twice:?}"
        );
        let delivered: BTreeSet<&str> = counts.keys().map(String::as_str).collect();
        assert_eq!(
            delivered, expected,
            "{to}: the deliveries are not exactly {from}'s good ones"
        );
        let files: BTreeSet<String> = recipient.inbox_files("referrals").into_iter().collect();
        assert_eq!(
            files.iter().map(String::as_str).collect::<BTreeSet<_>>(),
            expected,
            "{to}: the inbox's referrals"
        );
        let sender = system.adapter(from);
        let received: BTreeSet<String> = sender
            .lines_of("notification")
            .iter()
            .filter(|l| l.state().as_deref() == Some("RECEIVED"))
            .filter_map(|l| l.referral_id().map(str::to_owned))
            .collect();
        assert_eq!(
            received.iter().map(String::as_str).collect::<BTreeSet<_>>(),
            expected,
            "{from}: RECEIVED notifications"
        );
    }
    // The broker agrees.
    for (from, ids) in &ids_by_sender {
        wires[from]
            .wait_all_in_state(ids, v1::ReferralState::Received, SHORT, || {
                system.broker.log_tail()
            })
            .await;
    }

    eprintln!("the broker agrees after {:?}", started.elapsed());
    // Each hostile one: a dead letter with its reason, and a rejection to its sender if any.
    let dead = dead_letters(&system).await;
    for (h, seq) in &sent_hostile {
        let row = dead
            .get(seq)
            .unwrap_or_else(|| panic!("{}: no dead letter for seq {seq}: {dead:?}", h.what));
        assert_eq!(reason(row), h.code, "{}: {row}", h.what);
        assert_eq!(
            row["subject"].as_str(),
            Some(h.subject.as_str()),
            "{}",
            h.what
        );
        assert_eq!(
            row["message_id"].as_str().unwrap_or_default(),
            h.message_id,
            "{}: {row}",
            h.what
        );
        if let Some(to) = h.reply_to {
            assert_eq!(row["sender"].as_str(), Some(to), "{}: {row}", h.what);
        }
    }
    assert_eq!(
        dead.len(),
        sent_hostile.len(),
        "dead letters other than the hostile ones: {dead:?}"
    );
    for (h, _) in sent_hostile
        .iter()
        .filter(|(h, _)| !h.message_id.is_empty())
    {
        let to = h.reply_to.expect("a readable one names its sender");
        let rejection = system
            .adapter(to)
            .wait_rejection_of(&h.message_id, SHORT)
            .await;
        assert_eq!(
            rejection.code().as_deref(),
            Some(h.code),
            "{}: {}",
            h.what,
            rejection.raw
        );
        // A reused id's rejection names the referral of the refused message, so that a sender
        // matching rejections by message id alone is not misled into failing the first one.
        if h.code == "REPLAYED_MESSAGE_ID" {
            assert_eq!(
                rejection.referral_id(),
                h.referral_id.as_deref(),
                "{}: {}",
                h.what,
                rejection.raw
            );
        }
    }
    // And exactly those rejections, per agency (the unreadable ones have no id to match).
    for (from, _) in PAIRS {
        let mut want: Vec<&str> = sent_hostile
            .iter()
            .filter(|(h, _)| h.reply_to == Some(from))
            .map(|(h, _)| h.code)
            .collect();
        want.sort_unstable();
        let adapter = system.adapter(from);
        adapter
            .wait_lines("every rejection", SHORT, |lines| {
                lines.iter().filter(|l| l.kind() == "rejection").count() >= want.len()
            })
            .await;
        let mut got: Vec<String> = adapter
            .rejections()
            .iter()
            .map(|l| l.code().unwrap_or_default())
            .collect();
        got.sort_unstable();
        assert_eq!(got, want, "{from}: rejections");
    }
    // No hostile referral went anywhere.
    for (h, _) in &sent_hostile {
        if let Some(rid) = &h.referral_id {
            for adapter in system.adapters() {
                assert_eq!(adapter.deliveries_of(rid), 0, "{} delivered", h.what);
            }
        }
    }
    for adapter in system.adapters() {
        assert!(
            !adapter
                .rejections()
                .iter()
                .any(
                    |l| adapter.rejected_message_id(l).as_deref() == Some(&oversized_message_id)
                        && l.code().as_deref() != Some("TOO_LARGE")
                ),
            "the oversized message got another answer than TOO_LARGE"
        );
    }

    // The broker never restarted and never crashed.
    assert!(system.broker.is_running(), "{}", system.broker.log_tail());
    assert_eq!(system.broker.pid(), Some(broker_pid));
    assert_eq!(system.broker.starts(), 1);
    let log = std::fs::read_to_string(system.broker.log_path()).expect("the broker's log");
    assert!(
        !log.contains("panicked") && !log.contains("broker start #2"),
        "{}",
        system.broker.log_tail()
    );
    eprintln!("hostile test done in {:?}", started.elapsed());
}

/// Publishes a correctly signed referral over the size limit as CENTRE: `Ok((message id,
/// None))` if JetStream refused it with a PubAck error naming the size, `Ok((id, Some(seq)))`
/// if the stream stored it, `Err` for any other outcome.
async fn publish_oversized(centre: &WireClient) -> Result<(String, Option<u64>), String> {
    let referral = ReferralBuilder::new(CENTRE, HOPE)
        .reason(&"너무 긴 사유 (test) ".repeat(500))
        .build();
    let e = centre.referral_envelope(&referral);
    let bytes = e.encode_to_vec();
    assert!(bytes.len() > usize::try_from(MAX_MESSAGE_BYTES).expect("small"));
    let publish = PublishMessage::build()
        .payload(bytes.into())
        .message_id(&e.message_id);
    let result = match centre
        .jetstream()
        .send_publish(subject::inbound(CENTRE, InKind::Referral), publish)
        .await
    {
        Ok(ack) => ack.await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(ack) => Ok((e.message_id, Some(ack.sequence))),
        Err(err) if err.contains("size") => {
            eprintln!("the oversized publish was refused by JetStream: {err}");
            Ok((e.message_id, None))
        }
        Err(err) => Err(format!("the oversized publish failed otherwise: {err}")),
    }
}

/// The recipient's adapter, configured with the registry, checks the sender's signature that
/// the broker relays. The broker here has been given a registry in which CENTRE's key is an
/// impostor's (a stale or tampered registry), and does not require signatures: it relays an
/// unsigned referral and one signed by the impostor; HOPE's adapter, with the true registry,
/// hands over neither, logs why, and keeps handing over good ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_relayed_signature_does_not_verify_is_not_handed_over() {
    let impostor = rogue_key(&test_key(CENTRE).id);
    let files = tempfile::tempdir().expect("tempdir");
    let broker_registry = files.path().join("broker-registry.toml");
    yeongye_tests::registry::write(&broker_registry, &yeongye_tests::registry::DEFAULT_AGENCIES);
    let text = std::fs::read_to_string(&broker_registry).expect("read registry");
    let swapped = text.replace(&test_key(CENTRE).public_b64(), &impostor.public_b64());
    assert_ne!(text, swapped);
    std::fs::write(&broker_registry, swapped).expect("write registry");
    let mut system = System::builder()
        .adapters(&[WELFARE])
        .broker_config(move |c| {
            c.registry = broker_registry;
            c.extra
                .insert("require_signatures".into(), toml::Value::Boolean(false));
        })
        .start()
        .await;
    let mut hope = with_registry(&system, HOPE);
    let (centre, welfare) = (system.wire(CENTRE).await, system.wire(WELFARE).await);

    let before = ReferralBuilder::new(WELFARE, HOPE).build();
    welfare.send_referral(&before).await;
    hope.wait_lines("the first good delivery", SHORT, |lines| {
        lines
            .iter()
            .any(|l| l.kind() == "delivery" && l.referral_id() == Some(&before.referral_id))
    })
    .await;

    let unsigned_referral = ReferralBuilder::new(CENTRE, HOPE).build();
    let mut unsigned = centre.referral_envelope(&unsigned_referral);
    unsigned.signature.clear();
    unsigned.key_id.clear();
    centre.publish_envelope(InKind::Referral, &unsigned).await;
    let forged_referral = ReferralBuilder::new(CENTRE, HOPE).build();
    let mut forged = centre.referral_envelope(&forged_referral);
    impostor.sign(&mut forged);
    centre.publish_envelope(InKind::Referral, &forged).await;
    let after = ReferralBuilder::new(WELFARE, HOPE).build();
    welfare.send_referral(&after).await;
    // HOPE reads its queue in order: once `after` is handed over, the two before it were judged.
    system
        .adapter(WELFARE)
        .wait_notified(&after.referral_id, "RECEIVED", SHORT)
        .await;

    // The broker did relay both (it holds them DELIVERED) ...
    for r in [&unsigned_referral, &forged_referral] {
        assert_eq!(
            centre.state(&r.referral_id).await,
            Some(v1::ReferralState::Delivered),
            "{}",
            system.broker.log_tail()
        );
    }
    // ... and HOPE's adapter handed over neither, and said why.
    for r in [&unsigned_referral, &forged_referral] {
        assert_eq!(hope.deliveries_of(&r.referral_id), 0, "{}", hope.describe());
    }
    let inbox: BTreeSet<String> = hope.inbox_files("referrals").into_iter().collect();
    assert_eq!(
        inbox,
        BTreeSet::from([before.referral_id.clone(), after.referral_id.clone()]),
        "{}",
        hope.describe()
    );
    assert_eq!(hope.lines_of("delivery").len(), 2, "{}", hope.describe());
    let log = std::fs::read_to_string(hope.log_path()).expect("HOPE's adapter log");
    assert!(
        log.matches("relayed signature does not verify").count() >= 2,
        "{}",
        hope.describe()
    );
    assert!(log.contains("the envelope is not signed"), "{log}");
    assert!(
        log.contains("the signature does not match the envelope"),
        "{log}"
    );
    assert!(hope.is_running(), "{}", hope.describe());
    assert!(system.broker.is_running());
}

/// CENTRE's key is rotated: the registry keeps the old key until a cutoff a few seconds ahead
/// and lists a new one. The new key passes at once; the old one passes before the cutoff
/// (judged by when the stream stored the message) and is refused with SIGNATURE_KEY_EXPIRED
/// after it. The recipient's adapter checks the relayed signatures against the same registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_accepted_until_its_cutoff_and_the_new_one_at_once() {
    let mut system = System::builder()
        .agencies(&[CENTRE, HOPE])
        .adapters(&[CENTRE])
        .start()
        .await;
    let centre = system.wire(CENTRE).await;
    let old = test_key(CENTRE);
    let new = rogue_key("cc-haengbok1-2026");
    let cutoff = now_ms() + 3000;
    let text = std::fs::read_to_string(&system.registry).expect("read registry");
    let old_line = format!("public_key = \"{}\"\n", old.public_b64());
    assert!(text.contains(&old_line));
    let rotated = text.replace(
        &old_line,
        &format!(
            "{old_line}not_after_ms = {cutoff}\n\n[[agency.keys]]\nid = \"{}\"\npublic_key = \"{}\"\n",
            new.id,
            new.public_b64()
        ),
    );
    std::fs::write(&system.registry, rotated).expect("write registry");
    let addr = system.broker.config().http_addr.parse().expect("http_addr");
    let reloaded = HttpClient::new(addr, Some(yeongye_tests::broker::TEST_OPERATOR_TOKEN))
        .request("POST", "/api/v1/registry/reload", &[], Some(b""))
        .await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    let send = async |key: &PrivateKey| {
        let referral = ReferralBuilder::new(CENTRE, HOPE).build();
        let mut e = centre.referral_envelope(&referral);
        key.sign(&mut e);
        centre.publish_envelope(InKind::Referral, &e).await;
        (referral.referral_id, e.message_id)
    };

    let (new_before, _) = send(&new).await;
    let (old_before, _) = send(&old).await;
    assert!(
        now_ms() < cutoff - 500,
        "the messages before the cutoff took too long to send: the test cannot tell"
    );
    // HOPE's adapter reads the rotated registry (its deliveries wait in its queue till then).
    let hope = with_registry(&system, HOPE);
    let wait = u64::try_from(cutoff + 1000 - now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (old_after, old_after_message) = send(&old).await;
    let (new_after, _) = send(&new).await;

    let adapter = system.adapter(CENTRE);
    for rid in [&new_before, &old_before, &new_after] {
        adapter.wait_notified(rid, "RECEIVED", SHORT).await;
        assert_eq!(hope.deliveries_of(rid), 1, "{}", hope.describe());
    }
    adapter
        .wait_rejected(&old_after_message, "SIGNATURE_KEY_EXPIRED", SHORT)
        .await;
    assert_eq!(hope.deliveries_of(&old_after), 0);
    assert_eq!(adapter.rejections().len(), 1, "{}", adapter.describe());
    let dead = dead_letters(&system).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let row = dead.values().next().expect("one");
    assert_eq!(reason(row), "SIGNATURE_KEY_EXPIRED", "{row}");
    assert_eq!(row["message_id"].as_str(), Some(old_after_message.as_str()));
    let log = std::fs::read_to_string(hope.log_path()).expect("HOPE's adapter log");
    assert!(!log.contains("relayed signature does not verify"), "{log}");
    assert!(system.broker.is_running());
}
