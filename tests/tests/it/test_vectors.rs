//! `docs/test-vectors/yeongye-v1.json` is what the Rust implementation does: the signing input,
//! signature, public key, key file and encoding of a fixed envelope under a fixed test key, and
//! every kind of derived id (the broker's `derive_id`, the adapter's receipt and purge
//! confirmation ids). Another implementation checks itself against the file offline (the
//! Python agency does, in `python_agency.rs`); this test fails when the file and the Rust code
//! drift apart. `docs/test-vectors/yeongye-v1-seal.json` does the same for sealed client data
//! (`the_seal_test_vectors_open_with_the_implementation`; sealing is randomized, so the file is
//! written once, with `YEONGYE_WRITE_VECTORS=1`, and checked to open ever after).

use prost::Message as _;
use serde_json::Value;
use yeongye_proto::signing::{self, KeyRing, PrivateKey, SigningKey};
use yeongye_tests::v1;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex length: {text}");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

pub(crate) fn vectors_path() -> std::path::PathBuf {
    yeongye_tests::repo_root().join("docs/test-vectors/yeongye-v1.json")
}

#[test]
fn the_test_vectors_are_what_the_implementation_does() {
    let text = std::fs::read_to_string(vectors_path()).expect("read the test vectors");
    let v: Value = serde_json::from_str(&text).expect("the test vectors are JSON");

    let s = &v["signature"];
    let seed: [u8; 32] = unhex(str_of(s, "seed_hex"))
        .try_into()
        .expect("32-byte seed");
    let key = PrivateKey {
        id: str_of(s, "key_id").to_owned(),
        key: SigningKey::from_bytes(&seed),
    };
    assert_eq!(key.public_b64(), str_of(s, "public_key_base64"));
    assert_eq!(key.to_file_text().trim_end(), str_of(s, "key_file"));
    let parsed = PrivateKey::parse(str_of(s, "key_file"), "test vectors").expect("key file");
    assert_eq!(parsed.public_b64(), key.public_b64());

    let e = &s["envelope"];
    let payload = unhex(str_of(e, "payload_hex"));
    let referral = v1::Referral::decode(payload.as_slice()).expect("the payload is a Referral");
    assert_eq!(referral.referral_id, str_of(s, "payload_referral_id"));
    assert_eq!(
        hex(&referral.encode_to_vec()),
        str_of(e, "payload_hex"),
        "prost encodes the payload to the same bytes"
    );
    let mut envelope = v1::Envelope {
        message_id: str_of(e, "message_id").to_owned(),
        sender: str_of(e, "sender").to_owned(),
        sent_at_ms: str_of(e, "sent_at_ms").parse().expect("sent_at_ms"),
        payload_type: v1::PayloadType::from_str_name(str_of(e, "payload_type"))
            .expect("a payload type") as i32,
        payload,
        ..Default::default()
    };
    assert_eq!(
        hex(&signing::signing_input(&envelope)),
        str_of(s, "signing_input_hex")
    );
    key.sign(&mut envelope);
    assert_eq!(hex(&envelope.signature), str_of(s, "signature_hex"));
    assert_eq!(envelope.key_id, str_of(s, "key_id"));
    assert_eq!(hex(&envelope.encode_to_vec()), str_of(s, "envelope_hex"));
    let registry = format!(
        "[[agency]]\nid = \"{}\"\n[[agency.keys]]\nid = \"{}\"\npublic_key = \"{}\"\n",
        envelope.sender,
        key.id,
        key.public_b64()
    );
    let ring = KeyRing::from_registry_toml(&registry).expect("registry");
    let sent = v1::Envelope::decode(unhex(str_of(s, "envelope_hex")).as_slice()).expect("env");
    ring.verify(&envelope.sender, &sent, envelope.sent_at_ms)
        .expect("the vector's envelope verifies");

    assert_eq!(
        str_of(&v, "namespace"),
        yeongye_adapter::ids::NAMESPACE.to_string()
    );
    let list = |key: &str| {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is not a list"))
            .clone()
    };
    for d in list("derived_ids") {
        let uuid = uuid::Uuid::new_v5(
            &yeongye_adapter::ids::NAMESPACE,
            str_of(&d, "name").as_bytes(),
        );
        assert_eq!(uuid.to_string(), str_of(&d, "id"), "{d}");
    }
    for d in list("receipt_ids") {
        assert_eq!(
            yeongye_adapter::ids::receipt_message_id(str_of(&d, "delivery_message_id")),
            str_of(&d, "id"),
            "{d}"
        );
    }
    for d in list("purge_confirmation_ids") {
        assert_eq!(
            yeongye_adapter::ids::purge_message_id(str_of(&d, "withdrawal_message_id")),
            str_of(&d, "id"),
            "{d}"
        );
    }
    let broker_ids = list("broker_ids");
    assert!(
        broker_ids.len() >= 8,
        "every kind of broker id has a vector"
    );
    for d in broker_ids {
        let i = usize::try_from(d["i"].as_u64().expect("i")).expect("usize");
        assert_eq!(
            yeongye_broker::convert::derive_id(str_of(&d, "cause"), i),
            str_of(&d, "id"),
            "{d}"
        );
    }
}

