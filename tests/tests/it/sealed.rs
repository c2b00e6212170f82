//! Sealed client data (issue #15), end to end: the seal's associated data binds the routing
//! metadata (a ciphertext moved onto other metadata, or metadata changed after sealing, does not
//! open at the recipient), the recipient's adapter refuses contents beyond the declared
//! categories and keeps nothing of them, and a key rotation with referrals in flight.
//!
//! Each refused referral must reach no inbox, and the broker must show it DECLINED by the
//! recipient with the reason code (the sender's notification carries it too).

use std::time::Duration;

use prost::Message as _;
use yeongye_proto::seal;
use yeongye_proto::signing::PrivateKey;
use yeongye_proto::subject::{self, InKind};
use yeongye_tests::secure::SecureSystem;
use yeongye_tests::wire::{self, ReferralBuilder, envelope};
use yeongye_tests::{AdapterProcess, Rng, System, WireClient, v1};

use crate::{CENTRE, HOPE, MENTAL, SHORT, WELFARE};

/// Publishes `referral` (sealed already, maybe tampered with) from `wire`'s agency.
async fn publish_referral(wire: &WireClient, referral: &v1::Referral) -> String {
    let e = envelope(
        wire.agency(),
        v1::PayloadType::Referral,
        referral.encode_to_vec(),
    );
    wire.publish_envelope(InKind::Referral, &e).await;
    e.message_id
}

/// Waits until the broker shows `referral_id` DECLINED by `by` with `reason`, and the sender's
/// adapter was notified of it with that reason; asserts that the recipient's inbox has no
/// file of it.
async fn assert_declined_with(
    system: &System,
    wire: &WireClient,
    referral_id: &str,
    by: &str,
    reason: v1::ReasonCode,
) {
    let reply = wire
        .wait_state(referral_id, v1::ReferralState::Declined, SHORT, || {
            system.describe()
        })
        .await;
    let decline = reply
        .history
        .iter()
        .find(|h| h.state() == v1::ReferralState::Declined)
        .expect("a DECLINED history entry");
    assert_eq!(decline.by_agency, by, "{reply:?}");
    assert_eq!(decline.reason(), reason, "{reply:?}");
    let sender = system.adapter(wire.agency());
    sender.wait_notified(referral_id, "DECLINED", SHORT).await;
    let line = sender
        .lines_of("notification")
        .into_iter()
        .find(|l| l.referral_id() == Some(referral_id) && l.state().as_deref() == Some("DECLINED"))
        .expect("the DECLINED notification's line");
    let file = sender
        .item_file(&line)
        .expect("the DECLINED notification's inbox file");
    assert!(
        file.to_string().contains(reason.as_str_name()),
        "the sender's notification names {}: {file}",
        reason.as_str_name()
    );
    let recipient = system.adapter(by);
    assert!(
        !recipient
            .inbox_files("referrals")
            .iter()
            .any(|f| f == referral_id),
        "{by} handed over {referral_id}"
    );
    assert_eq!(recipient.deliveries_of(referral_id), 0, "{by} delivered it");
}

