# Sourced by the install scripts (deploy/install-nats.sh, tests/install-*.sh): one way to make a
# project-local Python venv under .tools/ and pip-install a pinned tool into it, with the same
# clear errors everywhere. Not run on its own.
#
# pip_venv <who> <venv dir> <pip install arguments...>
#   Recreates <venv dir> and installs into it; <who> names the caller in error messages.
pip_venv() {
  local who=$1 venv=$2
  shift 2
  command -v python3 >/dev/null || { echo "$who: python3 is needed (apt-get install python3 python3-venv)" >&2; return 1; }
  mkdir -p "$(dirname "$venv")"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >&2; then
    echo "$who: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2
    return 1
  fi
  if ! "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" >&2; then
    echo "$who: pip could not install $* (no network, or no PyPI access?)" >&2
    return 1
  fi
}