pub(crate) fn seal_vectors_path() -> std::path::PathBuf {
    yeongye_tests::repo_root().join("docs/test-vectors/yeongye-v1-seal.json")
}

/// The fixed input of the sealing vectors: keys derived from fixed `ikm`s, a referral sealed to
/// its recipient (statutory basis, so that the justification is sealed too), a status note
/// sealed to the referral's sender. Personal data: fictional, canary-like.
mod seal_sample {
    use yeongye_proto::seal::PrivateKey;
    use yeongye_tests::v1;

    pub(super) const RECIPIENT: &str = "hope-support";
    pub(super) const RECIPIENT_KEY_ID: &str = "hope-support-seal-1";
    pub(super) const RECIPIENT_IKM: [u8; 32] = *b"yeongye test vector ikm: hope-s1";
    pub(super) const READER: &str = "cc-haengbok1";
    pub(super) const READER_KEY_ID: &str = "cc-haengbok1-seal-1";
    pub(super) const READER_IKM: [u8; 32] = *b"yeongye test vector ikm: cc-hb-1";
    pub(super) const NOTE: &str = "정신건강 사례로 등록 (가상 사례: 캐너리 노트 7Q3)";
    pub(super) const NOTE_REFERRAL_ID: &str = "01937a4e-5c2b-7d10-9e3f-4a5b6c7d8e9f";

    pub(super) fn keys() -> (PrivateKey, PrivateKey) {
        (
            PrivateKey::derive(RECIPIENT_KEY_ID, &RECIPIENT_IKM),
            PrivateKey::derive(READER_KEY_ID, &READER_IKM),
        )
    }

    /// The referral as its sender wrote it, before sealing.
    pub(super) fn referral() -> v1::Referral {
        v1::Referral {
            referral_id: NOTE_REFERRAL_ID.into(),
            from_agency: READER.into(),
            to_agency: RECIPIENT.into(),
            client: Some(v1::Client {
                pseudonym_id: "p-2026-canary-0001".into(),
                name: "김캐너리하늘".into(),
                birth_date: "1987-03-14".into(),
                phone: "010-5555-0173".into(),
                address: "한빛구 새빛로 12, 301호 (가상 주소)".into(),
                household: "모 1인, 자녀 2인(9세, 6세); 3개월 월세 체납 (가상 사례)".into(),
            }),
            field: v1::FieldOfNeed::Livelihood as i32,
            urgency: v1::Urgency::Crisis as i32,
            reason: "단전 예고 통지, 식료품 부족: 긴급 생계지원 의뢰 (가상 사례)".into(),
            legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(
                v1::StatutoryBasis {
                    statute: v1::Statute::SocialSecurityBenefitsAct as i32,
                    justification:
                        "사회보장급여법 위기가구 발굴: 동의를 받을 수 없는 긴급 상황 (가상)".into(),
                },
            )),
            data_categories: vec![
                v1::DataCategory::Identity as i32,
                v1::DataCategory::Contact as i32,
                v1::DataCategory::Household as i32,
                v1::DataCategory::Income as i32,
            ],
            receive_by_ms: 1_767_312_000_000,
            parent_referral_id: "01937a4e-0000-7000-8000-00000000a001".into(),
            purpose: v1::Purpose::CrisisResponse as i32,
            sealed: None,
        }
    }
}

fn key_json(agency: &str, key: &yeongye_proto::seal::PrivateKey, ikm: &[u8]) -> Value {
    let file = yeongye_proto::seal::KeyFile {
        keys: vec![key.clone()],
    };
    serde_json::json!({
        "agency": agency,
        "key_id": key.id,
        "ikm_hex": hex(ikm),
        "public_key_base64": key.public().to_b64(),
        "key_file": file.to_file_text().trim_end(),
    })
}

fn sealed_json(s: &v1::Sealed) -> Value {
    serde_json::json!({
        "key_id": s.key_id,
        "enc_hex": hex(&s.enc),
        "ciphertext_hex": hex(&s.ciphertext),
    })
}

