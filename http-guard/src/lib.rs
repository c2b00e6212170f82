//! `yeongye-http`: the one HTTP server loop of the broker's operator endpoint and the adapter's
//! `serve`, with the limits axum's own `axum::serve` does not give: a header-read timeout (a
//! slow-header "slowloris" client is cut off), a body-read deadline (a dripping body gets a
//! 408 and the connection is closed), an inactivity timeout, and a cap on concurrent
//! connections (past it, a connection is answered 503 at once and closed). Graceful shutdown:
//! once the token is cancelled no connection is accepted, requests in hand finish, and
//! connections without one (idle, or a head still arriving) are closed within 200 ms.
//!
//! Neither wire contract nor product logic: its own crate so that both binaries share one
//! implementation (`proto/` is the wire contract and stays free of servers).
//!
//! # Layout
//! - this file: [`Limits`] (the `[http_limits]` / `[http.limits]` configuration) and [`serve`].
//! - `conn.rs`: one connection — hyper's HTTP/1 with its header timer, the body deadline, the
//!   refusal past the cap.
//! - `io.rs`: [`io::IdleIo`], the inactivity timeout on the socket.

mod conn;
mod io;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The limits of one HTTP server. In TOML (every key optional):
///
/// ```toml
/// header_timeout_secs = 10   # a request head must be complete this long after the
///                            # connection starts waiting for it (also: keep-alive idle)
/// body_timeout_secs = 30     # a request body must be complete this long after its head
/// idle_timeout_secs = 60     # no byte either way for this long: the connection is closed
/// max_connections = 256      # more at once: answered 503 and closed
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Seconds a request head may take, from when the connection starts waiting for it (its
    /// opening, or the end of the previous answer: hyper runs this clock on idle keep-alive
    /// connections too, so it is also how long one stays open between requests).
    pub header_timeout_secs: u64,
    /// Seconds a request body may take to arrive in full, from the end of its head.
    pub body_timeout_secs: u64,
    /// Seconds without a byte read or written before the connection is closed (a client that
    /// stopped reading its answer, or stalls between body chunks past the body deadline).
    pub idle_timeout_secs: u64,
    /// Connections served at once; one more is answered `503` and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            idle_timeout_secs: 60,
            max_connections: 256,
        }
    }
}

impl Limits {
    /// Checks every limit is within its range; `section` names the table in errors
    /// (`http_limits`, `http.limits`).
    pub fn validate(&self, section: &str) -> Result<(), String> {
        let secs = [
            ("header_timeout_secs", self.header_timeout_secs, 300),
            ("body_timeout_secs", self.body_timeout_secs, 3600),
            ("idle_timeout_secs", self.idle_timeout_secs, 3600),
        ];
        for (key, value, max) in secs {
            if !(1..=max).contains(&value) {
                return Err(format!("{section}.{key} = {value} is not within 1..={max}"));
            }
        }
        if !(1..=65_536).contains(&self.max_connections) {
            return Err(format!(
                "{section}.max_connections = {} is not within 1..=65536",
                self.max_connections
            ));
        }
        Ok(())
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

/// Connections being answered 503 at once (past the cap): more are simply closed.
const MAX_REFUSING: usize = 64;

/// Serves `app` on `listener` within `limits` until `shutdown` is cancelled, then lets the
/// connections in hand finish (each bounded by the limits) and returns.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let tracker = TaskTracker::new();
    // Warn once each time the cap is reached, not once per refused connection.
    let full = AtomicBool::new(false);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!(cause = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                full.store(false, Ordering::Relaxed);
                tracker.spawn(conn::serve(
                    stream,
                    app.clone(),
                    limits,
                    shutdown.clone(),
                    permit,
                ));
            }
            Err(_) => {
                if !full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "HTTP connection cap reached: further connections are answered 503"
                    );
                }
                if let Ok(permit) = Arc::clone(&refusing).try_acquire_owned() {
                    tracker.spawn(conn::refuse(stream, permit));
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_validate() {
        let l: Limits = toml_like("header_timeout_secs", 2);
        assert_eq!(l.header_timeout_secs, 2);
        assert_eq!(l.max_connections, 256);
        assert!(Limits::default().validate("x").is_ok());
        for bad in [
            Limits {
                header_timeout_secs: 0,
                ..Limits::default()
            },
            Limits {
                body_timeout_secs: 4000,
                ..Limits::default()
            },
            Limits {
                max_connections: 0,
                ..Limits::default()
            },
        ] {
            let e = bad.validate("http_limits").unwrap_err();
            assert!(e.starts_with("http_limits."), "{e}");
        }
    }

    fn toml_like(key: &str, value: u64) -> Limits {
        use serde::de::IntoDeserializer;
        use serde::de::value::MapDeserializer;
        let map = [(key, value)].into_iter();
        let de: MapDeserializer<'_, _, serde::de::value::Error> =
            MapDeserializer::new(map.map(|(k, v)| (k.into_deserializer(), v.into_deserializer())));
        Limits::deserialize(de).unwrap()
    }
}
