//! The `tracing` filter both binaries (`referral-broker`, `agency-adapter`) start with, and agency
//! systems built on the SDK may use too. `RUST_LOG` governs every target (default `info`, also
//! when it is set but empty); the NATS client (`async_nats`) is capped at `info` unless
//! `RUST_LOG` names it, because at debug it logs every pull request (thousands of lines an idle
//! hour) and its server URLs (a password in one included), and at trace whole message payloads.
//! The cap only ever lowers the NATS client's level, never raises it; and even when named, the
//! NATS client never logs at trace (payloads carry personal data).
//!
//! Its own crate because both binaries need exactly this rule and share no crate where logging
//! belongs (`proto` is the wire contract, `yeongye-http` the HTTP server loop).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The filter when `RUST_LOG` is unset, empty or not understood.
pub const DEFAULT: &str = "info";
/// The NATS client's target, and the most it logs unless `RUST_LOG` names it.
const NATS_CLIENT: &str = "async_nats";
const NATS_CLIENT_CAP: LevelFilter = LevelFilter::INFO;

/// The filter for `rust_log` (the variable's value, if set), and a warning to log once the
/// subscriber is up if the value was not understood (then [`DEFAULT`] is used).
pub fn filter(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let given = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let (spec, warning) = match given {
        Some(spec) => match EnvFilter::try_new(spec) {
            Ok(_) => (spec, None),
            Err(e) => (
                DEFAULT,
                Some(format!(
                    "RUST_LOG is not understood ({e}); logging at {DEFAULT:?}"
                )),
            ),
        },
        None => (DEFAULT, None),
    };
    let names_nats_client = spec.split(',').any(|d| d.trim().starts_with(NATS_CLIENT));
    // Named at trace (or with no level, which means trace): debug at most.
    let spec = spec
        .split(',')
        .map(|d| {
            let d = d.trim();
            match d.split_once('=') {
                Some((target, level))
                    if target.starts_with(NATS_CLIENT)
                        && level.trim().eq_ignore_ascii_case("trace") =>
                {
                    format!("{target}=debug")
                }
                None if d.starts_with(NATS_CLIENT) => format!("{d}=debug"),
                _ => d.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let spec = spec.as_str();
    // The level of targets no directive names: the last directive without a target.
    let global = spec
        .split(',')
        .filter_map(|d| d.trim().parse::<LevelFilter>().ok())
        .next_back();
    let spec = match global {
        Some(level) if !names_nats_client && level > NATS_CLIENT_CAP => {
            format!("{spec},{NATS_CLIENT}={NATS_CLIENT_CAP}")
        }
        _ => spec.to_owned(),
    };
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(DEFAULT));
    (filter, warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(rust_log: Option<&str>) -> String {
        filter(rust_log).0.to_string()
    }

    #[test]
    fn rust_log_governs_and_the_nats_client_is_capped() {
        assert_eq!(shown(None), "info");
        assert_eq!(shown(Some("")), "info");
        assert_eq!(shown(Some("  ")), "info");
        assert_eq!(shown(Some("warn")), "warn");
        assert_eq!(shown(Some("info")), "info");
        for spec in ["debug", "trace", "yeongye_app=trace,debug"] {
            let f = shown(Some(spec));
            assert!(f.contains("async_nats=info"), "{spec}: {f}");
        }
        // Named: the operator asked for it, but never trace (payloads).
        let f = shown(Some("debug,async_nats=debug"));
        assert!(
            f.contains("async_nats=debug") && !f.contains("async_nats=info"),
            "{f}"
        );
        for spec in [
            "debug,async_nats=trace",
            "info,async_nats",
            "async_nats=TRACE",
        ] {
            let f = shown(Some(spec));
            assert!(
                f.contains("async_nats=debug") && !f.contains("trace"),
                "{spec}: {f}"
            );
        }
        let f = shown(Some("info,async_nats::connector=debug"));
        assert!(!f.contains("async_nats=info"), "{f}");
        // Never raised: no global level, or one below the cap.
        assert_eq!(shown(Some("yeongye_app=debug")), "yeongye_app=debug");
        assert_eq!(shown(Some("error")), "error");
    }

    #[test]
    fn a_value_not_understood_falls_back_with_a_warning() {
        let (f, warning) = filter(Some("info,yeongye=notalevel"));
        assert_eq!(f.to_string(), "info");
        assert!(warning.is_some_and(|w| w.contains("RUST_LOG")));
        assert!(filter(Some("debug")).1.is_none());
    }
}
