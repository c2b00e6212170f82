//! The only place the broker reads the wall clock. Everything else takes time as an argument.
//!
//! For tests only, `testing_clock_offset_file` names a file holding milliseconds to add to the
//! clock, re-read at every call: a test moves time forward by writing the file, with no sleep.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::referral::Millis;

static OFFSET_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Installs the testing offset file (once per process).
pub fn use_offset_file(path: PathBuf) {
    tracing::warn!(file = %path.display(), "TESTING clock offset file in use: time is not the wall clock");
    let _ = OFFSET_FILE.set(path);
}

fn offset() -> Millis {
    let Some(path) = OFFSET_FILE.get() else {
        return 0;
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<Millis>().ok())
        .unwrap_or(0)
}

/// A duration in whole milliseconds, for logs and metrics (saturating).
pub fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> Millis {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now();
    let wall = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    wall.saturating_add(offset())
}
