#!/usr/bin/env bash
# Installs Debian's prometheus package (it ships promtool) for the alert-rule test
# (tests/it/operators.rs) unless promtool is already there. Needs root (or passwordless sudo).
set -euo pipefail
if [ -x /usr/bin/promtool ]; then echo /usr/bin/promtool; exit 0; fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "promtool is missing and this user cannot install packages: run 'apt-get install -y prometheus' as root" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "promtool is missing and there is no apt-get: install Prometheus so that /usr/bin/promtool exists" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
# The package's service is not wanted: only the promtool binary.
$SUDO apt-get install -y -qq --no-install-recommends prometheus >&2
[ -x /usr/bin/promtool ] || { echo "apt-get installed prometheus but /usr/bin/promtool is missing" >&2; exit 1; }
echo /usr/bin/promtool
