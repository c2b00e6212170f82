//! The broker's allocator: mimalloc (glibc's malloc took about an eighth of the broker's CPU
//! under load: sled allocates and frees per write, the NATS client per message), and one
//! setting of it, held while the broker reads its store in bulk: freed memory goes back to the
//! system at once ([`purge_at_once`]).
//!
//! Why: mimalloc (v3, as the `mimalloc` crate builds it) keeps memory it freed for
//! `purge_delay` (1,000 ms) before handing it back, and checks that age only when the thread
//! that freed it next allocates. A bulk read of the store (a snapshot of a million referrals:
//! 2.3 GB through sled's page cache in ~25 s, on a blocking thread that then goes idle) frees
//! pages as fast as it reads them, so the broker's resident memory carried tens of MB of freed
//! pages: its peak through a first start on the bench's million-referral store was 229-287 MB
//! in five runs, against 186-205 MB with a delay of 0 (issue 17; docs/PERFORMANCE.md).
//! Not always 0: a system call per emptied span cost the broker ~11% more CPU per referral at
//! its maximum rate (0.565 → 0.630 ms, `yeongye-bench --sync default --recipients wire`), so
//! the delay is 0 only while a bulk read holds a [`PurgeAtOnce`].
//!
//! This crate is the workspace's only `unsafe` code: calls through mimalloc's C API, which no
//! safe wrapper exposes.

use std::ffi::c_long;
use std::sync::Mutex;

pub use mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, enum `mi_option_e`: the same index in
/// v2 and v3; `libmimalloc-sys` 0.1.49 exports no constant for it). A test checks that the
/// index still holds v3's default for this option.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Guards held, and the delay to put back when the last one goes.
static HELD: Mutex<(usize, c_long)> = Mutex::new((0, 0));

/// While held (by any thread), memory freed goes back to the system when it is freed. Take one
/// around a bulk read of the store; guards nest.
#[must_use = "the setting lasts only while the guard is held"]
pub struct PurgeAtOnce(());

pub fn purge_at_once() -> PurgeAtOnce {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    if held.0 == 0 {
        held.1 = purge_delay_ms();
        set_purge_delay(0);
    }
    held.0 += 1;
    PurgeAtOnce(())
}

impl Drop for PurgeAtOnce {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        held.0 = held.0.saturating_sub(1);
        if held.0 == 0 {
            set_purge_delay(held.1);
        }
    }
}

/// The purge delay in force, milliseconds (mimalloc reads it at each decision to purge).
fn purge_delay_ms() -> c_long {
    #[allow(unsafe_code)]
    // SAFETY: `mi_option_get` takes an option index, has no other precondition, and only
    // reads the option (an index out of range is checked against `_mi_option_last`).
    unsafe {
        libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY)
    }
}

fn set_purge_delay(ms: c_long) {
    #[allow(unsafe_code)]
    // SAFETY: `mi_option_set` takes an option index and a value and has no other
    // preconditions (an index out of range is ignored); the value is a plain `long` that
    // mimalloc reads at each decision to purge.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static ALLOCATOR: MiMalloc = MiMalloc;

    #[test]
    fn the_index_is_the_purge_delay_and_guards_set_it_to_zero_while_held() {
        // Tests run without MIMALLOC_PURGE_DELAY: the value is mimalloc v3's default for
        // `purge_delay`, so a renumbered enum (or a v2 build, default 10) shows here.
        assert_eq!(
            std::env::var_os("MIMALLOC_PURGE_DELAY"),
            None,
            "run the tests without MIMALLOC_PURGE_DELAY"
        );
        assert_eq!(purge_delay_ms(), 1000);
        let outer = purge_at_once();
        assert_eq!(purge_delay_ms(), 0);
        let inner = std::thread::spawn(purge_at_once).join().expect("thread");
        drop(outer);
        assert_eq!(purge_delay_ms(), 0, "another guard is still held");
        drop(inner);
        assert_eq!(purge_delay_ms(), 1000);
    }
}
