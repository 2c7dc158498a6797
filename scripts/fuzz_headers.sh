#!/usr/bin/env bash
# Long fuzz run of the header, index and config parsers (the default suite runs 150 cases
# per property). Usage: scripts/fuzz_headers.sh [CASES_PER_PROPERTY]   (default 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
K2MINI_FUZZ_EXAMPLES="${1:-5000}" exec python -m pytest -q -s -p no:warnings tests/test_fuzz_headers.py
