//! Replicated broker state on JetStream: brokers as members of one group, one leading.
//!
//! Every broker — the only one of a single-node install too: one code path — is a [`Member`]:
//! - as a **standby** ([`Member::follow`]) it reads the state log (`log.rs`) and applies each
//!   change set to its own store, and tries now and then to take the lease (`lease.rs`);
//! - having taken it, it **takes over** ([`Member::take_over`]): reads the log to its end,
//!   appends (fenced) a `leader` record, and then leads: the event loop (`server.rs`) appends
//!   each turn's change set to the log before it commits it to the store, publishes or
//!   acknowledges anything;
//! - while leading, [`Member::keep`] renews the lease; if it is lost, or an append is fenced,
//!   the broker stops leading and follows again.
//!
//! JetStream (R3 streams, a KV revision, expected-sequence headers) is the only consensus here:
//! see ARCHITECTURE.md, "Replication".

pub mod lease;
pub mod log;
pub mod snapshot;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::ops::{Ops, Task};
use crate::server::Command;
use crate::store::{ChangeSet, Store};
use lease::{Lease, Leases, Renewal};
use log::{Progress, Record, Tail, Writer};

/// How often a standby refreshes what operators see (the view, the log's length).
const REFRESH: Duration = Duration::from_secs(1);
/// How long a standby waits for the answer to one attempt to take the lease. Unanswered, an
/// attempt waited for the request timeouts, 10-15 s (seen during partitions: the KV's group
/// electing, or the node in between cut off), and a leader's lease that expired meanwhile was
/// taken only after it (once 10.8 s after the leader was cut off). An abandoned attempt that
/// lands after all leaves the lease to nobody until its TTL runs out, then it is taken.
const ATTEMPT_BOUND: Duration = Duration::from_secs(2);
/// How often a broker taking over looks whether its reader still reads (see [`Progress`]).
const TAKE_OVER_POLL: Duration = Duration::from_millis(500);

/// One request at a time to NATS, run beside a loop: [`done`](Self::done) is ready with its
/// answer once it has one (None if it failed to run), and never while none is under way.
/// Dropped, it aborts the request.
struct Beside<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Default for Beside<T> {
    fn default() -> Self {
        Beside(None)
    }
}

impl<T: Send + 'static> Beside<T> {
    fn idle(&self) -> bool {
        self.0.is_none()
    }

    fn start(&mut self, request: impl std::future::Future<Output = T> + Send + 'static) {
        self.0 = Some(tokio::spawn(request));
    }

    /// Cancel-safe: the request goes on if this future is dropped.
    async fn done(&mut self) -> Option<T> {
        let Some(handle) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let answer = handle.await.ok();
        self.0 = None;
        answer
    }
}

impl<T> Drop for Beside<T> {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

/// This broker as a member of its group.
pub struct Member {
    pub name: String,
    js: jetstream::Context,
    store: Arc<dyn Store>,
    ops: Arc<Ops>,
    leases: Leases,
    ttl: Duration,
    pub snapshots: snapshot::Snapshots,
    /// Where a snapshot's temporary file goes (beside the store).
    snapshot_dir: std::path::PathBuf,
    /// How long applied message ids are kept (`dedup_retention_days`): a standby forgets
    /// older ones as the leader does, in the same bounded steps.
    retention: Duration,
    /// `testing_takeover_delay_ms`.
    takeover_delay: Duration,
}

impl Member {
    /// Creates (or updates) the state log, the lease bucket and the snapshot bucket, and
    /// restores an empty store from the newest snapshot.
    pub async fn join(
        js: jetstream::Context,
        cfg: &crate::config::Config,
        store: Arc<dyn Store>,
        ops: Arc<Ops>,
    ) -> Result<Member> {
        let name = cfg.broker_name.as_str();
        let ttl = Duration::from_secs(cfg.lease_ttl_secs);
        let replicas = cfg.stream_replicas;
        let retention = Duration::from_secs(u64::from(cfg.dedup_retention_days) * 24 * 3600);
        let snapshot_dir = cfg.snapshot_dir();
        log::ensure_stream(&js, replicas).await?;
        let leases = Leases::open(&js, name, ttl, replicas).await?;
        let snapshots = snapshot::Snapshots::open(&js, replicas).await?;
        restore_if_empty(&js, store.as_ref(), &snapshots, &snapshot_dir).await?;
        let newest = snapshots.positions().await?.last().copied();
        let (position, last) = (store.state_position()?, log::extent(&js).await?.1);
        if last > position {
            // Nothing lost: a store commits a record without waiting for the disk (the log
            // holds it), so after a crash it may be behind by its last few turns.
            tracing::info!(
                position,
                log_last = last,
                behind = last - position,
                "the store is behind the state log: reading the records after its position back"
            );
        }
        ops.set_cluster(|c| {
            c.snapshot = newest;
            c.me = name.to_owned();
            c.position = store.state_position().unwrap_or(0);
        });
        Ok(Member {
            name: name.to_owned(),
            js,
            store,
            ops,
            leases,
            ttl,
            snapshots,
            snapshot_dir,
            retention,
            takeover_delay: Duration::from_millis(cfg.testing_takeover_delay_ms),
        })
    }

