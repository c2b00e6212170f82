//! The only place the broker reads the wall clock. Everything else takes time as an argument.

use crate::referral::Millis;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> Millis {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