/// Ciphertexts moved onto other metadata, and metadata changed after sealing, do not open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_moved_or_its_metadata_changed_does_not_open() {
    let system = System::start().await;
    let centre = system.wire(CENTRE).await;

    // Moved: the seal of one referral on another's metadata (same parties).
    let first = wire::sealed(&ReferralBuilder::new(CENTRE, HOPE).build());
    let mut moved = wire::sealed(&ReferralBuilder::new(CENTRE, HOPE).build());
    moved.sealed.clone_from(&first.sealed);
    // Changed recipient: sealed to HOPE, sent to MENTAL (whose key does not open it).
    let mut to_other = wire::sealed(&ReferralBuilder::new(CENTRE, HOPE).build());
    MENTAL.clone_into(&mut to_other.to_agency);
    // Changed purpose, and changed categories (one more declared), after sealing.
    let mut purpose = wire::sealed(&ReferralBuilder::new(CENTRE, HOPE).build());
    purpose.purpose = v1::Purpose::ServiceLinkage.into();
    let mut categories = wire::sealed(&ReferralBuilder::new(CENTRE, HOPE).build());
    categories
        .data_categories
        .push(v1::DataCategory::Contact.into());
    // An untouched one, as the control: it opens and is handed over.
    let intact = wire::sealed(&ReferralBuilder::new(CENTRE, HOPE).build());

    for r in [&moved, &to_other, &purpose, &categories, &intact] {
        publish_referral(&centre, r).await;
    }
    system
        .adapter(HOPE)
        .wait_lines("the intact referral's delivery", SHORT, |lines| {
            lines
                .iter()
                .any(|l| l.kind() == "delivery" && l.referral_id() == Some(&intact.referral_id))
        })
        .await;
    for (what, r, by) in [
        ("moved", &moved, HOPE),
        ("recipient changed", &to_other, MENTAL),
        ("purpose changed", &purpose, HOPE),
        ("categories changed", &categories, HOPE),
    ] {
        eprintln!("sealed: {what}: {}", r.referral_id);
        assert_declined_with(
            &system,
            &centre,
            &r.referral_id,
            by,
            v1::ReasonCode::SealedOpenFailed,
        )
        .await;
    }
    // The seal that was moved still opens on its own metadata.
    publish_referral(&centre, &first).await;
    system
        .adapter(HOPE)
        .wait_lines("the first referral's delivery", SHORT, |lines| {
            lines
                .iter()
                .any(|l| l.kind() == "delivery" && l.referral_id() == Some(&first.referral_id))
        })
        .await;
}

/// Every file under `dir`, with its bytes.
pub(crate) fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => {
                    if let Ok(bytes) = std::fs::read(&path) {
                        out.push((path, bytes));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The files under `dir` that hold `needle`.
pub(crate) fn holding(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|(_, bytes)| contains(bytes, needle.as_bytes()))
        .map(|(p, _)| p)
        .collect()
}

/// A referral whose sealed client has a household while HOUSEHOLD is not declared is declined
/// by the recipient's adapter, the sender is told why, and nothing of it stays at the recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_contents_beyond_the_declared_categories_are_refused_and_purged() {
    let mut rng = Rng::from_env("sealed_undeclared");
    let token = format!("cnry{:016x}", rng.next_u64());
    let system = System::start().await;
    let welfare = system.wire(WELFARE).await;

    let mut r = ReferralBuilder::new(WELFARE, HOPE).build();
    let client = r.client.as_mut().expect("a client");
    client.household = format!("세대 {token} 3인");
    r.data_categories = vec![v1::DataCategory::Identity.into()];
    // Sealed as the sender's adapter would not: it checks the categories before sealing.
    let r = wire::sealed(&r);
    assert!(r.sealed.is_some());
    // The control: the same, declared, is handed over whole.
    let mut ok = ReferralBuilder::new(WELFARE, HOPE).build();
    let control = format!("ctl{:016x}", rng.next_u64());
    ok.client.as_mut().expect("a client").household = format!("세대 {control} 2인");
    let ok = wire::sealed(&ok);

    publish_referral(&welfare, &r).await;
    publish_referral(&welfare, &ok).await;
    assert_declined_with(
        &system,
        &welfare,
        &r.referral_id,
        HOPE,
        v1::ReasonCode::SealedCategoryNotDeclared,
    )
    .await;
    let hope: &AdapterProcess = system.adapter(HOPE);
    hope.wait_lines("the control's delivery", SHORT, |lines| {
        lines
            .iter()
            .any(|l| l.kind() == "delivery" && l.referral_id() == Some(&ok.referral_id))
    })
    .await;
    // The control proves the scan finds what is there.
    let adapter_dir = system.adapter_dir(HOPE);
    assert!(
        !holding(&adapter_dir, &control).is_empty(),
        "the control's household is in HOPE's inbox"
    );
    let kept = holding(&adapter_dir, &token);
    assert!(
        kept.is_empty(),
        "HOPE's adapter kept the refused referral's household in {kept:?}"
    );
    let log = std::fs::read_to_string(hope.log_path()).expect("HOPE's log");
    assert!(
        !log.contains(&token),
        "HOPE's log holds the refused household"
    );
}

