#!/usr/bin/env bash
# The whole local system, start to finish: identities for the broker and every agency of the
# district roster in deploy/agencies.toml (`referral-broker init` and `agency add`: signing keys,
# NATS credentials, the generated registry and NATS authorization config, all in .demo/run/), a
# pinned nats-server (JetStream, file storage, fsync on every write) that admits only those users
# with their per-agency permissions, the referral broker, and one adapter per agency. Plays one
# case (see deploy/demo/play_case.py), prints each referral's timeline as it happens, then stops
# everything it started. Safe to run again.
#
# ./deploy/demo.sh --cluster plays the same case on three NATS nodes (one JetStream cluster,
# every stream and bucket R3) and two brokers (one leads, one stands by), and in the middle kills
# (-9) the leading broker and then the NATS node that leads the inbound stream, printing who took
# over and how long it took; every referral must still end as its case says.
set -euo pipefail
cluster=0
for arg in "$@"; do
  case "$arg" in
    --cluster) cluster=1 ;;
    *) echo "usage: $0 [--cluster]" >&2; exit 2 ;;
  esac
done
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

if [ "$cluster" = 0 ]; then
  say "starting nats-server on 127.0.0.1:$port (monitoring on 127.0.0.1:$http_port), registered users only"
  sed -e "s|@STORE_DIR@|$run/nats-store|" -e "s|@PORT@|$port|" -e "s|@HTTP_PORT@|$http_port|" \
    deploy/nats/nats-server.conf > "$run/config/nats-server.conf"
  "$nats_bin" -c "$run/config/nats-server.conf" > "$run/logs/nats.log" 2>&1 &
  pids+=($!)
  wait_for 10 "nats-server" python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)"
  urls="\"nats://127.0.0.1:$port\""
  nodes_json=""
else
  names=(n1 n2 n3); ports=(); https=(); routes=()
  for i in 0 1 2; do
    ports+=("$(free_port)"); https+=("$(free_port)"); cports[$i]=$(free_port)
    routes+=("\"nats-route://127.0.0.1:${cports[$i]}\"")
  done
  route_list=$(IFS=,; echo "${routes[*]}")
  urls=""; nodes_json=""
  for i in 0 1 2; do
    n=${names[$i]}
    say "starting NATS node $n on 127.0.0.1:${ports[$i]} (cluster port ${cports[$i]}, monitoring ${https[$i]})"
    sed -e "s|@NAME@|$n|" -e "s|@STORE_DIR@|$run/nats-store-$n|" -e "s|@PORT@|${ports[$i]}|" \
      -e "s|@HTTP_PORT@|${https[$i]}|" -e "s|@CLUSTER_PORT@|${cports[$i]}|" -e "s|@ROUTES@|$route_list|" \
      deploy/nats/nats-demo-cluster-node.conf > "$run/config/nats-$n.conf"
    "$nats_bin" -c "$run/config/nats-$n.conf" > "$run/logs/nats-$n.log" 2>&1 &
    pids+=($!)
    urls="$urls${urls:+, }\"nats://127.0.0.1:${ports[$i]}\""
    nodes_json="$nodes_json${nodes_json:+, }{\"name\": \"$n\", \"pid\": $!, \"http\": ${https[$i]}}"
  done
  for i in 0 1 2; do
    wait_for 30 "NATS node ${names[$i]}" python3 -c "import socket; socket.create_connection(('127.0.0.1', ${ports[$i]}), 1)"
  done
  wait_for 60 "the JetStream cluster's meta leader" python3 -c "
import json, urllib.request, sys
j = json.load(urllib.request.urlopen('http://127.0.0.1:${https[0]}/jsz', timeout=2))
sys.exit(0 if (j.get('meta_cluster') or {}).get('leader') else 1)"
fi

