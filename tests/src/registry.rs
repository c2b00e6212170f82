//! Agency registries for tests, in the format of `deploy/agencies.toml` (`[[agency]]` tables with
//! `id`, `name` and `kind`).

use std::fmt::Write as _;
use std::path::Path;

use yeongye_proto::seal;
use yeongye_proto::signing::{PrivateKey, SigningKey};

/// The agencies a [`crate::System`] registers unless told otherwise: a welfare support group, a
/// community service centre, a mental health centre and a welfare centre.
pub const DEFAULT_AGENCIES: [&str; 4] = [
    "hope-support",
    "cc-haengbok1",
    "mental-health",
    "welfare-center",
];

/// An agency id that is in no registry the harness writes.
pub const UNREGISTERED: &str = "not-registered";

/// The signing key a test agency uses: derived from its id, so that every part of the harness
/// (registry, adapter processes, SDK clients, the raw wire client) has the same key without
/// passing files around. For tests only: a real agency's key comes from
/// `referral-broker agency add`.
pub fn test_key(agency: &str) -> PrivateKey {
    use sha2::Digest;
    let seed: [u8; 32] = sha2::Sha256::digest(format!("yeongye-test-key/{agency}")).into();
    PrivateKey {
        id: format!("{agency}-test"),
        key: SigningKey::from_bytes(&seed),
    }
}

/// Writes `agency`'s test key to `path` (mode 0600) unless a key file is already there.
pub fn write_test_key(agency: &str, path: &Path) {
    if path.exists() {
        return;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create key dir");
    }
    test_key(agency)
        .save(path)
        .unwrap_or_else(|e| panic!("write test key {}: {e}", path.display()));
}

/// The sealing key a test agency opens sealed referrals with: derived from its id, like
/// [`test_key`], so that the registry, the adapters, the SDK clients and the raw wire client
/// agree without passing files around. For tests only.
pub fn test_sealing_key(agency: &str) -> seal::PrivateKey {
    use sha2::Digest;
    let ikm: [u8; 32] = sha2::Sha256::digest(format!("yeongye-test-sealing-key/{agency}")).into();
    seal::PrivateKey::derive(&format!("{agency}-seal-test"), &ikm)
}

/// Writes `agency`'s test sealing key file to `path` (mode 0600) unless one is there.
pub fn write_test_sealing_key(agency: &str, path: &Path) {
    if path.exists() {
        return;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create key dir");
    }
    let file = seal::KeyFile {
        keys: vec![test_sealing_key(agency)],
    };
    yeongye_proto::credentials::write_private(path, file.to_file_text().as_bytes())
        .unwrap_or_else(|e| panic!("write test sealing key {}: {e}", path.display()));
}

/// The agencies a registry lists for a client that was given none: the defaults, the other
/// agencies tests use, and `own`.
pub fn local_agencies(own: &str) -> Vec<&str> {
    let mut ids: Vec<&str> = DEFAULT_AGENCIES.to_vec();
    ids.extend(["self-sufficiency", "elderly-care", "dream-start", own]);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Writes a registry listing `agencies`, each with its [`test_key`] and [`test_sealing_key`],
/// to `path`.
pub fn write(path: &Path, agencies: &[&str]) {
    let mut toml = String::from("# Written by the yeongye test harness.\n");
    for id in agencies {
        let (name, kind) = describe(id);
        let key = test_key(id);
        let sealing = test_sealing_key(id).entry();
        write!(
            toml,
            "\n[[agency]]\nid = \"{id}\"\nname = \"{name}\"\nkind = \"{kind}\"\n\
             sealing_keys = [{{ id = \"{}\", public_key = \"{}\" }}]\n\
             [[agency.keys]]\nid = \"{}\"\npublic_key = \"{}\"\n",
            sealing.id,
            sealing.public_key,
            key.id,
            key.public_b64()
        )
        .expect("write to String");
    }
    // The broker signs what it publishes (see broker::BrokerProcess::start).
    let broker = test_key(yeongye_proto::BROKER_ID);
    write!(
        toml,
        "\n[broker]\n[[broker.keys]]\nid = \"{}\"\npublic_key = \"{}\"\n",
        broker.id,
        broker.public_b64()
    )
    .expect("write to String");
    std::fs::write(path, toml)
        .unwrap_or_else(|e| panic!("cannot write registry {}: {e}", path.display()));
}

/// A plausible name and kind for a test agency id.
fn describe(id: &str) -> (String, &'static str) {
    match id {
        "hope-support" => (
            "한빛구 희망복지지원단".to_owned(),
            "hope_welfare_support_group",
        ),
        "mental-health" => ("한빛구 정신건강복지센터".to_owned(), "mental_health_centre"),
        "welfare-center" => ("한빛종합사회복지관".to_owned(), "community_welfare_centre"),
        "self-sufficiency" => ("한빛지역자활센터".to_owned(), "self_sufficiency_centre"),
        "elderly-care" => (
            "한빛 노인맞춤돌봄서비스 수행기관".to_owned(),
            "elderly_care",
        ),
        "dream-start" => ("한빛구 드림스타트".to_owned(), "dream_start"),
        id if id.starts_with("cc-") => (
            format!("한빛구 {id} 행정복지센터"),
            "community_service_centre",
        ),
        id => (format!("test agency {id}"), "other"),
    }
}
