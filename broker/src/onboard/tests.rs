//! Onboarding against temporary directories: the happy paths, and malformed and hostile input
//! (bad ids, names and kinds, duplicates, unknown agencies, files that are not what they should
//! be). A refused command must leave every file as it was.

use std::path::Path;

use tempfile::TempDir;
use yeongye_proto::signing::{KeyRing, PrivateKey};

use super::*;
use crate::registry::Registry;

struct Env {
    dir: TempDir,
    paths: Paths,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths {
        registry: dir.path().join("registry.toml"),
        secrets: dir.path().join("secrets"),
        nats_conf: Some(dir.path().join("nats-auth.conf")),
    };
    Env { dir, paths }
}

fn initialised() -> Env {
    let e = env();
    init(&e.paths, None).unwrap();
    e
}

fn conf(e: &Env) -> String {
    std::fs::read_to_string(e.paths.nats_conf.as_ref().unwrap()).unwrap()
}

fn registry_text(e: &Env) -> String {
    std::fs::read_to_string(&e.paths.registry).unwrap()
}

/// Every file under the directory with its bytes, to show that a refusal changed nothing. The
/// registry's lock file is left out: it holds only the pid of the last command that took it.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "lock") {
                continue;
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn refused(e: &Env, f: impl FnOnce(&Paths) -> Result<Report>, needle: &str) {
    let before = snapshot(e.dir.path());
    let err = f(&e.paths).unwrap_err().to_string();
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(
        snapshot(e.dir.path()),
        before,
        "a refused command changed files ({err})"
    );
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_the_broker_identity() {
    let e = env();
    let report = init(&e.paths, None).unwrap();
    assert!(
        report.to_string().contains("nats_credentials_file"),
        "{report}"
    );
    let r = Registry::load(&e.paths.registry).unwrap();
    assert!(r.nats_password_bcrypt("broker").is_some());
    assert!(r.keys().knows("broker"));
    let key = PrivateKey::load(&e.paths.signing_key("broker")).unwrap();
    assert_eq!(key.id, "broker-1");
    let creds = Credentials::load(&e.paths.credentials("broker")).unwrap();
    assert_eq!(creds.user, "broker");
    assert!(bcrypt::verify(&creds.password, r.nats_password_bcrypt("broker").unwrap()).unwrap());
    #[cfg(unix)]
    {
        assert_eq!(mode(&e.paths.signing_key("broker")), 0o600);
        assert_eq!(mode(&e.paths.credentials("broker")), 0o600);
        assert_eq!(mode(&e.paths.secret_dir("broker")), 0o700);
        assert_eq!(mode(e.paths.nats_conf.as_ref().unwrap()), 0o600);
    }
    let c = conf(&e);
    assert!(c.contains("user: \"broker\""), "{c}");
    // The broker may publish only what it publishes: never the inbound subjects, never a purge
    // of the agencies' streams or the lease (only its own state log's, behind a snapshot).
    assert!(!c.contains("allow: [\">\"]"), "{c}");
    assert!(c.contains("\"yeongye.out.>\""), "{c}");
    assert!(
        c.contains(
            "deny: [\"yeongye.in.>\", \"$JS.API.STREAM.PURGE.YEONGYE_IN\", \"$JS.API.STREAM.PURGE.YEONGYE_OUT\", \"$JS.API.STREAM.PURGE.KV_YEONGYE_LEADER\""
        ),
        "{c}"
    );
    assert!(!c.contains("\"$JS.API.STREAM.PURGE.>\""), "{c}");
    assert!(
        c.contains("subscribe: { allow: [\"yeongye.query.*\", \"_INBOX_broker.>\"] }"),
        "{c}"
    );
    assert!(!c.contains(&creds.password), "the config holds hashes only");
    assert!(!c.contains("tls {"));
    assert!(!registry_text(&e).contains(&creds.password));
    // The lock is free again (the file may stay: the system lock is what counts).
    drop(files::Lock::take(&e.paths.registry).unwrap());

    // Once only.
    refused(&e, |p| init(p, None), "already has the broker's identity");
}

#[test]
fn init_keeps_an_existing_roster_and_writes_tls() {
    let e = env();
    std::fs::write(
        &e.paths.registry,
        "# my roster\n[[agency]]\nid = \"a\"\nname = \"A\"\nkind = \"other\"\n",
    )
    .unwrap();
    let cert = e.dir.path().join("server.pem");
    let key = e.dir.path().join("server.key");
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
    let report = init(
        &e.paths,
        Some(ServerTls {
            cert_file: cert.clone(),
            key_file: key.clone(),
        }),
    )
    .unwrap();
    assert!(
        report.to_string().contains("without a NATS identity"),
        "{report}"
    );
    let text = registry_text(&e);
    assert!(
        text.starts_with("# my roster\n[[agency]]\nid = \"a\""),
        "{text}"
    );
    let c = conf(&e);
    assert!(
        c.contains(&format!("cert_file: \"{}\"", cert.display())),
        "{c}"
    );
    assert!(!c.contains("user: \"a\""), "no identity, no user: {c}");

    // Adding an agency keeps the TLS block.
    add_agency(&e.paths, "b", "B", "other").unwrap();
    let c = conf(&e);
    assert!(
        c.contains(&format!("key_file: \"{}\"", key.display())),
        "{c}"
    );
    assert!(c.contains("user: \"b\""));
}

#[test]
fn init_refuses_bad_tls_files_and_foreign_configs() {
    let e = env();
    let missing = e.dir.path().join("missing.pem");
    let tls = |cert: &Path| {
        Some(ServerTls {
            cert_file: cert.to_path_buf(),
            key_file: cert.to_path_buf(),
        })
    };
    refused(&e, |p| init(p, tls(&missing)), "--tls-cert");
    let not_pem = e.dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    refused(&e, |p| init(p, tls(&not_pem)), "not a PEM file");
    let quoted = e.dir.path().join("a\"b.pem");
    std::fs::write(&quoted, "-----BEGIN CERTIFICATE-----\n").unwrap();
    refused(&e, |p| init(p, tls(&quoted)), "quotes");

    // A hand-written NATS config is never overwritten.
    std::fs::write(
        e.paths.nats_conf.as_ref().unwrap(),
        "listen: 0.0.0.0:4222\n",
    )
    .unwrap();
    refused(&e, |p| init(p, None), "not generated by referral-broker");
}

#[test]
fn add_registers_an_agency_with_its_own_permissions() {
    let e = initialised();
    add_agency(
        &e.paths,
        "cc-1",
        "한빛구 행복1동 행정복지센터",
        "community_service_centre",
    )
    .unwrap();
    add_agency(
        &e.paths,
        "hope",
        "희망복지지원단",
        "hope_welfare_support_group",
    )
    .unwrap();
    let r = Registry::load(&e.paths.registry).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r.get("cc-1").unwrap().name, "한빛구 행복1동 행정복지센터");
    let key = PrivateKey::load(&e.paths.signing_key("cc-1")).unwrap();
    assert_eq!(key.id, "cc-1-1");
    let ring = KeyRing::load(&e.paths.registry).unwrap();
    let mut env = yeongye_proto::v1::Envelope {
        message_id: "m".into(),
        sender: "cc-1".into(),
        ..Default::default()
    };
    key.sign(&mut env);
    assert_eq!(
        ring.verify("cc-1", &env, 1),
        Ok(()),
        "the registry lists the key"
    );
    let creds = Credentials::load(&e.paths.credentials("cc-1")).unwrap();
    assert_eq!(creds.user, "cc-1");
    assert!(bcrypt::verify(&creds.password, r.nats_password_bcrypt("cc-1").unwrap()).unwrap());

    let c = conf(&e);
    let block = c
        .split("user: ")
        .find(|b| b.starts_with("\"cc-1\""))
        .expect("a user for cc-1");
    assert!(
        block.contains(
            "publish: { allow: [\"yeongye.in.cc-1.>\", \"yeongye.query.cc-1\", \
             \"$JS.API.CONSUMER.INFO.YEONGYE_OUT.agency-cc-1\", \
             \"$JS.API.CONSUMER.MSG.NEXT.YEONGYE_OUT.agency-cc-1\", \
             \"$JS.ACK.YEONGYE_OUT.agency-cc-1.>\"] }"
        ),
        "{block}"
    );
    assert!(
        block.contains("subscribe: { allow: [\"_INBOX_cc-1.>\"] }"),
        "{block}"
    );
    assert!(
        !c.contains("$JS.API.>") && !c.contains("\"_INBOX.>\""),
        "{c}"
    );
    // The broker may answer cc-1's queries (its inbox) and manage its consumer, nothing more.
    let broker = c
        .split("user: ")
        .find(|b| b.starts_with("\"broker\""))
        .expect("a user for the broker");
    for allowed in [
        "\"_INBOX_cc-1.>\"",
        "\"$JS.API.CONSUMER.INFO.YEONGYE_OUT.agency-cc-1\"",
        "\"$JS.API.CONSUMER.CREATE.YEONGYE_OUT.agency-cc-1.>\"",
    ] {
        assert!(broker.contains(allowed), "{allowed} in {broker}");
    }
}

