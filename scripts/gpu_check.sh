#!/usr/bin/env bash
# The accelerator check: from a bare NVIDIA GPU machine with only this repository (and PyPI),
# in under 8 minutes on one H200 —
#   1. installs lmjax with the GPU extra (scripts/setup.sh dev: it picks cuda12 or cuda13);
#   2. runs the device-agnostic tests on the GPU (resume exactness, perplexity against brute
#      force, KV cache, Hugging Face parity) and the check that the train step with cuDNN's
#      fused attention compiles with memory linear in the sequence length;
#   3. trains one checkpoint and evaluates its held-out perplexity on the CPU and on the GPU;
#   4. trains experiments/gpt2_small.py for 50 steps in bfloat16 with fused (cuDNN) and with XLA
#      attention, side by side: tokens/s, MFU against the device's bf16 peak, peak memory;
#   5. runs the default experiment end to end (scripts/run_default.sh);
# and prints a summary. Logs and figures: $GPU_CHECK_OUT (default runs/gpu_check).
#
#   bash scripts/gpu_check.sh          on the GPU machine
#   bash scripts/gpu_check.sh --cpu    every step on the CPU with tiny settings, no install, with the
#                                      Python in $PYTHON (checks the script itself on a laptop)
# LMJAX_PIP_ARGS="--no-index --find-links DIR" installs from a wheel directory (no network).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
SUMMARY=()
FAILED=0
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
# Several processes share one GPU here (tests start subprocesses): allocate as needed, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ "$MODE" = cpu ]; then
  PY=${PYTHON:-python3}
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu
  DEVICE_ENV=(env JAX_PLATFORMS=cpu)
  TESTS=${GPU_CHECK_TESTS:-tests/test_resume.py}
  # gpt2_small's code path at a CPU-sized shape; 'cpu' (lmjax's kernel) stands in for the fused one
  SMALL=(--config.model.d_model=64 --config.model.n_layers=2 --config.model.n_heads=2 --config.model.d_ff=256
         --config.data.seq_len=128 --config.train.batch_size=4 --config.train.grad_accum=1
         --config.model.vocab_size=0 --config.data.max_documents=200)
  STEPS=6
  FUSED=cpu
  DEFAULT_ARGS=(--config.train.steps=20)
else
  PY=.venv/bin/python
  DEVICE_ENV=(env -u JAX_PLATFORMS)
  TESTS=${GPU_CHECK_TESTS:-tests/test_resume.py tests/test_eval_bruteforce.py tests/test_sampling.py
    tests/test_hf_interop.py tests/test_attention.py
    tests/test_plan.py::test_compiles_for_a_gpu_without_one_with_fused_attention_linear_in_the_sequence}
  SMALL=()
  STEPS=50
  FUSED=cudnn
  DEFAULT_ARGS=()
fi
LMJAX=("$PY" -m lmjax.cli)

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record status and time
  local name=$1 start rc
  shift
  start=$(date +%s)
  echo "== $name" >&2
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local status="ok"
  if [ $rc -ne 0 ]; then
    status="FAILED (exit $rc; tail of $OUT/$name.log below)"
    FAILED=1
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /' >&2
  fi
  SUMMARY+=("$(printf '%-22s %5ss  %s' "$name" $(( $(date +%s) - start )) "$status")")
  return $rc
}

install() {
  bash scripts/setup.sh dev || return 1
  "$PY" -c "import jax; d = jax.devices()[0]; print(jax.default_backend(), d.device_kind); \
assert jax.default_backend() == 'gpu', 'JAX does not see the GPU'"
}

if [ "$MODE" = gpu ]; then
  step install install || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
else
  SUMMARY+=("$(printf '%-22s %5ss  %s' install 0 "skipped (--cpu: $PY)")")
fi
"${DEVICE_ENV[@]}" "$PY" -c "import jax; d = jax.devices()[0]; print(f'device: {jax.device_count()} x {d.device_kind} \
({jax.default_backend()}), jax {jax.__version__}')" >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# shellcheck disable=SC2086
step tests "${DEVICE_ENV[@]}" "$PY" -m pytest -q -m "not slow" -p no:cacheprovider $TESTS

