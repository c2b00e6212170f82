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

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, let go).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
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
