//! The load driver shared by the raw JetStream baseline and the end-to-end run: offers work
//! either open-loop at a fixed rate or closed-loop with a window of items in flight, tracks
//! each item from its send to its completion, and measures throughput and latency (HDR
//! histogram) over a window after a warm-up, with a progress bar.
//!
//! Latency is measured from the moment an item was *due* to be sent (open loop) or was sent
//! (closed loop) to the moment its completion was seen, so a stalled sender cannot hide delay
//! (no coordinated omission).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;

/// How work is offered.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Offer {
    /// As fast as completions allow, with at most this many items in flight.
    Closed { window: usize },
    /// This many items per second, whatever happens to them.
    Open { rate: f64 },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) offer: Offer,
    pub(crate) warmup: Duration,
    pub(crate) measure: Duration,
    /// How long to wait after the measurement for items still in flight.
    pub(crate) drain: Duration,
}

/// What one phase measured.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct PhaseResult {
    pub(crate) name: String,
    pub(crate) offer: Offer,
    pub(crate) measure_secs: f64,
    /// Items offered in the whole phase (warm-up included).
    pub(crate) sent: u64,
    /// Items completed in the whole phase (drain included).
    pub(crate) completed: u64,
    /// Completions per second inside the measurement window.
    pub(crate) throughput: f64,
    /// Latency of the items sent inside the measurement window, milliseconds.
    pub(crate) latency_ms: Latency,
    /// Sends that failed.
    pub(crate) errors: u64,
    /// Items still in flight when the drain gave up.
    pub(crate) lost: u64,
    /// Completions seen for items not in flight (repeats, or late ones of an earlier phase).
    pub(crate) unexpected: u64,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Latency {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Items in flight and what has been seen of them. The completion side (a consumer, a tap)
/// calls [`Tracker::complete`].
pub(crate) struct Tracker {
    pending: Mutex<HashMap<String, Instant>>,
    hist: Mutex<Histogram<u64>>,
    permits: Semaphore,
    closed_loop: AtomicBool,
    /// Measurement window, as offsets from `epoch` in microseconds (0: not yet).
    window_start: AtomicU64,
    window_end: AtomicU64,
    epoch: Instant,
    sent: AtomicU64,
    completed: AtomicU64,
    in_window: AtomicU64,
    errors: AtomicU64,
    unknown: AtomicU64,
    /// Watch for the first completion of an item due at or after this offset (µs from
    /// `epoch`; `u64::MAX`: not watching), and the offset of that completion (0: none yet).
    watch_from: AtomicU64,
    first_after: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tracker {
    pub(crate) fn new() -> Result<Arc<Tracker>> {
        Ok(Arc::new(Tracker {
            pending: Mutex::new(HashMap::new()),
            // 1 µs to 10 minutes, 3 significant digits.
            hist: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
            permits: Semaphore::new(0),
            closed_loop: AtomicBool::new(false),
            window_start: AtomicU64::new(0),
            window_end: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            sent: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            watch_from: AtomicU64::new(u64::MAX),
            first_after: AtomicU64::new(0),
        }))
    }

    fn offset(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    fn in_window(&self, t: Instant) -> bool {
        let o = self.offset(t);
        let start = self.window_start.load(Ordering::Relaxed);
        start != 0 && o >= start && o <= self.window_end.load(Ordering::Relaxed)
    }

    /// Starts tracking `key`, due at `due`.
    fn begin(&self, key: String, due: Instant) {
        lock(&self.pending).insert(key, due);
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// The send of `key` failed: it will never complete.
    fn failed(&self, key: &str) {
        lock(&self.pending).remove(key);
        self.errors.fetch_add(1, Ordering::Relaxed);
        if self.closed_loop.load(Ordering::Relaxed) {
            self.permits.add_permits(1);
        }
    }

    /// `key` completed now. Unknown keys (a repeat, or from another phase) are counted apart.
    pub(crate) fn complete(&self, key: &str) {
        let now = Instant::now();
        let Some(due) = lock(&self.pending).remove(key) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.completed.fetch_add(1, Ordering::Relaxed);
        if self.offset(due) >= self.watch_from.load(Ordering::Relaxed) {
            let _ = self.first_after.compare_exchange(
                0,
                self.offset(now).max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if self.in_window(now) {
            self.in_window.fetch_add(1, Ordering::Relaxed);
        }
        if self.in_window(due) {
            let us = u64::try_from(now.saturating_duration_since(due).as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            let _ = lock(&self.hist).record(us.min(600_000_000));
        }
        if self.closed_loop.load(Ordering::Relaxed) {
            self.permits.add_permits(1);
        }
    }

    /// From now on, notes the first completion of an item due at or after `t`
    /// ([`Tracker::first_completion_after`]).
    pub(crate) fn watch_from(&self, t: Instant) {
        self.first_after.store(0, Ordering::Relaxed);
        self.watch_from
            .store(self.offset(t).max(1), Ordering::Relaxed);
    }

    /// Stops watching.
    pub(crate) fn unwatch(&self) {
        self.watch_from.store(u64::MAX, Ordering::Relaxed);
        self.first_after.store(0, Ordering::Relaxed);
    }

    /// When the first item due at or after the watched instant completed, if one did.
    pub(crate) fn first_completion_after(&self) -> Option<Instant> {
        let us = self.first_after.load(Ordering::Relaxed);
        (us != 0).then(|| self.epoch + Duration::from_micros(us))
    }

    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.pending).len()
    }
}

/// Sends one item: returns its key (what [`Tracker::complete`] will be called with) and the
/// future that sends it.
pub(crate) type SendFn =
    dyn Fn(u64) -> Result<(String, Pin<Box<dyn Future<Output = Result<()>> + Send>>)> + Send + Sync;

/// Runs one phase: warm-up, measurement, drain.
pub(crate) async fn run(
    name: &str,
    tracker: &Arc<Tracker>,
    plan: Plan,
    send: Arc<SendFn>,
) -> Result<PhaseResult> {
    let closed = matches!(plan.offer, Offer::Closed { .. });
    tracker.closed_loop.store(closed, Ordering::Relaxed);
    if let Offer::Closed { window } = plan.offer {
        tracker.permits.add_permits(window);
    }
    let total = plan.warmup + plan.measure;
    let bar = ProgressBar::new(total.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos:>3}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_owned());

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let offer = {
        let tracker = Arc::clone(tracker);
        let stop = Arc::clone(&stop);
        let send = Arc::clone(&send);
        tokio::spawn(async move { offer_loop(plan.offer, &tracker, &stop, &send, start).await })
    };

    let mut last = (Instant::now(), 0u64);
    let mut measuring = false;
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if !measuring && start.elapsed() >= plan.warmup {
            measuring = true;
            tracker
                .window_start
                .store(tracker.offset(Instant::now()).max(1), Ordering::Relaxed);
        }
        let done = tracker.completed.load(Ordering::Relaxed);
        let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        last = (Instant::now(), done);
        bar.set_position(start.elapsed().as_secs());
        bar.set_message(format!(
            "{}sent {} done {} in flight {} ({rate:.0}/s)",
            if measuring { "" } else { "warm-up: " },
            tracker.sent.load(Ordering::Relaxed),
            done,
            tracker.in_flight(),
        ));
        if offer.is_finished() {
            break;
        }
    }
    let window_end = Instant::now();
    tracker
        .window_end
        .store(tracker.offset(window_end), Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    if offer.is_finished() {
        offer.await??;
        bail!("{name}: the sender stopped early");
    }
    offer.await??;
    let measured = tracker
        .window_end
        .load(Ordering::Relaxed)
        .saturating_sub(tracker.window_start.load(Ordering::Relaxed)) as f64
        / 1e6;

    // Drain what is still in flight.
    let drain_start = Instant::now();
    while tracker.in_flight() > 0 && drain_start.elapsed() < plan.drain {
        bar.set_message(format!("draining: {} in flight", tracker.in_flight()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    let lost = {
        let mut pending = lock(&tracker.pending);
        let n = pending.len() as u64;
        pending.clear();
        n
    };
    let latency = {
        let mut h = lock(&tracker.hist);
        let l = Latency::of(&h);
        h.reset();
        l
    };
    // Leave the tracker ready for the next phase.
    tracker.closed_loop.store(false, Ordering::Relaxed);
    let _ = tracker.permits.forget_permits(usize::MAX);
    tracker.window_start.store(0, Ordering::Relaxed);
    tracker.window_end.store(u64::MAX, Ordering::Relaxed);
    let result = PhaseResult {
        name: name.to_owned(),
        offer: plan.offer,
        measure_secs: measured,
        sent: tracker.sent.swap(0, Ordering::Relaxed),
        completed: tracker.completed.swap(0, Ordering::Relaxed),
        throughput: tracker.in_window.swap(0, Ordering::Relaxed) as f64 / measured.max(1e-3),
        latency_ms: latency,
        errors: tracker.errors.swap(0, Ordering::Relaxed),
        lost,
        unexpected: tracker.unknown.swap(0, Ordering::Relaxed),
    };
    eprintln!(
        "{name}: {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms ({} sent, {} done, {} errors, {} lost)",
        result.throughput,
        result.latency_ms.p50,
        result.latency_ms.p99,
        result.latency_ms.p999,
        result.sent,
        result.completed,
        result.errors,
        result.lost
    );
    Ok(result)
}

async fn offer_loop(
    offer: Offer,
    tracker: &Arc<Tracker>,
    stop: &AtomicBool,
    send: &Arc<SendFn>,
    start: Instant,
) -> Result<()> {
    let mut n = 0u64;
    let launch = |n: u64, due: Instant| -> Result<()> {
        let (key, fut) = send(n)?;
        tracker.begin(key.clone(), due);
        let tracker = Arc::clone(tracker);
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                if tracker.errors.load(Ordering::Relaxed) < 3 {
                    eprintln!("send failed: {e:#}");
                }
                tracker.failed(&key);
            }
        });
        Ok(())
    };
    match offer {
        Offer::Closed { .. } => {
            while !stop.load(Ordering::Relaxed) {
                let permit = tokio::select! {
                    p = tracker.permits.acquire() => p?,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                };
                permit.forget();
                launch(n, Instant::now())?;
                n += 1;
            }
        }
        Offer::Open { rate } => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                // Everything due by now goes out, each stamped with when it was due.
                loop {
                    let due = start + interval.mul_f64(n as f64);
                    if due > now {
                        break;
                    }
                    launch(n, due)?;
                    n += 1;
                }
                let next = start + interval.mul_f64(n as f64);
                tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
            }
        }
    }
    Ok(())
}