broker_config() { # broker_config <name> <http port>
  cat <<TOML
nats_urls = [$urls]
nats_credentials_file = "$secrets/broker/nats.creds"
signing_key_file = "$secrets/broker/signing.key"
store_dir = "$run/broker-store-$1"
registry = "$registry"
coordinator = "hope-support"
http_addr = "127.0.0.1:$2"
operators_file = "$run/config/operators.toml"
broker_name = "$1"
stream_replicas = $([ "$cluster" = 1 ] && echo 3 || echo 1)
TOML
}
if [ "$cluster" = 0 ]; then brokers=(broker); else brokers=(broker-a broker-b); fi
brokers_json=""
for b in "${brokers[@]}"; do
  if [ "$b" = "${brokers[0]}" ]; then hp=$broker_http; else hp=$(free_port); fi
  say "starting referral-broker $b (HTTP on 127.0.0.1:$hp)"
  broker_config "$b" "$hp" > "$run/config/$b.toml"
  "$bin/referral-broker" --config "$run/config/$b.toml" run > "$run/logs/$b.log" 2>&1 &
  pids+=($!)
  brokers_json="$brokers_json${brokers_json:+, }{\"name\": \"$b\", \"pid\": $!, \"http\": $hp}"
  if [ "$b" = "${brokers[0]}" ]; then
    # The first one leads: the others follow it.
    wait_for 30 "$b to lead" grep -q "leading" "$run/logs/$b.log"
  else
    wait_for 30 "$b to stand by" grep -q "broker ready" "$run/logs/$b.log"
  fi
done
[ "${brokers[0]}" = broker ] || cp "$run/config/${brokers[0]}.toml" "$run/config/broker.toml"
say "broker ready: dashboard at http://127.0.0.1:$broker_http/ (metrics at /metrics)"
if [ "$cluster" = 1 ]; then
  printf '{"brokers": [%s], "nats": [%s]}\n' "$brokers_json" "$nodes_json" > "$run/processes.json"
  printf '#!/bin/sh\nexec python3 "%s/deploy/demo/chaos.py" "%s/processes.json" "$1"\n' "$root" "$run" > "$run/hook.sh"
  chmod +x "$run/hook.sh"
  hook=(--hook "$run/hook.sh")
else
  hook=()
fi

say "starting one adapter per agency: $agencies"
for a in $agencies; do
  cat > "$run/config/$a.toml" <<TOML
agency = "$a"
nats_urls = [$urls]
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
python3 deploy/demo/play_case.py --adapter "$bin/agency-adapter" --run "$run" --registry deploy/agencies.toml "${hook[@]}"

# Ask a broker that is alive (in the cluster demo the first one was killed): the leader.
for b in "${brokers[@]}"; do
  if python3 -c "import json,sys,urllib.request; sys.exit(0 if json.load(urllib.request.urlopen('http://127.0.0.1:' + sys.argv[1] + '/api/v1/cluster', timeout=2))['role'] == 'leader' else 1)" \
      "$(sed -n 's/^http_addr = "127.0.0.1:\([0-9]*\)"/\1/p' "$run/config/$b.toml")" 2>/dev/null; then
    [ "$b" = broker ] || cp "$run/config/$b.toml" "$run/config/broker.toml"
    broker_http=$(sed -n 's/^http_addr = "127.0.0.1:\([0-9]*\)"/\1/p' "$run/config/$b.toml")
  fi
done
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
  if grep -rlF -- "$n" "$run"/broker-store* "$run"/nats-store* "$run/logs" 2>/dev/null | grep -q .; then
    echo "demo: $n is held by the hub:" >&2
    grep -rlF -- "$n" "$run"/broker-store* "$run"/nats-store* "$run/logs" >&2
    leaked=1
  fi
done <<< "$names"
[ "$leaked" = 0 ] || exit 1
[ "$received" -gt 0 ] || { echo "demo: no client name in any inbox: the check looks in the wrong place" >&2; exit 1; }
echo "client names: $(echo "$names" | wc -l) in the case, $received in recipients' inboxes, none held by the hub"

say "done: stopping everything (logs and inboxes stay in .demo/run)"
