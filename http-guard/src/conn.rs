//! One HTTP/1 connection within the [`Limits`]: hyper's server with its header-read timer, the
//! socket's inactivity timeout ([`IdleIo`]), each request body under a deadline
//! ([`Deadline`]: past it the answer is a 408 problem document and the connection closes), and
//! graceful shutdown. Also [`refuse`]: the 503 for a connection past the cap.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::Limits;
use crate::io::IdleIo;

/// The problem document's media type (RFC 9457).
const PROBLEM_JSON: &str = "application/problem+json";
/// At shutdown, how often a connection is checked for a request in hand; one without is closed.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);

/// Counts a request in hand on its connection while it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(count))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted connection; `_permit` holds its slot under the cap until it closes.
pub(crate) async fn serve(
    stream: TcpStream,
    app: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(IdleIo::new(stream, limits.idle_timeout()));
    let body_timeout = limits.body_timeout();
    let busy = Arc::new(AtomicUsize::new(0));
    let requests = Arc::clone(&busy);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let in_hand = Busy::new(&requests);
        let mut app = app.clone();
        let timed_out = Arc::new(AtomicBool::new(false));
        let request = request
            .map(|body| Body::new(Deadline::new(body, body_timeout, Arc::clone(&timed_out))));
        async move {
            let _in_hand = in_hand;
            let response = match app.call(request).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if timed_out.load(Ordering::Relaxed) {
                tracing::info!("request body not complete within the body timeout: 408");
                return Ok::<_, Infallible>(too_slow());
            }
            Ok(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout())
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            // A request in hand finishes; a connection without one (idle, or a head still
            // arriving) is closed now rather than when its header timeout runs out.
            loop {
                tokio::select! {
                    result = connection.as_mut() => break result,
                    () = tokio::time::sleep(SHUTDOWN_POLL) => {
                        if busy.load(Ordering::Relaxed) == 0 {
                            break Ok(());
                        }
                    }
                }
            }
        }
    };
    if let Err(e) = result {
        // Timeouts, resets, malformed requests: the client's doing, not worth more than debug.
        tracing::debug!(cause = %e, "HTTP connection ended with an error");
    }
}

/// `408` with a problem document, and the connection closed after it.
fn too_slow() -> Response<Body> {
    let body = problem(
        StatusCode::REQUEST_TIMEOUT,
        "request-timeout",
        "Request timeout",
        "the request body did not arrive within the server's body timeout",
    );
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn problem(status: StatusCode, slug: &str, title: &str, detail: &str) -> String {
    format!(
        "{{\"type\":\"urn:yeongye:problem:{slug}\",\"title\":\"{title}\",\"status\":{},\"detail\":\"{detail}\"}}",
        status.as_u16()
    )
}

/// Answers a connection past the cap `503` (with `Retry-After`) and closes it, reading what the
/// client sent for a moment first so that the close does not reset the answer away.
pub(crate) async fn refuse(mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let body = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Service unavailable",
        "too many connections at once; retry shortly",
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {PROBLEM_JSON}\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let linger = Duration::from_secs(1);
    let _ = tokio::time::timeout(linger, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The request body, failing once `deadline` passes before it is complete; sets `timed_out`
/// so that the answer becomes a 408 whatever the handler made of the error.
struct Deadline {
    inner: Incoming,
    sleep: Pin<Box<Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl Deadline {
    fn new(inner: Incoming, timeout: Duration, timed_out: Arc<AtomicBool>) -> Deadline {
        Deadline {
            inner,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timed_out,
        }
    }
}

/// The error a body past its deadline ends with.
#[derive(Debug)]
struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
