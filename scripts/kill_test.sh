#!/usr/bin/env bash
# kill -9 convert, analyze and quantize at many write events and random moments (the default
# suite strikes each once). Usage: scripts/kill_test.sh [EVENT_KILLS] [TIMED_KILLS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
K2MINI_KILL_POINTS="${1:-6}" K2MINI_TIMED_KILLS="${2:-2}" K2MINI_KILL_SEED="${3:-7}" \
  exec python -m pytest -q -s -p no:warnings tests/test_interrupts.py