#[test]
fn add_keeps_comments_and_layout() {
    let e = env();
    let roster = "# Header comment: keep me.\n\n[[agency]]\n# about a\nid = \"a\"   # trailing\nname = \"A\"\nkind = \"other\"\n";
    std::fs::write(&e.paths.registry, roster).unwrap();
    init(&e.paths, None).unwrap();
    add_agency(&e.paths, "b", "B", "other").unwrap();
    let text = registry_text(&e);
    assert!(text.starts_with(roster), "{text}");
    assert!(text.contains("id = \"b\""), "{text}");
    assert!(text.contains("[[agency.keys]]\nid = \"b-1\""), "{text}");
    // Removing the first agency keeps the file's header.
    remove_agency(&e.paths, "a").unwrap();
    let text = registry_text(&e);
    assert!(text.starts_with("# Header comment: keep me."), "{text}");
    assert!(!text.contains("id = \"a\""), "{text}");
    Registry::load(&e.paths.registry).unwrap();
}

#[test]
fn names_are_written_as_toml_strings() {
    let e = initialised();
    let name = "a \"quoted\" name ]] [[agency]] id = \"x\" # not a comment \\ 끝";
    add_agency(&e.paths, "q", name, "other").unwrap();
    let r = Registry::load(&e.paths.registry).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r.get("q").unwrap().name, name);
}

