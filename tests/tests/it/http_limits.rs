//! The HTTP servers' limits (`yeongye-http`), on the real broker and the real `agency-adapter
//! serve`, with raw TCP clients: a request head that stops half-way is cut off after the header
//! timeout; a body that drips is answered 408 and closed after the body timeout; past
//! `max_connections` a connection is answered 503 at once, and served again once a slot frees.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yeongye_tests::http::{Delivery, ServeProcess, TOKEN};
use yeongye_tests::{System, wait_for};

use crate::CENTRE;

/// The limits both servers get in these tests: short, so the tests are quick.
const HEADER_SECS: u64 = 1;
const BODY_SECS: u64 = 4;
const MAX_CONNECTIONS: usize = 3;
/// How much later than its timeout a cut-off may come (a loaded test machine).
const MARGIN: Duration = Duration::from_secs(8);

/// Reads until the server closes (EOF or reset), at most `within`; what was read and whether it
/// closed in time.
async fn read_until_closed(
    stream: &mut (impl AsyncReadExt + Unpin),
    within: Duration,
) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A POST head whose body (`length` bytes) is still to come.
fn post_head(addr: SocketAddr, path: &str, auth: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n"
    )
}

async fn get_healthz(addr: SocketAddr) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let (raw, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    Some((status_of(&raw)?, String::from_utf8_lossy(&raw).into_owned()))
}

/// The three checks against one server. `post_path` must read its body; `auth` is the
/// `Authorization` header line it needs (with CRLF).
async fn slow_clients_are_cut_off(
    addr: SocketAddr,
    post_path: &str,
    auth: &str,
    log: impl Fn() -> String,
) {
    // Half a request line, then nothing: closed after the header timeout, without an answer.
    let started = Instant::now();
    let mut slow_head = TcpStream::connect(addr).await.expect("connect");
    slow_head
        .write_all(b"GET /healthz HT")
        .await
        .expect("write half a line");
    let (got, closed) =
        read_until_closed(&mut slow_head, Duration::from_secs(HEADER_SECS) + MARGIN).await;
    let took = started.elapsed();
    assert!(
        closed,
        "a half-sent head was still open after {took:?}\n{}",
        log()
    );
    assert!(
        took >= Duration::from_millis(HEADER_SECS * 1000 - 200),
        "closed after {took:?}, before the header timeout: {:?}",
        String::from_utf8_lossy(&got)
    );

    // A head, then the body one byte every 200 ms: 408 after the body timeout, then closed.
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(post_head(addr, post_path, auth, 1000).as_bytes())
        .await
        .expect("write the head");
    let drip = tokio::spawn(async move {
        for _ in 0..1000 {
            if writer.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (got, closed) =
        read_until_closed(&mut reader, Duration::from_secs(BODY_SECS) + MARGIN).await;
    let took = started.elapsed();
    drip.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(
        closed,
        "a dripping body was still open after {took:?}: {text}\n{}",
        log()
    );
    assert_eq!(status_of(&got), Some(408), "after {took:?}: {text}");
    assert!(
        text.contains("urn:yeongye:problem:request-timeout"),
        "{text}"
    );
    assert!(
        took >= Duration::from_millis(BODY_SECS * 1000 - 200),
        "{took:?}"
    );

    // The cap: MAX_CONNECTIONS holders (heads sent, bodies not), then one more is answered 503.
    let mut holders = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(post_head(addr, post_path, auth, 1000).as_bytes())
            .await
            .expect("write the head");
        holders.push(s);
    }
    let (status, text) = get_healthz(addr).await.expect("an answer past the cap");
    assert_eq!(status, 503, "past the cap: {text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    // Once the holders are gone, connections are served again.
    drop(holders);
    wait_for(
        "a connection served once the holders are gone",
        MARGIN,
        || async { get_healthz(addr).await.filter(|(s, _)| *s == 200) },
        &log,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_http_endpoint_cuts_off_slow_clients_and_caps_connections() {
    let system = System::builder()
        .adapters(&[])
        .broker_config(|c| {
            let mut limits = toml::Table::new();
            limits.insert(
                "header_timeout_secs".into(),
                toml::Value::Integer(HEADER_SECS as i64),
            );
            limits.insert(
                "body_timeout_secs".into(),
                toml::Value::Integer(BODY_SECS as i64),
            );
            limits.insert(
                "max_connections".into(),
                toml::Value::Integer(MAX_CONNECTIONS as i64),
            );
            c.extra
                .insert("http_limits".into(), toml::Value::Table(limits));
        })
        .start()
        .await;
    let addr: SocketAddr = system.broker.config().http_addr.parse().expect("http_addr");
    let auth = format!(
        "Authorization: Bearer {}\r\n",
        yeongye_tests::broker::TEST_OPERATOR_TOKEN
    );
    slow_clients_are_cut_off(addr, "/api/v1/dead-letters/1/replay", &auth, || {
        system.broker.log_tail()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapters_http_api_cuts_off_slow_clients_and_caps_connections() {
    let system = System::builder().adapters(&[]).start().await;
    let limits = format!(
        "{{ header_timeout_secs = {HEADER_SECS}, body_timeout_secs = {BODY_SECS}, max_connections = {MAX_CONNECTIONS} }}"
    );
    let dir = system.dir().join("serve").join(CENTRE);
    let serve = ServeProcess::start_with(
        &dir,
        CENTRE,
        &[system.url()],
        Delivery::Pull,
        &[("limits", &limits)],
    )
    .await;
    let addr = serve.client().addr();
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    slow_clients_are_cut_off(addr, "/v1/referrals", &auth, || serve.log_tail()).await;
}
