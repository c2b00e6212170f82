#!/usr/bin/env bash
# Machine-checks the wire contract: `buf lint` of proto/yeongye/v1/, and `buf breaking` of it
# against the released yeongye.v1 kept in proto/released/ (docs/PROTOCOL.md, "Versioning").
# Usage: proto/check.sh [path of buf]; without one, tests/install-buf.sh installs the pinned buf.
# Run by ./tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")"
buf=${1:-$(../tests/install-buf.sh)}

"$buf" lint

# buf refuses an input inside the module's own directory as the baseline: compare against a
# copy of the released schemas outside it.
released=$(mktemp -d)
trap 'rm -rf "$released"' EXIT
cp -R released/yeongye "$released/"
if ! "$buf" breaking --against "$released"; then
  echo "proto/check.sh: the change above breaks the released yeongye.v1 (see docs/PROTOCOL.md, \"Versioning\")" >&2
  exit 1
fi
echo "proto/check.sh: buf lint and buf breaking (against proto/released) pass" >&2