# One checkpoint, its held-out perplexity on both platforms.
ppl_check() {
  "${DEVICE_ENV[@]}" "${LMJAX[@]}" train experiments/tiny.py --workdir "$OUT/ppl_run" --config.train.steps=60 \
    || return 1
  "${DEVICE_ENV[@]}" "${LMJAX[@]}" eval "$OUT/ppl_run" --json "$OUT/ppl_device.json" || return 1
  JAX_PLATFORMS=cpu "${LMJAX[@]}" eval "$OUT/ppl_run" --json "$OUT/ppl_cpu.json" || return 1
  "$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
dev, cpu = (json.load(open(f"{out}/ppl_{w}.json")) for w in ("device", "cpu"))
rel = abs(dev["nats_per_token"] - cpu["nats_per_token"]) / cpu["nats_per_token"]
line = (f"held-out perplexity of one checkpoint: device {dev['perplexity']:.5f}, cpu {cpu['perplexity']:.5f} "
        f"({cpu['tokens']:,} tokens; nats/token differ by {rel:.1e} relative)")
print(line)
open(f"{out}/ppl.txt", "w").write(line + "\n")
# float32 products on NVIDIA GPUs run as TF32 by default (10-bit mantissa): agree to 2e-3, not bit for bit
sys.exit(0 if rel < 2e-3 and dev["tokens"] == cpu["tokens"] else 1)
EOF
}
step perplexity ppl_check

# gpt2_small, fused vs XLA attention, each in its own process (peak memory is per process).
attention_run() {
  "${DEVICE_ENV[@]}" "$PY" - "$1" "$OUT/gpt2_$1" "$STEPS" "${SMALL[@]}" <<'EOF'
import json, resource, statistics, sys

import jax

from lmjax import config as config_lib
from lmjax.backend import startup_lines
from lmjax.train.loop import train

attention, workdir, steps, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
overrides = ["--config.tokenizer.kind=byte", "--config.model.vocab_size=50257", f"--config.train.steps={steps}",
             "--config.train.log_every=5", "--config.train.eval_every=100000", "--config.train.save_every=100000",
             "--config.train.eval_batches=1", "--config.train.tensorboard=False",
             f"--config.model.attention={attention}", *extra]
cfg = config_lib.load("experiments/gpt2_small.py", overrides)
print("\n".join(startup_lines(cfg)), flush=True)
train(cfg, workdir)
records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
timed = [r for r in records if "tokens_per_s" in r][1:] or [r for r in records if "tokens_per_s" in r]
stats = jax.devices()[0].memory_stats() or {}
peak = stats.get("peak_bytes_in_use") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mfu = [r["mfu"] for r in timed if "mfu" in r]
print("RESULT " + json.dumps({
    "attention": attention, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
    "mfu": statistics.median(mfu) if mfu else None, "peak_gib": peak / 2**30,
    "peak_of": "device" if stats else "process RSS", "loss": [r["loss"] for r in records if "loss" in r][-1]}))
EOF
}
step "gpt2_small_$FUSED" attention_run "$FUSED"
step gpt2_small_xla attention_run xla

# The default experiment, end to end.
if [ "$MODE" = gpu ]; then
  step default env WORKDIR="$OUT/default" bash scripts/run_default.sh
else
  default_cpu() {
    "${LMJAX[@]}" train experiments/default.py --workdir "$OUT/default" "${DEFAULT_ARGS[@]}" || return 1
    "${LMJAX[@]}" sample "$OUT/default" --prompt "def " --max-new-tokens 40 --temperature 0.7 || return 1
    "${LMJAX[@]}" eval "$OUT/default"
  }
  step default default_cpu
fi

TOTAL=$(( $(date +%s) - T0 ))
{
  echo
  echo "=== gpu_check summary ($MODE mode) ==="
  cat "$OUT/device.txt"
  printf '%s\n' "${SUMMARY[@]}"
  grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/tests.log" | tail -1 | sed 's/^/tests: /'
  [ -f "$OUT/ppl.txt" ] && cat "$OUT/ppl.txt"
  "$PY" - "$OUT" "$FUSED" <<'EOF'
import json, sys
out, fused = sys.argv[1], sys.argv[2]
rows = {}
for name in (fused, "xla"):
    try:
        rows[name] = json.loads(next(l for l in open(f"{out}/gpt2_small_{name}.log") if l.startswith("RESULT "))[7:])
    except (OSError, StopIteration):
        pass
print(f"{'gpt2_small attention':22} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}  of")
for name, r in rows.items():
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    print(f"{name:22} {r['tokens_per_s']:10,.0f} {mfu:>7} {r['peak_gib']:9.2f}  {r['peak_of']}")
if len(rows) == 2:
    f, x = rows[fused], rows["xla"]
    print(f"{fused} / xla: tokens/s {f['tokens_per_s'] / x['tokens_per_s']:.2f}x, "
          f"peak memory {f['peak_gib'] / x['peak_gib']:.2f}x")
EOF
  grep -hE "perplexity|run directory" "$OUT/default.log" | tail -2
  echo "total: ${TOTAL}s (budget 480 s on one H200)"
} | tee "$OUT/summary.txt"
exit $FAILED
