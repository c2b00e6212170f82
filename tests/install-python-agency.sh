#!/usr/bin/env bash
# Makes .tools/python-agency (a project-local venv, git-ignored) for the raw-NATS Python agency
# examples/python-agency/raw_agency.py: installs the pinned packages of
# examples/python-agency/requirements-raw.txt unless they are already there, generates the
# protobuf modules from proto/yeongye/v1/*.proto into .tools/python-agency/gen (every time, so
# they never go stale), and prints the venv's python. Used by tests/tests/it/python_agency.rs and
# test_vectors.rs (the cross-language seal check).
#
# Versions are pinned exactly; hashes are not (the wheels differ by Python version, and this
# is a test tool that never ships).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/python-agency"
req="$root/examples/python-agency/requirements-raw.txt"
py="$venv/bin/python"
marker="$venv/.requirements"

if ! { [ -x "$py" ] && [ -f "$marker" ] && cmp -s "$req" "$marker"; }; then
  . "$root/deploy/pip-venv.sh"
  pip_venv install-python-agency.sh "$venv" --no-deps -r "$req"
  cp "$req" "$marker"
fi

gen="$venv/gen"
rm -rf "$gen"
mkdir -p "$gen"
(cd "$root/proto" && "$py" -m grpc_tools.protoc -I . --python_out="$gen" yeongye/v1/envelope.proto yeongye/v1/referral.proto yeongye/v1/consent.proto) >&2
echo "$py"
