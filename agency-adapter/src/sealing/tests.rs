//! The adapter's sealing: what a sender seals opens at the recipient as it was written; what
//! does not open, or carries more than it declared, is refused with its reason.

use yeongye_proto::seal::PrivateKey;

use super::*;
use crate::AdapterConfig;

const TO: &str = "mental-health";
const FROM: &str = "cc-haengbok1";

fn recipient_key() -> PrivateKey {
    PrivateKey::derive("mental-health-seal-1", b"mental-health test sealing key..")
}

fn sender_key() -> PrivateKey {
    PrivateKey::derive("cc-haengbok1-seal-1", b"cc-haengbok1 test sealing key...")
}

fn directory() -> Directory {
    let mut d = Directory::default();
    d.add(TO, &recipient_key().entry()).unwrap();
    d.add(FROM, &sender_key().entry()).unwrap();
    d
}

fn sender() -> Sealing {
    Sealing::new(
        Some(directory()),
        Some(KeyFile {
            keys: vec![sender_key()],
        }),
    )
}

fn recipient() -> Sealing {
    Sealing::new(
        Some(directory()),
        Some(KeyFile {
            keys: vec![recipient_key()],
        }),
    )
}

fn referral() -> v1::Referral {
    v1::Referral {
        referral_id: "r-1".into(),
        from_agency: FROM.into(),
        to_agency: TO.into(),
        client: Some(v1::Client {
            pseudonym_id: "p-1".into(),
            name: "김canary".into(),
            phone: "010-9999-0000".into(),
            ..Default::default()
        }),
        field: 3,
        urgency: 1,
        reason: "우울".into(),
        legal_basis: Some(v1::referral::LegalBasis::ConsentId("c-1".into())),
        data_categories: vec![
            v1::DataCategory::Identity as i32,
            v1::DataCategory::Contact as i32,
        ],
        purpose: 1,
        ..Default::default()
    }
}

#[test]
fn what_the_sender_seals_the_recipient_opens_as_written() {
    let original = referral();
    let mut r = original.clone();
    sender().seal_referral(&mut r).unwrap();
    assert!(r.sealed.is_some());
    assert!(!seal::has_clear_personal_data(&r));
    match recipient().open_referral(&r, 0) {
        Opened::Referral(opened) => assert_eq!(*opened, original),
        Opened::Refused(code, why) => panic!("{code:?}: {why}"),
    }
}

#[test]
fn without_a_registry_nothing_is_sealed_and_clear_referrals_pass_as_they_came() {
    let mut r = referral();
    Sealing::default().seal_referral(&mut r).unwrap();
    assert_eq!(r, referral());
    assert!(matches!(
        recipient().open_referral(&r, 0),
        Opened::Referral(_)
    ));
}

#[test]
fn a_recipient_without_a_sealing_key_in_the_registry_gets_nothing_sent() {
    let mut r = referral();
    r.to_agency = "no-keys".into();
    let err = sender().seal_referral(&mut r).unwrap_err();
    assert!(err.to_string().contains("no sealing key"), "{err}");
}

#[test]
fn contents_beyond_the_declared_categories_are_refused() {
    // The sender's adapter would refuse this before sealing; a hostile sender seals it anyway.
    let mut r = referral();
    r.client.as_mut().unwrap().household = "가구 구성".into();
    seal::seal_referral(&mut r, &recipient_key().public()).unwrap();
    assert!(matches!(
        recipient().open_referral(&r, 0),
        Opened::Refused(ReasonCode::SealedCategoryNotDeclared, _)
    ));
}

#[test]
fn a_seal_that_does_not_open_is_refused_whatever_the_cause() {
    let mut r = referral();
    sender().seal_referral(&mut r).unwrap();
    // No key file at all.
    assert!(matches!(
        Sealing::new(Some(directory()), None).open_referral(&r, 0),
        Opened::Refused(ReasonCode::SealedOpenFailed, _)
    ));
    // Metadata changed in transit.
    let mut moved = r.clone();
    moved.purpose = 2;
    assert!(matches!(
        recipient().open_referral(&moved, 0),
        Opened::Refused(ReasonCode::SealedOpenFailed, _)
    ));
    // The key past its grace period.
    let mut old = recipient_key();
    old.not_after_ms = 10;
    let expired = Sealing::new(None, Some(KeyFile { keys: vec![old] }));
    assert!(matches!(expired.open_referral(&r, 10), Opened::Referral(_)));
    assert!(matches!(
        expired.open_referral(&r, 11),
        Opened::Refused(ReasonCode::SealedOpenFailed, _)
    ));
}

#[test]
fn a_note_is_sealed_to_the_other_party_and_opens_in_its_notification() {
    let sealed = recipient()
        .seal_note(
            TO,
            FROM,
            "r-1",
            v1::Status::Declined,
            "정신건강 사례로 등록",
        )
        .unwrap()
        .expect("sealed");
    let mut n = v1::Notification {
        referral_id: "r-1".into(),
        state: v1::ReferralState::Declined as i32,
        by_agency: TO.into(),
        sealed_note: Some(sealed),
        ..Default::default()
    };
    // The author cannot open it (sealed to the sender): passed on sealed.
    let mut at_author = n.clone();
    recipient().open_note(TO, &mut at_author, 0);
    assert!(at_author.sealed_note.is_some() && at_author.note.is_empty());
    sender().open_note(FROM, &mut n, 0);
    assert_eq!(n.note, "정신건강 사례로 등록");
    assert!(n.sealed_note.is_none());
    // An empty note is not sealed; without a registry nothing is.
    assert!(
        sender()
            .seal_note(FROM, TO, "r-1", v1::Status::Cancelled, "")
            .unwrap()
            .is_none()
    );
    assert!(
        Sealing::default()
            .seal_note(FROM, TO, "r-1", v1::Status::Cancelled, "x")
            .unwrap()
            .is_none()
    );
}

