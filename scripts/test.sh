#!/usr/bin/env bash
# Sets up what is missing, then checks everything: ruff (lint and format), mypy --strict,
# and the test suite against a real Mosquitto. Extra arguments go to pytest.
# The suite runs in three processes (pytest-xdist): most of its time is spent waiting on
# brokers, timers and subprocesses, not computing; idle workers take tests from busy ones
# (`--dist worksteal`: the test durations are very uneven). `-n 0` runs it in one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
# The dashboard's tests drive a real headless Chromium (Debian's; playwright's own browser
# downloads are not used). Only the tests need it, not the demo.
if [ ! -x /usr/bin/chromium ]; then
  apt_install chromium
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
PACKAGES=(schemas broker agent coordinator models storage edgefleet dashboard tests bench)
echo "== ruff" >&2
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
echo "== mypy --strict" >&2
.venv/bin/python -m mypy "${PACKAGES[@]}"
echo "== pytest" >&2
exec .venv/bin/python -m pytest -n 3 --dist worksteal "$@"
