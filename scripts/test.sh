#!/usr/bin/env bash
# Set up with the dev extras (and .gpu-compile/, for the tests that compile a GPU program without a GPU), check lint
# and format with ruff, then run the test suite on two pytest-xdist workers, a test file per worker at a time (so a
# file's module fixtures, such as a trained reference run, are made once); pytest's "no tests ran" counts as a failure.
# Arguments go to pytest after ours: `bash scripts/test.sh -n 0 tests/test_config.py` runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/setup_gpu_compile.sh  # the tests that compile a GPU program on this CPU
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
set +e
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$code"
