//! [`AdapterProcess`]: the real `agency-adapter` binary for one agency, run as
//! `agency-adapter --config <file> run --inbox <dir>`, and [`cli`] for its one-shot commands.
//!
//! The adapter prints one JSON object per line on stdout for each item it hands to the agency
//! system (`{"kind": "delivery" | "notification" | "rejection", "message_id": .., "referral_id":
//! .., ...}`); a background thread collects them as [`Line`]s, kept across restarts. The inbox
//! holds `referrals/<referral_id>.json`, `notifications/<message_id>.json` and
//! `rejections/<message_id>.json`. The adapter's stderr goes to `adapter.log` in its directory.
//!
//! [`Line`] reads fields leniently (`referral_id` or `referralId`, at any depth; states with or
//! without the `REFERRAL_STATE_` prefix) so that the tests depend on the meaning of a line, not on
//! how the adapter nests it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;

use crate::process;

/// One line the adapter printed on stdout.
#[derive(Debug, Clone)]
pub struct Line {
    /// Which run of the adapter printed it (1 for the first start).
    pub run: u32,
    pub raw: String,
    /// `Null` if the line is not JSON.
    pub json: Value,
}

impl Line {
    /// A field by its snake_case name, also tried in lowerCamelCase, searched depth-first.
    pub fn field(&self, name: &str) -> Option<&Value> {
        let camel = to_camel(name);
        find(&self.json, name).or_else(|| find(&self.json, &camel))
    }

    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(Value::as_str)
    }

    /// `delivery`, `notification`, `rejection` (or whatever else the adapter printed).
    pub fn kind(&self) -> &str {
        self.json.get("kind").and_then(Value::as_str).unwrap_or("")
    }

    pub fn message_id(&self) -> Option<&str> {
        self.json
            .get("message_id")
            .or_else(|| self.json.get("messageId"))
            .and_then(Value::as_str)
            .or_else(|| self.str_field("message_id"))
    }

    pub fn referral_id(&self) -> Option<&str> {
        self.str_field("referral_id")
    }

    /// A notification's new state, without the `REFERRAL_STATE_` prefix (`SUBMITTED`, ...).
    pub fn state(&self) -> Option<String> {
        self.field("state")
            .map(|v| strip_enum(v, "REFERRAL_STATE_"))
    }

    /// A rejection's reason code, without the `REASON_CODE_` prefix (`MALFORMED_ENVELOPE`, ...).
    pub fn code(&self) -> Option<String> {
        self.field("code").map(|v| strip_enum(v, "REASON_CODE_"))
    }
}

fn strip_enum(value: &Value, prefix: &str) -> String {
    match value {
        Value::String(s) => s.strip_prefix(prefix).unwrap_or(s).to_owned(),
        other => other.to_string(),
    }
}

fn to_camel(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Depth-first search for a key (objects' own keys before nested ones).
fn find<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find(v, key))),
        Value::Array(items) => items.iter().find_map(|v| find(v, key)),
        _ => None,
    }
}

/// `RUST_LOG` for the processes the harness starts: `YEONGYE_TEST_LOG`, else `info`.
pub fn test_log() -> String {
    std::env::var("YEONGYE_TEST_LOG").unwrap_or_else(|_| "info".to_owned())
}

/// The adapter's configuration file. `extra` holds anything else (credentials, TLS, keys):
/// it is written last, as given.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub agency: String,
    pub nats_urls: Vec<String>,
    pub state_dir: PathBuf,
    pub extra: toml::Table,
}

impl AdapterConfig {
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::new();
        table.insert("agency".into(), toml::Value::String(self.agency.clone()));
        table.insert(
            "nats_urls".into(),
            toml::Value::Array(
                self.nats_urls
                    .iter()
                    .map(|u| toml::Value::String(u.clone()))
                    .collect(),
            ),
        );
        table.insert(
            "state_dir".into(),
            toml::Value::String(self.state_dir.display().to_string()),
        );
        for (key, value) in &self.extra {
            table.insert(key.clone(), value.clone());
        }
        toml::to_string(&table).expect("a TOML table serialises")
    }
}

/// What a one-shot command printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics (showing both streams) unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "agency-adapter failed: {self:#?}");
        self
    }

    /// stdout parsed as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("agency-adapter printed no JSON ({e}): {self:#?}"))
    }
}

/// Runs `agency-adapter --config <config> <args...>` to completion (at most 60 s).
pub async fn cli(config: &Path, args: &[&str]) -> CliOutput {
    let bin = crate::workspace_bin("agency-adapter");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("agency-adapter {args:?} ran for over 60 s"))
        .unwrap_or_else(|e| panic!("cannot run agency-adapter {args:?}: {e}"));
    CliOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// One agency's adapter, running `run --inbox`.
pub struct AdapterProcess {
    dir: PathBuf,
    config: AdapterConfig,
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<()>>,
    lines: Arc<Mutex<Vec<Line>>>,
    runs: u32,
    /// `RUST_LOG` for the process; `None`: `YEONGYE_TEST_LOG`, else `info`.
    rust_log: Option<String>,
}