    /// How often a standby tries to take the lease.
    fn attempt_every(&self) -> Duration {
        (self.ttl / 6).max(Duration::from_millis(100))
    }

    /// As a standby: applies the log as it grows, answers operators' commands with who leads,
    /// and returns the lease once this broker takes it (not before `hold_off` has passed), or
    /// None once `token` is cancelled.
    pub async fn follow(
        &self,
        commands: &mut mpsc::Receiver<Command>,
        token: &CancellationToken,
        hold_off: Duration,
    ) -> Result<Option<(Lease, Tail)>> {
        self.ops.set_cluster(|c| c.leading = false);
        let mut tail = Tail::open(&self.js, &self.name, self.store.state_position()?).await?;
        let mut progress = Progress::new(tail.read, Instant::now());
        let mut may_take = Instant::now() + hold_off;
        let mut attempt = tokio::time::interval(self.attempt_every());
        attempt.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The lease and the log's length are asked for beside the loop, never in it: with the
        // KV's group electing or the node in between cut off, an answer takes up to the request
        // timeout (seen: 10 s for each attempt to take the lease, one after another), and a
        // loop waiting on it reads none of the log.
        let mut taking = Beside::default();
        let mut extent = Beside::default();
        let mut changed = true;
        let mut background = crate::server::background::Background::new(
            crate::server::PRUNE_EVERY,
            crate::store::PRUNE_STEP,
            crate::server::BACKGROUND_PAUSE,
        );
        loop {
            tokio::select! {
                // An attempt still under way is dropped (aborted): if its create lands, the
                // lease is nobody's and expires after its TTL.
                _ = token.cancelled() => return Ok(None),
                record = tail.next() => match record? {
                    Some((seq, record)) => {
                        // After a step-down, this broker leaves the lease to the others until
                        // one of them has led (then it may take it again at once).
                        if matches!(&record, Record::Leader { name, .. } if *name != self.name) {
                            may_take = Instant::now();
                        }
                        self.restore_before_the_first_record(seq).await?;
                        self.apply(seq, record)?;
                        changed = true;
                        self.reopen_if_due()?;
                    }
                    None => return Err(Error::Nats("the state log reader ended".into())),
                },
                Some(cmd) = commands.recv() => {
                    let leader = tokio::time::timeout(REFRESH, self.leases.holder()).await;
                    cmd.refuse(&not_leading(leader.ok().flatten().as_deref()));
                }
                _ = refresh.tick() => {
                    self.refresh_view(changed);
                    changed = false;
                    if extent.idle() {
                        let js = self.js.clone();
                        extent.start(async move { log::extent(&js).await });
                    }
                }
                got = extent.done() => match got {
                    Some(Ok((_, last))) => {
                        self.ops.set_cluster(|c| c.log_last = last);
                        if progress.stalled(tail.read, last, Instant::now()) {
                            self.read_again(&mut tail, last).await?;
                        }
                    }
                    Some(Err(e)) => tracing::debug!(cause = %e, "reading the state log's extent"),
                    None => {}
                },
                // Applied ids past retention, forgotten a bounded step at a time (the
                // leader's own rule, so that both keep the same).
                _ = tokio::time::sleep(background.wait()), if background.busy() => {}
                _ = attempt.tick(), if Instant::now() >= may_take && taking.idle() => {
                    let leases = self.leases.clone();
                    taking.start(async move {
                        match tokio::time::timeout(ATTEMPT_BOUND, leases.try_take()).await {
                            Ok(taken) => taken,
                            Err(_) => {
                                tracing::debug!(
                                    bound_ms = crate::clock::ms(ATTEMPT_BOUND),
                                    "an attempt to take the lease had no answer: abandoned"
                                );
                                None
                            }
                        }
                    });
                }
                taken = taking.done() => {
                    if let Some(Some(lease)) = taken {
                        tracing::info!(term = lease.term, "took the lease");
                        return Ok(Some((lease, tail)));
                    }
                }
            }
            // One bounded step when one is due (a prune starts every hour).
            tokio::task::block_in_place(|| {
                background.step(self.store.as_ref(), &self.ops, self.retention)
            });
        }
    }

