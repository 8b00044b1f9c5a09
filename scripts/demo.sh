#!/usr/bin/env bash
# The demo: a simulated line, a real mosquitto on a free loopback port, the demo region
# expert (fitted on first run, then cached), the daemon, and a subscriber printing events.
# Extra arguments go to `linecam demo` (e.g. --camera viky, --frames 300).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/linecam demo "$@"
