//! The failover time on a three-node cluster: a second broker (`b`, its own store and HTTP
//! port) joins the leading one (`a`) as a standby; under a steady open-loop load the leader is
//! killed with SIGKILL, and the bench measures
//! - **to leader**: from the kill until the other broker's `GET /api/v1/cluster` says
//!   `"role": "leader"` (polled every 10 ms);
//! - **to flowing**: from the kill until the first referral *due* at or after the kill (open
//!   loop: scheduled to be sent then) reaches `RECEIVED` (its notification, published by the
//!   new leader, seen by the tap). That referral needs both of the new leader's turns (the
//!   referral, then the recipient's receipt), so this is when referrals flow again for a sender.
//!
//! The killed broker is then started again on its store and waits until it says `standby`
//! (and follows the log closely, `/readyz`), so the next round kills the other one.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::e2e::{FailoverPlan, cluster_config};
use crate::load::{self, Offer, Plan, SendFn, Tracker};
use crate::procs::Broker;

/// One kill.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Round {
    /// The broker killed (`a` or `b`).
    pub(crate) killed: String,
    /// Kill → the standby says `leader`, seconds.
    pub(crate) to_leader_secs: f64,
    /// Kill → the first referral due after the kill reached `RECEIVED`, seconds.
    pub(crate) to_flowing_secs: f64,
    /// The killed broker, started again: spawn → `standby` and following closely, seconds.
    pub(crate) restart_to_standby_secs: f64,
    /// The load around the kill (latency of referrals due in the measured window, which
    /// begins at the kill).
    pub(crate) phase: load::PhaseResult,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FailoverResult {
    /// Referrals offered per second during each round.
    pub(crate) rate: f64,
    pub(crate) lease_ttl_secs: u64,
    pub(crate) rounds: Vec<Round>,
    pub(crate) to_leader_median_secs: f64,
    pub(crate) to_leader_max_secs: f64,
    pub(crate) to_flowing_median_secs: f64,
    pub(crate) to_flowing_max_secs: f64,
}

pub(crate) struct Setup<'a> {
    pub(crate) plan: FailoverPlan,
    pub(crate) rate: f64,
    /// Broker `a`, leading.
    pub(crate) leader: &'a mut Broker,
    pub(crate) dir: &'a Path,
    pub(crate) nats_urls: &'a [String],
    pub(crate) registry: &'a Path,
    pub(crate) signing_key: &'a Path,
    pub(crate) batch_size: usize,
    pub(crate) replicas: usize,
    pub(crate) drain: Duration,
    pub(crate) tracker: &'a Arc<Tracker>,
    pub(crate) send: Arc<SendFn>,
}

/// The broker's default `lease_ttl_secs` (the bench does not set it).
const LEASE_TTL_SECS: u64 = 3;
const POLL: Duration = Duration::from_millis(10);
const TIMEOUT: Duration = Duration::from_secs(120);

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) async fn run(s: Setup<'_>) -> Result<FailoverResult> {
    if s.replicas < 2 {
        bail!("a failover needs a cluster (stream_replicas > 1)");
    }
    let mut b = Broker::spawn(
        &s.dir.join("broker-b"),
        s.nats_urls,
        &s.dir.join("broker-b/store"),
        s.registry,
        s.signing_key,
        s.batch_size,
        &cluster_config(s.replicas, "b"),
    )?;
    b.wait_role("standby", Duration::from_millis(50), TIMEOUT)
        .await
        .context("broker b as a standby")?;
    eprintln!("failover: broker b is a standby; {} rounds", s.plan.rounds);

    // brokers[leading] leads.
    let mut leading = 0usize;
    let mut rounds = Vec::new();
    for round in 0..s.plan.rounds {
        let plan = Plan {
            offer: Offer::Open { rate: s.rate },
            warmup: s.plan.settle,
            measure: s.plan.after,
            drain: s.drain,
        };
        let name = format!("failover {}/{}", round + 1, s.plan.rounds);
        let load = {
            let tracker = Arc::clone(s.tracker);
            let send = Arc::clone(&s.send);
            tokio::spawn(async move { load::run(&name, &tracker, plan, send).await })
        };
        tokio::time::sleep(s.plan.settle).await;
        let (killed, standby): (&mut Broker, &mut Broker) = if leading == 0 {
            (&mut *s.leader, &mut b)
        } else {
            (&mut b, &mut *s.leader)
        };
        if killed.role().as_deref() != Some("leader") {
            bail!(
                "round {}: broker {} was to lead but does not; see {}",
                round + 1,
                if leading == 0 { "a" } else { "b" },
                killed.log.display()
            );
        }
        let killed_at = killed.kill()?;
        s.tracker.watch_from(killed_at);
        let led_at = standby
            .wait_role("leader", POLL, TIMEOUT)
            .await
            .context("the standby taking over")?;
        let flowing_at = loop {
            if let Some(t) = s.tracker.first_completion_after() {
                break t;
            }
            if killed_at.elapsed() > TIMEOUT {
                bail!(
                    "no referral sent after the kill reached RECEIVED in {TIMEOUT:?}; see {}",
                    standby.log.display()
                );
            }
            tokio::time::sleep(POLL).await;
        };
        let phase = load.await.context("the failover load")??;
        s.tracker.unwatch();
        killed.restart()?;
        let restarted = Instant::now();
        killed
            .wait_role("standby", Duration::from_millis(50), TIMEOUT)
            .await
            .context("the killed broker back as a standby")?;
        let r = Round {
            killed: if leading == 0 { "a" } else { "b" }.to_owned(),
            to_leader_secs: led_at.saturating_duration_since(killed_at).as_secs_f64(),
            to_flowing_secs: flowing_at
                .saturating_duration_since(killed_at)
                .as_secs_f64(),
            restart_to_standby_secs: restarted.elapsed().as_secs_f64(),
            phase,
        };
        eprintln!(
            "failover {}: killed {}: leader after {:.2} s, flowing after {:.2} s; restarted as a standby in {:.1} s",
            round + 1,
            r.killed,
            r.to_leader_secs,
            r.to_flowing_secs,
            r.restart_to_standby_secs
        );
        rounds.push(r);
        leading = 1 - leading;
    }
    // Leave broker a leading for whoever comes next: stop b (it gives its lease back).
    b.stop();
    if leading == 1 {
        s.leader
            .wait_role("leader", POLL, TIMEOUT)
            .await
            .context("broker a leading again")?;
    }
    let to_leader: Vec<f64> = rounds.iter().map(|r| r.to_leader_secs).collect();
    let to_flowing: Vec<f64> = rounds.iter().map(|r| r.to_flowing_secs).collect();
    Ok(FailoverResult {
        rate: s.rate,
        lease_ttl_secs: LEASE_TTL_SECS,
        to_leader_median_secs: median(&to_leader),
        to_leader_max_secs: to_leader.iter().copied().fold(0.0, f64::max),
        to_flowing_median_secs: median(&to_flowing),
        to_flowing_max_secs: to_flowing.iter().copied().fold(0.0, f64::max),
        rounds,
    })
}