impl AdapterProcess {
    /// Writes the config to `<dir>/adapter.toml` (state in `<dir>/state`, inbox in
    /// `<dir>/inbox`) and starts the adapter.
    pub fn start(dir: &Path, agency: &str, nats_urls: &[String]) -> AdapterProcess {
        let config = AdapterConfig {
            agency: agency.to_owned(),
            nats_urls: nats_urls.to_vec(),
            state_dir: dir.join("state"),
            extra: toml::Table::new(),
        };
        AdapterProcess::start_with(dir, config)
    }

    /// [`AdapterProcess::start`] with a configuration of the caller's.
    pub fn start_with(dir: &Path, config: AdapterConfig) -> AdapterProcess {
        AdapterProcess::start_logged(dir, config, None)
    }

    /// [`start_with`](Self::start_with), with `RUST_LOG` set to `rust_log` if given.
    pub fn start_logged(
        dir: &Path,
        mut config: AdapterConfig,
        rust_log: Option<&str>,
    ) -> AdapterProcess {
        std::fs::create_dir_all(dir).expect("create adapter dir");
        if !config.extra.contains_key("signing_key_file") {
            // Sign as the agency, with its test key (see registry::test_key).
            let key = dir.join("signing.key");
            crate::registry::write_test_key(&config.agency, &key);
            config.extra.insert(
                "signing_key_file".into(),
                toml::Value::String(key.display().to_string()),
            );
        }
        if !config.extra.contains_key("sealing_key_file") {
            // Open what is sealed to the agency, with its test sealing key.
            let key = dir.join("sealing.key");
            crate::registry::write_test_sealing_key(&config.agency, &key);
            config.extra.insert(
                "sealing_key_file".into(),
                toml::Value::String(key.display().to_string()),
            );
        }
        if !config.extra.contains_key("registry") {
            // Seal to the recipients' keys (a registry of the agencies tests use).
            let registry = dir.join("registry.toml");
            crate::registry::write(&registry, &crate::registry::local_agencies(&config.agency));
            config.extra.insert(
                "registry".into(),
                toml::Value::String(registry.display().to_string()),
            );
        }
        std::fs::write(dir.join("adapter.toml"), config.to_toml()).expect("write adapter.toml");
        let mut adapter = AdapterProcess {
            dir: dir.to_path_buf(),
            config,
            child: None,
            reader: None,
            lines: Arc::new(Mutex::new(Vec::new())),
            runs: 0,
            rust_log: rust_log.map(str::to_owned),
        };
        adapter.start_again();
        adapter
    }