#[test]
fn inline_tables_in_the_registry_are_edited_too() {
    let e = env();
    std::fs::write(
        &e.paths.registry,
        "agency = [{ id = \"a\", name = \"A\", kind = \"other\", keys = [] }]\n",
    )
    .unwrap();
    init(&e.paths, None).unwrap();
    add_agency(&e.paths, "b", "B", "other").unwrap();
    let r = Registry::load(&e.paths.registry).unwrap();
    assert!(r.contains("a") && r.contains("b"));
    remove_agency(&e.paths, "a").unwrap();
    assert!(!Registry::load(&e.paths.registry).unwrap().contains("a"));
}

#[test]
fn bad_ids_names_and_kinds_are_refused() {
    let e = initialised();
    for id in [
        "",
        "A",
        "a.b",
        "a b",
        "a*",
        ">",
        "-a",
        "broker",
        "a/../b",
        "a\nb",
        "ａ",
        &"a".repeat(65),
    ] {
        refused(&e, |p| add_agency(p, id, "x", "other"), "not valid");
        refused(&e, |p| remove_agency(p, id), "not valid");
    }
    refused(&e, |p| add_agency(p, "a", "", "other"), "--name is empty");
    refused(&e, |p| add_agency(p, "a", "  ", "other"), "--name is empty");
    refused(&e, |p| add_agency(p, "a", "x\ny", "other"), "control");
    refused(
        &e,
        |p| add_agency(p, "a", &"가".repeat(201), "other"),
        "longer",
    );
    refused(&e, |p| add_agency(p, "a", "x", ""), "--kind");
    refused(&e, |p| add_agency(p, "a", "x", "bank"), "--kind");
    refused(
        &e,
        |p| add_agency(p, "a", "x", "other\"\n[broker]"),
        "--kind",
    );
}

