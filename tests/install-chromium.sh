#!/usr/bin/env bash
# Installs what the dashboard test (tests/it/operators.rs) needs, unless already there: Debian's
# chromium package, and a Korean font (fonts-nanum) so that the screenshot shows Hangul rather
# than empty boxes. Prints Chromium's path. Needs root (or passwordless sudo) to install.
set -euo pipefail
chromium=""
for c in /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -x "$c" ]; then chromium="$c"; break; fi
done
missing=()
[ -n "$chromium" ] || missing+=(chromium)
if ! command -v fc-list >/dev/null || [ -z "$(fc-list :lang=ko family 2>/dev/null)" ]; then
  missing+=(fonts-nanum fontconfig)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "missing ${missing[*]} and this user cannot install packages: run 'apt-get install -y ${missing[*]}' as root" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    echo "missing ${missing[*]} and there is no apt-get: install Chromium (/usr/bin/chromium) and a Korean font" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq "${missing[@]}" >&2
  chromium=/usr/bin/chromium
fi
[ -x "$chromium" ] || { echo "chromium was installed but $chromium is missing" >&2; exit 1; }
echo "$chromium"