    /// As a standby, between applied records: once enough was written since the store was
    /// opened, reopens it so that sled writes its recovery snapshot and a start replays little.
    /// Only here: the stall (as long as an open) delays no referral, only this follower, which
    /// then reads on from where it was. A leader's loop never does it.
    fn reopen_if_due(&self) -> Result<()> {
        let started = Instant::now();
        if tokio::task::block_in_place(|| self.store.snapshot_if_due())? {
            self.ops.background.record(Task::Reopen, started.elapsed());
        }
        Ok(())
    }

    /// Before the log's first record, an empty store looks for the snapshot again: the group's
    /// first leader stores one at position 0 before that record if its store held state from
    /// before the log, and this broker may have joined while it was being stored.
    async fn restore_before_the_first_record(&self, seq: u64) -> Result<()> {
        if seq == 1 {
            restore_if_empty(
                &self.js,
                self.store.as_ref(),
                &self.snapshots,
                &self.snapshot_dir,
            )
            .await?;
        }
        Ok(())
    }

    /// Applies one record of the log to the store (a standby's, or a new leader's catching up).
    fn apply(&self, seq: u64, record: Record) -> Result<()> {
        let mut change = match record {
            Record::Change {
                change,
                envelopes_kept,
            } => {
                let mut change = *change;
                if envelopes_kept {
                    log::fill_envelopes(&mut change, self.store.as_ref())?;
                }
                change
            }
            Record::Leader { name, term } => {
                tracing::info!(leader = %name, term, seq, "a broker took the lead");
                self.ops.set_cluster(|c| {
                    c.leader = Some(name);
                    c.term = term;
                });
                ChangeSet::default()
            }
        };
        change.state_seq = Some(seq);
        tokio::task::block_in_place(|| self.store.commit_logged(&change))?;
        self.ops.set_cluster(|c| c.position = seq);
        Ok(())
    }

    /// What operators see of a standby: the view from the store (the log's length comes
    /// with each answer about its extent).
    fn refresh_view(&self, changed: bool) {
        if changed {
            match tokio::task::block_in_place(|| crate::ops::load_view(self.store.as_ref())) {
                Ok(view) => self.ops.update_view(|v| *v = view),
                Err(e) => tracing::warn!(cause = %e, "reading the view from the store"),
            }
        }
    }

    /// A reader that stopped hearing the log while it grew (see [`log::TAIL_STALL`]) is
    /// replaced by a new one from this store's position (a record read in part is read again).
    async fn read_again(&self, tail: &mut Tail, last: u64) -> Result<()> {
        let position = self.store.state_position()?;
        tracing::warn!(
            read = tail.read,
            position,
            log_last = last,
            stalled_ms = crate::clock::ms(log::TAIL_STALL),
            "the state log reader read nothing while the log grew: reading it again from this \
             store's position"
        );
        *tail = Tail::open(&self.js, &self.name, position).await?;
        Ok(())
    }