#[test]
fn duplicates_and_unknown_agencies_are_refused() {
    let e = initialised();
    add_agency(&e.paths, "a", "A", "other").unwrap();
    refused(
        &e,
        |p| add_agency(p, "a", "A again", "other"),
        "already registered",
    );
    refused(&e, |p| remove_agency(p, "nobody"), "not registered");
    refused(
        &e,
        |p| rotate_key(p, "nobody", DEFAULT_GRACE, 0),
        "not registered",
    );

    // Removed: gone from the registry and the NATS config; its secrets stay, so adding it again
    // is refused until they are moved away (a key is never overwritten).
    let report = remove_agency(&e.paths, "a").unwrap();
    assert!(report.to_string().contains("left in place"), "{report}");
    assert!(!conf(&e).contains("user: \"a\""));
    assert!(!Registry::load(&e.paths.registry).unwrap().contains("a"));
    assert!(e.paths.signing_key("a").exists());
    refused(&e, |p| add_agency(p, "a", "A", "other"), "already exists");
    std::fs::rename(e.paths.secret_dir("a"), e.dir.path().join("old-a")).unwrap();
    add_agency(&e.paths, "a", "A", "other").unwrap();
}

#[test]
fn commands_need_an_initialised_registry() {
    let e = env();
    refused(
        &e,
        |p| add_agency(p, "a", "A", "other"),
        "run `referral-broker init` first",
    );
    // A roster without [broker]: no NATS config can be generated.
    std::fs::write(&e.paths.registry, "").unwrap();
    refused(
        &e,
        |p| add_agency(p, "a", "A", "other"),
        "no [broker] NATS identity",
    );
}

#[test]
fn a_registry_that_is_not_toml_is_refused() {
    let e = initialised();
    for text in [
        "this is not toml",
        "[[agency]]\nid = \"a\"\n",
        "agency = 3",
        "[[agency]]\nid = \"a\"\nname = \"A\"\nkind = \"other\"\nsurprise = true\n",
        "\u{0}\u{1}\u{2}",
    ] {
        std::fs::write(&e.paths.registry, text).unwrap();
        refused(&e, |p| add_agency(p, "b", "B", "other"), "registry");
        refused(&e, |p| remove_agency(p, "a"), "registry");
        refused(&e, |p| rotate_key(p, "a", DEFAULT_GRACE, 0), "registry");
    }
    std::fs::write(&e.paths.registry, [0xff, 0xfe, 0x00]).unwrap();
    refused(&e, |p| add_agency(p, "b", "B", "other"), "registry");
}

#[test]
fn paths_that_are_not_what_they_should_be_are_refused() {
    let e = initialised();
    let mut p = e.paths.clone();
    p.nats_conf = Some(p.registry.clone());
    refused(&e, |_| add_agency(&p, "a", "A", "other"), "same file");
    let mut p = e.paths.clone();
    p.nats_conf = None;
    refused(
        &e,
        |_| add_agency(&p, "a", "A", "other"),
        "--nats-conf is required",
    );
    let mut p = e.paths.clone();
    p.registry = e.dir.path().to_path_buf();
    refused(&e, |_| add_agency(&p, "a", "A", "other"), "directory");
    let mut p = e.paths.clone();
    p.secrets = e.paths.registry.clone();
    refused(&e, |_| add_agency(&p, "a", "A", "other"), "not a directory");
    // Another command holds the lock.
    let held = files::Lock::take(&e.paths.registry).unwrap();
    refused(
        &e,
        |p| add_agency(p, "a", "A", "other"),
        "another onboarding command",
    );
    drop(held);
    // A lock file left by a command that was killed holds nothing.
    let lock = e.dir.path().join("registry.toml.lock");
    std::fs::write(&lock, "4242\n").unwrap();
    drop(files::Lock::take(&e.paths.registry).expect("a stale lock file is no lock"));
    // A secret in the way: nothing is written, not even the other secret.
    files::private_dir(&e.paths.secret_dir("a")).unwrap();
    std::fs::write(e.paths.credentials("a"), "user = \"a\"\npassword = \"x\"\n").unwrap();
    refused(&e, |p| add_agency(p, "a", "A", "other"), "already exists");
}

