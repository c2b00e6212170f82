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

. "$root/deploy/pip-venv.sh"
pip_venv install-schemathesis.sh "$venv" "schemathesis==$VERSION"
"$st" --version >&2
echo "$st"
