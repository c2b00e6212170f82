#!/usr/bin/env bash
# Installs buf (the protobuf linter and breaking-change checker), pinned, into .tools/buf
# (git-ignored) unless it is already there, and prints the path of its binary. Used by
# ./tests/run.sh through proto/check.sh.
#
# buf comes from npm's `@bufbuild/buf`, which ships the official release binary in a
# per-platform package (`@bufbuild/buf-linux-x64`). The version is exact and the binary's
# SHA-256 is checked, so a changed package cannot slip in. npm is needed only to install: if
# it is missing, Debian's `nodejs npm` are installed with apt-get (as root or passwordless
# sudo), as tests/install-chromium.sh does for Chromium.
set -euo pipefail
VERSION=1.75.0
SHA256_LINUX_X64=fad1e38d6909bbb583a4da81d8c02a01046e2cd663bde7e337dd24277393764b
root=$(cd "$(dirname "$0")/.." && pwd)
prefix="$root/.tools/buf"
bin="$prefix/node_modules/@bufbuild/buf-linux-x64/bin/buf"

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "install-buf.sh: no pinned binary hash for $(uname -s)-$(uname -m); add one here" >&2; exit 1 ;;
esac

verified() {
  [ -x "$bin" ] && echo "$SHA256_LINUX_X64  $bin" | sha256sum --check --status
}

if verified && "$bin" --version 2>/dev/null | grep -qx "$VERSION"; then
  echo "$bin"
  exit 0
fi

if ! command -v npm >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install-buf.sh: npm is missing and this user cannot install packages: run 'apt-get install -y nodejs npm' as root" >&2
    exit 1
  fi
  command -v apt-get >/dev/null || { echo "install-buf.sh: npm is missing and there is no apt-get: install Node.js and npm" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq nodejs npm >&2
fi

rm -rf "$prefix"
mkdir -p "$prefix"
if ! npm install --prefix "$prefix" --no-audit --no-fund --silent "@bufbuild/buf@$VERSION" >&2; then
  echo "install-buf.sh: npm could not install @bufbuild/buf@$VERSION (no network, or no npm registry access?)" >&2
  exit 1
fi
if ! verified; then
  echo "install-buf.sh: $bin is missing or its SHA-256 is not the pinned $SHA256_LINUX_X64" >&2
  exit 1
fi
"$bin" --version >&2
echo "$bin"