#[test]
fn rotate_key_keeps_the_old_key_until_the_cutoff() {
    let e = initialised();
    add_agency(&e.paths, "a", "A", "other").unwrap();
    let old = PrivateKey::load(&e.paths.signing_key("a")).unwrap();
    let report = rotate_key(&e.paths, "a", Duration::from_secs(60), 1_000_000).unwrap();
    assert!(report.to_string().contains("a-2"), "{report}");
    let new = PrivateKey::load(&e.paths.signing_key("a")).unwrap();
    assert_eq!(new.id, "a-2");
    let retired = e.paths.secret_dir("a").join("signing.key.a-1");
    assert_eq!(
        PrivateKey::load(&retired).unwrap().public_b64(),
        old.public_b64()
    );
    #[cfg(unix)]
    assert_eq!(mode(&e.paths.signing_key("a")), 0o600);

    let ring = KeyRing::load(&e.paths.registry).unwrap();
    let signed = |k: &PrivateKey| {
        let mut env = yeongye_proto::v1::Envelope {
            message_id: "m".into(),
            sender: "a".into(),
            ..Default::default()
        };
        k.sign(&mut env);
        env
    };
    assert_eq!(ring.verify("a", &signed(&new), 1_000_000), Ok(()));
    assert_eq!(ring.verify("a", &signed(&old), 1_060_000), Ok(()));
    assert!(ring.verify("a", &signed(&old), 1_060_001).is_err());

    // Again: a-3; a-1's cutoff is not moved later.
    rotate_key(&e.paths, "a", DEFAULT_GRACE, 2_000_000).unwrap();
    let keys = RegistryDoc::parse(&registry_text(&e), &e.paths.registry)
        .unwrap()
        .keys("a");
    let cutoffs: Vec<(&str, i64)> = keys
        .iter()
        .map(|k| (k.id.as_str(), k.not_after_ms))
        .collect();
    assert_eq!(
        cutoffs,
        [
            ("a-1", 1_060_000),
            ("a-2", 2_000_000 + 86_400_000),
            ("a-3", 0)
        ]
    );
    // The broker's key rotates the same way.
    rotate_key(&e.paths, "broker", Duration::ZERO, 5).unwrap();
    assert_eq!(
        PrivateKey::load(&e.paths.signing_key("broker")).unwrap().id,
        "broker-2"
    );
}

#[test]
fn rotate_key_refuses_what_does_not_add_up() {
    let e = initialised();
    add_agency(&e.paths, "a", "A", "other").unwrap();
    add_agency(&e.paths, "b", "B", "other").unwrap();
    refused(
        &e,
        |p| rotate_key(p, "a", MAX_GRACE + Duration::from_secs(1), 0),
        "longer than",
    );
    // The key file holds b's key: not one the registry lists for a.
    let a_key = e.paths.signing_key("a");
    let saved = std::fs::read(&a_key).unwrap();
    std::fs::remove_file(&a_key).unwrap();
    std::fs::copy(e.paths.signing_key("b"), &a_key).unwrap();
    refused(
        &e,
        |p| rotate_key(p, "a", DEFAULT_GRACE, 0),
        "does not list",
    );
    // A key file that is not one.
    std::fs::write(&a_key, "garbage").unwrap();
    refused(&e, |p| rotate_key(p, "a", DEFAULT_GRACE, 0), "key file");
    std::fs::write(&a_key, &saved).unwrap();
    // An interrupted rotation left a staged key.
    let staged = e.paths.secret_dir("a").join("signing.key.new");
    std::fs::write(&staged, "x").unwrap();
    refused(&e, |p| rotate_key(p, "a", DEFAULT_GRACE, 0), "interrupted");
    std::fs::remove_file(&staged).unwrap();
    rotate_key(&e.paths, "a", DEFAULT_GRACE, 0).unwrap();
}

fn sealing_keys(e: &Env, who: &str) -> yeongye_proto::seal::KeyFile {
    yeongye_proto::seal::KeyFile::load(&e.paths.sealing_key(who)).unwrap()
}

