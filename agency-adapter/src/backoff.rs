//! The adapter's one retry policy: exponential waits with jitter (the `backon` crate), used by
//! every loop that retries — publishing (`client/publish.rs`), binding and reading the agency's
//! consumer (`incoming.rs`), and the HTTP bridge's webhook and follow-up worker
//! (`http/worker.rs`). Jitter keeps a district's adapters, all cut off by the same outage, from
//! retrying in step when the hub comes back.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Waits that double from `first` up to `max`, each drawn between half and all of its nominal
/// value (so never above `max`).
#[derive(Debug)]
pub(crate) struct Backoff {
    builder: ExponentialBuilder,
    waits: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Backoff {
        let first = first.min(max);
        // backon adds a jitter of up to the wait itself: build from half the bounds.
        let builder = ExponentialBuilder::new()
            .with_min_delay(first / 2)
            .with_max_delay(max / 2)
            .with_jitter()
            .without_max_times();
        Backoff {
            waits: builder.build(),
            builder,
            max,
        }
    }

    /// The wait before the next attempt (the one after is about twice as long, up to `max`).
    pub(crate) fn next_wait(&mut self) -> Duration {
        self.waits.next().unwrap_or(self.max).min(self.max)
    }

    /// Back to the first wait, after a success.
    pub(crate) fn reset(&mut self) {
        self.waits = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_within_bounds_and_resets() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(first, max);
        let waits: Vec<Duration> = (0..12).map(|_| b.next_wait()).collect();
        // Each nominal wait n (100, 200, 400, ... capped at 2 s) is drawn from [n/2, n].
        let mut nominal = first;
        for w in &waits {
            assert!(
                *w >= nominal / 2 && *w <= nominal,
                "{w:?} for {nominal:?}: {waits:?}"
            );
            nominal = (nominal * 2).min(max);
        }
        assert!(waits[11] >= max / 2, "{waits:?}");
        // Jitter: a run of waits at the cap is not all the same.
        let capped: Vec<Duration> = (0..20).map(|_| b.next_wait()).collect();
        assert!(capped.iter().any(|w| *w != capped[0]), "{capped:?}");
        b.reset();
        assert!(b.next_wait() <= first);
        // A first wait above the max is the max.
        let mut small = Backoff::new(Duration::from_secs(1), Duration::from_millis(300));
        assert!(small.next_wait() <= Duration::from_millis(300));
    }
}
