//! The operators' command line, as a library: a client of the broker's HTTP API (queues,
//! referrals, dead letters, consents, purges, registry reload); the offline audit commands read
//! a stopped broker's store through `audit_report`, as the API does. Renders tables for people (Korean names
//! aligned by display width) or JSON for scripts. Prints nothing itself: returns text.
//! Sends the operator's bearer token ([`load_token_file`]: a 0600 file) with every request.

use std::time::Duration;

use serde_json::Value;
use unicode_width::UnicodeWidthStr;

use crate::error::{Error, Result};

/// A client of one broker's HTTP API.
pub struct Api {
    base: String,
    agent: ureq::Agent,
    /// The operator's bearer token (never shown: `Api` has no `Debug`).
    token: Option<String>,
}

/// Reads an operator's token file (`referral-broker operator add` writes it), refusing one that
/// others than its owner may read. Errors name the file, never its content.
pub fn load_token_file(path: &std::path::Path) -> Result<String> {
    if let Some(mode) = yeongye_proto::credentials::shared_mode(path) {
        return Err(Error::File {
            path: path.to_owned(),
            message: format!(
                "the operator token file is readable by others (mode {mode:04o}): run \
                 `chmod 600 {}` (and consider the token leaked: make a new one)",
                path.display()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.to_owned(),
        message: format!("cannot read the operator token file: {e}"),
    })?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(Error::File {
            path: path.to_owned(),
            message: "not an operator token file (one line, the token)".into(),
        });
    }
    Ok(token.to_owned())
}

impl Api {
    pub fn new(base: &str) -> Api {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .into();
        Api {
            base: base.trim_end_matches('/').to_owned(),
            agent,
            token: None,
        }
    }

    /// Sends `token` as the operator's bearer token.
    pub fn with_token(mut self, token: Option<String>) -> Api {
        self.token = token;
        self
    }

    fn authorization(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn answer(
        &self,
        what: &str,
        r: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut r = r.map_err(|e| {
            Error::Nats(format!(
                "{what}: the broker's API at {} did not answer: {e}",
                self.base
            ))
        })?;
        let status = r.status();
        let body: Value = r
            .body_mut()
            .read_json()
            .map_err(|e| Error::Nats(format!("{what}: unreadable answer ({status}): {e}")))?;
        if status.is_success() {
            Ok(body)
        } else {
            let detail = body
                .get("detail")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| body.to_string());
            Err(Error::Nats(format!("{what}: {status}: {detail}")))
        }
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        let mut request = self.agent.get(&format!("{}{path}", self.base));
        if let Some(value) = self.authorization() {
            request = request.header("Authorization", &value);
        }
        let r = request.call();
        self.answer(path, r)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let mut request = self.agent.post(&format!("{}{path}", self.base));
        if let Some(value) = self.authorization() {
            request = request.header("Authorization", &value);
        }
        let r = request.send_json(body);
        self.answer(path, r)
    }

    /// A path segment from user input, made safe to put in a URL.
    pub fn segment(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
}

/// A table: headers and rows of cells, columns padded to the widest cell's display width.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.width()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.width());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            out.push_str(cell);
            out.push_str(&" ".repeat(w.saturating_sub(cell.width()) + 2));
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&mut headers.iter().copied());
    out.push_str(&line(
        &mut widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    ));
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn age(ms: Option<i64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) => {
            let secs = ms / 1000;
            match secs {
                s if s < 120 => format!("{s}s"),
                s if s < 7200 => format!("{}m", s / 60),
                s if s < 172_800 => format!("{}h", s / 3600),
                s => format!("{}d", s / 86_400),
            }
        }
    }
}