    /// Having taken the lease (term `term`), which [`Member::keep`] already renews: reads the
    /// log to its end and appends, fenced, this broker's `leader` record. Returns the writer to
    /// lead with, or None if another broker appended first or the lease was lost on the way
    /// (`kept` cancelled); the caller gives the lease back.
    pub async fn take_over(
        &self,
        term: u64,
        mut tail: Tail,
        kept: &CancellationToken,
    ) -> Result<Option<Writer>> {
        let started = Instant::now();
        let last = log::extent(&self.js).await.map(|(_, last)| last)?;
        let mut progress = Progress::new(tail.read, Instant::now());
        // A lease lost on the way ends the reading; the check after the loop says so.
        while tail.read < last && !kept.is_cancelled() {
            // Bounded, so that a reader that stopped hearing the log is noticed; a record read
            // in part when the wait ends stays in `tail` (`next` only awaits whole messages).
            match tokio::time::timeout(TAKE_OVER_POLL, tail.next()).await {
                Ok(Ok(Some((seq, record)))) => {
                    self.restore_before_the_first_record(seq).await?;
                    self.apply(seq, record)?;
                }
                Ok(Ok(None)) => return Err(Error::Nats("the state log reader ended".into())),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    if progress.stalled(tail.read, last, Instant::now()) {
                        self.read_again(&mut tail, last).await?;
                    }
                }
            }
        }
        drop(tail);
        if last == 0 {
            self.snapshot_before_the_log().await?;
        }
        if !self.takeover_delay.is_zero() {
            tracing::warn!(
                delay_ms = crate::clock::ms(self.takeover_delay),
                "TESTING: the takeover waits before its first append"
            );
            tokio::time::sleep(self.takeover_delay).await;
        }
        if kept.is_cancelled() {
            // Catching up outlasted the lease (NATS unreachable for longer than its TTL): another
            // broker may be taking over; the fence would settle it, but there is no need to try.
            tracing::warn!(term, "lost the lease while catching up: following");
            return Ok(None);
        }
        let writer = Writer::new(self.js.clone(), &self.name, term, last);
        let record = Record::Leader {
            name: self.name.clone(),
            term,
        };
        match writer.append(&record).await {
            Ok(seq) => {
                self.apply(seq, record)?;
                self.ops.set_cluster(|c| {
                    c.leading = true;
                    c.log_last = seq;
                });
                tracing::info!(
                    term,
                    seq,
                    caught_up_ms = started.elapsed().as_millis() as u64,
                    "leading"
                );
                Ok(Some(writer))
            }
            Err(Error::Fenced { .. }) => {
                tracing::warn!("another broker appended to the state log first: following");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The group's first leader (the log is empty): if its store holds state from before the
    /// log (a single broker upgraded to a group), that state is in no record, so it goes into a
    /// snapshot at position 0 before the log's first record; a broker on an empty disk starts
    /// from it. Until it is stored this broker does not lead (the lease keeps the others out).
    async fn snapshot_before_the_log(&self) -> Result<()> {
        let position = self.store.state_position()?;
        if position > 0 {
            // The log this store followed was deleted: a new one starts from this store.
            tracing::warn!(
                position,
                "the state log is empty but this store was at a position of it (the log was \
                 deleted): a new log starts from this store"
            );
            tokio::task::block_in_place(|| self.store.restart_state_position())?;
        }
        // Any snapshot stored is of a log that no longer exists (or of an attempt like this one
        // that died before its first append): none may be restored with this log.
        self.snapshots.clear().await?;
        self.ops.set_cluster(|c| {
            c.snapshot = None;
            c.position = 0;
        });
        let store = self.store.clone();
        if tokio::task::block_in_place(|| holds_nothing(store.as_ref()))? {
            return Ok(());
        }
        let started = Instant::now();
        let bytes = snapshot::store_before_the_log(
            &self.snapshots,
            self.store.clone(),
            self.snapshot_dir.clone(),
        )
        .await?;
        self.ops.set_cluster(|c| c.snapshot = Some(0));
        tracing::info!(
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "snapshot stored at position 0: this store holds state from before the state log"
        );
        Ok(())
    }

    /// From the moment the lease is taken (catching up and the group's first snapshot can
    /// outlast its TTL: at a million referrals that snapshot takes ~25 s) and while leading:
    /// renews the lease, on a task of its own (never starved by the event loop's turns), until
    /// `stop` is cancelled (then hands the lease back, to give back) or it is lost (then
    /// cancels `lost`, which stops the loop, and hands back None).
    ///
    /// `stop` is not the loop's token: a SIGTERM stops the loop after the turn in hand, and the
    /// lease must outlive that turn (a debug-build turn under a backlog takes seconds, longer
    /// than the TTL): else a standby takes the lease meanwhile, the turn's append is fenced and
    /// the stopping broker exits with an error. [`Member::give_back`] cancels `stop` once the
    /// loop has returned.
    pub fn keep(
        &self,
        mut lease: Lease,
        stop: CancellationToken,
        lost: CancellationToken,
    ) -> tokio::task::JoinHandle<Option<Lease>> {
        let leases = self.leases.clone();
        let every = self.ttl / 3;
        tokio::spawn(async move {
            let mut renew = tokio::time::interval(every);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            renew.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Some(lease),
                    _ = renew.tick() => match leases.renew(&mut lease).await {
                        Ok(()) => {}
                        Err(Renewal::Lost) => {
                            // Expired while NATS could not be reached (a KV leader election
                            // outlasts the TTL): if no one took it meanwhile, this broker takes
                            // it again and goes on (the state log's fence would have refused
                            // it if another had led).
                            if let Some(again) = leases.try_take().await {
                                tracing::warn!(term = again.term, "the lease had expired; taken again");
                                lease = again;
                                continue;
                            }
                            tracing::warn!(term = lease.term, "lost the lease: stepping down");
                            lost.cancel();
                            return None;
                        }
                        Err(Renewal::Unavailable(cause)) => {
                            tracing::warn!(%cause, "renewing the lease failed; the state log's fence keeps writes safe");
                        }
                    },
                }
            }
        })
    }