/// Seals the sample afresh (HPKE is randomized: every run gives other `enc` and ciphertext).
fn make_seal_vectors() -> Value {
    use seal_sample::*;
    use yeongye_proto::seal;
    let (recipient, reader) = keys();
    let original = referral();
    let contents = v1::SealedContents {
        client: original.client.clone(),
        reason: original.reason.clone(),
        justification: match &original.legal_basis {
            Some(v1::referral::LegalBasis::StatutoryBasis(b)) => b.justification.clone(),
            _ => String::new(),
        },
    };
    let mut r = original.clone();
    seal::seal_referral(&mut r, &recipient.public()).expect("seal the referral");
    let sealed = r.sealed.clone().expect("sealed");
    let client = contents.client.clone().unwrap_or_default();
    let status = v1::Status::InProgress as i32;
    let note_aad = seal::note_aad(NOTE_REFERRAL_ID, RECIPIENT, READER, status, READER_KEY_ID);
    let note = seal::seal(&reader.public(), &note_aad, NOTE.as_bytes()).expect("seal the note");
    serde_json::json!({
        "description": "Sealed client data (docs/PROTOCOL.md, \"Sealed client data\"): keys derived with RFC 9180 DeriveKeyPair from a fixed ikm, a referral sealed to its recipient's key, a status note sealed to the referral's sender. Sealing is randomized: enc and ciphertext differ at every sealing, so an implementation checks that it opens these and that what it seals opens, not that it seals to the same bytes. The personal data is fictional. Checked by tests/tests/it/test_vectors.rs; rewritten by it with YEONGYE_WRITE_VECTORS=1.",
        "suite": {
            "mode": "base (0x00)",
            "kem": "DHKEM(X25519, HKDF-SHA256) (0x0020)",
            "kdf": "HKDF-SHA256 (0x0001)",
            "aead": "ChaCha20-Poly1305 (0x0003)",
            "info": String::from_utf8_lossy(seal::INFO),
            "info_hex": hex(seal::INFO),
        },
        "keys": [
            key_json(RECIPIENT, &recipient, &RECIPIENT_IKM),
            key_json(READER, &reader, &READER_IKM),
        ],
        "referral": {
            "payload_hex": hex(&r.encode_to_vec()),
            "clear": {
                "referral_id": r.referral_id,
                "from_agency": r.from_agency,
                "to_agency": r.to_agency,
                "pseudonym_id": client.pseudonym_id,
                "field": r.field,
                "urgency": r.urgency,
                "purpose": r.purpose,
                "data_categories": r.data_categories,
                "basis": seal::basis_text(&r),
                "receive_by_ms": r.receive_by_ms.to_string(),
                "parent_referral_id": r.parent_referral_id,
            },
            "aad_hex": hex(&seal::referral_aad(&r, &sealed.key_id)),
            "sealed": sealed_json(&sealed),
            "plaintext_hex": hex(&contents.encode_to_vec()),
            "contents": {
                "client": {
                    "pseudonym_id": client.pseudonym_id,
                    "name": client.name,
                    "birth_date": client.birth_date,
                    "phone": client.phone,
                    "address": client.address,
                    "household": client.household,
                },
                "reason": contents.reason,
                "justification": contents.justification,
            },
        },
        "note": {
            "referral_id": NOTE_REFERRAL_ID,
            "author": RECIPIENT,
            "reader": READER,
            "status": status,
            "status_name": v1::Status::InProgress.as_str_name(),
            "aad_hex": hex(&note_aad),
            "sealed": sealed_json(&note),
            "note": NOTE,
        },
    })
}

fn sealed_of(v: &Value) -> v1::Sealed {
    v1::Sealed {
        key_id: str_of(v, "key_id").to_owned(),
        enc: unhex(str_of(v, "enc_hex")),
        ciphertext: unhex(str_of(v, "ciphertext_hex")),
    }
}

fn int_of(v: &Value, key: &str) -> i64 {
    v[key]
        .as_i64()
        .unwrap_or_else(|| panic!("{key} is not an integer in {v}"))
}

