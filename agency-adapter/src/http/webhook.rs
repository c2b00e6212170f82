//! `Webhook`: one POST of a queued item to the agency system's URL (HTTP/1.1 over a fresh
//! connection, hyper's client), signed with HMAC-SHA256 ([`signature`](super::signature)).
//!
//! ```text
//! POST <webhook_url>
//! Content-Type: application/json
//! X-Yeongye-Signature: <hex HMAC-SHA256 of the body>
//! X-Yeongye-Message-Id: <message id>     (also in the body: the key to deduplicate on)
//! X-Yeongye-Kind: delivery | notification | rejection | escalation | withdrawal
//!
//! {"kind": .., "message_id": .., "referral_id": .., "queued_at_ms": .., "item": {..}}
//! ```
//!
//! Only a 2xx counts as delivered. Redirects are not followed.

use std::time::Duration;

use axum::http::{Method, Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::signature::{SIGNATURE_HEADER, sign};
use crate::config::WebhookTarget;

/// The header carrying the item's message id.
pub const MESSAGE_ID_HEADER: &str = "X-Yeongye-Message-Id";
/// The header carrying the item's kind.
pub const KIND_HEADER: &str = "X-Yeongye-Kind";

/// The agency system's webhook endpoint.
pub(crate) struct Webhook {
    target: WebhookTarget,
    secret: Vec<u8>,
    timeout: Duration,
}

impl Webhook {
    pub(crate) fn new(target: WebhookTarget, secret: &str, timeout: Duration) -> Webhook {
        Webhook {
            target,
            secret: secret.as_bytes().to_vec(),
            timeout,
        }
    }

    /// POSTs `body` and returns the response's status, or why there was none.
    pub(crate) async fn post(
        &self,
        message_id: &str,
        kind: &str,
        body: Vec<u8>,
    ) -> Result<StatusCode, String> {
        match tokio::time::timeout(self.timeout, self.attempt(message_id, kind, body)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no response within {:?}", self.timeout)),
        }
    }

    async fn attempt(
        &self,
        message_id: &str,
        kind: &str,
        body: Vec<u8>,
    ) -> Result<StatusCode, String> {
        let stream = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.target.authority))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
        let driver = tokio::spawn(async move {
            // The connection ends when the response is read and the sender dropped.
            let _ = connection.await;
        });
        let signature = sign(&self.secret, &body);
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.target.path.as_str())
            .header(header::HOST, self.target.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("yeongye-adapter/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::CONNECTION, "close")
            .header(SIGNATURE_HEADER, signature)
            .header(MESSAGE_ID_HEADER, message_id)
            .header(KIND_HEADER, kind)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        // Read (and discard) the body so the connection finishes cleanly; its content is the
        // agency system's business and is not logged.
        let _ = response.into_body().collect().await;
        drop(sender);
        driver.abort();
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::http::HeaderMap;
    use axum::routing::post;

    use super::*;
    use crate::http::signature::verify;

    #[tokio::test]
    async fn posts_signed_bodies() {
        let seen: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
        let record = Arc::clone(&seen);
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let record = Arc::clone(&record);
                async move {
                    record.lock().unwrap().push((headers, body));
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let target = WebhookTarget::parse(&format!("http://{addr}/hook")).unwrap();
        let hook = Webhook::new(target, "0123456789abcdef", Duration::from_secs(5));
        let status = hook
            .post("m-1", "delivery", br#"{"kind":"delivery"}"#.to_vec())
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (headers, body) = seen.lock().unwrap()[0].clone();
        assert_eq!(&body[..], br#"{"kind":"delivery"}"#);
        assert_eq!(headers[MESSAGE_ID_HEADER], "m-1");
        assert_eq!(headers[KIND_HEADER], "delivery");
        let sig = headers[SIGNATURE_HEADER].to_str().unwrap();
        assert!(verify(b"0123456789abcdef", &body, sig));

        // Nobody listening: an error, not a panic.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let target = WebhookTarget::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        let hook = Webhook::new(target, "0123456789abcdef", Duration::from_secs(5));
        assert!(
            hook.post("m-2", "notification", b"{}".to_vec())
                .await
                .is_err()
        );
    }
}
