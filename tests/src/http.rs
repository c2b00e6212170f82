//! The adapter's local HTTP API from the outside: [`ServeProcess`] (the real `agency-adapter
//! serve`, with an `[http]` section, a token file and optionally a webhook), [`HttpClient`] (a
//! minimal HTTP/1.1 client over a TCP socket, so the tests need no HTTP library and see the
//! raw status, headers and body) and [`WebhookReceiver`] (an agency system's webhook endpoint
//! that can be down, failing or up, and records what arrives and whether each signature holds).
//!
//! ```text
//! <dir>/adapter.toml  serve.log  token  webhook-secret  state/
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::process;

/// The bearer token every [`ServeProcess`] uses.
pub const TOKEN: &str = "yeongye-test-token-0123456789";
/// The webhook HMAC secret every [`ServeProcess`] with a webhook uses.
pub const WEBHOOK_SECRET: &str = "yeongye-test-webhook-secret-0123";

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A minimal HTTP/1.1 client: one connection per request (`Connection: close`).
#[derive(Debug, Clone)]
pub struct HttpClient {
    addr: SocketAddr,
    token: Option<String>,
}

impl HttpClient {
    pub fn new(addr: SocketAddr, token: Option<&str>) -> HttpClient {
        HttpClient {
            addr,
            token: token.map(str::to_owned),
        }
    }

    /// The same server without (or with another) token.
    pub fn with_token(&self, token: Option<&str>) -> HttpClient {
        HttpClient::new(self.addr, token)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends a request; `Err` if the server could not be reached or answered garbage.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<HttpResponse, String> {
        let mut stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        if let Some(body) = body {
            stream.write_all(body).await.map_err(|e| e.to_string())?;
        }
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
            .await
            .map_err(|_| "no complete response within 60 s".to_owned())?
            .map_err(|e| e.to_string())?;
        parse_response(&raw)
    }

    /// [`try_request`](Self::try_request), panicking on a transport failure.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        self.try_request(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, &[], None).await
    }

    /// POSTs `body` as `application/json`, with `Idempotency-Key: key` if given.
    pub async fn post_json(&self, path: &str, body: &Value, key: Option<&str>) -> HttpResponse {
        let bytes = serde_json::to_vec(body).expect("JSON");
        self.post_raw(path, &bytes, "application/json", key).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: &[u8],
        content_type: &str,
        key: Option<&str>,
    ) -> HttpResponse {
        let mut headers = vec![("Content-Type", content_type)];
        if let Some(k) = key {
            headers.push(("Idempotency-Key", k));
        }
        self.request("POST", path, &headers, Some(body)).await
    }
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size_text = String::from_utf8_lossy(&rest[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size: {e}"))?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or("short chunk")?);
        rest = rest.get(size + 2..).ok_or("short chunk")?;
    }
}

/// How an agency's adapter hands items to its system.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// `GET /v1/inbox`.
    Pull,
    /// POSTs to this URL.
    Webhook(String),
}

/// `agency-adapter serve` for one agency.
pub struct ServeProcess {
    dir: PathBuf,
    agency: String,
    addr: SocketAddr,
    child: Option<Child>,
    starts: u32,
}

impl ServeProcess {
    /// Writes the config (a free loopback port, the token, the webhook if any, retries backing
    /// off to at most 1 s) to `<dir>/adapter.toml` and starts the adapter; waits until it
    /// answers `/healthz`.
    pub async fn start(
        dir: &Path,
        agency: &str,
        nats_urls: &[String],
        delivery: Delivery,
    ) -> ServeProcess {
        ServeProcess::start_with(dir, agency, nats_urls, delivery, &[]).await
    }

    /// [`start`](Self::start) with extra `[http]` keys (`("body_limit_bytes", "4096")`).
    pub async fn start_with(
        dir: &Path,
        agency: &str,
        nats_urls: &[String],
        delivery: Delivery,
        extra: &[(&str, &str)],
    ) -> ServeProcess {
        std::fs::create_dir_all(dir).expect("create serve dir");
        // Secret files must be private (0600), or the adapter refuses them.
        process::write_secret(&dir.join("token"), format!("{TOKEN}\n").as_bytes());
        let port = process::free_port();
        let urls: Vec<String> = nats_urls.iter().map(|u| format!("{u:?}")).collect();
        // Sign as the agency, with its test key (see registry::test_key).
        let key = dir.join("signing.key");
        crate::registry::write_test_key(agency, &key);
        // Seal to the recipients' test keys, open with its own (see registry::test_sealing_key).
        let sealing = dir.join("sealing.key");
        crate::registry::write_test_sealing_key(agency, &sealing);
        let registry = dir.join("registry.toml");
        crate::registry::write(&registry, &crate::registry::local_agencies(agency));
        let mut config = format!(
            "agency = {agency:?}\nnats_urls = [{}]\nstate_dir = {:?}\nsigning_key_file = {:?}\nsealing_key_file = {:?}\nregistry = {:?}\n\n[http]\nbind = \"127.0.0.1:{port}\"\ntoken_file = {:?}\nwebhook_max_backoff_secs = 1\n",
            urls.join(", "),
            dir.join("state").display().to_string(),
            key.display().to_string(),
            sealing.display().to_string(),
            registry.display().to_string(),
            dir.join("token").display().to_string(),
        );
        match &delivery {
            Delivery::Pull => config.push_str("delivery = \"pull\"\n"),
            Delivery::Webhook(url) => {
                process::write_secret(&dir.join("webhook-secret"), WEBHOOK_SECRET.as_bytes());
                config.push_str(&format!(
                    "delivery = \"webhook\"\nwebhook_url = {url:?}\nwebhook_secret_file = {:?}\nwebhook_timeout_secs = 5\n",
                    dir.join("webhook-secret").display().to_string()
                ));
            }
        }
        for (key, value) in extra {
            config.push_str(&format!("{key} = {value}\n"));
        }
        std::fs::write(dir.join("adapter.toml"), config).expect("write adapter.toml");
        let mut serve = ServeProcess {
            dir: dir.to_path_buf(),
            agency: agency.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            starts: 0,
        };
        serve.start_again().await;
        serve
    }