/// `referral-broker status`: one row per agency, then the totals.
pub fn render_queues(q: &Value) -> String {
    let rows: Vec<Vec<String>> = q
        .get("agencies")
        .and_then(Value::as_array)
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            vec![
                s(a, "id"),
                s(a, "name"),
                s(a, "sent"),
                s(a, "awaiting_receipt"),
                s(a, "awaiting_acceptance"),
                s(a, "in_progress"),
                s(a, "overdue"),
                s(a, "dead_letters"),
                age(a
                    .get("oldest_unacknowledged_age_ms")
                    .and_then(Value::as_i64)),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "AGENCY",
            "NAME",
            "SENT",
            "AWAIT RECEIPT",
            "AWAIT ACCEPT",
            "IN PROGRESS",
            "OVERDUE",
            "DEAD",
            "OLDEST UNACKED",
        ],
        &rows,
    );
    out.push('\n');
    if let Some(states) = q.get("states").and_then(Value::as_object) {
        let parts: Vec<String> = states
            .iter()
            .filter(|(_, n)| n.as_u64() != Some(0))
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        out.push_str(&format!(
            "referrals: {}\n",
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            }
        ));
    }
    out.push_str(&format!(
        "overdue: {}  dead letters: {}  outbox: {}\n",
        s(q, "overdue"),
        s(q, "dead_letters"),
        s(q, "outbox")
    ));
    let streams: Vec<String> = q
        .get("streams")
        .and_then(Value::as_array)
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|st| {
            format!(
                "{} {}/{} current, leader {}",
                s(st, "name"),
                s(st, "replicas_current"),
                s(st, "replicas"),
                st.get("leader").and_then(Value::as_str).unwrap_or("NONE")
            )
        })
        .collect();
    if !streams.is_empty() {
        out.push_str(&format!("streams: {}\n", streams.join("; ")));
    }
    if let Some(c) = q.get("cluster").filter(|c| c.is_object()) {
        out.push_str(&format!(
            "broker: {} ({}), leader {}, term {}, state log {} of {} (lag {}), takeovers {}\n",
            s(c, "broker"),
            s(c, "role"),
            c.get("leader").and_then(Value::as_str).unwrap_or("NONE"),
            s(c, "term"),
            s(c, "state_log_position"),
            s(c, "state_log_last"),
            s(c, "lag"),
            s(c, "takeovers"),
        ));
    }
    out
}

pub fn render_dead_letters(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|d| {
            vec![
                s(d, "seq"),
                s(d, "status"),
                s(d, "sender"),
                s(d, "reason"),
                s(d, "referral_id"),
                s(d, "detail"),
            ]
        })
        .collect();
    table(
        &["SEQ", "STATUS", "SENDER", "REASON", "REFERRAL", "DETAIL"],
        &rows,
    )
}

pub fn render_referral(r: &Value) -> String {
    let mut out = format!(
        "referral {}\n  {} -> {}  state {}{}\n\n",
        s(r, "referral_id"),
        s(r, "from"),
        s(r, "to"),
        s(r, "state"),
        if r.get("overdue").and_then(Value::as_bool) == Some(true) {
            " (overdue)"
        } else {
            ""
        }
    );
    let rows: Vec<Vec<String>> = r
        .get("history")
        .and_then(Value::as_array)
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|h| vec![s(h, "at_ms"), s(h, "state"), s(h, "by")])
        .collect();
    out.push_str(&table(&["AT (ms)", "STATE", "BY"], &rows));
    out
}

pub fn render_audit(entries: &[Value]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let change = match (s(e, "from").as_str(), s(e, "to").as_str()) {
                ("", "") => String::new(),
                (from, to) => format!("{from} -> {to}"),
            };
            vec![
                s(e, "seq"),
                s(e, "at_ms"),
                s(e, "event"),
                s(e, "actor"),
                change,
                s(e, "reason"),
                s(e, "basis"),
            ]
        })
        .collect();
    table(
        &[
            "SEQ", "AT (ms)", "EVENT", "ACTOR", "CHANGE", "REASON", "BASIS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn korean_names_line_up() {
        let t = table(
            &["ID", "NAME", "N"],
            &[
                vec!["a".into(), "희망복지지원단".into(), "1".into()],
                vec!["bb".into(), "x".into(), "22".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        // The third column starts at the same display column on every line.
        let col = |l: &str| l[..l.rfind(' ').unwrap()].width();
        assert_eq!(col(lines[2]), col(lines[3]));
    }

    #[cfg(unix)]
    #[test]
    fn token_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("op.token");
        std::fs::write(&path, "yop_secret-token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_token_file(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains("yop_secret"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_token_file(&path).unwrap(), "yop_secret-token");
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(Api::segment("ab-1_2"), "ab-1_2");
        assert_eq!(Api::segment("../x y"), "..%2Fx%20y");
    }

    #[test]
    fn status_shows_each_streams_replicas_and_leader() {
        let q = serde_json::json!({
            "agencies": [], "overdue": 0, "dead_letters": 0, "outbox": 0,
            "streams": [
                {"name": "YEONGYE_IN", "replicas": 3, "replicas_current": 2, "leader": "n2"},
                {"name": "YEONGYE_OUT", "replicas": 3, "replicas_current": 0, "leader": null},
            ],
        });
        let out = render_queues(&q);
        assert!(
            out.contains(
                "streams: YEONGYE_IN 2/3 current, leader n2; YEONGYE_OUT 0/3 current, leader NONE"
            ),
            "{out}"
        );
    }
}