#[test]
fn add_gives_an_agency_a_sealing_key_listed_in_the_registry() {
    let e = initialised();
    let report = add_agency(&e.paths, "cc-1", "행복1동", "community_service_centre").unwrap();
    let text = report.to_string();
    assert!(
        text.contains("sealing_key_file") && text.contains("registry = "),
        "{text}"
    );
    let file = sealing_keys(&e, "cc-1");
    assert_eq!(file.keys.len(), 1);
    assert_eq!(file.keys[0].id, "cc-1-seal-1");
    assert_eq!(file.keys[0].not_after_ms, 0);
    #[cfg(unix)]
    assert_eq!(mode(&e.paths.sealing_key("cc-1")), 0o600);
    Registry::load(&e.paths.registry).unwrap();
    let d = yeongye_proto::seal::Directory::load(&e.paths.registry).unwrap();
    let current = d.current("cc-1").unwrap();
    assert_eq!(current.id, "cc-1-seal-1");
    assert_eq!(current.to_b64(), file.keys[0].public().to_b64());
    // What is sealed to the listed key opens with the file's.
    let sealed = yeongye_proto::seal::seal(current, b"aad", "김하늘".as_bytes()).unwrap();
    assert_eq!(
        yeongye_proto::seal::open(&file, &sealed, b"aad", 0).unwrap(),
        "김하늘".as_bytes()
    );
    // The broker has no sealing key, and its secrets hold none.
    assert!(d.current("broker").is_err());
    assert!(!e.paths.sealing_key("broker").exists());
    // The secret is in the file only: neither in the registry nor in the report.
    let secret = file.keys[0].secret_b64();
    assert!(!registry_text(&e).contains(&secret));
    assert!(!text.contains(&secret));
    // An existing sealing key is never overwritten by a new identity.
    remove_agency(&e.paths, "cc-1").unwrap();
    std::fs::remove_file(e.paths.signing_key("cc-1")).unwrap();
    std::fs::remove_file(e.paths.credentials("cc-1")).unwrap();
    refused(
        &e,
        |p| add_agency(p, "cc-1", "행복1동", "community_service_centre"),
        "sealing.key already exists",
    );
}

#[test]
fn rotate_key_rotates_the_sealing_key_and_drops_it_after_the_grace() {
    use yeongye_proto::seal::{Directory, open, seal};
    let e = initialised();
    add_agency(&e.paths, "a", "A", "other").unwrap();
    let first = sealing_keys(&e, "a");
    let to_first = Directory::load(&e.paths.registry)
        .unwrap()
        .current("a")
        .unwrap()
        .clone();
    let in_flight = seal(&to_first, b"m", b"in flight").unwrap();

    let report = rotate_key(&e.paths, "a", Duration::from_secs(60), 1_000_000).unwrap();
    assert!(report.to_string().contains("a-seal-2"), "{report}");
    let file = sealing_keys(&e, "a");
    #[cfg(unix)]
    assert_eq!(mode(&e.paths.sealing_key("a")), 0o600);
    let ids: Vec<(&str, i64)> = file
        .keys
        .iter()
        .map(|k| (k.id.as_str(), k.not_after_ms))
        .collect();
    assert_eq!(ids, [("a-seal-1", 1_060_000), ("a-seal-2", 0)]);
    assert_eq!(file.keys[0].secret_b64(), first.keys[0].secret_b64());
    Registry::load(&e.paths.registry).unwrap();
    let d = Directory::load(&e.paths.registry).unwrap();
    assert_eq!(d.current("a").unwrap().id, "a-seal-2");
    assert_eq!(
        d.current("a").unwrap().to_b64(),
        file.keys[1].public().to_b64()
    );
    let listed = RegistryDoc::parse(&registry_text(&e), &e.paths.registry)
        .unwrap()
        .sealing_keys("a");
    let cutoffs: Vec<(&str, i64)> = listed
        .iter()
        .map(|k| (k.id.as_str(), k.not_after_ms))
        .collect();
    assert_eq!(cutoffs, [("a-seal-1", 1_060_000), ("a-seal-2", 0)]);
    // What was in flight still opens within the grace period, not after.
    assert_eq!(
        open(&file, &in_flight, b"m", 1_060_000).unwrap(),
        b"in flight"
    );
    assert!(open(&file, &in_flight, b"m", 1_060_001).is_err());

    // A rotation within the grace period keeps a-seal-1; one after it drops it from the file.
    rotate_key(&e.paths, "a", Duration::from_secs(60), 1_010_000).unwrap();
    let ids: Vec<String> = sealing_keys(&e, "a")
        .keys
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, ["a-seal-1", "a-seal-2", "a-seal-3"]);
    let report = rotate_key(&e.paths, "a", Duration::from_secs(60), 2_000_000).unwrap();
    assert!(report.to_string().contains("dropped"), "{report}");
    let file = sealing_keys(&e, "a");
    let ids: Vec<(&str, i64)> = file
        .keys
        .iter()
        .map(|k| (k.id.as_str(), k.not_after_ms))
        .collect();
    assert_eq!(ids, [("a-seal-3", 2_060_000), ("a-seal-4", 0)]);
    assert!(open(&file, &in_flight, b"m", 1_000_000).is_err());
    assert!(!e.paths.secret_dir("a").join("sealing.key.new").exists());
    Registry::load(&e.paths.registry).unwrap();
    assert_eq!(
        Directory::load(&e.paths.registry)
            .unwrap()
            .current("a")
            .unwrap()
            .id,
        "a-seal-4"
    );
}