    pub fn agency(&self) -> &str {
        &self.agency
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("adapter.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("serve.log")
    }

    pub fn log_tail(&self) -> String {
        process::tail(&self.log_path(), 6000)
    }

    /// A client with the token.
    pub fn client(&self) -> HttpClient {
        HttpClient::new(self.addr, Some(TOKEN))
    }

    /// Starts the adapter again (it must not be running), same config and state.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the adapter is already running");
        self.starts += 1;
        let marker = format!(
            "\n=== yeongye test harness: serve start #{} ===\n",
            self.starts
        );
        let _ = std::io::Write::write_all(
            &mut process::append_log(&self.log_path()),
            marker.as_bytes(),
        );
        let mut cmd = Command::new(crate::workspace_bin("agency-adapter"));
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("serve")
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("YEONGYE_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env_remove("YEONGYE_AGENCY")
            .env_remove("YEONGYE_NATS_URLS")
            .env_remove("YEONGYE_STATE_DIR")
            .stdin(Stdio::null());
        self.child = Some(process::spawn_logged(&mut cmd, &self.log_path()));
        let client = self.client();
        let start = std::time::Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = process::exited(child)
            {
                self.child = None;
                panic!(
                    "agency-adapter serve exited ({status})\n{}",
                    self.log_tail()
                );
            }
            if let Ok(r) = client.try_request("GET", "/healthz", &[], None).await
                && r.status == 200
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agency-adapter serve not answering after 30 s\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill9(&mut child);
        }
    }

    /// SIGTERM; asserts a clean exit within 15 s.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("the adapter is running");
        process::signal(child.id(), "TERM");
        match process::wait_exit_async(&mut child, Duration::from_secs(15)).await {
            Some(status) => assert!(
                status.success(),
                "agency-adapter serve exited with {status}\n{}",
                self.log_tail()
            ),
            None => {
                process::kill9(&mut child);
                panic!("agency-adapter serve ignored SIGTERM\n{}", self.log_tail());
            }
        }
    }

    /// Everything waiting in the inbox (`GET /v1/inbox?limit=1000`).
    pub async fn inbox(&self) -> Vec<Value> {
        let r = self.client().get("/v1/inbox?limit=1000").await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["items"].as_array().cloned().unwrap_or_default()
    }

    pub fn describe(&self) -> String {
        format!(
            "--- serve {} on {} ---\n{}",
            self.agency,
            self.addr,
            self.log_tail()
        )
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}

/// How a [`WebhookReceiver`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 204, and records the item.
    Up,
    /// 503, records nothing.
    Failing,
    /// Closes the connection without an answer.
    Hangup,
}

/// One POST the receiver took (answered 204).
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub kind: String,
    pub body: Value,
    pub signature_ok: bool,
    pub header_message_id: Option<String>,
}

/// An agency system's webhook endpoint on a free loopback port.
pub struct WebhookReceiver {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    received: Arc<Mutex<Vec<Received>>>,
    refused: Arc<Mutex<u32>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start(mode: Mode) -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook");
        let addr = listener.local_addr().expect("local_addr");
        let mode_cell = Arc::new(AtomicU8::new(mode as u8));
        let received = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let task = tokio::spawn({
            let mode = Arc::clone(&mode_cell);
            let received = Arc::clone(&received);
            let refused = Arc::clone(&refused);
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let mode = Arc::clone(&mode);
                    let received = Arc::clone(&received);
                    let refused = Arc::clone(&refused);
                    tokio::spawn(async move {
                        serve_one(stream, &mode, &received, &refused).await;
                    });
                }
            }
        });
        WebhookReceiver {
            addr,
            mode: mode_cell,
            received,
            refused,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/yeongye/items", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Everything taken so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How many POSTs were answered with a failure or hung up on.
    pub fn refused(&self) -> u32 {
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mode_of(v: u8) -> Mode {
    match v {
        0 => Mode::Up,
        1 => Mode::Failing,
        _ => Mode::Hangup,
    }
}

async fn serve_one(
    mut stream: TcpStream,
    mode: &AtomicU8,
    received: &Mutex<Vec<Received>>,
    refused: &Mutex<u32>,
) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    // Read the head, then the body by Content-Length.
    let (head_end, length) = loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while raw.len() < head_end + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let body = &raw[head_end..head_end + length];
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let answer = match mode_of(mode.load(Ordering::SeqCst)) {
        Mode::Hangup => {
            *refused
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
            return;
        }
        Mode::Failing => {
            *refused
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Mode::Up => {
            let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let signature_ok = header("x-yeongye-signature").is_some_and(|sig| {
                yeongye_adapter::http::signature::verify(WEBHOOK_SECRET.as_bytes(), body, &sig)
            });
            received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Received {
                    message_id: json["message_id"].as_str().unwrap_or("").to_owned(),
                    kind: json["kind"].as_str().unwrap_or("").to_owned(),
                    header_message_id: header("x-yeongye-message-id"),
                    body: json,
                    signature_ok,
                });
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
    };
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}
