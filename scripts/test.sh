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
PACKAGES=(schemas broker agent coordinator models storage edgefleet dashboard tests bench)
echo "== ruff" >&2
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
echo "== mypy --strict" >&2
.venv/bin/python -m mypy "${PACKAGES[@]}"
echo "== pytest" >&2
exec .venv/bin/python -m pytest -n 3 --dist worksteal "$@"
