#!/usr/bin/env bash
# The whole local system, start to finish: identities for the broker and every agency of the
# district roster in deploy/agencies.toml (`referral-broker init` and `agency add`: signing keys,
# NATS credentials, the generated registry and NATS authorization config, all in .demo/run/), a
# pinned nats-server (JetStream, file storage, fsync on every write) that admits only those users
# with their per-agency permissions, the referral broker, and one adapter per agency. Plays one
# case (see deploy/demo/play_case.py), prints each referral's timeline as it happens, then stops
# everything it started. Safe to run again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

say "installing the pinned nats-server (once)"
nats_bin=$(./deploy/install-nats.sh)

say "building"
cargo build --quiet --bins
bin="$root/target/debug"

run="$root/.demo/run"
rm -rf "$run"
mkdir -p "$run/logs" "$run/config"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
http_port=$(free_port)
broker_http=$(free_port)

pids=()
cleanup() {
  # Adapters and broker first (graceful: SIGTERM), NATS last.
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

wait_for() { # wait_for <seconds> <description> <command...>
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: timed out waiting for $what; logs are in $run/logs" >&2
  exit 1
}

registry="$run/registry.toml"
secrets="$run/secrets"
onboard=(--registry "$registry" --secrets "$secrets" --nats-conf "$run/config/nats-auth.conf")
say "creating identities: the broker's, then one per agency of deploy/agencies.toml"
"$bin/referral-broker" init "${onboard[@]}" > "$run/logs/onboard.log"
agencies=""
while IFS=$'\t' read -r id kind name; do
  "$bin/referral-broker" agency add "$id" --name "$name" --kind "$kind" "${onboard[@]}" >> "$run/logs/onboard.log"
  agencies="$agencies $id"
done < <(python3 -c '
import sys, tomllib
for a in tomllib.load(open(sys.argv[1], "rb"))["agency"]:
    print(a["id"], a["kind"], a["name"], sep="\t")
' deploy/agencies.toml)
agencies=${agencies# }
say "creating the demo's operator of the broker's HTTP API (token in \$secrets/operators, 0600)"
"$bin/referral-broker" operator add demo-operator --operators "$run/config/operators.toml" \
  --secrets "$secrets" >> "$run/logs/onboard.log"
export REFERRAL_OPERATOR_TOKEN_FILE="$secrets/operators/demo-operator.token"

say "starting nats-server on 127.0.0.1:$port (monitoring on 127.0.0.1:$http_port), registered users only"
sed -e "s|@STORE_DIR@|$run/nats-store|" -e "s|@PORT@|$port|" -e "s|@HTTP_PORT@|$http_port|" \
  deploy/nats/nats-server.conf > "$run/config/nats-server.conf"
"$nats_bin" -c "$run/config/nats-server.conf" > "$run/logs/nats.log" 2>&1 &
pids+=($!)
wait_for 10 "nats-server" python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)"

say "starting referral-broker"
cat > "$run/config/broker.toml" <<TOML
nats_urls = ["nats://127.0.0.1:$port"]
nats_credentials_file = "$secrets/broker/nats.creds"
signing_key_file = "$secrets/broker/signing.key"
store_dir = "$run/broker-store"
registry = "$registry"
coordinator = "hope-support"
http_addr = "127.0.0.1:$broker_http"
operators_file = "$run/config/operators.toml"
TOML
"$bin/referral-broker" --config "$run/config/broker.toml" run > "$run/logs/broker.log" 2>&1 &
pids+=($!)
wait_for 30 "the broker to be ready" grep -q "broker ready" "$run/logs/broker.log"
say "broker ready: dashboard at http://127.0.0.1:$broker_http/ (metrics at /metrics)"

say "starting one adapter per agency: $agencies"
for a in $agencies; do
  cat > "$run/config/$a.toml" <<TOML
agency = "$a"
nats_urls = ["nats://127.0.0.1:$port"]
nats_credentials_file = "$secrets/$a/nats.creds"
signing_key_file = "$secrets/$a/signing.key"
sealing_key_file = "$secrets/$a/sealing.key"
registry = "$registry"
state_dir = "$run/adapters/$a"
TOML
  "$bin/agency-adapter" --config "$run/config/$a.toml" run --inbox "$run/inbox/$a" \
    > "$run/logs/adapter-$a.jsonl" 2> "$run/logs/adapter-$a.log" &
  pids+=($!)
done

say "playing the case"
python3 deploy/demo/play_case.py --adapter "$bin/agency-adapter" --run "$run" --registry deploy/agencies.toml

say "what the operators see (referral-broker status)"
"$bin/referral-broker" --config "$run/config/broker.toml" status

say "an operator action (authenticated with demo-operator's token): registry reload"
"$bin/referral-broker" --config "$run/config/broker.toml" registry reload

say "checking the audit log's hash chain"
"$bin/referral-broker" --config "$run/config/broker.toml" --api "http://127.0.0.1:$broker_http" audit verify

say "checking that the hub never held a client's name (sealed to the recipients)"
# No client name of the case in the broker's store, the NATS store or any log; the names of
# the referrals that were taken in are in their recipients' inboxes (a withdrawn one's purged).
names=$(python3 -c 'import re,sys; print("\n".join(sorted(set(re.findall(r"\"name\": *\"([^\"]+)\"", open(sys.argv[1], encoding="utf-8").read())))))' deploy/demo/play_case.py)
leaked=0
received=0
while IFS= read -r n; do
  [ -n "$n" ] || continue
  if grep -rqF -- "$n" "$run/inbox"; then received=$((received + 1)); fi
  if grep -rlF -- "$n" "$run/broker-store" "$run/nats-store" "$run/logs" 2>/dev/null | grep -q .; then
    echo "demo: $n is held by the hub:" >&2
    grep -rlF -- "$n" "$run/broker-store" "$run/nats-store" "$run/logs" >&2
    leaked=1
  fi
done <<< "$names"
[ "$leaked" = 0 ] || exit 1
[ "$received" -gt 0 ] || { echo "demo: no client name in any inbox: the check looks in the wrong place" >&2; exit 1; }
echo "client names: $(echo "$names" | wc -l) in the case, $received in recipients' inboxes, none held by the hub"

say "done: stopping everything (logs and inboxes stay in .demo/run)"
