//! The operators' side of the broker, for the tests in `tests/it/operators.rs`: a small HTTP
//! client for the broker's endpoint ([`OpsHttp`]: `/readyz`, `/metrics`, `/api/v1/...`), a
//! parser for the Prometheus text ([`Metrics`]), the `referral-broker` operator command line
//! ([`broker_cli`]), finding or installing external tools (Chromium, promtool) and reading the
//! dashboard's DOM as Chromium dumps it ([`dashboard_cells`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use serde_json::Value;

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct OpsResponse {
    pub status: u16,
    pub body: String,
}

impl OpsResponse {
    /// The body as JSON, or a panic that shows it.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// A client for the broker's operator endpoint (`http_addr`). Blocking ureq calls run on
/// tokio's blocking pool; any status is an answer (only transport errors are errors).
#[derive(Clone)]
pub struct OpsHttp {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl OpsHttp {
    /// `addr` is `host:port`, as in the broker's `http_addr`.
    pub fn new(addr: &str) -> OpsHttp {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build();
        OpsHttp {
            base: format!("http://{addr}"),
            agent: ureq::Agent::new_with_config(config),
            token: None,
        }
    }

    /// The same client, sending `token` as the operator's bearer token.
    pub fn with_token(&self, token: Option<&str>) -> OpsHttp {
        OpsHttp {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The same client as the harness's operator ([`crate::broker::TEST_OPERATOR`]).
    pub fn operator(&self) -> OpsHttp {
        self.with_token(Some(crate::broker::TEST_OPERATOR_TOKEN))
    }

    /// `http://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request; `Err` only if no HTTP answer came (connection refused, timeout).
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<OpsResponse, String> {
        let url = format!("{}{path}", self.base);
        let agent = self.agent.clone();
        let method = method.to_owned();
        let authorization = self.token.as_ref().map(|t| format!("Bearer {t}"));
        tokio::task::spawn_blocking(move || {
            let result = match (method.as_str(), body, authorization) {
                ("GET", _, None) => agent.get(&url).call(),
                ("GET", _, Some(a)) => agent.get(&url).header("Authorization", &a).call(),
                ("POST", Some(body), None) => agent.post(&url).send_json(&body),
                ("POST", Some(body), Some(a)) => agent
                    .post(&url)
                    .header("Authorization", &a)
                    .send_json(&body),
                ("POST", None, None) => agent.post(&url).send_empty(),
                ("POST", None, Some(a)) => {
                    agent.post(&url).header("Authorization", &a).send_empty()
                }
                (m, _, _) => return Err(format!("unsupported method {m}")),
            };
            let mut response = result.map_err(|e| format!("{method} {url}: {e}"))?;
            let status = response.status().as_u16();
            let body = response
                .body_mut()
                .read_to_string()
                .map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
            Ok(OpsResponse { status, body })
        })
        .await
        .expect("the blocking HTTP call panicked")
    }

    /// GET, panicking if no answer came.
    pub async fn get(&self, path: &str) -> OpsResponse {
        self.try_request("GET", path, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// GET that must answer 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// POST a JSON body, panicking if no answer came.
    pub async fn post_json(&self, path: &str, body: Value) -> OpsResponse {
        self.try_request("POST", path, Some(body))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `/metrics`, parsed.
    pub async fn metrics(&self) -> Metrics {
        let r = self.get("/metrics").await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        Metrics::parse(&r.body)
    }
}

/// Samples of a Prometheus / OpenMetrics text exposition, keyed by metric name and then by the
/// sample's labels (`state="DELIVERED"`, in the order written; empty for none).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: BTreeMap<String, BTreeMap<String, f64>>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            samples
                .entry(name.to_owned())
                .or_default()
                .insert(labels.to_owned(), value);
        }
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of `name` with exactly these labels (`""` for none).
    pub fn get(&self, name: &str, labels: &str) -> Option<f64> {
        self.samples.get(name)?.get(labels).copied()
    }

    /// Every sample of `name` whose only label is `label`, by that label's value.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let prefix = format!("{label}=\"");
        self.samples
            .get(name)
            .map(|series| {
                series
                    .iter()
                    .filter_map(|(labels, v)| {
                        let value = labels.strip_prefix(&prefix)?.strip_suffix('"')?;
                        Some((value.to_owned(), *v))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What a `referral-broker` operator command printed.
#[derive(Debug)]
pub struct BrokerCli {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl BrokerCli {
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "referral-broker failed: {self:#?}");
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("referral-broker printed no JSON ({e}): {self:#?}"))
    }
}

/// Runs `referral-broker --config <config> <args...>` to completion (at most 60 s). The
/// command finds the running broker's API through `http_addr` in the configuration, and
/// authenticates as the harness's operator if its token file is beside the configuration.
pub async fn broker_cli(config: &Path, args: &[&str]) -> BrokerCli {
    let token = config
        .parent()
        .map(|d| d.join(crate::broker::OPERATOR_TOKEN_FILE))
        .filter(|p| p.is_file());
    broker_cli_with(config, args, token.as_deref()).await
}

/// [`broker_cli`] with `REFERRAL_OPERATOR_TOKEN_FILE` set to `token_file` (or unset).
pub async fn broker_cli_with(config: &Path, args: &[&str], token_file: Option<&Path>) -> BrokerCli {
    let bin = crate::workspace_bin("referral-broker");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REFERRAL_") {
            cmd.env_remove(key);
        }
    }
    if let Some(file) = token_file {
        cmd.env("REFERRAL_OPERATOR_TOKEN_FILE", file);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("referral-broker {args:?} ran for over 60 s"))
        .unwrap_or_else(|e| panic!("cannot run referral-broker {args:?}: {e}"));
    BrokerCli {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The first of `candidates` that is a file; otherwise runs `tests/<script>` (which installs
/// the tool from Debian's packages, or fails saying why) and looks again. Panics with the
/// script's output if the tool is still missing.
pub fn find_or_install(tool: &str, candidates: &[&str], script: &str) -> PathBuf {
    let found = || candidates.iter().map(PathBuf::from).find(|p| p.is_file());
    if let Some(path) = found() {
        return path;
    }
    let script_path = crate::repo_root().join("tests").join(script);
    let output = std::process::Command::new("bash")
        .arg(&script_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script_path.display()));
    found().unwrap_or_else(|| {
        panic!(
            "{tool} is not installed and {} could not install it ({}):\n{}\n{}",
            script_path.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Whether fontconfig knows a font that covers Korean (`fc-list :lang=ko`): without one,
/// Chromium draws Hangul as empty boxes.
pub fn korean_font_installed() -> bool {
    std::process::Command::new("fc-list")
        .args([":lang=ko", "family"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.trim_ascii().is_empty())
}

/// Runs `tests/<script>` and returns its stdout, or panics with what it printed.
pub fn run_install_script(script: &str) -> String {
    let script_path = crate::repo_root().join("tests").join(script);
    let output = std::process::Command::new("bash")
        .arg(&script_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script_path.display()));
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}\n{}",
        script_path.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The dashboard's per-agency table as Chromium's serialised DOM has it: for each
/// `<tr data-agency="...">`, its `<td data-col="...">` texts by column.
pub fn dashboard_cells(dom: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut rows = BTreeMap::new();
    let mut rest = dom;
    while let Some(start) = rest.find("<tr data-agency=\"") {
        let after = &rest[start + "<tr data-agency=\"".len()..];
        let Some(quote) = after.find('"') else { break };
        let agency = unescape(&after[..quote]);
        let end = after.find("</tr>").unwrap_or(after.len());
        let row = &after[quote..end];
        let mut cells = BTreeMap::new();
        let mut r = row;
        while let Some(td) = r.find("<td") {
            let tag_end = match r[td..].find('>') {
                Some(i) => td + i,
                None => break,
            };
            let tag = &r[td..tag_end];
            let close = r[tag_end..].find("</td>").map_or(r.len(), |i| tag_end + i);
            let text = &r[tag_end + 1..close];
            if let Some(col) = attr(tag, "data-col") {
                cells.insert(col, unescape(text));
            }
            r = &r[close.min(r.len())..];
            if r.len() <= 5 {
                break;
            }
            r = &r[5..];
        }
        rows.insert(agency, cells);
        rest = &after[end..];
    }
    rows
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(unescape(&tag[start..start + len]))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// Whether `path` holds a PNG (signature and IHDR) of at least `min_bytes`, and its size.
pub fn png_dimensions(path: &Path) -> Option<(u32, u32, usize)> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
    Some((w, h, bytes.len()))
}
