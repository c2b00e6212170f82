//! What the process wrappers share: spawning with output to a log file, signals, exit waits, log
//! tails and free ports.
//!
//! Signals other than SIGKILL go through the `kill` command, since the workspace forbids unsafe
//! code (and so `libc::kill`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Opens `path` for appending (creating it): each restart of a process adds to the same log.
/// Writes a secret file (token, webhook secret) readable by its owner only, replacing any
/// earlier one: the binaries refuse secret files that others may read.
pub fn write_secret(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    yeongye_proto::credentials::write_private(path, bytes)
        .unwrap_or_else(|e| panic!("write secret {}: {e}", path.display()));
}

pub fn append_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log {}: {e}", path.display()))
}

/// Sends stdout and stderr of `cmd` to the log at `log` and spawns it.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = append_log(log);
    let err = out.try_clone().expect("clone log file handle");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"))
}

/// The last `max` bytes of a log file (lossy UTF-8), for panic messages.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    format!(
        "--- last {} bytes of {} ---\n{}",
        bytes.len(),
        path.display(),
        String::from_utf8_lossy(&bytes)
    )
}

/// Sends a signal (`TERM`, `INT`, `STOP`, `CONT`, ...) to a process by pid.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill -{name} {pid}: {e}"));
    assert!(status.success(), "kill -{name} {pid} failed: {status}");
}

/// SIGKILL, then reap. A process that is already gone is fine.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `timeout` for the process to exit; `None` if it is still running.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return None,
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

/// Whether the process has exited, and how (without waiting).
pub fn exited(child: &mut Child) -> Option<ExitStatus> {
    child.try_wait().ok().flatten()
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a process to listen on.
///
/// Taken below the kernel's ephemeral range, never twice in one test process. A port from the
/// ephemeral range (what binding port 0 gives) can be taken, between this call and the
/// process's own bind or between two starts of it, by any outgoing connection: a client's, or a
/// route between nats-servers. CI saw a broker refuse to start on "Address already in use".
/// Below that range, only a listener that names the port can take it. Each test process starts
/// at its own offset (from its pid), so two runs on one machine rarely meet, and each port is
/// bound once here to skip those in use.
pub fn free_port() -> u16 {
    try_free_port().unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// [`free_port`], for callers that report errors rather than panic.
pub fn try_free_port() -> std::io::Result<u16> {
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicU32;
    static NEXT: OnceLock<(u32, u32, AtomicU32)> = OnceLock::new();
    let (low, span, next) = NEXT.get_or_init(|| {
        let low = 10_000;
        let high = ephemeral_low().unwrap_or(32_768).max(low + 1_000);
        let span = high - low;
        (
            low,
            span,
            AtomicU32::new(std::process::id().wrapping_mul(7_919) % span),
        )
    });
    match next_free(*low, *span, next) {
        Some(port) => Ok(port),
        // Every port below the ephemeral range is in use: fall back to the kernel's choice.
        None => Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()),
    }
}

/// The next port in `low..low + span` (cycling from `next`) that can be bound now.
fn next_free(low: u32, span: u32, next: &std::sync::atomic::AtomicU32) -> Option<u16> {
    for _ in 0..span {
        let offset = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % span;
        let Ok(port) = u16::try_from(low + offset) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Some(port);
        }
    }
    None
}

/// The first port of the kernel's ephemeral range (Linux), if it can be read.
fn ephemeral_low() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// [`wait_exit`] without blocking the async runtime.
pub async fn wait_exit_async(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(None) => return None,
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let low = ephemeral_low().unwrap_or(32_768);
        let ports: Vec<u16> = (0..64).map(|_| free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "a port handed out twice: {ports:?}"
        );
        for port in ports {
            assert!(
                u32::from(port) < low,
                "port {port} is in the ephemeral range from {low}"
            );
            TcpListener::bind(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("port {port} was handed out but is not free: {e}"));
        }
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let held = free_port();
        let holder = TcpListener::bind(("127.0.0.1", held)).expect("bind the held port");
        let next = std::sync::atomic::AtomicU32::new(0);
        assert_eq!(
            next_free(u32::from(held), 1, &next),
            None,
            "a held port was handed out"
        );
        drop(holder);
        assert_eq!(
            next_free(u32::from(held), 1, &next),
            Some(held),
            "a free port was skipped"
        );
    }
}
