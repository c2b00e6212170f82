//! Sealing and opening: round trips, the associated data's binding, keys and their files.

use super::*;

fn referral() -> v1::Referral {
    v1::Referral {
        referral_id: "r-1".into(),
        from_agency: "cc-haengbok1".into(),
        to_agency: "mental-health".into(),
        client: Some(v1::Client {
            pseudonym_id: "p-0001".into(),
            name: "홍길동".into(),
            birth_date: "1960-01-02".into(),
            phone: "010-0000-0000".into(),
            address: "한빛구 행복1동".into(),
            household: "독거".into(),
        }),
        field: 3,
        urgency: 2,
        reason: "우울 증상".into(),
        legal_basis: Some(v1::referral::LegalBasis::ConsentId("c-1".into())),
        data_categories: vec![1, 2, 3],
        receive_by_ms: 0,
        parent_referral_id: String::new(),
        purpose: 1,
        sealed: None,
    }
}

fn keys() -> (KeyFile, PublicKey) {
    let k = PrivateKey::derive("mental-health-1", b"test key material, 32 bytes long");
    let public = k.public();
    (KeyFile { keys: vec![k] }, public)
}

#[test]
fn a_sealed_referral_keeps_only_metadata_in_clear_and_opens_to_what_was_written() {
    let (file, public) = keys();
    let original = referral();
    let mut r = original.clone();
    seal_referral(&mut r, &public).unwrap();
    assert!(!has_clear_personal_data(&r));
    assert!(has_clear_personal_data(&original));
    let wire = prost::Message::encode_to_vec(&r);
    for canary in ["홍길동", "010-0000-0000", "우울 증상", "독거", "1960-01-02"] {
        assert!(
            !wire.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "{canary} in clear"
        );
    }
    assert_eq!(r.client.as_ref().unwrap().pseudonym_id, "p-0001");
    let contents = open_referral(&r, &file, 0).unwrap().expect("sealed");
    assert_eq!(unsealed(&r, contents), original);
}

#[test]
fn a_statutory_justification_is_sealed_too() {
    let (file, public) = keys();
    let mut original = referral();
    original.legal_basis = Some(v1::referral::LegalBasis::StatutoryBasis(
        v1::StatutoryBasis {
            statute: 1,
            justification: "학대 의심".into(),
        },
    ));
    let mut r = original.clone();
    seal_referral(&mut r, &public).unwrap();
    assert!(!has_clear_personal_data(&r));
    let contents = open_referral(&r, &file, 0).unwrap().unwrap();
    assert_eq!(unsealed(&r, contents), original);
}

/// Every piece of metadata is bound: changed in transit, the seal does not open.
#[test]
fn changing_any_bound_metadata_in_transit_makes_the_seal_fail_to_open() {
    let (file, public) = keys();
    let mut r = referral();
    seal_referral(&mut r, &public).unwrap();
    type Change = Box<dyn Fn(&mut v1::Referral)>;
    let changes: Vec<(&str, Change)> = vec![
        ("referral_id", Box::new(|r| r.referral_id = "r-2".into())),
        (
            "from_agency",
            Box::new(|r| r.from_agency = "cc-saebit".into()),
        ),
        ("to_agency", Box::new(|r| r.to_agency = "addiction".into())),
        (
            "pseudonym",
            Box::new(|r| r.client.as_mut().unwrap().pseudonym_id = "p-2".into()),
        ),
        ("field", Box::new(|r| r.field = 4)),
        ("urgency", Box::new(|r| r.urgency = 1)),
        ("purpose", Box::new(|r| r.purpose = 2)),
        ("categories", Box::new(|r| r.data_categories = vec![1, 2])),
        (
            "category order",
            Box::new(|r| r.data_categories = vec![2, 1, 3]),
        ),
        (
            "consent",
            Box::new(|r| r.legal_basis = Some(v1::referral::LegalBasis::ConsentId("c-2".into()))),
        ),
        ("receive_by", Box::new(|r| r.receive_by_ms = 5)),
        ("parent", Box::new(|r| r.parent_referral_id = "r-0".into())),
    ];
    for (what, change) in changes {
        let mut moved = r.clone();
        change(&mut moved);
        assert_eq!(
            open_referral(&moved, &file, 0).unwrap_err(),
            SealError::Open,
            "{what} changed"
        );
    }
    // The ciphertext moved onto another referral's metadata.
    let mut other = referral();
    other.referral_id = "r-9".into();
    seal_referral(&mut other, &public).unwrap();
    other.sealed = r.sealed.clone();
    assert_eq!(
        open_referral(&other, &file, 0).unwrap_err(),
        SealError::Open
    );
    // A flipped bit of the ciphertext.
    let mut flipped = r.clone();
    flipped.sealed.as_mut().unwrap().ciphertext[0] ^= 1;
    assert_eq!(
        open_referral(&flipped, &file, 0).unwrap_err(),
        SealError::Open
    );
}

