//! What the broker's and the adapter's sled stores share: telling a held lock on a store
//! directory apart from every other open failure, and opening again while that lock lasts.
//!
//! sled 0.34 takes an exclusive `flock` on `<dir>/db` when it opens a database and reports a
//! lock held elsewhere as `sled::Error::Io(e)` with `e.kind() == ErrorKind::Other` and a message
//! "could not acquire lock on ...". It releases the lock a moment *after* the last handle is
//! dropped (its background threads let go last), so a process that closes and reopens a store
//! — the broker's snapshot reopen, any test that reopens — must wait for that moment, while
//! another process holding the store must be reported as such ([`is_lock_error`]).
//!
//! [`is_lock_error`] is the one place that recognises the lock error: the variant, the kind and
//! the message, all three, so that an I/O failure of another kind or with another message is
//! never mistaken for it (and never retried).
//!
//! sled also reads — and for a new store writes, in two writes — its `conf` file *before* it
//! takes that lock, so two processes opening a new store at once could read each other's
//! half-written `conf` and fail with "crc for settings file failed" (seen once in CI: an
//! adapter's first start beside its own command line). [`open_serialized`] runs an open under
//! a lock of ours on `<dir>/open.lock`, so that no open reads `conf` while another writes it.

use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant};

/// The file [`open_serialized`] locks, in the store's directory.
pub const OPEN_LOCK: &str = "open.lock";

/// The start of the message sled 0.34 gives a held lock (`sled::config`, `try_lock`).
pub const LOCK_MESSAGE: &str = "could not acquire lock";

/// How long [`retry_while_locked`] sleeps between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// Whether `e` is sled's report that another handle (this process's or another's) holds the
/// store directory's lock.
pub fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == ErrorKind::Other && io.to_string().contains(LOCK_MESSAGE)
        }
        _ => false,
    }
}

/// An error that may be sled's held-lock error, possibly wrapped (a crate's own error type
/// holding a `sled::Error`).
pub trait LockError {
    /// Whether this is (or wraps) sled's held-lock error: see [`is_lock_error`].
    fn is_lock_error(&self) -> bool;
}

impl LockError for sled::Error {
    fn is_lock_error(&self) -> bool {
        is_lock_error(self)
    }
}

/// Calls `open` again while it fails with the held-lock error, for at most `wait`; returns its
/// first success, its first other error, or the lock error once `wait` is over. Blocks the
/// thread (it sleeps between attempts): call it where blocking is allowed.
pub fn retry_while_locked<T, E: LockError>(
    wait: Duration,
    open: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    retry_while(wait, E::is_lock_error, open)
}

/// [`retry_while_locked`] with the test for the lock error given: for callers whose error type
/// cannot implement [`LockError`] (a generic `E`), which must still recognise it through
/// [`is_lock_error`] or [`LOCK_MESSAGE`].
pub fn retry_while<T, E>(
    wait: Duration,
    locked: impl Fn(&E) -> bool,
    mut open: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + wait;
    loop {
        match open() {
            Err(e) if locked(&e) && Instant::now() < deadline => std::thread::sleep(RETRY_EVERY),
            done => return done,
        }
    }
}

/// How long [`open_serialized`] waits for another open of the same store to end (an open
/// takes a second or two at most, even of a large store).
const OPEN_WAIT: Duration = Duration::from_secs(60);

/// Runs `open` (sled's open of the store in `dir`) holding an exclusive lock on
/// `<dir>/open.lock`, creating `dir` if need be: another process's open waits until this one
/// returns (for at most a minute: then an error that says so). Only the open is serialized;
/// the store's own lock (sled's, on `db`) then tells a second opener that the store is in use.
/// Blocks the thread.
pub fn open_serialized<T, E: From<std::io::Error>>(
    dir: &Path,
    open: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    open_serialized_within(dir, OPEN_WAIT, open)
}

