#!/usr/bin/env bash
# Sets up what is missing, then runs the live demo: a Mosquitto broker, a coordinator and
# 24 agents in two hardware classes; a first install, a rollout in three waves, and a bad
# build stopped and rolled back. Extra arguments go to `edgefleet demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/edgefleet demo "$@"
