//! `docs/test-vectors/yeongye-v1.json` is what the Rust implementation does: the signing input,
//! signature, public key, key file and encoding of a fixed envelope under a fixed test key, and
//! every kind of derived id (the broker's `derive_id`, the adapter's receipt and purge
//! confirmation ids). Another implementation checks itself against the file offline (the
//! Python agency does, in `python_agency.rs`); this test fails when the file and the Rust code
//! drift apart.

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
