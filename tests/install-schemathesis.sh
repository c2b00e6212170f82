#!/usr/bin/env bash
# Installs schemathesis (PyPI), pinned, into .tools/schemathesis (a project-local venv, git-ignored)
# unless it is already there, and prints the path of its `st` command. Used by the end-to-end test
# tests/tests/it/http_api.rs (schemathesis against the adapter's /openapi.json).
#
# The version is pinned; its dependencies are resolved by pip at install time (a hash-locked
# requirements file for schemathesis's whole dependency tree is not kept: it is a test tool that
# never ships).
set -euo pipefail
VERSION=4.32.5
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/schemathesis"
st="$venv/bin/st"

if [ -x "$st" ] && "$st" --version 2>/dev/null | grep -q "$VERSION"; then
  echo "$st"
  exit 0
fi

command -v python3 >/dev/null || { echo "install-schemathesis.sh: python3 is needed (apt-get install python3 python3-venv)" >&2; exit 1; }
mkdir -p "$root/.tools"
rm -rf "$venv"
if ! python3 -m venv "$venv" >&2; then
  echo "install-schemathesis.sh: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2
  exit 1
fi
if ! "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION" >&2; then
  echo "install-schemathesis.sh: pip could not install schemathesis==$VERSION (no network, or no PyPI access?)" >&2
  exit 1
fi
"$st" --version >&2
echo "$st"
