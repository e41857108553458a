#!/usr/bin/env bash
# Runs the hostile-input fuzz suite (tests/fuzz, issue 7 rule 1) against a real Mosquitto
# for as long as you like. CI runs the same tests briefly as part of `pytest`.
#
#   scripts/fuzz.sh                 # 10 minutes per test
#   scripts/fuzz.sh 3600            # an hour per test
#   EDGEFLEET_FUZZ_EXAMPLES=500 scripts/fuzz.sh 0 -k agent   # 500 examples, no time limit
#
# The first argument, when a number, is the seconds each fuzz test may run (0: no
# limit, EDGEFLEET_FUZZ_EXAMPLES then bounds it); the rest goes to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
seconds=600
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
export EDGEFLEET_FUZZ_SECONDS=$seconds
export EDGEFLEET_FUZZ_EXAMPLES=${EDGEFLEET_FUZZ_EXAMPLES:-1000000}
# A long run must not be cut by pytest's default per-test timeout.
exec .venv/bin/python -m pytest -m fuzz tests/fuzz --timeout=0 -ra "$@"
