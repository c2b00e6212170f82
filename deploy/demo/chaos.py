#!/usr/bin/env python3
"""The cluster demo's machine deaths (./deploy/demo.sh --cluster), run by play_case.py's hook.

`chaos.py <processes.json> broker` kills (-9) the broker that leads and prints which broker took
over and how long after the kill it led; `chaos.py <processes.json> nats` kills (-9) the NATS node
that leads the inbound stream YEONGYE_IN and prints which node leads it next and how long that
took. processes.json (written by demo.sh) names every broker (pid, HTTP port) and NATS node
(pid, monitoring port).
"""
import json
import os
import signal
import sys
import time
import urllib.request


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.load(r)
    except Exception:
        return None


def alive(p):
    try:
        os.kill(p["pid"], 0)
        return True
    except OSError:
        return False


def kill_leading_broker(procs):
    brokers = [b for b in procs["brokers"] if alive(b)]
    leader = next((b for b in brokers
                   if (get(f"http://127.0.0.1:{b['http']}/api/v1/cluster") or {}).get("role") == "leader"), None)
    if leader is None:
        sys.exit("chaos: no broker says it leads")
    os.kill(leader["pid"], signal.SIGKILL)
    killed = time.time()
    print(f"\n  ✗ kill -9 {leader['name']} (the leading broker), pid {leader['pid']}", flush=True)
    others = [b for b in brokers if b is not leader]
    while time.time() - killed < 60:
        for b in others:
            c = get(f"http://127.0.0.1:{b['http']}/api/v1/cluster") or {}
            if c.get("role") == "leader":
                print(f"  ✓ {b['name']} took over {time.time() - killed:.1f} s after the kill"
                      f" (term {c.get('term')}, state log at {c.get('state_log_position')})", flush=True)
                return
        time.sleep(0.1)
    sys.exit("chaos: no standby took over within 60 s")


def stream_leader(procs, stream):
    for n in procs["nats"]:
        if not alive(n):
            continue
        jsz = get(f"http://127.0.0.1:{n['http']}/jsz?accounts=true&streams=true") or {}
        for account in jsz.get("account_details", []):
            for s in account.get("stream_detail", []):
                if s.get("name") == stream and (s.get("cluster") or {}).get("leader"):
                    return s["cluster"]["leader"]
    return None


def kill_stream_leader(procs, stream="YEONGYE_IN"):
    name = stream_leader(procs, stream)
    node = next((n for n in procs["nats"] if n["name"] == name), None)
    if node is None:
        sys.exit(f"chaos: no node leads {stream}")
    os.kill(node["pid"], signal.SIGKILL)
    killed = time.time()
    print(f"\n  ✗ kill -9 NATS node {name} (leader of {stream}), pid {node['pid']}", flush=True)
    while time.time() - killed < 60:
        now = stream_leader(procs, stream)
        if now and now != name:
            print(f"  ✓ {now} leads {stream} {time.time() - killed:.1f} s after the kill", flush=True)
            return
        time.sleep(0.2)
    sys.exit(f"chaos: {stream} has no new leader within 60 s")


def main():
    procs = json.load(open(sys.argv[1]))
    phase = sys.argv[2]
    if phase == "broker":
        kill_leading_broker(procs)
    elif phase == "nats":
        kill_stream_leader(procs)
    else:
        sys.exit(f"chaos: unknown phase {phase!r}")


if __name__ == "__main__":
    main()
