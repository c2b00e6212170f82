//! Secret files (issue #12): `check-config` of both binaries reads every key, credentials and
//! token file its configuration names, and fails — naming the file — on one that is missing,
//! garbage or readable by others (with the `chmod 600` that fixes it); and the binaries refuse
//! to start with a signing key or token file others may read. Identities come from the real
//! `referral-broker init` / `agency add`; no NATS server is needed, since every check happens
//! before anything connects.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use yeongye_proto::credentials::write_private;
use yeongye_tests::adapter::{CliOutput, cli};
use yeongye_tests::broker::BrokerConfig;
use yeongye_tests::ops::broker_cli;
use yeongye_tests::secure::Identities;

use crate::CENTRE;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// An adapter configuration for CENTRE with its onboarding files and `key` / `token`.
fn adapter_config(dir: &Path, ids: &Identities, key: &Path, token: &Path) -> PathBuf {
    let s = |p: &Path| p.display().to_string();
    let text = format!(
        "agency = {CENTRE:?}\nnats_urls = [\"nats://127.0.0.1:1\"]\nstate_dir = {:?}\n\
         nats_credentials_file = {:?}\nsigning_key_file = {:?}\nregistry = {:?}\n\
         sealing_key_file = {:?}\n\n[http]\ntoken_file = {:?}\n",
        s(&dir.join("state")),
        s(&ids.creds(CENTRE)),
        s(key),
        s(&ids.registry),
        s(&ids.sealing_key(CENTRE)),
        s(token),
    );
    let path = dir.join(format!("adapter-{}.toml", tag(key)));
    std::fs::write(&path, text).expect("adapter.toml");
    path
}

/// A file-name-safe tag for a key path (configs for several keys side by side).
fn tag(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().replace('.', "-"))
        .unwrap_or_default()
}

/// The broker's configuration with its onboarding credentials and `key`.
fn broker_config(dir: &Path, ids: &Identities, key: &Path) -> PathBuf {
    let mut config = BrokerConfig::new("nats://127.0.0.1:1", &dir.join("store"), &ids.registry);
    let s = |p: &Path| toml::Value::String(p.display().to_string());
    config
        .extra
        .insert("nats_credentials_file".into(), s(&ids.creds("broker")));
    config.extra.insert("signing_key_file".into(), s(key));
    let path = dir.join(format!("broker-{}.toml", tag(key)));
    std::fs::write(&path, config.to_toml()).expect("broker.toml");
    path
}

/// Asserts the command failed with exit code `code` and a message naming `file` and holding
/// every one of `says`.
fn refused(out: &CliOutput, code: i32, file: &Path, says: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "{out:#?}");
    assert!(out.stderr.contains(&file.display().to_string()), "{out:#?}");
    for s in says {
        assert!(out.stderr.contains(s), "{s:?} missing: {out:#?}");
    }
}

/// Keys of every kind next to the real one: (name, path), each 0600 but the shared one.
struct Keys {
    good: PathBuf,
    missing: PathBuf,
    garbage: PathBuf,
    shared: PathBuf,
}