#[test]
fn a_seal_to_a_key_not_held_or_past_its_grace_does_not_open() {
    let (mut file, public) = keys();
    let mut r = referral();
    seal_referral(&mut r, &public).unwrap();
    let stranger = KeyFile {
        keys: vec![PrivateKey::derive(
            "other-1",
            b"another key material, 32 bytes..",
        )],
    };
    assert!(matches!(
        open_referral(&r, &stranger, 0),
        Err(SealError::UnknownKey(_))
    ));
    // Rotated out: opens until the end of its grace period, not after.
    file.keys[0].not_after_ms = 1000;
    assert!(open_referral(&r, &file, 1000).is_ok());
    assert!(matches!(
        open_referral(&r, &file, 1001),
        Err(SealError::UnknownKey(_))
    ));
    // A stranger's key under the right id does not open it either.
    let impostor = KeyFile {
        keys: vec![PrivateKey::derive(
            "mental-health-1",
            b"another key material, 32 bytes..",
        )],
    };
    assert_eq!(
        open_referral(&r, &impostor, 0).unwrap_err(),
        SealError::Open
    );
}

#[test]
fn malformed_seals_are_refused_with_a_reason() {
    let (file, public) = keys();
    let mut r = referral();
    seal_referral(&mut r, &public).unwrap();
    let mut short = r.clone();
    short.sealed.as_mut().unwrap().enc.truncate(5);
    assert!(matches!(
        open_referral(&short, &file, 0),
        Err(SealError::Malformed(_))
    ));
    // Sealed contents whose pseudonym differs from the clear one.
    let mut lying = referral();
    let aad_referral = {
        let mut m = lying.clone();
        m.client = Some(v1::Client {
            pseudonym_id: "p-0001".into(),
            ..Default::default()
        });
        m.reason.clear();
        m
    };
    let contents = v1::SealedContents {
        client: Some(v1::Client {
            pseudonym_id: "p-other".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sealed = seal(
        &public,
        &referral_aad(&aad_referral, &public.id),
        &prost::Message::encode_to_vec(&contents),
    )
    .unwrap();
    lying = aad_referral;
    lying.sealed = Some(sealed);
    assert!(matches!(
        open_referral(&lying, &file, 0),
        Err(SealError::Malformed(_))
    ));
    // Not sealed at all.
    assert_eq!(open_referral(&referral(), &file, 0), Ok(None));
}

#[test]
fn notes_are_bound_to_their_referral_author_reader_and_status() {
    let (file, public) = keys();
    let aad = note_aad("r-1", "cc-haengbok1", "mental-health", 6, &public.id);
    let sealed = seal(&public, &aad, "정신건강 사례로 등록".as_bytes()).unwrap();
    assert_eq!(
        open(&file, &sealed, &aad, 0).unwrap(),
        "정신건강 사례로 등록".as_bytes()
    );
    for other in [
        note_aad("r-2", "cc-haengbok1", "mental-health", 6, &public.id),
        note_aad("r-1", "cc-saebit", "mental-health", 6, &public.id),
        note_aad("r-1", "cc-haengbok1", "addiction", 6, &public.id),
        note_aad("r-1", "cc-haengbok1", "mental-health", 3, &public.id),
    ] {
        assert_eq!(open(&file, &sealed, &other, 0), Err(SealError::Open));
    }
}

#[test]
fn key_files_round_trip_and_drop_expired_keys() {
    let mut old = PrivateKey::derive("a-1", b"old key material, thirty-two b..");
    old.not_after_ms = 500;
    let new = PrivateKey::derive("a-2", b"new key material, thirty-two b..");
    let file = KeyFile {
        keys: vec![old.clone(), new.clone()],
    };
    let text = file.to_file_text();
    let parsed = KeyFile::parse(&text, "f").unwrap();
    assert_eq!(parsed.keys.len(), 2);
    assert_eq!(parsed.keys[0].public().to_b64(), old.public().to_b64());
    assert_eq!(parsed.keys[0].not_after_ms, 500);
    assert_eq!(parsed.without_expired(500).keys.len(), 2);
    let later = parsed.without_expired(501);
    assert_eq!(later.keys.len(), 1);
    assert_eq!(later.keys[0].id, "a-2");
    for (bad, why) in [
        ("", "no key"),
        ("yeongye-ed25519-v1 a-1 AAAA", "not a yeongye-x25519-v1 key"),
        ("yeongye-x25519-v1", "no key id"),
        ("yeongye-x25519-v1 a/1 AAAA", "key id"),
        ("yeongye-x25519-v1 a-1 AAAA", "32 bytes"),
        ("yeongye-x25519-v1 a-1 !!!!", "32 bytes"),
    ] {
        let err = KeyFile::parse(bad, "f").unwrap_err().to_string();
        assert!(err.contains(why), "{bad:?}: {err}");
    }
    let twice = format!("{}{}", new.to_line(), new.to_line());
    assert!(
        KeyFile::parse(&twice, "f")
            .unwrap_err()
            .to_string()
            .contains("twice")
    );
    let trailing = format!("{} extra\n", new.to_line().trim_end());
    assert!(
        KeyFile::parse(&trailing, "f")
            .unwrap_err()
            .to_string()
            .contains("trailing")
    );
    // Debug shows no secret.
    assert!(!format!("{file:?}").contains(&new.secret_b64()));
}

#[test]
fn the_directory_seals_to_each_agencys_current_key() {
    let old = PrivateKey::derive("mh-1", b"old key material, thirty-two b..");
    let new = PrivateKey::derive("mh-2", b"new key material, thirty-two b..");
    let mut old_entry = old.entry();
    old_entry.not_after_ms = 10;
    let toml = format!(
        "[[agency]]\nid = \"mental-health\"\nname = \"x\"\nkind = \"other\"\nsealing_keys = [\n  {{ id = \"mh-1\", public_key = \"{}\", not_after_ms = 10 }},\n  {{ id = \"mh-2\", public_key = \"{}\" }},\n]\n\n[[agency]]\nid = \"no-keys\"\nname = \"y\"\nkind = \"other\"\n",
        old_entry.public_key,
        new.entry().public_key
    );
    let d = Directory::from_registry_toml(&toml).unwrap();
    assert_eq!(d.current("mental-health").unwrap().id, "mh-2");
    assert_eq!(
        d.current("no-keys").unwrap_err(),
        SealError::NoKeyFor("no-keys".into())
    );
    let bad = toml.replace(&new.entry().public_key, "AAAA");
    assert!(Directory::from_registry_toml(&bad).is_err());
}

#[cfg(unix)]
#[test]
fn a_key_file_others_may_read_is_refused_without_quoting_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sealing.key");
    let (file, _) = keys();
    std::fs::write(&path, file.to_file_text()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = KeyFile::load(&path).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains(&file.keys[0].secret_b64()), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(KeyFile::load(&path).unwrap().keys.len(), 1);
}