#[test]
fn a_note_moved_to_another_status_does_not_open() {
    let sealed = recipient()
        .seal_note(TO, FROM, "r-1", v1::Status::Accepted, "메모")
        .unwrap()
        .unwrap();
    let mut n = v1::Notification {
        referral_id: "r-1".into(),
        state: v1::ReferralState::Completed as i32,
        by_agency: TO.into(),
        sealed_note: Some(sealed),
        ..Default::default()
    };
    sender().open_note(FROM, &mut n, 0);
    assert!(n.note.is_empty() && n.sealed_note.is_some());
}

/// A rotation while the adapter runs: the new key is in the file before anyone seals to it;
/// the first seal naming it makes the adapter read the file again.
#[test]
fn a_key_added_to_the_file_after_start_is_read_when_a_seal_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sealing.key");
    let write = |keys: Vec<PrivateKey>| {
        let _ = std::fs::remove_file(&path);
        yeongye_proto::credentials::write_private(
            &path,
            KeyFile { keys }.to_file_text().as_bytes(),
        )
        .unwrap();
    };
    write(vec![recipient_key()]);
    let mut cfg = AdapterConfig::new(TO, ["nats://127.0.0.1:1"], dir.path().join("state"));
    cfg.sealing_key_file = Some(path.clone());
    let sealing = Sealing::open(cfg.registry.as_deref(), cfg.sealing_key_file.as_deref()).unwrap();
    let rotated = PrivateKey::derive("mental-health-seal-2", b"mental-health rotated key.......");
    let mut r = referral();
    seal::seal_referral(&mut r, &rotated.public()).unwrap();
    // Not in the file yet: refused (nothing to read again that helps).
    assert!(matches!(
        sealing.open_referral(&r, 0),
        Opened::Refused(ReasonCode::SealedOpenFailed, _)
    ));
    let mut old = recipient_key();
    old.not_after_ms = 1_000;
    write(vec![old, rotated]);
    assert!(matches!(sealing.open_referral(&r, 0), Opened::Referral(_)));
    assert_eq!(
        sealing.key_ids(),
        vec![
            "mental-health-seal-1".to_owned(),
            "mental-health-seal-2".to_owned()
        ]
    );
}

/// A long-running sender seals to the registry's current keys: a rotation (or a new agency)
/// written to the registry file is read at the next seal.
#[test]
fn a_changed_registry_is_read_again_before_sealing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.toml");
    let registry = |keys: &[&PrivateKey]| {
        let entries: Vec<String> = keys
            .iter()
            .map(|k| {
                let e = k.entry();
                format!(
                    "{{ id = \"{}\", public_key = \"{}\", not_after_ms = {} }}",
                    e.id, e.public_key, e.not_after_ms
                )
            })
            .collect();
        format!(
            "[[agency]]\nid = \"{TO}\"\nname = \"x\"\nkind = \"other\"\nsealing_keys = [{}]\n",
            entries.join(", ")
        )
    };
    std::fs::write(&path, registry(&[&recipient_key()])).unwrap();
    let mut cfg = AdapterConfig::new(FROM, ["nats://127.0.0.1:1"], dir.path().join("state"));
    cfg.registry = Some(path.clone());
    let sealing = Sealing::open(cfg.registry.as_deref(), cfg.sealing_key_file.as_deref()).unwrap();
    let mut r = referral();
    sealing.seal_referral(&mut r).unwrap();
    assert_eq!(r.sealed.as_ref().unwrap().key_id, "mental-health-seal-1");

    let mut old = recipient_key();
    old.not_after_ms = 1_000;
    let rotated = PrivateKey::derive("mental-health-seal-2", b"mental-health rotated key.......");
    // Written with a later modification time than the first (file systems keep whole
    // seconds on some machines).
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    loop {
        std::fs::write(&path, registry(&[&old, &rotated])).unwrap();
        if std::fs::metadata(&path).unwrap().modified().unwrap() != before {
            break;
        }
        std::thread::yield_now();
    }
    let mut r = referral();
    sealing.seal_referral(&mut r).unwrap();
    assert_eq!(r.sealed.as_ref().unwrap().key_id, "mental-health-seal-2");
}

/// An agency whose registry entry has a sealing key must have its key file, or everything
/// sealed to it would be declined: `check-config` says so.
#[test]
fn check_config_refuses_a_registry_key_without_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.toml");
    let e = recipient_key().entry();
    std::fs::write(
        &registry,
        format!(
            "[[agency]]\nid = \"{TO}\"\nname = \"x\"\nkind = \"other\"\n\
             sealing_keys = [{{ id = \"{}\", public_key = \"{}\" }}]\n",
            e.id, e.public_key
        ),
    )
    .unwrap();
    let mut cfg = AdapterConfig::new(TO, ["nats://127.0.0.1:1"], dir.path().join("state"));
    cfg.registry = Some(registry);
    let err = cfg.check_files().unwrap_err().to_string();
    assert!(err.contains("sealing_key_file"), "{err}");
    let key = dir.path().join("sealing.key");
    yeongye_proto::credentials::write_private(
        &key,
        KeyFile {
            keys: vec![recipient_key()],
        }
        .to_file_text()
        .as_bytes(),
    )
    .unwrap();
    cfg.sealing_key_file = Some(key);
    let found = cfg.check_files().unwrap();
    assert!(
        found.iter().any(|f| f.contains("mental-health-seal-1")),
        "{found:?}"
    );
}
