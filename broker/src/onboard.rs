//! Onboarding: giving the broker and each agency an identity — an Ed25519 signing key and a NATS
//! user with a random password, and for each agency an X25519 sealing key (the key its client
//! data is sealed to, PROTOCOL.md "Sealed client data"; the broker has none) — recording the
//! public halves in the registry, and generating the NATS server's authorization config from the
//! registry. The library side of
//! `referral-broker init` and `referral-broker agency add|remove|rotate-key`.
//!
//! ```text
//! <secrets>/<who>/signing.key          the private signing key (0600), <who> = agency id or broker
//! <secrets>/<who>/signing.key.<old id> a key rotated out (kept for the record)
//! <secrets>/<who>/nats.creds           TOML user + password (0600)
//! <secrets>/<agency>/sealing.key       the agency's private sealing keys (0600): the current one
//!                                      and those rotated out still in their grace period
//! <registry>                           [[agency]] / [broker]: keys, sealing_keys (agencies),
//!                                      nats_password_bcrypt
//! <nats-conf>                          authorization { users = [...] } (+ tls), an include file
//! ```
//!
//! Every command takes `<registry>.lock`, validates all input, prepares every change in memory
//! (the edited registry must load as a [`Registry`]), and only then writes: secrets first (never
//! overwriting one), then the NATS config, then the registry; a failure undoes what it wrote.
//! The registry is the source of truth: the NATS config is a function of it.
//!
//! # Layout
//! - [`nats_conf`]: the generated NATS config and each agency's permission set.
//! - `registry_doc`: editing the registry file in place (comments and layout kept).
//! - `files`: locking, atomic replacement, private files and directories, undo.
//! - [`operators`]: `operator add|remove`, the operators' HTTP API tokens.

mod files;
pub mod nats_conf;
pub mod operators;
mod registry_doc;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use yeongye_proto::seal;
use yeongye_proto::signing::{PrivateKey, PublicKeyEntry};
use yeongye_proto::subject::is_valid_agency_id;

use crate::error::{Error, Result};
use files::{Lock, Undo};
pub use nats_conf::ServerTls;
pub use operators::{add_operator, remove_operator};
use registry_doc::{RegistryDoc, SEALING, SIGNING};
use yeongye_proto::credentials::Credentials;

/// The private signing key's file name in a secrets directory.
pub const SIGNING_KEY_FILE: &str = "signing.key";
/// An agency's private sealing key file's name in its secrets directory.
pub const SEALING_KEY_FILE: &str = "sealing.key";
/// The NATS credentials file's name in a secrets directory.
pub const CREDENTIALS_FILE: &str = "nats.creds";
/// How long a rotated-out key is still accepted (a signing key) or held (a sealing key), by
/// default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The longest grace period `rotate-key` accepts.
pub const MAX_GRACE: Duration = Duration::from_secs(90 * 24 * 3600);
/// The kinds of agency the registry knows (see `deploy/agencies.toml`).
pub const KINDS: [&str; 12] = [
    "hope_welfare_support_group",
    "community_service_centre",
    "mental_health_centre",
    "self_sufficiency_centre",
    "elderly_care",
    "dream_start",
    "community_welfare_centre",
    "medical_aid",
    "addiction_centre",
    "child_protection",
    "disability_welfare_centre",
    "other",
];
/// Longest display name, characters.
const MAX_NAME_CHARS: usize = 200;
/// bcrypt's cost: 11, as `nats server passwd` uses (the server checks it at every connect).
/// Unit tests use the minimum, to stay fast.
const BCRYPT_COST: u32 = if cfg!(test) { 4 } else { 11 };

/// Where an onboarding command reads and writes.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The agency registry (the broker's `registry`).
    pub registry: PathBuf,
    /// The directory holding one private directory per identity.
    pub secrets: PathBuf,
    /// The generated NATS authorization config (an include file). Required by every command
    /// but `rotate-key`, for which it is regenerated only if given.
    pub nats_conf: Option<PathBuf>,
}

impl Paths {
    /// `<secrets>/<who>`.
    pub fn secret_dir(&self, who: &str) -> PathBuf {
        self.secrets.join(who)
    }

    /// `<secrets>/<who>/signing.key`.
    pub fn signing_key(&self, who: &str) -> PathBuf {
        self.secret_dir(who).join(SIGNING_KEY_FILE)
    }

