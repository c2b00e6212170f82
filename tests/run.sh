#!/usr/bin/env bash
# The whole check, as CI runs it: formatting, lints, the binaries, then every test (unit tests and
# the end-to-end tests in tests/, which start real nats-server processes and the real binaries).
# Extra arguments go to `cargo test`, e.g. ./tests/run.sh -p yeongye-tests lifecycle
set -euo pipefail
cd "$(dirname "$0")/.."

nats=$(./deploy/install-nats.sh)
export YEONGYE_NATS_SERVER="$nats"

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run target/debug/{referral-broker,agency-adapter}: build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
