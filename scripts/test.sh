#!/usr/bin/env bash
# Run the test suite (sets up .venv first when needed). Extra arguments go to pytest:
#   bash scripts/test.sh tests/test_cli.py -k json
# pytest's exit code is passed through unchanged (5 = no tests collected is a failure too).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

set +e
# pyproject addopts already has -q; a second -q would hide the "N passed" summary line.
# worksteal: a worker that runs out of tests takes queued ones from the other (with the default
# scheduling the slow real-model tests could queue up on one worker while the other idled).
.venv/bin/python -m pytest -n 2 --dist worksteal "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
    echo "test: pytest collected no tests (exit 5)" >&2
fi
exit "$status"