    /// `<secrets>/<agency>/sealing.key`.
    pub fn sealing_key(&self, agency: &str) -> PathBuf {
        self.secret_dir(agency).join(SEALING_KEY_FILE)
    }

    /// `<secrets>/<who>/nats.creds`.
    pub fn credentials(&self, who: &str) -> PathBuf {
        self.secret_dir(who).join(CREDENTIALS_FILE)
    }

    fn check(&self, need_nats_conf: bool) -> Result<()> {
        let bad = |m: String| Err(Error::Onboard(m));
        for (what, p) in [("registry", &self.registry), ("secrets", &self.secrets)] {
            if p.as_os_str().is_empty() {
                return bad(format!("--{what} is empty"));
            }
        }
        if self.registry.is_dir() {
            return bad(format!(
                "--registry {} is a directory, not a file",
                self.registry.display()
            ));
        }
        if self.secrets.exists() && !self.secrets.is_dir() {
            return bad(format!(
                "--secrets {} is not a directory",
                self.secrets.display()
            ));
        }
        match &self.nats_conf {
            None if need_nats_conf => bad("--nats-conf is required".into()),
            None => Ok(()),
            Some(conf) => {
                if conf.as_os_str().is_empty() || conf.is_dir() {
                    return bad(format!("--nats-conf {} is not a file", conf.display()));
                }
                if absolute(conf)? == absolute(&self.registry)? {
                    return bad("--nats-conf and --registry name the same file".into());
                }
                Ok(())
            }
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::File {
        path: p.to_owned(),
        message: e.to_string(),
    })
}

/// What a command did and what the operator should do next, one line each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub lines: Vec<String>,
}

impl Report {
    fn wrote(&mut self, what: &str, path: &Path) {
        self.lines.push(format!("wrote {what}: {}", path.display()));
    }

    fn note(&mut self, text: impl Into<String>) {
        self.lines.push(text.into());
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

fn check_agency_id(id: &str) -> Result<()> {
    if !is_valid_agency_id(id) || id == yeongye_proto::BROKER_ID {
        return Err(Error::Onboard(format!(
            "agency id {:?} is not valid: 1-64 characters of a-z, 0-9 and '-', not starting \
             with '-', and not \"broker\"",
            id.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::Onboard("--name is empty".into()));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::Onboard(
            "--name may not hold control characters (newlines, tabs, ...)".into(),
        ));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(Error::Onboard(format!(
            "--name is longer than {MAX_NAME_CHARS} characters"
        )));
    }
    Ok(())
}

fn check_kind(kind: &str) -> Result<()> {
    if KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(Error::Onboard(format!(
            "--kind {:?} is not one of: {}",
            kind.chars().take(80).collect::<String>(),
            KINDS.join(", ")
        )))
    }
}

/// A server certificate or key file: it must exist and look like PEM. Returned absolute, since
/// the server resolves relative paths against its own config file.
fn check_pem(path: &Path, what: &str) -> Result<PathBuf> {
    let text = std::fs::read(path)
        .map_err(|e| Error::Onboard(format!("{what} {}: {e}", path.display())))?;
    if !text.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Error::Onboard(format!(
            "{what} {} is not a PEM file",
            path.display()
        )));
    }
    absolute(path)
}

fn read_registry(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Registry {
            path: path.to_owned(),
            message: e.to_string(),
        }),
    }
}

fn not_initialised(path: &Path) -> Error {
    Error::Onboard(format!(
        "registry {} does not exist: run `referral-broker init` first",
        path.display()
    ))
}

/// Takes the registry's lock, then reads and parses it. A missing registry is reported as such
/// before any lock file is made beside it.
fn lock_and_load(path: &Path) -> Result<(Lock, RegistryDoc)> {
    if !path.exists() {
        return Err(not_initialised(path));
    }
    let lock = Lock::take(path)?;
    let text = read_registry(path)?.ok_or_else(|| not_initialised(path))?;
    Ok((lock, RegistryDoc::parse(&text, path)?))
}

fn bcrypt_hash(password: &str) -> Result<String> {
    bcrypt::hash(password, BCRYPT_COST)
        .map_err(|e| Error::Onboard(format!("hashing the NATS password: {e}")))
}

