#!/usr/bin/env bash
# Installs what edgefleet needs and is missing: Python >= 3.11 with venv, Mosquitto (Debian
# package), a virtual environment in .venv with the project and its dev tools.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is there).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    echo "setup: apt-get update" >&2
    as_root apt-get update -qq
    apt_updated=1
  fi
  echo "setup: apt-get install $*" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

python_ok() {
  command -v python3 >/dev/null 2>&1 &&
    python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if ! python_ok; then
  apt_install python3 python3-venv python3-pip
fi
if ! python_ok; then
  echo "setup: edgefleet needs Python >= 3.11 with venv; found $(python3 --version 2>&1)" >&2
  exit 1
fi

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto
fi

# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.edgefleet-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing edgefleet and its dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi

# The official AsyncAPI parser, which tests/edgefleet/test_asyncapi.py runs on
# docs/asyncapi.json: node, and tools/asyncapi's locked packages, installed again when the
# lock changed (no install scripts: the parser needs none).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
npm_lock=tools/asyncapi/package-lock.json
npm_stamp=tools/asyncapi/node_modules/.edgefleet-installed
npm_want=$(sha256sum "$npm_lock" | cut -d' ' -f1)
if [ "$(cat "$npm_stamp" 2>/dev/null)" != "$npm_want" ]; then
  echo "setup: installing the AsyncAPI parser (npm ci in tools/asyncapi)" >&2
  (cd tools/asyncapi && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  echo "$npm_want" > "$npm_stamp"
fi