fn open_serialized_within<T, E: From<std::io::Error>>(
    dir: &Path,
    wait: Duration,
    open: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(OPEN_LOCK);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // The same wait as for sled's own lock: polled, for at most `wait`.
    let waited = retry_while(
        wait,
        |e| matches!(e, std::fs::TryLockError::WouldBlock),
        || lock.try_lock(),
    );
    match waited {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(std::io::Error::other(format!(
                "{} is held by another process for over {} s: is it stuck opening this store?",
                path.display(),
                wait.as_secs()
            ))
            .into());
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
    }
    let opened = open();
    // Closing the file releases the lock.
    drop(lock);
    opened
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn a_second_open_of_the_same_directory_is_the_lock_error() {
        let dir = tempfile::tempdir().unwrap();
        let _first = sled::open(dir.path()).unwrap();
        let e = sled::open(dir.path()).expect_err("the directory is locked");
        assert!(is_lock_error(&e), "{e:?}");
        assert!(e.is_lock_error());
    }

    #[test]
    fn other_errors_are_not_the_lock_error() {
        let other_kind = sled::Error::Io(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!("{LOCK_MESSAGE} on /x"),
        ));
        let other_text = sled::Error::Io(std::io::Error::other("disk full"));
        let not_io = sled::Error::Unsupported(LOCK_MESSAGE.into());
        for e in [other_kind, other_text, not_io] {
            assert!(!is_lock_error(&e), "{e:?}");
        }
    }

    #[test]
    fn retries_until_the_lock_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = std::cell::RefCell::new(Some(sled::open(dir.path()).unwrap()));
        let (attempts, locked) = (Cell::new(0), Cell::new(0));
        let db = retry_while_locked(Duration::from_secs(10), || {
            attempts.set(attempts.get() + 1);
            let r = sled::open(dir.path());
            if r.as_ref().is_err_and(is_lock_error) {
                locked.set(locked.get() + 1);
                // Closing the first handle frees the lock (a moment later).
                first.borrow_mut().take();
            }
            r
        });
        assert!(db.is_ok(), "{:?}", db.err());
        assert!(locked.get() >= 1, "the first attempt met the lock");
        assert_eq!(attempts.get(), locked.get() + 1);
    }

    #[test]
    fn another_error_is_not_retried() {
        let attempts = Cell::new(0);
        let r: Result<(), sled::Error> = retry_while_locked(Duration::from_secs(10), || {
            attempts.set(attempts.get() + 1);
            Err(sled::Error::Io(std::io::Error::other("disk full")))
        });
        assert!(r.is_err());
        assert_eq!(attempts.get(), 1);
    }

    #[test]
    fn serialized_opens_of_one_directory_never_overlap_and_open_the_store() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("new-store");
        let (inside, overlaps, opened) = (
            AtomicBool::new(false),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        let db = retry_while_locked(Duration::from_secs(30), || {
                            open_serialized(&store, || {
                                if inside.swap(true, Ordering::SeqCst) {
                                    overlaps.fetch_add(1, Ordering::SeqCst);
                                }
                                // Long enough that an unserialized second open would overlap.
                                std::thread::sleep(Duration::from_millis(20));
                                let db = sled::open(&store);
                                inside.store(false, Ordering::SeqCst);
                                db
                            })
                        })
                        .unwrap();
                        opened.fetch_add(1, Ordering::SeqCst);
                        drop(db);
                    }
                });
            }
        });
        assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two opens ran at once");
        assert_eq!(opened.load(Ordering::SeqCst), 20);
        assert!(store.join(OPEN_LOCK).is_file());
    }

    #[test]
    fn an_open_lock_held_too_long_is_an_error_that_names_it_and_opens_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        let held = std::fs::File::create(dir.path().join(OPEN_LOCK)).unwrap();
        held.lock().unwrap();
        let opened = Cell::new(false);
        let r: Result<(), std::io::Error> =
            open_serialized_within(dir.path(), Duration::from_millis(100), || {
                opened.set(true);
                Ok(())
            });
        let e = r.expect_err("the lock is held");
        assert!(e.to_string().contains(OPEN_LOCK), "{e}");
        assert!(!opened.get());
        drop(held);
        open_serialized_within(dir.path(), Duration::from_millis(100), || {
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
    }

    #[test]
    fn a_lock_that_lasts_is_reported_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let _held = sled::open(dir.path()).unwrap();
        let attempts = Cell::new(0);
        let r = retry_while_locked(Duration::from_millis(100), || {
            attempts.set(attempts.get() + 1);
            sled::open(dir.path())
        });
        assert!(r.as_ref().is_err_and(is_lock_error), "{:?}", r.err());
        assert!(attempts.get() > 1, "retried while locked");
    }
}