fn ensure_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(|e| Error::File {
                path: dir.to_owned(),
                message: e.to_string(),
            })
        }
        _ => Ok(()),
    }
}

fn seal_err(e: seal::SealError) -> Error {
    Error::Onboard(e.to_string())
}

/// Writes a sealing key file (0600), refusing to overwrite one.
fn save_sealing_keys(path: &Path, keys: &seal::KeyFile) -> Result<()> {
    yeongye_proto::credentials::write_private(path, keys.to_file_text().as_bytes()).map_err(|e| {
        Error::File {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })
}

/// A new identity's files, written with undo: the signing key, an agency's sealing key (`None`
/// for the broker), the NATS credentials.
fn write_identity(
    paths: &Paths,
    who: &str,
    key: &PrivateKey,
    sealing: Option<&seal::PrivateKey>,
    creds: &Credentials,
    undo: &mut Undo,
    report: &mut Report,
) -> Result<()> {
    let dir = paths.secret_dir(who);
    files::private_dir(&dir)?;
    let key_path = paths.signing_key(who);
    key.save(&key_path)?;
    undo.created(key_path.clone());
    report.wrote("signing key (0600)", &key_path);
    if let Some(sealing) = sealing {
        let path = paths.sealing_key(who);
        let file = seal::KeyFile {
            keys: vec![sealing.clone()],
        };
        save_sealing_keys(&path, &file)?;
        undo.created(path.clone());
        report.wrote(&format!("sealing key {} (0600)", sealing.id), &path);
    }
    let creds_path = paths.credentials(who);
    creds.save(&creds_path)?;
    undo.created(creds_path.clone());
    report.wrote("NATS credentials (0600)", &creds_path);
    Ok(())
}

/// Checks that neither secret of `who` exists yet.
fn no_identity_yet(paths: &Paths, who: &str) -> Result<()> {
    let hint = "a key or password is never overwritten; move the old secrets away first";
    files::must_not_exist(&paths.signing_key(who), hint)?;
    files::must_not_exist(&paths.sealing_key(who), hint)?;
    files::must_not_exist(&paths.credentials(who), hint)
}

/// Writes the NATS config, then the registry; if the registry cannot be written, the old NATS
/// config is put back.
fn write_conf_and_registry(
    paths: &Paths,
    conf: Option<(&Path, &str)>,
    registry_text: &str,
    report: &mut Report,
) -> Result<()> {
    let mut previous = None;
    if let Some((path, text)) = conf {
        previous = Some((path, std::fs::read(path).ok()));
        files::replace(path, text.as_bytes(), 0o600)?;
    }
    if let Err(e) = files::replace(&paths.registry, registry_text.as_bytes(), 0o644) {
        if let Some((path, old)) = previous {
            let restored = match old {
                Some(bytes) => files::replace(path, &bytes, 0o600),
                None => std::fs::remove_file(path).map_err(Error::Io),
            };
            // Both failures matter: the operator must know the NATS config no longer matches
            // the registry.
            if let Err(undo) = restored {
                return Err(Error::Onboard(format!(
                    "{e}; and the NATS config {} could not be put back ({undo}): it may now \
                     grant what the registry does not list — regenerate it from the registry",
                    path.display()
                )));
            }
        }
        return Err(e);
    }
    if let Some((path, _)) = conf {
        report.wrote("NATS authorization config", path);
    }
    report.wrote("registry", &paths.registry);
    Ok(())
}

/// A path as an operator should copy it into a config file: absolute.
fn shown(path: &Path) -> String {
    absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

fn reload_notes(report: &mut Report, nats_conf: bool) {
    if nats_conf {
        report.note(
            "next: reload the NATS server (nats-server --signal reload, or SIGHUP) so that it \
             reads the new authorization config",
        );
    }
    report.note(
        "next: tell a running broker (referral-broker registry reload, or restart it) so that it \
         reads the new registry",
    );
}

/// The broker's own identity: its signing key (`broker-1`) and NATS user `broker` (allowed
/// everything), in a registry created if absent; and the NATS config, with a `tls` block if
/// `tls` is given (kept from the existing config if not).
pub fn init(paths: &Paths, tls: Option<ServerTls>) -> Result<Report> {
    paths.check(true)?;
    let conf = paths.nats_conf.as_deref().unwrap_or(Path::new(""));
    let tls = match tls {
        Some(t) => Some(ServerTls {
            cert_file: check_pem(&t.cert_file, "--tls-cert")?,
            key_file: check_pem(&t.key_file, "--tls-key")?,
        }),
        None => None,
    };
    ensure_parent(&paths.registry)?;
    ensure_parent(conf)?;
    let _lock = Lock::take(&paths.registry)?;
    let text = read_registry(&paths.registry)?;
    let mut doc = RegistryDoc::parse(
        text.as_deref().unwrap_or(registry_doc::NEW_REGISTRY),
        &paths.registry,
    )?;
    let broker = yeongye_proto::BROKER_ID;
    let (_, current) = doc.render(&paths.registry)?;
    if current.nats_password_bcrypt(broker).is_some() || !doc.keys(broker).is_empty() {
        return Err(Error::Onboard(format!(
            "registry {} already has the broker's identity ([broker]): init runs once",
            paths.registry.display()
        )));
    }
    let tls = match tls {
        Some(t) => {
            nats_conf::existing_tls(conf)?;
            Some(t)
        }
        None => nats_conf::existing_tls(conf)?,
    };
    no_identity_yet(paths, broker)?;

    let key = PrivateKey::generate(&format!("{broker}-1"))?;
    let creds = Credentials::generate(broker)?;
    let entry = PublicKeyEntry {
        id: key.id.clone(),
        public_key: key.public_b64(),
        not_after_ms: 0,
    };
    if !doc.set_broker(&entry, &bcrypt_hash(&creds.password)?) {
        return Err(Error::Registry {
            path: paths.registry.clone(),
            message: "`broker` is not a table".into(),
        });
    }
    let (registry_text, registry) = doc.render(&paths.registry)?;
    let (conf_text, missing) = nats_conf::render(&registry, tls.as_ref())?;

    let mut report = Report::default();
    let mut undo = Undo::default();
    write_identity(paths, broker, &key, None, &creds, &mut undo, &mut report)?;
    write_conf_and_registry(paths, Some((conf, &conf_text)), &registry_text, &mut report)?;
    undo.commit();
    if let Some(t) = &tls {
        report.note(format!(
            "the NATS config requires TLS with {} / {}",
            t.cert_file.display(),
            t.key_file.display()
        ));
    }
    if !missing.is_empty() {
        report.note(format!(
            "agencies without a NATS identity, who cannot connect (give them one with \
             `agency remove` then `agency add`): {}",
            missing.join(", ")
        ));
    }
    report.note(format!(
        "the broker's config needs nats_credentials_file = {:?} and signing_key_file = {:?}",
        shown(&paths.credentials(broker)),
        shown(&paths.signing_key(broker))
    ));
    report.note(format!(
        "next: make an operator of the HTTP API (replay, discard, registry reload): \
         referral-broker operator add <name> --operators <dir>/operators.toml --secrets {}, \
         then set operators_file in the broker's config",
        shown(&paths.secrets)
    ));
    Ok(report)
}

/// Registers agency `id`: a signing key `<id>-1`, a sealing key `<id>-seal-1`, a NATS user
/// `<id>` with a random password allowed only its own subjects, a new `[[agency]]` in the
/// registry, and the NATS config regenerated.
pub fn add_agency(paths: &Paths, id: &str, name: &str, kind: &str) -> Result<Report> {
    check_agency_id(id)?;
    check_name(name)?;
    check_kind(kind)?;
    paths.check(true)?;
    let conf = paths.nats_conf.as_deref().unwrap_or(Path::new(""));
    let (_lock, mut doc) = lock_and_load(&paths.registry)?;
    if doc.contains(id) {
        return Err(Error::Onboard(format!(
            "agency {id} is already registered in {}",
            paths.registry.display()
        )));
    }
    let tls = nats_conf::existing_tls(conf)?;
    no_identity_yet(paths, id)?;

    let key = PrivateKey::generate(&format!("{id}-1"))?;
    let sealing = seal::PrivateKey::generate(&sealing_key_id(id, 1));
    let creds = Credentials::generate(id)?;
    let entry = PublicKeyEntry {
        id: key.id.clone(),
        public_key: key.public_b64(),
        not_after_ms: 0,
    };
    if !doc.push_agency(
        id,
        name,
        kind,
        &entry,
        &sealing.entry(),
        &bcrypt_hash(&creds.password)?,
    ) {
        return Err(Error::Registry {
            path: paths.registry.clone(),
            message: "`agency` is not a list of tables".into(),
        });
    }
    let (registry_text, registry) = doc.render(&paths.registry)?;
    let sealing_listed = seal::Directory::from_registry_toml(&registry_text)
        .ok()
        .and_then(|d| d.current(id).ok().map(seal::PublicKey::to_b64));
    if registry.nats_password_bcrypt(id).is_none()
        || !registry.keys().knows(id)
        || sealing_listed != Some(sealing.public().to_b64())
    {
        return Err(Error::Registry {
            path: paths.registry.clone(),
            message: format!("agency {id} did not come out as written"),
        });
    }
    let (conf_text, _) = nats_conf::render(&registry, tls.as_ref())?;

    let mut report = Report::default();
    let mut undo = Undo::default();
    write_identity(
        paths,
        id,
        &key,
        Some(&sealing),
        &creds,
        &mut undo,
        &mut report,
    )?;
    write_conf_and_registry(paths, Some((conf, &conf_text)), &registry_text, &mut report)?;
    undo.commit();
    report.note(format!(
        "agency {id}: NATS user {id} may publish {} and subscribe {}",
        nats_conf::agency_publish(id).join(" "),
        nats_conf::agency_subscribe(id).join(" ")
    ));
    report.note(format!(
        "give its adapter nats_credentials_file = {:?}, signing_key_file = {:?}, \
         sealing_key_file = {:?} and registry = {:?}",
        shown(&paths.credentials(id)),
        shown(&paths.signing_key(id)),
        shown(&paths.sealing_key(id)),
        shown(&paths.registry)
    ));
    reload_notes(&mut report, true);
    Ok(report)
}

/// Drops agency `id` from the registry and the NATS config. Its secrets directory is left.
pub fn remove_agency(paths: &Paths, id: &str) -> Result<Report> {
    check_agency_id(id)?;
    paths.check(true)?;
    let conf = paths.nats_conf.as_deref().unwrap_or(Path::new(""));
    let (_lock, mut doc) = lock_and_load(&paths.registry)?;
    if !doc.remove_agency(id) {
        return Err(Error::Onboard(format!(
            "agency {id} is not registered in {}",
            paths.registry.display()
        )));
    }
    let tls = nats_conf::existing_tls(conf)?;
    let (registry_text, registry) = doc.render(&paths.registry)?;
    let (conf_text, _) = nats_conf::render(&registry, tls.as_ref())?;
    let mut report = Report::default();
    write_conf_and_registry(paths, Some((conf, &conf_text)), &registry_text, &mut report)?;
    report.note(format!(
        "agency {id} removed; its secrets in {} are left in place (delete them once its \
         adapter is retired), and its JetStream consumer {} stays until deleted",
        paths.secret_dir(id).display(),
        yeongye_proto::subject::agency_consumer(id)
    ));
    reload_notes(&mut report, true);
    Ok(report)
}

/// The number at the end of key id `<who>-<n>`.
fn key_number(who: &str, key_id: &str) -> Option<u64> {
    key_id.strip_prefix(who)?.strip_prefix('-')?.parse().ok()
}

/// An agency's `n`-th sealing key id: `<agency>-seal-<n>` (its signing keys are `<agency>-<n>`).
fn sealing_key_id(agency: &str, n: u64) -> String {
    format!("{agency}-seal-{n}")
}

/// The sealing half of `rotate-key` for an agency, prepared in memory: the registry document is
/// edited (the current key gets its cutoff, the new key is appended), the key file's new
/// content is returned.
struct SealingRotation {
    new_id: String,
    /// The key rotated out and the end of its grace period; `None` if the agency had no sealing
    /// key yet (a registry from before sealing: this rotation gives it its first).
    old: Option<(String, i64)>,
    /// Keys dropped from the file: their grace period had ended.
    dropped: Vec<String>,
    file: seal::KeyFile,
}

fn plan_sealing_rotation(
    paths: &Paths,
    doc: &mut RegistryDoc,
    who: &str,
    grace_ms: i64,
    now_ms: i64,
) -> Result<SealingRotation> {
    let path = paths.sealing_key(who);
    let listed = doc.sealing_keys(who);
    let exists = match std::fs::symlink_metadata(&path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(Error::File {
                path,
                message: e.to_string(),
            });
        }
    };
    let mut file = if exists {
        seal::KeyFile::load(&path).map_err(seal_err)?
    } else if listed.is_empty() {
        seal::KeyFile::default()
    } else {
        return Err(Error::Onboard(format!(
            "the registry lists sealing keys for {who} but {} does not exist: restore it (without \
             it, {who} cannot open what is sealed to it)",
            path.display()
        )));
    };
    let had_keys = !file.keys.is_empty();
    let old = match file.keys.iter_mut().rev().find(|k| k.not_after_ms == 0) {
        Some(current) => {
            let Some(entry) = listed.iter().find(|k| k.id == current.id) else {
                return Err(Error::Onboard(format!(
                    "{} holds sealing key {:?}, which the registry does not list for {who}",
                    path.display(),
                    current.id
                )));
            };
            if entry.public_key.trim() != current.public().to_b64() {
                return Err(Error::Onboard(format!(
                    "{} does not match the public sealing key the registry lists as {:?}",
                    path.display(),
                    current.id
                )));
            }
            let mut cutoff = now_ms.saturating_add(grace_ms);
            if entry.not_after_ms != 0 {
                cutoff = cutoff.min(entry.not_after_ms);
            }
            current.not_after_ms = cutoff;
            if !doc.set_cutoff(who, SEALING, &current.id, cutoff) {
                return Err(Error::Registry {
                    path: paths.registry.clone(),
                    message: format!("cannot edit the sealing keys of {who}"),
                });
            }
            Some((current.id.clone(), cutoff))
        }
        None if !had_keys => None,
        None => {
            return Err(Error::Onboard(format!(
                "{} holds no current sealing key (every key has an end): it does not match the \
                 registry",
                path.display()
            )));
        }
    };
    let prefix = format!("{who}-seal");
    let next = listed
        .iter()
        .map(|k| k.id.as_str())
        .chain(file.keys.iter().map(|k| k.id.as_str()))
        .filter_map(|id| key_number(&prefix, id))
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    let new = seal::PrivateKey::generate(&sealing_key_id(who, next));
    if !doc.push_key(who, SEALING, &(&new.entry()).into()) {
        return Err(Error::Registry {
            path: paths.registry.clone(),
            message: format!("cannot edit the sealing keys of {who}"),
        });
    }
    file.keys.push(new.clone());
    let kept = file.without_expired(now_ms);
    let dropped = file
        .keys
        .iter()
        .filter(|k| !kept.keys.iter().any(|c| c.id == k.id))
        .map(|k| k.id.clone())
        .collect();
    Ok(SealingRotation {
        new_id: new.id,
        old,
        dropped,
        file: kept,
    })
}

/// Gives `who` (an agency, or `broker`) a new signing key `<who>-<n+1>`, accepted at once; the
/// current key stays accepted until `now_ms + grace`, and its file is kept as
/// `signing.key.<old id>`. An agency also gets a new sealing key `<who>-seal-<n+1>`, current at
/// once (senders seal to it); the old one stays in `sealing.key`, usable until `now_ms + grace`,
/// and keys whose grace period has ended are dropped from the file.
pub fn rotate_key(paths: &Paths, who: &str, grace: Duration, now_ms: i64) -> Result<Report> {
    if who != yeongye_proto::BROKER_ID {
        check_agency_id(who)?;
    }
    if grace > MAX_GRACE {
        return Err(Error::Onboard(format!(
            "--grace-secs {} is longer than {} days",
            grace.as_secs(),
            MAX_GRACE.as_secs() / 86_400
        )));
    }
    paths.check(false)?;
    let (_lock, mut doc) = lock_and_load(&paths.registry)?;
    let listed = doc.keys(who);
    if who != yeongye_proto::BROKER_ID && !doc.contains(who) {
        return Err(Error::Onboard(format!(
            "agency {who} is not registered in {}",
            paths.registry.display()
        )));
    }
    let key_path = paths.signing_key(who);
    let old = PrivateKey::load(&key_path)?;
    let Some(old_entry) = listed.iter().find(|k| k.id == old.id) else {
        return Err(Error::Onboard(format!(
            "{} holds key {:?}, which the registry does not list for {who}",
            key_path.display(),
            old.id
        )));
    };
    if old_entry.public_key.trim() != old.public_b64() {
        return Err(Error::Onboard(format!(
            "{} does not match the public key the registry lists as {:?}",
            key_path.display(),
            old.id
        )));
    }
    let next = listed
        .iter()
        .filter_map(|k| key_number(who, &k.id))
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    let new = PrivateKey::generate(&format!("{who}-{next}"))?;
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let mut cutoff = now_ms.saturating_add(grace_ms);
    if old_entry.not_after_ms != 0 {
        cutoff = cutoff.min(old_entry.not_after_ms);
    }
    let dir = paths.secret_dir(who);
    let retired = dir.join(format!("{SIGNING_KEY_FILE}.{}", old.id));
    let staged = dir.join(format!("{SIGNING_KEY_FILE}.new"));
    files::must_not_exist(&retired, "a retired key file is never overwritten")?;
    files::must_not_exist(
        &staged,
        "an earlier rotation was interrupted: check the registry, then remove it",
    )?;
    let entry = PublicKeyEntry {
        id: new.id.clone(),
        public_key: new.public_b64(),
        not_after_ms: 0,
    };
    if !doc.set_cutoff(who, SIGNING, &old.id, cutoff)
        || !doc.push_key(who, SIGNING, &(&entry).into())
    {
        return Err(Error::Registry {
            path: paths.registry.clone(),
            message: format!("cannot edit the keys of {who}"),
        });
    }
    let sealing = if who == yeongye_proto::BROKER_ID {
        None
    } else {
        Some(plan_sealing_rotation(
            paths, &mut doc, who, grace_ms, now_ms,
        )?)
    };
    let sealing_path = paths.sealing_key(who);
    let sealing_staged = dir.join(format!("{SEALING_KEY_FILE}.new"));
    if sealing.is_some() {
        files::must_not_exist(
            &sealing_staged,
            "an earlier rotation was interrupted: check the registry, then remove it",
        )?;
    }
    let (registry_text, registry) = doc.render(&paths.registry)?;
    let conf = match paths.nats_conf.as_deref() {
        Some(conf) => {
            let tls = nats_conf::existing_tls(conf)?;
            Some((conf, nats_conf::render(&registry, tls.as_ref())?.0))
        }
        None => None,
    };

    let mut report = Report::default();
    let mut undo = Undo::default();
    new.save(&staged)?;
    undo.created(staged.clone());
    if let Some(s) = &sealing {
        save_sealing_keys(&sealing_staged, &s.file)?;
        undo.created(sealing_staged.clone());
    }
    write_conf_and_registry(
        paths,
        conf.as_ref().map(|(p, t)| (*p, t.as_str())),
        &registry_text,
        &mut report,
    )?;
    undo.commit();
    files::rename_new(&key_path, &retired)?;
    files::rename_new(&staged, &key_path)?;
    report.wrote(&format!("new signing key {} (0600)", new.id), &key_path);
    report.wrote(&format!("retired signing key {}", old.id), &retired);
    if let Some(s) = &sealing {
        std::fs::rename(&sealing_staged, &sealing_path).map_err(|e| Error::File {
            path: sealing_path.clone(),
            message: e.to_string(),
        })?;
        report.wrote(
            &format!("new sealing key {} (0600)", s.new_id),
            &sealing_path,
        );
        if let Some((old_id, end)) = &s.old {
            report.note(format!(
                "senders seal to {} from now; {who} still opens what was sealed to {old_id} \
                 until {end} (Unix ms), and a rotation after that drops it from {}",
                s.new_id, SEALING_KEY_FILE
            ));
        }
        if !s.dropped.is_empty() {
            report.note(format!(
                "dropped the sealing keys past their grace period: {}",
                s.dropped.join(", ")
            ));
        }
    }
    report.note(format!(
        "key {} is accepted from now; key {} until {cutoff} (Unix ms, {} s from now)",
        new.id,
        old.id,
        cutoff.saturating_sub(now_ms) / 1000
    ));
    report.note(format!(
        "next: restart {who}'s {}",
        if who == yeongye_proto::BROKER_ID {
            "broker so that it signs with the new key"
        } else {
            "adapter so that it signs with the new key and holds the new sealing key — before \
             the other agencies' adapters read the new registry and seal to it"
        }
    ));
    reload_notes(&mut report, conf.is_some());
    Ok(report)
}