#[test]
fn the_seal_test_vectors_open_with_the_implementation() {
    use yeongye_proto::seal::{self, KeyFile, PrivateKey, SealError};
    let path = seal_vectors_path();
    if std::env::var_os("YEONGYE_WRITE_VECTORS").is_some_and(|v| v == "1") {
        let text = serde_json::to_string_pretty(&make_seal_vectors()).expect("json") + "\n";
        std::fs::write(&path, text).expect("write the seal test vectors");
    }
    let text = std::fs::read_to_string(&path).expect("read the seal test vectors");
    let v: Value = serde_json::from_str(&text).expect("the seal test vectors are JSON");
    assert_eq!(str_of(&v["suite"], "info_hex"), hex(seal::INFO));

    // The keys: derived from their ikm, and as a key file writes them.
    let mut files = std::collections::BTreeMap::new();
    for k in v["keys"].as_array().expect("keys") {
        let key = PrivateKey::derive(str_of(k, "key_id"), &unhex(str_of(k, "ikm_hex")));
        assert_eq!(key.public().to_b64(), str_of(k, "public_key_base64"), "{k}");
        let file = KeyFile::parse(str_of(k, "key_file"), "test vectors").expect("key file");
        assert_eq!(file.keys.len(), 1);
        assert_eq!(file.keys[0].id, key.id);
        assert_eq!(file.keys[0].public().to_b64(), key.public().to_b64());
        assert_eq!(file.to_file_text().trim_end(), str_of(k, "key_file"));
        files.insert(str_of(k, "agency").to_owned(), file);
    }
    // The sample is what the vectors hold (the generator's input is this file's input).
    let sample = seal_sample::referral();

    // The referral: its clear metadata, associated data, seal and contents.
    let rv = &v["referral"];
    let payload = unhex(str_of(rv, "payload_hex"));
    let r = v1::Referral::decode(payload.as_slice()).expect("the payload is a Referral");
    assert_eq!(hex(&r.encode_to_vec()), str_of(rv, "payload_hex"));
    assert!(
        !seal::has_clear_personal_data(&r),
        "nothing personal in clear"
    );
    let clear = &rv["clear"];
    assert_eq!(r.referral_id, str_of(clear, "referral_id"));
    assert_eq!(r.from_agency, str_of(clear, "from_agency"));
    assert_eq!(r.to_agency, str_of(clear, "to_agency"));
    assert_eq!(
        r.client.as_ref().map(|c| c.pseudonym_id.as_str()),
        Some(str_of(clear, "pseudonym_id"))
    );
    assert_eq!(i64::from(r.field), int_of(clear, "field"));
    assert_eq!(i64::from(r.urgency), int_of(clear, "urgency"));
    assert_eq!(i64::from(r.purpose), int_of(clear, "purpose"));
    let categories: Vec<i64> = clear["data_categories"]
        .as_array()
        .expect("data_categories")
        .iter()
        .map(|c| c.as_i64().expect("a category number"))
        .collect();
    assert_eq!(
        r.data_categories
            .iter()
            .map(|c| i64::from(*c))
            .collect::<Vec<_>>(),
        categories
    );
    assert_eq!(seal::basis_text(&r), str_of(clear, "basis"));
    assert_eq!(r.receive_by_ms.to_string(), str_of(clear, "receive_by_ms"));
    assert_eq!(r.parent_referral_id, str_of(clear, "parent_referral_id"));
    let sealed = r.sealed.clone().expect("the referral is sealed");
    assert_eq!(sealed, sealed_of(&rv["sealed"]));
    assert_eq!(
        hex(&seal::referral_aad(&r, &sealed.key_id)),
        str_of(rv, "aad_hex")
    );
    let recipient = &files[r.to_agency.as_str()];
    let contents = seal::open_referral(&r, recipient, 0)
        .expect("the sealed referral opens")
        .expect("sealed");
    assert_eq!(hex(&contents.encode_to_vec()), str_of(rv, "plaintext_hex"));
    let c = &rv["contents"];
    let client = contents.client.clone().expect("the sealed client");
    for (got, key) in [
        (&client.pseudonym_id, "pseudonym_id"),
        (&client.name, "name"),
        (&client.birth_date, "birth_date"),
        (&client.phone, "phone"),
        (&client.address, "address"),
        (&client.household, "household"),
    ] {
        assert_eq!(got, str_of(&c["client"], key), "client.{key}");
    }
    assert_eq!(contents.reason, str_of(c, "reason"));
    assert_eq!(contents.justification, str_of(c, "justification"));
    assert_eq!(
        seal::unsealed(&r, contents),
        sample,
        "opened, the referral is the sample as its sender wrote it"
    );
    // Not with the other party's key.
    assert!(seal::open_referral(&r, &files[r.from_agency.as_str()], 0).is_err());
    // Metadata changed in transit, or the ciphertext moved onto other metadata: does not open.
    type Change = fn(&mut v1::Referral);
    let changes: [(&str, Change); 8] = [
        ("referral_id", |r| r.referral_id.push('0')),
        ("from_agency", |r| r.from_agency = "cc-saebit".into()),
        ("pseudonym_id", |r| {
            if let Some(c) = r.client.as_mut() {
                c.pseudonym_id.push('9');
            }
        }),
        ("purpose", |r| {
            r.purpose = v1::Purpose::CaseManagement as i32;
        }),
        ("data_categories", |r| {
            r.data_categories
                .push(v1::DataCategory::MentalHealth as i32);
        }),
        ("urgency", |r| r.urgency = v1::Urgency::Routine as i32),
        ("receive_by_ms", |r| r.receive_by_ms += 1),
        ("parent_referral_id", |r| r.parent_referral_id.clear()),
    ];
    for (what, change) in changes {
        let mut moved = r.clone();
        change(&mut moved);
        assert_eq!(
            seal::open_referral(&moved, recipient, 0).map(|_| ()),
            Err(SealError::Open),
            "changed {what}"
        );
    }
    // Moved to another recipient (whose key it is not sealed to): unknown key.
    let mut moved = r.clone();
    moved.to_agency = "cc-saebit".into();
    assert!(seal::open_referral(&moved, recipient, 0).is_err());

    // The note.
    let nv = &v["note"];
    let status = i32::try_from(int_of(nv, "status")).expect("status");
    assert_eq!(
        v1::Status::try_from(status).map(|s| s.as_str_name()),
        Ok(str_of(nv, "status_name"))
    );
    let note = sealed_of(&nv["sealed"]);
    let aad = seal::note_aad(
        str_of(nv, "referral_id"),
        str_of(nv, "author"),
        str_of(nv, "reader"),
        status,
        &note.key_id,
    );
    assert_eq!(hex(&aad), str_of(nv, "aad_hex"));
    let reader = &files[str_of(nv, "reader")];
    assert_eq!(
        seal::open(reader, &note, &aad, 0).expect("the note opens"),
        str_of(nv, "note").as_bytes()
    );
    let other_status = seal::note_aad(
        str_of(nv, "referral_id"),
        str_of(nv, "author"),
        str_of(nv, "reader"),
        v1::Status::Completed as i32,
        &note.key_id,
    );
    assert_eq!(
        seal::open(reader, &note, &other_status, 0),
        Err(SealError::Open)
    );
    let swapped = seal::note_aad(
        str_of(nv, "referral_id"),
        str_of(nv, "reader"),
        str_of(nv, "author"),
        status,
        &note.key_id,
    );
    assert_eq!(seal::open(reader, &note, &swapped, 0), Err(SealError::Open));
}

