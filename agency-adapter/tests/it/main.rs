//! End-to-end tests of the adapter crate against a real `nats-server` (started per test from
//! `.tools/nats/bin/nats-server`, or `YEONGYE_NATS_SERVER`; install it with
//! `./deploy/install-nats.sh`). The tests play the broker's part on the wire.

// Helpers are test code too: a failed setup step should panic loudly.
#![allow(clippy::unwrap_used)]

mod cli;
mod harness;
mod outbox;
mod sdk;