/// The sender and recipient of the rotation test (onboarded for real).
const ROT_SENDER: &str = "cc-rotate";
const ROT_RECIPIENT: &str = "hope-rotate";

/// `referral-broker agency rotate-key <agency> --grace-secs <grace>` on the system's files.
fn rotate_key(system: &SecureSystem, agency: &str, grace_secs: u64) {
    let ids = &system.ids;
    let s = |p: &std::path::Path| p.display().to_string();
    let args: Vec<String> = vec![
        "agency".into(),
        "rotate-key".into(),
        agency.into(),
        "--grace-secs".into(),
        grace_secs.to_string(),
        "--registry".into(),
        s(&ids.registry),
        "--secrets".into(),
        s(&ids.secrets),
        "--nats-conf".into(),
        s(&ids.nats_conf),
    ];
    ids.run(&args);
}

/// The recipient's current public sealing key, as the registry lists it now.
fn current_key(system: &SecureSystem, agency: &str) -> seal::PublicKey {
    seal::Directory::load(&system.ids.registry)
        .expect("the registry's sealing keys")
        .current(agency)
        .expect("a current sealing key")
        .clone()
}

/// Sends `count` referrals with the sender adapter's one-shot `send` (a fresh process: it reads
/// the registry, so seals to the recipient's current key), and waits until each is DELIVERED
/// (in the recipient's queue).
async fn send_with_cli(system: &SecureSystem, count: usize, tag: &str) -> Vec<String> {
    let sender = system.adapter(ROT_SENDER);
    let mut ids = Vec::new();
    for i in 0..count {
        let r = ReferralBuilder::new(ROT_SENDER, ROT_RECIPIENT).build();
        let file = system.dir().join(format!("referral-{tag}-{i}.json"));
        std::fs::write(&file, serde_json::to_vec(&r).expect("JSON")).expect("write");
        sender
            .cli(&["send", file.to_str().expect("utf-8 path")])
            .await
            .assert_success();
        ids.push(r.referral_id);
    }
    for id in &ids {
        sender.wait_notified(id, "DELIVERED", SHORT).await;
    }
    ids
}

