#!/usr/bin/env bash
# Create .venv (if missing) and install lmjax into it, at the exact versions of constraints.txt,
# with JAX's backend for this machine: the cuda13 or cuda12 extra when nvidia-smi sees an NVIDIA
# GPU (cuda13 if the driver supports CUDA 13), tpu on a Cloud TPU VM, else the CPU jaxlib.
#   bash scripts/setup.sh [dev] [tiktoken] ...   extras to add (dev: the test tools)
#   LMJAX_PLATFORM=cpu|cuda12|cuda13|tpu         override the detection
#   LMJAX_PIP_ARGS="--no-index --find-links DIR" extra pip arguments (an offline wheel directory)
#   LMJAX_SETUP_DRY_RUN=1                        print the install command instead of running it
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

detect_platform() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    local cuda
    cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
    if [ "${cuda:-0}" -ge 13 ]; then echo cuda13; else echo cuda12; fi
  elif [ -n "${TPU_ACCELERATOR_TYPE:-}" ] || [ -n "${TPU_NAME:-}" ] || ls /dev/accel* >/dev/null 2>&1 \
       || ls /dev/vfio/[0-9]* >/dev/null 2>&1; then
    echo tpu
  else
    echo cpu
  fi
}

PLATFORM=${LMJAX_PLATFORM:-$(detect_platform)}
case "$PLATFORM" in
  cpu) why="no NVIDIA GPU (nvidia-smi) or TPU found" ;;
  cuda12 | cuda13) why="nvidia-smi: $(nvidia-smi -L 2>/dev/null | head -1 | sed 's/ (UUID.*//')" ;;
  tpu) why="Cloud TPU VM" ;;
  *) echo "setup: LMJAX_PLATFORM must be cpu, cuda12, cuda13 or tpu, got '$PLATFORM'" >&2; exit 2 ;;
esac
[ -n "${LMJAX_PLATFORM:-}" ] && why="LMJAX_PLATFORM=$LMJAX_PLATFORM"

extras=()
[ "$PLATFORM" != cpu ] && extras+=("$PLATFORM")
extras+=("$@")
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
echo "setup: JAX backend $PLATFORM ($why); installing -e '$spec' with constraints.txt"

pip_args=(-q -c constraints.txt)
# The test extras need torch for the Hugging Face parity tests only: on an accelerator machine
# take the CPU wheel (PyPI's default build carries gigabytes of CUDA libraries of its own).
if [ "$PLATFORM" != cpu ] && [[ " $* " == *" dev "* ]]; then
  pip_args+=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
if [ -n "${LMJAX_SETUP_DRY_RUN:-}" ]; then
  echo "pip install ${pip_args[*]} ${LMJAX_PIP_ARGS:-} -e $spec"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# shellcheck disable=SC2086
.venv/bin/python -m pip install "${pip_args[@]}" ${LMJAX_PIP_ARGS:-} -e "$spec"
