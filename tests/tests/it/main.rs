//! The end-to-end tests: one binary, one module per behaviour. Each test starts its own
//! nats-server, broker and adapters through the harness in `tests/src/` (crate `yeongye_tests`).
//!
//! Waits are bounded by the timeouts below. A message the broker or an adapter took but did not
//! acknowledge before being killed comes back after the consumer's `ack_wait` (30 s), so waits
//! that may depend on a redelivery use [`REDELIVERY`].

mod bad_input;
mod canary;
mod cluster;
mod consent;
mod consent_audit;
mod consent_parties;
mod crash;
mod deadline;
mod dedup;
mod deputy;
mod failover;
mod harness;
mod hostile;
mod http_api;
mod http_limits;
mod lifecycle;
mod operator_auth;
mod operators;
mod outbox;
mod partition;
mod python_agency;
mod restart;
mod sdk;
mod sealed;
mod secret_files;
mod security;
mod test_vectors;

use std::time::Duration;

/// Something that takes a few broker round trips.
pub(crate) const SHORT: Duration = Duration::from_secs(20);
/// Something that may wait for a redelivery after `ack_wait` (30 s).
pub(crate) const REDELIVERY: Duration = Duration::from_secs(90);

/// The agencies of the default [`yeongye_tests::System`].
pub(crate) const HOPE: &str = "hope-support";
pub(crate) const CENTRE: &str = "cc-haengbok1";
pub(crate) const MENTAL: &str = "mental-health";
pub(crate) const WELFARE: &str = "welfare-center";

/// Sends a referral `from` → `to` and waits until the sender's adapter is told it was RECEIVED.
/// The broker applies inbound messages in stream order and each adapter reads its queue in
/// order, so once this returns, the effects of everything published before it (by anyone) have
/// reached the adapters of `from` and `to`.
pub(crate) async fn barrier(system: &yeongye_tests::System, from: &str, to: &str) -> String {
    let wire = system.wire(from).await;
    let referral = yeongye_tests::ReferralBuilder::new(from, to)
        .reason("barrier")
        .build();
    wire.send_referral(&referral).await;
    system
        .adapter(from)
        .wait_notified(&referral.referral_id, "RECEIVED", REDELIVERY)
        .await;
    referral.referral_id
}

/// A referral's states from submission to completion, in order.
pub(crate) const LIFE: [&str; 6] = [
    "SUBMITTED",
    "DELIVERED",
    "RECEIVED",
    "ACCEPTED",
    "IN_PROGRESS",
    "COMPLETED",
];

/// Asserts that a referral's notifications at its sender name each state at most once,
/// never SUBMITTED (the sender hears first of DELIVERED), and that the furthest state along the lifecycle is `last` (DELIVERED may
/// be missing: a receipt can overtake it after a crash). Arrival order is not asserted: after
/// an outage a publish retried with its id can land after later ones, and PROTOCOL.md tells
/// agencies to go by each notification's state and time, not by arrival order.
pub(crate) fn assert_notified_once_each(states: &[String], last: &str, what: &str) {
    let mut seen = std::collections::BTreeSet::new();
    assert!(
        states.iter().all(|s| seen.insert(s.as_str())),
        "{what}: a state notified twice: {states:?}"
    );
    assert!(
        !seen.contains("SUBMITTED"),
        "{what}: SUBMITTED notified: {states:?}"
    );
    let rank = |s: &str| LIFE.iter().position(|o| *o == s).unwrap_or(LIFE.len());
    let furthest = states.iter().max_by_key(|s| rank(s)).map(String::as_str);
    assert_eq!(furthest, Some(last), "{what}: {states:?}");
}