    /// Stops [`Member::keep`]'s renewals (cancels its `stop`) and gives the lease back if it
    /// was still held.
    pub async fn give_back(
        &self,
        stop: &CancellationToken,
        keeper: tokio::task::JoinHandle<Option<Lease>>,
    ) {
        stop.cancel();
        if let Some(lease) = keeper.await.unwrap_or(None) {
            self.leases.release(lease).await;
        }
    }
}

/// A store that followed this group's log (position > 0) but stopped before the record the log
/// now starts at (trimmed behind two snapshots while this broker was away) cannot catch up by
/// following. If a snapshot covers the log's start, returns (position, first): the caller moves
/// the store aside ([`move_aside`]) and starts on an empty one, which [`Member::join`] restores
/// from that snapshot. A store at position 0 that holds state (from before the state log) is
/// never moved: that state may be in no record, and [`Member::join`] refuses it as before.
pub async fn behind_the_log(
    js: &jetstream::Context,
    store: &dyn Store,
    replicas: usize,
) -> Result<Option<(u64, u64)>> {
    let position = store.state_position()?;
    if position == 0 {
        return Ok(None);
    }
    log::ensure_stream(js, replicas).await?;
    let (first, _) = log::extent(js).await?;
    if position + 1 >= first {
        return Ok(None);
    }
    let snapshots = snapshot::Snapshots::open(js, replicas).await?;
    let newest = snapshots.positions().await?.last().copied();
    Ok(match newest {
        Some(at) if at + 1 >= first => Some((position, first)),
        _ => None,
    })
}

/// Moves a store directory that fell behind the log to `<dir>.behind` (replacing an earlier
/// one: one stale copy is kept, for whoever wants to look, never more) and returns that path.
pub fn move_aside(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let mut aside = dir.as_os_str().to_owned();
    aside.push(".behind");
    let aside = std::path::PathBuf::from(aside);
    if aside.exists() {
        std::fs::remove_dir_all(&aside)?;
    }
    std::fs::rename(dir, &aside)?;
    Ok(aside)
}

/// A broker on an empty store starts from the newest snapshot (if any), then follows the log
/// from its position. A store that is not empty but behind the log's start (trimmed past it)
/// cannot catch up: that is an error saying what to do.
async fn restore_if_empty(
    js: &jetstream::Context,
    store: &dyn Store,
    snapshots: &snapshot::Snapshots,
    dir: &std::path::Path,
) -> Result<()> {
    let position = store.state_position()?;
    let empty = position == 0 && holds_nothing(store)?;
    let (first, _) = log::extent(js).await?;
    if !empty {
        if position + 1 < first {
            // A store that followed the log is moved aside before this (`behind_the_log`) when
            // a snapshot covers the log's start; this is a store from before the log, or one no
            // snapshot can replace.
            return Err(Error::InvalidConfig(format!(
                "this broker's store is at state-log position {position}, but the log now starts \
                 at {first} (trimmed behind a snapshot) and no stored snapshot replaces it: move \
                 the store directory away and start again once a snapshot is stored"
            )));
        }
        return Ok(());
    }
    let Some((at, mut file)) = snapshots.latest(dir).await? else {
        if first > 1 {
            // Following from an empty store would miss what the trimmed records held.
            return Err(Error::InvalidConfig(format!(
                "the state log starts at {first} (trimmed) and no snapshot is stored: this \
                 empty store cannot catch up; see why the bucket {} is empty",
                snapshot::SNAPSHOT_BUCKET
            )));
        }
        return Ok(());
    };
    let started = Instant::now();
    let bytes = file.metadata()?.len();
    tokio::task::block_in_place(|| {
        snapshot::restore_from(store, &mut std::io::BufReader::new(&mut file), at)
    })?;
    tracing::info!(
        position = at,
        bytes,
        took_ms = started.elapsed().as_millis() as u64,
        "an empty store restored from the newest snapshot"
    );
    Ok(())
}

/// Whether `store` holds nothing at all (a new broker's, or one to restore).
fn holds_nothing(store: &dyn Store) -> Result<bool> {
    // The cheap reads first: a store with anything in it has an audit entry or a checkpoint.
    Ok(store.audit_head()?.0 == 0
        && store.checkpoint()? == 0
        && store.consents()?.is_empty()
        && store.stats()? == crate::store::StoreStats::default())
}

/// What a standby answers an operator's action with: who leads, if anyone.
pub(crate) fn not_leading(leader: Option<&str>) -> String {
    match leader {
        Some(l) => format!("this broker is a standby: the leader is {l}"),
        None => "this broker is a standby and no broker leads right now: try again".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::move_aside;

    #[test]
    fn a_store_moved_aside_keeps_one_copy_and_leaves_the_path_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let aside = dir.path().join("store.behind");
        for round in ["first", "second"] {
            std::fs::create_dir_all(&store).unwrap();
            std::fs::write(store.join("db"), round).unwrap();
            assert_eq!(move_aside(&store).unwrap(), aside);
            assert!(
                !store.exists(),
                "the store's path is free for an empty store"
            );
            // The newest stale copy replaces the earlier one: one is kept, never more.
            assert_eq!(std::fs::read_to_string(aside.join("db")).unwrap(), round);
        }
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1, "nothing but the one copy");
    }

    #[test]
    fn a_copy_aside_that_is_a_symlink_is_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep"), "not the broker's").unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("store.behind")).unwrap();
        move_aside(&store).unwrap();
        assert_eq!(
            std::fs::read_to_string(elsewhere.join("keep")).unwrap(),
            "not the broker's"
        );
        assert!(dir.path().join("store.behind").is_dir());
    }

    #[test]
    fn a_store_that_is_not_there_is_an_error_and_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(move_aside(&dir.path().join("missing")).is_err());
        assert!(!dir.path().join("missing.behind").exists());
    }
}
