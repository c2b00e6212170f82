#!/usr/bin/env bash
# The whole check, as CI runs it: formatting, lints, the binaries, then every test (unit tests and
# the end-to-end tests in tests/, which start real nats-server processes and the real binaries).
# Extra arguments go to `cargo test`, e.g. ./tests/run.sh -p yeongye-tests lifecycle
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says how long it took (CI's budget is watched: see the closing notes).
step() {
    local started=$SECONDS
    "$@"
    echo "tests/run.sh: '$*' took $((SECONDS - started)) s" >&2
}

nats=$(./deploy/install-nats.sh)
export YEONGYE_NATS_SERVER="$nats"

# The partition test (tests/tests/it/partition.rs) makes network namespaces with `ip`
# (iproute2) and `unshare` (util-linux), inside a user namespace of its own.
if ! command -v ip >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q iproute2 >&2 || { apt-get update -q >&2 && apt-get install -y -q iproute2 >&2; }
    else
        echo "tests/run.sh: the partition test needs 'ip' (Debian package iproute2): install it" >&2
        exit 1
    fi
fi

step cargo fmt --all --check
# The wire contract: buf lint, and buf breaking against the released yeongye.v1.
buf=$(step ./tests/install-buf.sh)
step ./proto/check.sh "$buf"
step cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run target/debug/{referral-broker,agency-adapter}: build them first.
step cargo build --workspace --bins
# Licences, duplicate crates and sources (deny.toml); advisories need a network CI lacks.
deny=$(./tests/install-deny.sh)
# cargo-deny reads the crates of every target, not only this host's: fetch them first.
step cargo fetch --quiet
step "$deny" --offline check licenses bans sources
step cargo test --workspace "$@"
# A short fuzz run of every target (docs/FUZZING.md): the stable runner, random and mutated
# inputs, 10 s a target; it prints its seed (FUZZ_SEED=… replays a failure). Built into this
# workspace's target dir, where the broker's dependencies are already built.
step env CARGO_TARGET_DIR=target cargo run --quiet --manifest-path fuzz/Cargo.toml \
    --no-default-features --example fuzz-stable -- all 20