/// Runs tests/install-python-agency.sh and returns the python it prints.
fn python_agency() -> std::path::PathBuf {
    let script = yeongye_tests::repo_root().join("tests/install-python-agency.sh");
    let out = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Cross-language, offline: the Python example agency (pyhpke) opens the seal vectors the Rust
/// code wrote, and what it seals itself opens here.
#[test]
fn python_opens_the_seal_vectors_and_rust_opens_what_python_seals() {
    use yeongye_proto::seal::{self, KeyFile};
    let python = python_agency();
    let dir = tempfile::tempdir().expect("tempdir");
    let sealed_out = dir.path().join("python-sealed.json");
    let out = std::process::Command::new(&python)
        .arg(yeongye_tests::repo_root().join("examples/python-agency/raw_agency.py"))
        .args(["vectors", &seal_vectors_path().display().to_string()])
        .arg("--sealed-out")
        .arg(&sealed_out)
        .output()
        .expect("run raw_agency.py vectors");
    assert!(
        out.status.success(),
        "raw_agency.py vectors failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&sealed_out).expect("what Python sealed");
    let v: Value = serde_json::from_str(&text).expect("JSON");

    let (recipient, reader) = seal_sample::keys();
    let recipient = KeyFile {
        keys: vec![recipient],
    };
    let reader = KeyFile { keys: vec![reader] };
    let payload = unhex(str_of(&v, "referral_payload_hex"));
    let r = v1::Referral::decode(payload.as_slice()).expect("a Referral");
    assert!(!seal::has_clear_personal_data(&r));
    let contents = seal::open_referral(&r, &recipient, 0)
        .expect("what Python sealed opens")
        .expect("sealed");
    assert_eq!(seal::unsealed(&r, contents), seal_sample::referral());

    let note = sealed_of(&v["note"]);
    let aad = seal::note_aad(
        seal_sample::NOTE_REFERRAL_ID,
        seal_sample::RECIPIENT,
        seal_sample::READER,
        v1::Status::InProgress as i32,
        &note.key_id,
    );
    assert_eq!(
        seal::open(&reader, &note, &aad, 0).expect("Python's note opens"),
        seal_sample::NOTE.as_bytes()
    );
}
