#!/usr/bin/env bash
# Set up, then train the default experiment, evaluate it on held-out data and print a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR=${WORKDIR:-runs/default}
.venv/bin/lmjax train experiments/default.py --workdir "$WORKDIR" "$@"
.venv/bin/lmjax sample "$WORKDIR" --prompt "def " --max-new-tokens 120 --temperature 0.7
.venv/bin/lmjax eval "$WORKDIR"
echo "run directory: $(cd "$WORKDIR" && pwd)"
