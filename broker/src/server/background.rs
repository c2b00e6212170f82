//! The event loop's background work, done in bounded steps between turns: forgetting applied
//! message ids past `dedup_retention_days` ([`Store::prune_seen_step`], a few hundred of the
//! store's buckets of them a step).
//!
//! Why steps: a broker back after weeks away has weeks of ids to forget at its first prune.
//! Done at once, that held the loop (and every referral behind it) for as long as it took, and
//! sled's memory grew with the size of the job. A step is one small sled batch; the
//! loop takes one after a turn once the pause since the last one has passed (and an idle loop
//! wakes for it), so a backlog goes at a steady pace whatever the load, interleaved with the
//! referrals. The pace is for memory: a prune's cost follows its rate of removals (sled frees
//! the copy of a leaf each removal makes by epoch), not how much is left. Every step is timed into [`Ops::background`] (`/metrics`:
//! `yeongye_background_step_seconds_max`).

use std::time::{Duration, Instant};

use crate::clock;
use crate::ops::{Ops, Task};
use crate::referral::Millis;
use crate::store::Store;

pub(crate) struct Background {
    /// How often a prune starts.
    every: Duration,
    /// What a step reads at most ([`Store::prune_seen_step`]'s budget).
    budget: usize,
    /// Least time from the end of one step to the start of the next, busy or idle.
    pause: Duration,
    /// When the last step ended.
    last_step: Option<Instant>,
    /// When the last prune started (None: never, so one starts at once).
    last_start: Option<Instant>,
    prune: Option<Prune>,
}

/// A prune under way.
struct Prune {
    before: Millis,
    forgotten: usize,
    steps: u64,
    longest: Duration,
    started: Instant,
}

impl Background {
    pub(crate) fn new(every: Duration, budget: usize, pause: Duration) -> Background {
        Background {
            every,
            budget,
            pause,
            last_step: None,
            last_start: None,
            prune: None,
        }
    }

    /// Whether work is waiting: an idle loop then wakes for its next step ([`Self::wait`]).
    pub(crate) fn busy(&self) -> bool {
        self.prune.is_some()
    }

    /// How long until the next step may start.
    pub(crate) fn wait(&self) -> Duration {
        self.last_step
            .map_or(Duration::ZERO, |t| self.pause.saturating_sub(t.elapsed()))
    }

    /// Takes one bounded step of whatever is due (starting a prune of the ids applied more
    /// than `retention` ago if it is time), unless the last one ended less than the pause
    /// ago: steps are paced in time, so a busy loop (a turn every millisecond) does not run
    /// them back to back. Failures are logged, and the prune is tried again at its next time.
    pub(crate) fn step(&mut self, store: &dyn Store, ops: &Ops, retention: Duration) {
        if !self.wait().is_zero() {
            return;
        }
        if self.prune.is_none() && self.last_start.is_none_or(|t| t.elapsed() >= self.every) {
            self.last_start = Some(Instant::now());
            let keep = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
            self.prune = Some(Prune {
                before: clock::now_ms().saturating_sub(keep),
                forgotten: 0,
                steps: 0,
                longest: Duration::ZERO,
                started: Instant::now(),
            });
            ops.background
                .pruning
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(prune) = &mut self.prune else {
            return;
        };
        let started = Instant::now();
        let result = store.prune_seen_step(prune.before, self.budget);
        let took = started.elapsed();
        self.last_step = Some(Instant::now());
        ops.background.record(Task::Prune, took);
        prune.steps += 1;
        prune.longest = prune.longest.max(took);
        match result {
            Ok(step) => {
                prune.forgotten += step.forgotten;
                if step.done {
                    if prune.forgotten > 0 {
                        tracing::info!(
                            forgotten = prune.forgotten,
                            steps = prune.steps,
                            longest_step_ms = clock::ms(prune.longest),
                            took_ms = clock::ms(prune.started.elapsed()),
                            "pruned applied message ids past retention"
                        );
                    }
                    self.finish(ops);
                }
            }
            Err(e) => {
                tracing::warn!(cause = %e, forgotten = prune.forgotten, "pruning applied message ids failed");
                self.finish(ops);
            }
        }
    }

    fn finish(&mut self, ops: &Ops) {
        self.prune = None;
        ops.background
            .pruning
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