/// Key rotation with referrals in flight: what was sealed to the old key before the rotation
/// and to the new one after it all opens at a recipient whose adapter starts after the rotation
/// (within the grace period); after the grace period, the next rotation drops the old key from
/// the key file, and a referral still sealed to it is declined SEALED_OPEN_FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrals_in_flight_across_a_key_rotation_open_and_the_old_key_goes() {
    /// Long enough for the recipient's adapter to start and open what waits for it.
    const GRACE_SECS: u64 = 8;
    let mut system = SecureSystem::start(&[ROT_SENDER, ROT_RECIPIENT], false).await;
    system.start_adapter(ROT_SENDER);

    // N referrals sealed to the recipient's first key; its adapter is not running.
    let first = current_key(&system, ROT_RECIPIENT);
    let before = send_with_cli(&system, 3, "before").await;

    rotate_key(&system, ROT_RECIPIENT, GRACE_SECS);
    let second = current_key(&system, ROT_RECIPIENT);
    assert_ne!(first.id, second.id, "rotate-key gave a new current key");
    let keys = seal::KeyFile::load(&system.ids.sealing_key(ROT_RECIPIENT)).expect("key file");
    let not_after_ms = keys
        .keys
        .iter()
        .find(|k| k.id == first.id)
        .expect("the first key is kept for its grace period")
        .not_after_ms;
    assert!(not_after_ms > yeongye_tests::now_ms(), "a grace period");
    // The broker reads the registry at start: the recipient's new signing key (its receipts
    // are signed with it) is known to it once restarted.
    system.restart_broker().await;

    // M more, sealed to the second key by fresh `send` processes.
    let after = send_with_cli(&system, 3, "after").await;

    // The recipient's adapter starts now, in the grace period: everything opens.
    system.start_adapter(ROT_RECIPIENT);
    let recipient = system.adapter(ROT_RECIPIENT);
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    for id in &all {
        // Handed over (a referral that does not open is declined after its receipt instead).
        recipient
            .wait_lines(&format!("the delivery of {id}"), SHORT, |lines| {
                lines
                    .iter()
                    .any(|l| l.kind() == "delivery" && l.referral_id() == Some(id.as_str()))
            })
            .await;
        assert!(
            recipient.inbox_files("referrals").contains(id),
            "{id} is not in the recipient's inbox"
        );
    }
    assert!(
        yeongye_tests::now_ms() < not_after_ms,
        "the grace period ended before the recipient opened what was sealed to its first key: \
         the test cannot tell (raise GRACE_SECS)"
    );

    // After the grace period: a `send` still seals to the second key, which opens.
    yeongye_tests::wait_until(
        "the first key's grace period to end",
        Duration::from_secs(GRACE_SECS + 5),
        || yeongye_tests::now_ms() > not_after_ms,
        String::new,
    )
    .await;
    let late = send_with_cli(&system, 1, "late").await;
    recipient
        .wait_lines("the delivery of the late referral", SHORT, |lines| {
            lines
                .iter()
                .any(|l| l.kind() == "delivery" && l.referral_id() == Some(late[0].as_str()))
        })
        .await;
    for id in all.iter().chain(&late) {
        let states = system.adapter(ROT_SENDER).notified_states(id);
        assert!(
            !states.iter().any(|s| s == "DECLINED"),
            "{id} was declined: {states:?}"
        );
    }

    // The next rotation drops the first key from the key file.
    rotate_key(&system, ROT_RECIPIENT, GRACE_SECS);
    let keys = seal::KeyFile::load(&system.ids.sealing_key(ROT_RECIPIENT)).expect("key file");
    let held: Vec<&str> = keys.keys.iter().map(|k| k.id.as_str()).collect();
    assert!(
        !held.contains(&first.id.as_str()),
        "the first key is still in the key file: {held:?}"
    );
    assert!(held.contains(&second.id.as_str()), "{held:?}");

    // A referral still sealed to the first key is declined, and not handed over.
    let mut stale = ReferralBuilder::new(ROT_SENDER, ROT_RECIPIENT).build();
    seal::seal_referral(&mut stale, &first).expect("seal to the first key");
    let conn = system.connect_as(ROT_SENDER).connect(&system.url()).await;
    let key = PrivateKey::load(&system.ids.signing_key(ROT_SENDER)).expect("the sender's key");
    let mut e = envelope(ROT_SENDER, v1::PayloadType::Referral, stale.encode_to_vec());
    key.sign(&mut e);
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .payload(e.encode_to_vec().into())
        .message_id(e.message_id.clone());
    conn.jetstream()
        .send_publish(subject::inbound(ROT_SENDER, InKind::Referral), msg)
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    let sender = system.adapter(ROT_SENDER);
    sender
        .wait_notified(&stale.referral_id, "DECLINED", SHORT)
        .await;
    let line = sender
        .lines_of("notification")
        .into_iter()
        .find(|l| {
            l.referral_id() == Some(stale.referral_id.as_str())
                && l.state().as_deref() == Some("DECLINED")
        })
        .expect("the DECLINED notification");
    let file = sender.item_file(&line).expect("its inbox file");
    assert!(
        file.to_string()
            .contains(v1::ReasonCode::SealedOpenFailed.as_str_name()),
        "{file}"
    );
    assert!(
        !recipient
            .inbox_files("referrals")
            .contains(&stale.referral_id),
        "the stale referral was handed over"
    );
}
