//! What the event loop shares with the operators' side (HTTP, metrics): the [`View`], health
//! signals and the latency histogram. The event loop writes, after each commit; HTTP reads.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use prometheus_client::metrics::histogram::Histogram;

use crate::referral::Millis;
use crate::registry::Registry;
use crate::store::Store;
use crate::view::View;

pub struct Ops {
    store: Arc<dyn Store>,
    view: RwLock<View>,
    registry: RwLock<Arc<Registry>>,
    /// When the event loop last completed a turn (clock ms).
    pub last_turn: AtomicI64,
    /// Inbound messages the broker's consumer has not yet been given (from the last message).
    pub backlog: AtomicU64,
    /// Whether the last store commit succeeded.
    pub store_ok: AtomicBool,
    /// Outbox entries not yet acknowledged by the stream.
    pub outbox: AtomicU64,
    /// Seconds from an inbound message's arrival in the stream to its commit in the store.
    pub commit_latency: Histogram,
    /// Queries not answered because their reply subject was not the asker's inbox.
    pub queries_refused: AtomicU64,
    /// Turns the event loop completed since start (an idle loop turns every tick; each turn
    /// fires the deadlines due once the inbound backlog is read): what tests wait on instead of
    /// sleeping.
    pub turns: AtomicU64,
    /// Whether the status/consent query responder is running (false once it stopped, for
    /// whatever reason: `/readyz` then says not ready instead of the death showing only at
    /// shutdown).
    pub queries_alive: AtomicBool,
    /// The event loop's background work (pruning, the store's reopen): steps and the longest.
    pub background: BackgroundStats,
    /// The broker's streams as NATS last reported them (replicas, leader), every few seconds.
    pub streams: RwLock<Vec<StreamHealth>>,
    /// This broker in its group: who leads, where it is in the state log.
    cluster: RwLock<ClusterState>,
    /// A digest of the whole store is being read (`/api/v1/digest`: one at a time).
    pub digesting: AtomicBool,
}

/// This broker as a member of its group (`cluster`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// This broker's name.
    pub me: String,
    /// Whether this broker leads (consumes, decides, publishes).
    pub leading: bool,
    /// The leader as the state log last named it.
    pub leader: Option<String>,
    /// The term of that leader (the lease revision it took).
    pub term: u64,
    /// The state-log sequence this broker's store has applied.
    pub position: u64,
    /// The state log's last sequence, as last read.
    pub log_last: u64,
    /// Times this broker took the lead since it started.
    pub takeovers: u64,
    /// The state-log position of the newest snapshot this broker knows stored (None: none; a
    /// group whose first leader held state from before the log has one at 0).
    pub snapshot: Option<u64>,
}

impl ClusterState {
    /// How far this broker's store is behind the log.
    pub fn lag(&self) -> u64 {
        self.log_last.saturating_sub(self.position)
    }
}

/// One of the broker's streams as its JetStream cluster reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHealth {
    pub name: String,
    /// Replicas configured (`stream_replicas`).
    pub replicas: usize,
    /// Replicas up to date: the leader and every peer the group calls current.
    pub current: usize,
    /// The server leading the stream's Raft group, if it has one (a single server leads its
    /// own streams).
    pub leader: Option<String>,
}

/// A kind of background work the event loop does between turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Forgetting applied message ids past retention, a bounded step at a time.
    Prune,
    /// The store closing and reopening its database so that sled writes its snapshot (one
    /// step: sled 0.34 cannot do it in parts). Only a standby does it as a step, between the
    /// records it applies; never a leader's loop (a stopped broker does it once, uncounted).
    Reopen,
}

impl Task {
    pub const ALL: [Task; 2] = [Task::Prune, Task::Reopen];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Prune => "prune",
            Task::Reopen => "reopen",
        }
    }
}

/// Per [`Task`]: steps taken since start and the longest one (µs); and whether a prune is
/// under way.
#[derive(Debug, Default)]
pub struct BackgroundStats {
    steps: [AtomicU64; 2],
    longest_us: [AtomicU64; 2],
    /// A prune started and not yet finished.
    pub pruning: AtomicBool,
}

impl BackgroundStats {
    /// Records one step of `task` that held the event loop for `took`.
    pub fn record(&self, task: Task, took: std::time::Duration) {
        let i = task as usize;
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.steps[i].fetch_add(1, Ordering::Relaxed);
        self.longest_us[i].fetch_max(us, Ordering::Relaxed);
    }

    pub fn steps(&self, task: Task) -> u64 {
        self.steps[task as usize].load(Ordering::Relaxed)
    }

    /// The longest step of `task` since start.
    pub fn longest(&self, task: Task) -> std::time::Duration {
        std::time::Duration::from_micros(self.longest_us[task as usize].load(Ordering::Relaxed))
    }
}

impl Ops {
    pub fn new(store: Arc<dyn Store>, view: View, registry: Arc<Registry>) -> Ops {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Ops {
            store,
            view: RwLock::new(view),
            registry: RwLock::new(registry),
            last_turn: AtomicI64::new(0),
            backlog: AtomicU64::new(0),
            store_ok: AtomicBool::new(true),
            outbox: AtomicU64::new(0),
            commit_latency: Histogram::new(buckets),
            queries_refused: AtomicU64::new(0),
            turns: AtomicU64::new(0),
            queries_alive: AtomicBool::new(true),
            background: BackgroundStats::default(),
            streams: RwLock::new(Vec::new()),
            cluster: RwLock::new(ClusterState::default()),
            digesting: AtomicBool::new(false),
        }
    }

    pub fn cluster(&self) -> ClusterState {
        self.cluster
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_cluster(&self, f: impl FnOnce(&mut ClusterState)) {
        f(&mut self.cluster.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// The streams as last reported.
    pub fn streams(&self) -> Vec<StreamHealth> {
        self.streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_streams(&self, streams: Vec<StreamHealth>) {
        *self.streams.write().unwrap_or_else(|p| p.into_inner()) = streams;
    }

    /// For reads only: the event loop is the only writer.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn view(&self) -> RwLockReadGuard<'_, View> {
        // A panic while holding the lock cannot leave the view half-updated in a way that
        // matters more than losing metrics: recover the guard.
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn update_view(&self, f: impl FnOnce(&mut View)) {
        let mut v = self.view.write().unwrap_or_else(|e| e.into_inner());
        f(&mut v);
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_registry(&self, r: Arc<Registry>) {
        *self.registry.write().unwrap_or_else(|e| e.into_inner()) = r;
    }

    pub fn turned(&self, at: Millis) {
        self.last_turn.store(at, Ordering::Relaxed);
    }
}

/// The view of what `store` holds: its stored counters and the summaries of the referrals the
/// view watches, never every referral (with millions stored, reading each would take most of a
/// start and its memory).
pub fn load_view(store: &dyn Store) -> crate::error::Result<View> {
    let mut v = View::start(store.counts()?);
    store.for_each_watched(&mut |summary| v.watch(&summary))?;
    v.add_dead_letters(&store.dead_letters()?);
    Ok(v)
}
