"""The benchmark and profiling scripts run (tiny sizes) and print what their docstrings promise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


def run_script(*args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_train_against_a_baseline_checkout():
    # This checkout as its own baseline: same code, so same first-step loss on both sides.
    out = run_script(
        "scripts/bench_train.py", "--only", "tiny", "--steps", "2", "--no-compile-test", "--baseline", str(ROOT)
    )
    lines = out.splitlines()
    assert any(line.startswith("tiny@baseline ") for line in lines), out
    ratio = next(line for line in lines if "step time / baseline's" in line)
    loss = ratio.split("first-step loss ")[1]
    assert loss.split(" (baseline ")[0] == loss.split(" (baseline ")[1].rstrip(")"), ratio


@pytest.mark.slow
def test_profile_step_names_where_the_time_goes():
    out = run_script("scripts/profile_step.py", "tiny", "--steps", "1", "--top", "3")
    assert "matrix product" in out and "by origin" in out and "MFU if nothing else ran" in out, out


def test_profile_step_counts_the_flops_of_library_products(tmp_path):
    # A weight gradient as XLA:CPU writes it for Eigen: x[768,128] contracted with dy[768,512]
    # over the rows. Its FLOPs come from the operands' shapes: 2 * 128 * 512 * 768. The product
    # inside the fusion is a fused kernel, not a library call: it is not counted.
    hlo = tmp_path / "step.txt"
    hlo.write_text(
        "%fused_computation (p0: f32[768,128], p1: f32[128,512]) -> f32[768,512] {\n"
        "  %p0 = f32[768,128]{1,0} parameter(0)\n"
        "  %p1 = f32[128,512]{1,0} parameter(1)\n"
        "  ROOT %dot.1 = f32[768,512]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}\n"
        "}\n\n"
        "ENTRY %main (x: f32[768,128], dy: f32[768,512], w: f32[128,512]) -> f32[128,512] {\n"
        "  %x = f32[768,128]{1,0} parameter(0)\n"
        "  %dy = f32[768,512]{1,0} parameter(1)\n"
        "  %w = f32[128,512]{1,0} parameter(2)\n"
        "  %ynn_fusion = f32[768,512]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation\n"
        "  ROOT %dot.7 = f32[128,512]{1,0} dot(%x, %dy), lhs_contracting_dims={0}, rhs_contracting_dims={0}\n"
        "}\n"
    )
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import profile_step; "
        f"print(profile_step.library_dot_flops(profile_step.products({str(hlo)!r})))"
    )
    assert run_script("-c", code).strip() == str({"dot.7": 2 * 128 * 512 * 768})
