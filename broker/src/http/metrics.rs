//! `/metrics`: the Prometheus text exposition, built from the [`crate::view::View`] at each
//! scrape (so no value is ever stale) plus the event loop's latency histogram.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use yeongye_proto::v1::ReasonCode;

use super::AppState;
use crate::clock;

type Labels = Vec<(&'static str, String)>;

fn family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    reg.register(name, help, g);
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn render(state: &AppState) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("yeongye");
    let view = state.ops.view();
    let registry = state.ops.registry();

    let by_state = family(&mut reg, "referrals", "Referrals by state");
    for (s, n) in view.by_state() {
        by_state
            .get_or_create(&vec![("state", s.as_str().to_owned())])
            .set(int(n));
    }
    let sent = family(&mut reg, "agency_sent", "Referrals an agency has sent");
    let awaiting_receipt = family(
        &mut reg,
        "agency_awaiting_receipt",
        "Referrals to an agency not yet RECEIVED",
    );
    let awaiting_acceptance = family(
        &mut reg,
        "agency_awaiting_acceptance",
        "Referrals to an agency RECEIVED, not yet accepted or declined",
    );
    let in_progress = family(
        &mut reg,
        "agency_in_progress",
        "Referrals to an agency ACCEPTED or IN_PROGRESS",
    );
    let overdue = family(
        &mut reg,
        "agency_overdue",
        "Referrals to an agency past a deadline and not ended",
    );
    let dead = family(
        &mut reg,
        "agency_dead_letters",
        "Messages from an agency the broker could not apply",
    );
    let oldest = family(
        &mut reg,
        "agency_oldest_unacknowledged_seconds",
        "Age of the oldest referral to an agency that is not yet RECEIVED (0: none)",
    );
    let now = clock::now_ms();
    // Every registered agency gets a row, also with nothing in it — and only registered ones:
    // a referral refused for an unknown recipient must not let a sender mint label values.
    let ids: Vec<String> = registry.iter().map(|a| a.id.clone()).collect();
    for id in ids {
        let q = view.queue(&id);
        let l = vec![("agency", id.clone())];
        sent.get_or_create(&l).set(int(q.sent));
        awaiting_receipt
            .get_or_create(&l)
            .set(int(q.awaiting_receipt));
        awaiting_acceptance
            .get_or_create(&l)
            .set(int(q.awaiting_acceptance));
        in_progress.get_or_create(&l).set(int(q.in_progress));
        overdue.get_or_create(&l).set(int(q.overdue));
        dead.get_or_create(&l).set(int(q.dead_letters));
        let age = view
            .oldest_unacked(&id)
            .map(|at| (now - at).max(0) / 1000)
            .unwrap_or(0);
        oldest.get_or_create(&l).set(age);
    }
    gauge(
        &mut reg,
        "overdue_referrals",
        "Referrals past a deadline and not ended",
        int(view.overdue_count()),
    );
    gauge(
        &mut reg,
        "dead_letters",
        "Inbound messages the broker could not apply",
        int(view.dead_letters()),
    );
    let refusals = family(
        &mut reg,
        "refusals",
        "Inbound messages refused, by reason code",
    );
    for (code, n) in view.refusals() {
        let name = ReasonCode::try_from(*code)
            .map(|c| c.as_str_name().to_owned())
            .unwrap_or_else(|_| code.to_string());
        refusals.get_or_create(&vec![("reason", name)]).set(int(*n));
    }
    drop(view);
    gauge(
        &mut reg,
        "outbox_depth",
        "Messages the broker has to publish",
        int(state.ops.outbox.load(Ordering::Relaxed)),
    );
    gauge(
        &mut reg,
        "inbound_backlog",
        "Inbound messages not yet given to the broker",
        int(state.ops.backlog.load(Ordering::Relaxed)),
    );
    let connected = state.nats.connection_state() == async_nats::connection::State::Connected;
    gauge(
        &mut reg,
        "nats_connected",
        "1 when the broker is connected to NATS",
        i64::from(connected),
    );
    let (ready, _) = super::readiness(state);
    gauge(
        &mut reg,
        "ready",
        "1 when /readyz would answer 200",
        i64::from(ready),
    );
    let turns = prometheus_client::metrics::counter::Counter::<u64>::default();
    turns.inc_by(state.ops.turns.load(Ordering::Relaxed));
    reg.register(
        "turns",
        "Turns of the event loop since start (an idle loop turns every 250 ms tick)",
        turns,
    );
    let refused = prometheus_client::metrics::counter::Counter::<u64>::default();
    refused.inc_by(state.ops.queries_refused.load(Ordering::Relaxed));
    reg.register(
        "queries_refused",
        "Queries not answered since start: their reply subject was not the asking agency's inbox",
        refused,
    );
    let steps = Family::<Labels, prometheus_client::metrics::counter::Counter<u64>>::default();
    reg.register(
        "background_steps",
        "Steps of background work (prune: applied ids past retention; reopen: the store's snapshot, a standby's only) the event loop took between turns since start",
        steps.clone(),
    );
    let longest = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    reg.register(
        "background_step_seconds_max",
        "The longest a background step held the event loop since start, by task",
        longest.clone(),
    );
    let bg = &state.ops.background;
    for task in crate::ops::Task::ALL {
        let labels = vec![("task", task.as_str().to_owned())];
        steps.get_or_create(&labels).inc_by(bg.steps(task));
        longest
            .get_or_create(&labels)
            .set(bg.longest(task).as_secs_f64());
    }
    gauge(
        &mut reg,
        "background_pruning",
        "1 while a prune of applied ids past retention is under way (a step between turns)",
        i64::from(bg.pruning.load(Ordering::Relaxed)),
    );
    let replicas = family(
        &mut reg,
        "stream_replicas",
        "Replicas configured for the broker's stream (stream_replicas)",
    );
    let current = family(
        &mut reg,
        "stream_replicas_current",
        "Replicas of the stream up to date: its leader and the peers the group calls current (0: NATS does not answer for it)",
    );
    let leader = family(
        &mut reg,
        "stream_leader",
        "1 if the stream's Raft group has a leader (it takes writes), else 0",
    );
    for s in state.ops.streams() {
        let labels = vec![("stream", s.name.clone())];
        replicas.get_or_create(&labels).set(int(s.replicas as u64));
        current.get_or_create(&labels).set(int(s.current as u64));
        leader
            .get_or_create(&labels)
            .set(i64::from(s.leader.is_some()));
    }
    let cluster = state.ops.cluster();
    gauge(
        &mut reg,
        "broker_leading",
        "1 if this broker leads its group (consumes, decides, publishes), 0 if it is a standby",
        i64::from(cluster.leading),
    );
    gauge(
        &mut reg,
        "broker_term",
        "The term of the leader this broker last saw (the lease revision it took)",
        int(cluster.term),
    );
    gauge(
        &mut reg,
        "state_log_position",
        "The state-log sequence this broker's store has applied",
        int(cluster.position),
    );
    gauge(
        &mut reg,
        "state_log_lag",
        "State-log records this broker's store has not applied yet (a standby's lag)",
        int(cluster.lag()),
    );
    let takeovers = prometheus_client::metrics::counter::Counter::<u64>::default();
    takeovers.inc_by(cluster.takeovers);
    reg.register(
        "broker_takeovers",
        "Times this broker took the lead since it started",
        takeovers,
    );
    reg.register(
        "commit_latency_seconds",
        "From an inbound message's arrival in the stream to its commit in the broker's store",
        state.ops.commit_latency.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    match render(&state) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics encoding failed\n",
        )
            .into_response(),
    }
}