    pub fn agency(&self) -> &str {
        &self.config.agency
    }

    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("adapter.toml")
    }

    pub fn inbox(&self) -> PathBuf {
        self.dir.join("inbox")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("adapter.log")
    }

    pub fn log_tail(&self) -> String {
        process::tail(&self.log_path(), 4000)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| process::exited(child).is_none())
    }

    /// Starts the adapter (it must not be running) with the same config, state and inbox.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the adapter is already running");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.runs += 1;
        let bin = crate::workspace_bin("agency-adapter");
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("run")
            .arg("--inbox")
            .arg(self.inbox())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", self.rust_log.clone().unwrap_or_else(test_log))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(process::append_log(&self.log_path()));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn agency-adapter: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::clone(&self.lines);
        let run = self.runs;
        let agency = self.config.agency.clone();
        self.reader = Some(
            std::thread::Builder::new()
                .name(format!("adapter-{agency}-stdout"))
                .spawn(move || {
                    for raw in BufReader::new(stdout).lines() {
                        let Ok(raw) = raw else { break };
                        let json = serde_json::from_str(&raw).unwrap_or(Value::Null);
                        lines
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(Line { run, raw, json });
                    }
                })
                .expect("spawn reader thread"),
        );
        self.child = Some(child);
    }

    /// SIGKILL and reap; the lines it printed stay.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill9(&mut child);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Kill -9 and start again with the same state and inbox.
    pub fn restart(&mut self) {
        self.kill9();
        self.start_again();
    }

    /// SIGTERM; asserts a clean exit within 10 s.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("the adapter is running");
        process::signal(child.id(), "TERM");
        let status = process::wait_exit_async(&mut child, Duration::from_secs(10)).await;
        if status.is_none() {
            process::kill9(&mut child);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        match status {
            Some(status) => assert!(
                status.success(),
                "agency-adapter exited with {status}\n{}",
                self.log_tail()
            ),
            None => panic!(
                "agency-adapter ignored SIGTERM for 10 s\n{}",
                self.log_tail()
            ),
        }
    }

    /// Runs a one-shot command (`send`, `update`, `status`, ...) with this adapter's config.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        cli(&self.config_path(), args).await
    }

    fn guard(&self) -> MutexGuard<'_, Vec<Line>> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every line printed so far, all runs.
    pub fn lines(&self) -> Vec<Line> {
        self.guard().clone()
    }

    /// Lines of one kind (`delivery`, `notification`, `rejection`).
    pub fn lines_of(&self, kind: &str) -> Vec<Line> {
        self.guard()
            .iter()
            .filter(|l| l.kind() == kind)
            .cloned()
            .collect()
    }

    /// How many delivery lines name this referral.
    pub fn deliveries_of(&self, referral_id: &str) -> usize {
        self.guard()
            .iter()
            .filter(|l| l.kind() == "delivery" && l.referral_id() == Some(referral_id))
            .count()
    }

    /// The states of this referral's notifications, in the order they were printed, each
    /// notification (message id) once: a stdout line is a log of the handoff, at least once (a
    /// notification the server sends again because a restart lost its acknowledgement prints
    /// again under the same id, and is not handed over again). A state notified twice under
    /// two ids is still there twice.
    pub fn notified_states(&self, referral_id: &str) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.guard()
            .iter()
            .filter(|l| l.kind() == "notification" && l.referral_id() == Some(referral_id))
            .filter(|l| l.message_id().is_none_or(|id| seen.insert(id.to_owned())))
            .filter_map(Line::state)
            .collect()
    }

    /// Every rejection line.
    pub fn rejections(&self) -> Vec<Line> {
        self.lines_of("rejection")
    }

    /// Waits until `check` holds over the lines printed so far; panics after `timeout` with the
    /// lines and the adapter's log.
    pub async fn wait_lines(&self, what: &str, timeout: Duration, check: impl Fn(&[Line]) -> bool) {
        crate::wait_until(
            &format!("{} adapter: {what}", self.agency()),
            timeout,
            || check(&self.guard()),
            || self.describe(),
        )
        .await;
    }

    /// Waits until this referral has been notified in `state`.
    pub async fn wait_notified(&self, referral_id: &str, state: &str, timeout: Duration) {
        self.wait_lines(
            &format!("notification {state} for {referral_id}"),
            timeout,
            |lines| {
                lines.iter().any(|l| {
                    l.kind() == "notification"
                        && l.referral_id() == Some(referral_id)
                        && l.state().as_deref() == Some(state)
                })
            },
        )
        .await;
    }

    /// The inbox file of the item a line reports (`referrals/<referral_id>.json` for a
    /// delivery, `<kind>s/<message_id>.json` otherwise), parsed; `None` if it is not there.
    pub fn item_file(&self, line: &Line) -> Option<Value> {
        let (folder, name) = match line.kind() {
            "delivery" => ("referrals", line.referral_id()?),
            "notification" => ("notifications", line.message_id()?),
            "rejection" => ("rejections", line.message_id()?),
            _ => return None,
        };
        let path = self.inbox().join(folder).join(format!("{name}.json"));
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The id of the message a rejection answers: from the line if it says, else from the
    /// rejection's inbox file.
    pub fn rejected_message_id(&self, line: &Line) -> Option<String> {
        if let Some(id) = line.str_field("rejected_message_id") {
            return Some(id.to_owned());
        }
        let file = self.item_file(line)?;
        let value =
            find(&file, "rejected_message_id").or_else(|| find(&file, "rejectedMessageId"))?;
        value.as_str().map(str::to_owned)
    }

    /// Waits until there is a rejection of the message `message_id`, and returns its line.
    /// Waits for the rejection of `message_id` and asserts its reason code.
    pub async fn wait_rejected(&self, message_id: &str, code: &str, timeout: Duration) -> Line {
        let rejection = self.wait_rejection_of(message_id, timeout).await;
        assert_eq!(rejection.code().as_deref(), Some(code), "{}", rejection.raw);
        rejection
    }

    pub async fn wait_rejection_of(&self, message_id: &str, timeout: Duration) -> Line {
        crate::wait_for(
            &format!("{} adapter: the rejection of {message_id}", self.agency()),
            timeout,
            || {
                let found = self
                    .rejections()
                    .into_iter()
                    .find(|l| self.rejected_message_id(l).as_deref() == Some(message_id));
                std::future::ready(found)
            },
            || self.describe(),
        )
        .await
    }

    /// The file names (without `.json`) in one inbox folder: `referrals`, `notifications` or
    /// `rejections`.
    pub fn inbox_files(&self, folder: &str) -> Vec<String> {
        let dir = self.inbox().join(folder);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        names
    }

    /// One inbox file, parsed.
    pub fn inbox_json(&self, folder: &str, name: &str) -> Value {
        let path = self.inbox().join(folder).join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
    }

    /// The last lines and the log, for failure messages.
    pub fn describe(&self) -> String {
        let lines = self.guard();
        let skip = lines.len().saturating_sub(20);
        let mut out = format!(
            "--- {} adapter: {} stdout lines, last {} ---\n",
            self.agency(),
            lines.len(),
            lines.len() - skip
        );
        for line in lines.iter().skip(skip) {
            out.push_str(&line.raw);
            out.push('\n');
        }
        out.push_str(&self.log_tail());
        out
    }
}

impl Drop for AdapterProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}