fn keys(dir: &Path, real: &Path) -> Keys {
    let keys = Keys {
        good: real.to_path_buf(),
        missing: dir.join("missing.key"),
        garbage: dir.join("garbage.key"),
        shared: dir.join("shared.key"),
    };
    write_private(
        &keys.garbage,
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n",
    )
    .expect("garbage");
    std::fs::copy(real, &keys.shared).expect("copy the key");
    chmod(&keys.shared, 0o644);
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_missing_garbage_and_shared_secret_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ids = Identities::generate(dir, &[CENTRE], None);
    let token = dir.join("token");
    write_private(&token, b"0123456789abcdef0123456789\n").expect("token");

    // The adapter.
    let k = keys(dir, &ids.signing_key(CENTRE));
    let out = cli(
        &adapter_config(dir, &ids, &k.good, &token),
        &["check-config"],
    )
    .await;
    out.assert_success();
    let json = out.json();
    assert_eq!(json["valid"], true, "{json}");
    assert!(json.to_string().contains(&format!("{CENTRE}-1")), "{json}");
    let out = cli(
        &adapter_config(dir, &ids, &k.missing, &token),
        &["check-config"],
    )
    .await;
    refused(&out, 2, &k.missing, &["signing_key_file"]);
    let out = cli(
        &adapter_config(dir, &ids, &k.garbage, &token),
        &["check-config"],
    )
    .await;
    refused(&out, 2, &k.garbage, &["not a yeongye-ed25519-v1 key file"]);
    assert!(
        !out.stderr.contains("AAAA"),
        "never quotes the file: {out:#?}"
    );
    let out = cli(
        &adapter_config(dir, &ids, &k.shared, &token),
        &["check-config"],
    )
    .await;
    refused(&out, 2, &k.shared, &["chmod 600", "644"]);
    chmod(&token, 0o640);
    let out = cli(
        &adapter_config(dir, &ids, &k.good, &token),
        &["check-config"],
    )
    .await;
    refused(&out, 2, &token, &["http.token_file", "chmod 600"]);
    chmod(&token, 0o600);
    chmod(&ids.creds(CENTRE), 0o604);
    let out = cli(
        &adapter_config(dir, &ids, &k.good, &token),
        &["check-config"],
    )
    .await;
    refused(&out, 2, &ids.creds(CENTRE), &["chmod 600"]);
    chmod(&ids.creds(CENTRE), 0o600);

    // The broker.
    let k = keys(&dir.join("secrets"), &ids.signing_key("broker"));
    let out = broker_cli(&broker_config(dir, &ids, &k.good), &["check-config"]).await;
    assert!(out.status.success(), "{out:#?}");
    for (key, says) in [
        (&k.missing, "signing_key_file"),
        (&k.garbage, "not a yeongye-ed25519-v1 key file"),
        (&k.shared, "chmod 600"),
    ] {
        let out = broker_cli(&broker_config(dir, &ids, key), &["check-config"]).await;
        assert_eq!(out.status.code(), Some(1), "{out:#?}");
        assert!(
            out.stderr.contains(&key.display().to_string()) && out.stderr.contains(says),
            "{out:#?}"
        );
    }
    chmod(&ids.creds("broker"), 0o644);
    let out = broker_cli(&broker_config(dir, &ids, &k.good), &["check-config"]).await;
    assert!(
        !out.status.success() && out.stderr.contains("chmod 600"),
        "{out:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_refuse_to_start_with_a_secret_others_may_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ids = Identities::generate(dir, &[CENTRE], None);
    let token = dir.join("token");
    write_private(&token, b"0123456789abcdef0123456789\n").expect("token");

    // The broker: before it opens its store or connects.
    let key = ids.signing_key("broker");
    chmod(&key, 0o644);
    let out = broker_cli(&broker_config(dir, &ids, &key), &["run"]).await;
    assert!(
        !out.status.success() && out.stderr.contains(&format!("chmod 600 {}", key.display())),
        "{out:#?}"
    );
    assert!(!dir.join("store").exists(), "the store was not opened");

    // The adapter's `run`: before it connects (nothing listens on its URL).
    let key = ids.signing_key(CENTRE);
    chmod(&key, 0o640);
    let config = adapter_config(dir, &ids, &key, &token);
    let inbox = dir.join("inbox").display().to_string();
    let run = tokio::time::timeout(
        Duration::from_secs(30),
        cli(&config, &["run", "--inbox", &inbox]),
    )
    .await
    .expect("run stops at once");
    refused(&run, 2, &key, &["chmod 600"]);

    // `serve`, with a token file others may read.
    chmod(&key, 0o600);
    chmod(&token, 0o644);
    let serve = tokio::time::timeout(Duration::from_secs(30), cli(&config, &["serve"]))
        .await
        .expect("serve stops at once");
    refused(&serve, 2, &token, &["http.token_file", "chmod 600"]);
}
