#!/usr/bin/env bash
# Install what compiling for an NVIDIA GPU *without one* needs (jax-cuda12-plugin and its PJRT
# runtime, and cuDNN's library for the fused attention kernel) into .gpu-compile/, beside .venv,
# at the versions of constraints.txt. `lmjax plan --device H100-80G` uses it when it is on
# PYTHONPATH; the tests that compile the GPU program on a CPU machine find it there. Kept out of
# .venv: with the CUDA plugin installed, every JAX process on a machine without a GPU would try
# (and fail, with a warning) to start CUDA. No GPU or driver is needed; about 0.9 GB to download.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=.gpu-compile
[ -x .venv/bin/python ] || bash scripts/setup.sh
if [ -d "$TARGET/jax_plugins/xla_cuda12" ] && [ -d "$TARGET/nvidia/cudnn" ]; then
  exit 0
fi
echo "setup: the CUDA plugin and cuDNN for compiling GPU programs without a GPU, into $TARGET/"
rm -rf "$TARGET.partial"
.venv/bin/python -m pip install -q -c constraints.txt --no-deps --target "$TARGET.partial" \
  ${LMJAX_PIP_ARGS:-} jax-cuda12-plugin jax-cuda12-pjrt nvidia-cudnn-cu12
rm -rf "$TARGET"
mv "$TARGET.partial" "$TARGET"