#[test]
fn rotate_key_gives_an_agency_from_before_sealing_its_first_sealing_key() {
    let e = env();
    std::fs::write(
        &e.paths.registry,
        "[[agency]]\nid = \"old\"\nname = \"예전 기관\"\nkind = \"other\"\n",
    )
    .unwrap();
    init(&e.paths, None).unwrap();
    // Its signing key as an older onboarding made it.
    let key = PrivateKey::generate("old-1").unwrap();
    files::private_dir(&e.paths.secret_dir("old")).unwrap();
    key.save(&e.paths.signing_key("old")).unwrap();
    let mut doc = RegistryDoc::parse(&registry_text(&e), &e.paths.registry).unwrap();
    assert!(
        doc.push_key(
            "old",
            SIGNING,
            &(&PublicKeyEntry {
                id: key.id.clone(),
                public_key: key.public_b64(),
                not_after_ms: 0,
            })
                .into()
        )
    );
    std::fs::write(&e.paths.registry, doc.render(&e.paths.registry).unwrap().0).unwrap();

    rotate_key(&e.paths, "old", DEFAULT_GRACE, 0).unwrap();
    let file = sealing_keys(&e, "old");
    assert_eq!(file.keys.len(), 1);
    assert_eq!(file.keys[0].id, "old-seal-1");
    let d = yeongye_proto::seal::Directory::load(&e.paths.registry).unwrap();
    assert_eq!(
        d.current("old").unwrap().to_b64(),
        file.keys[0].public().to_b64()
    );
}

#[test]
fn rotate_key_refuses_a_sealing_key_file_that_does_not_add_up() {
    let e = initialised();
    add_agency(&e.paths, "a", "A", "other").unwrap();
    add_agency(&e.paths, "b", "B", "other").unwrap();
    let a_key = e.paths.sealing_key("a");
    let saved = std::fs::read(&a_key).unwrap();
    // b's sealing key in a's file: not one the registry lists for a.
    std::fs::remove_file(&a_key).unwrap();
    std::fs::copy(e.paths.sealing_key("b"), &a_key).unwrap();
    refused(
        &e,
        |p| rotate_key(p, "a", DEFAULT_GRACE, 0),
        "does not list",
    );
    // The same id with another key.
    let other = yeongye_proto::seal::KeyFile {
        keys: vec![yeongye_proto::seal::PrivateKey::generate("a-seal-1")],
    };
    std::fs::write(&a_key, other.to_file_text()).unwrap();
    refused(
        &e,
        |p| rotate_key(p, "a", DEFAULT_GRACE, 0),
        "does not match",
    );
    // Not a key file; then gone while the registry lists keys.
    std::fs::write(&a_key, "garbage").unwrap();
    refused(
        &e,
        |p| rotate_key(p, "a", DEFAULT_GRACE, 0),
        "sealing key file",
    );
    std::fs::remove_file(&a_key).unwrap();
    refused(
        &e,
        |p| rotate_key(p, "a", DEFAULT_GRACE, 0),
        "does not exist",
    );
    // Readable by others: refused, as a signing key would be.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&a_key, &saved).unwrap();
        std::fs::set_permissions(&a_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        refused(&e, |p| rotate_key(p, "a", DEFAULT_GRACE, 0), "chmod");
        std::fs::set_permissions(&a_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    #[cfg(not(unix))]
    std::fs::write(&a_key, &saved).unwrap();
    // An interrupted rotation left a staged sealing key.
    let staged = e.paths.secret_dir("a").join("sealing.key.new");
    std::fs::write(&staged, "x").unwrap();
    refused(&e, |p| rotate_key(p, "a", DEFAULT_GRACE, 0), "interrupted");
    std::fs::remove_file(&staged).unwrap();
    rotate_key(&e.paths, "a", DEFAULT_GRACE, 0).unwrap();
}
