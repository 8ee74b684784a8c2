#!/usr/bin/env bash
# Install what compiling for an NVIDIA GPU *without one* needs (jax-cuda12-plugin and its PJRT
# runtime, and cuDNN's library for the fused attention kernel) into .gpu-compile/, beside .venv,
# at the versions of constraints.txt: about 0.9 GB to download, 1.6 GB on disk; no GPU or driver.
# `lmjax plan --device H100-80G` finds the folder itself (lmjax.devices.gpu_compile_dir) and puts
# it on the path of that plan's process only; the tests that compile a GPU program use it. Kept
# out of .venv (and don't put it on PYTHONPATH): with the CUDA plugin importable, every JAX
# process on a machine without a GPU loads it and logs that it found no CUDA driver.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=.gpu-compile
PACKAGES=(jax-cuda12-plugin jax-cuda12-pjrt nvidia-cudnn-cu12)
[ -x .venv/bin/python ] || bash scripts/setup.sh
if .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("jax_plugins.xla_cuda12") and u.find_spec("nvidia.cudnn")))' 2>/dev/null; then
  exit 0  # .venv has them already (the cuda12 extra on a GPU machine)
fi
# The pins of constraints.txt the folder was made from: a changed pin makes it again.
STAMP=$(grep -E "^($(IFS='|'; echo "${PACKAGES[*]}"))==" constraints.txt | sort)
if [ -f "$TARGET/.constraints" ] && [ "$(cat "$TARGET/.constraints")" = "$STAMP" ]; then
  exit 0
fi
echo "setup: the CUDA plugin and cuDNN for compiling GPU programs without a GPU, into $TARGET/"
rm -rf "$TARGET.partial"
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q -c constraints.txt --no-deps --target "$TARGET.partial" \
  ${LMJAX_PIP_ARGS:-} "${PACKAGES[@]}"
echo "$STAMP" > "$TARGET.partial/.constraints"
rm -rf "$TARGET"
mv "$TARGET.partial" "$TARGET"
