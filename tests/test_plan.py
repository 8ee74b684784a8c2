"""`lmjax plan`: figures of the ahead-of-time compiled train step against counts made by hand."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from lmjax.devices import DEVICE_MEMORY, GiB, cuda_plugin_installed, gpu_compile_dir
from lmjax.errors import UserError
from lmjax.plan import (
    Plan,
    check_device,
    default_devices,
    device_name,
    plan_in_child,
    vocab_size_without_data,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "tiny.py")
# No biases, RMSNorm scales only, rotary positions: every matrix divides by 8, every vector is a norm scale.
V, D, L, F = 256, 32, 2, 128
SHAPE = [
    f"--config.model.vocab_size={V}",
    f"--config.model.d_model={D}",
    f"--config.model.n_layers={L}",
    "--config.model.n_heads=4",
    f"--config.model.d_ff={F}",
    "--config.model.bias=False",
    "--config.model.norm=rmsnorm",
    "--config.model.positions=rope",
    "--config.train.batch_size=16",
]


# The CUDA plugin and cuDNN, installed beside .venv by scripts/setup_gpu_compile.sh (scripts/test.sh runs it).
has_cudnn = bool(gpu_compile_dir()) or (
    importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.cudnn") is not None
)  # find_spec of a submodule raises when its parent package is missing
can_compile_cudnn_for_gpu = pytest.mark.skipif(
    not (has_cudnn and (gpu_compile_dir() or cuda_plugin_installed())),
    reason="needs the CUDA plugin and cuDNN: bash scripts/setup_gpu_compile.sh (no GPU needed)",
)


def plan_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "lmjax.cli", "plan", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("fsdp", [1, 8])
def test_parameter_and_optimizer_bytes_match_a_count_by_hand(tmp_path, fsdp):
    out = tmp_path / "plan.json"
    r = plan_cli(
        TINY,
        "--devices",
        str(fsdp),
        f"--config.parallel.fsdp={fsdp}",
        "--config.parallel.data=1",
        *SHAPE,
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    p = json.loads(out.read_text())
    matrices = V * D + L * (4 * D * D + 2 * D * F)  # tied embedding; q, k, v, out; MLP fc and proj
    vectors = L * 2 * D + D  # two norm scales per block and the final norm: replicated
    assert p["n_params"] == matrices + vectors
    assert p["devices"] == fsdp
    assert p["params_bytes"] == 4 * (matrices // fsdp + vectors)
    # Adam: two float32 moments per parameter, sharded as the parameters; plus int32 step counters.
    assert 0 < p["opt_state_bytes"] - 2 * p["params_bytes"] <= 16
    assert p["batch_bytes"] == 2 * 4 * 16 * 32 // fsdp  # inputs and targets, int32, rows split over devices
    assert p["temp_bytes"] > 0 and p["peak_bytes"] >= p["params_bytes"] + p["opt_state_bytes"] + p["temp_bytes"]
    assert p["flops_per_step"] > 6 * (matrices) * 16 * 32
    assert f"over {fsdp} cpu devices" in r.stdout and "H200-141G" in r.stdout
    assert "attention: cpu on cpu" in r.stdout and p["attention"].startswith("attention: cpu on cpu")


def test_mesh_that_does_not_divide_the_devices_is_one_line():
    r = plan_cli(TINY, "--devices", "8", "--config.parallel.fsdp=3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "parallel.fsdp=3" in r.stderr and "8 devices" in r.stderr


def test_a_plan_that_does_not_fit_the_named_device_exits_2():
    # 2M x 2048 embedding: 16 GiB of float32 parameters, 48 GiB with Adam's moments.
    r = plan_cli(
        TINY,
        "--compiler",
        "cpu",  # the same on either compiler (with .gpu-compile/, auto compiles for the A100)
        "--device",
        "a100-40g",
        "--config.model.vocab_size=2000000",
        "--config.model.d_model=2048",
        "--config.model.n_layers=1",
        "--config.model.n_heads=16",
        "--config.data.seq_len=8",
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "A100-40G" in r.stderr and "parallel.fsdp" in r.stderr
    assert "A100-40G   no" in r.stdout


def test_device_names_and_fit():
    assert device_name("h100") == "H100-80G" and device_name("tpu v5e") == "TPU-v5e"
    with pytest.raises(UserError, match="choose one of"):
        device_name("rtx 9090")
    plan = Plan("x", 1, "cpu", "cpu", "", "transformer", 0, 0, "", 0, 0, 0, 0, 0, 0, int(20 * GiB), None)
    check_device(plan, "TPU-v5p")
    with pytest.raises(UserError, match="TPU-v5e"):
        check_device(plan, "TPU-v5e")
    assert set(DEVICE_MEMORY) >= {"A100-40G", "A100-80G", "H100-80G", "H200-141G", "TPU-v5e"}


def test_device_count_from_the_mesh():
    assert default_devices(ConfigDict({"strategy": "auto", "data": -1, "fsdp": 4, "tensor": 2})) == 8
    assert default_devices(ConfigDict({"strategy": "single", "data": 2, "fsdp": 1, "tensor": 1})) == 1


def test_vocabulary_without_data():
    from lmjax.config import base_config

    c = base_config()
    assert vocab_size_without_data(c)[0] == 257  # byte
    c.tokenizer.kind, c.tokenizer.vocab_size = "bpe", 50257
    assert vocab_size_without_data(c)[0] == 50257
    c.tokenizer.kind, c.tokenizer.vocab_size = "char", 0
    with pytest.raises(UserError, match="model.vocab_size"):
        vocab_size_without_data(c)
    c.model.vocab_size = 300
    assert vocab_size_without_data(c) == (300, "model.vocab_size")


@can_compile_cudnn_for_gpu
def test_compiles_for_a_gpu_without_one_with_fused_attention_linear_in_the_sequence(tmp_path):
    """The train step compiled for two H100s without one (XLA's GPU compiler through the CUDA
    plugin): exact parameter bytes, cuDNN's fused attention taken by auto for bfloat16, and
    temporaries about linear in data.seq_len. XLA's attention keeps the T x T probabilities for
    the backward pass and grows ~14x for 4x the tokens (measured on `tiny`: 36.7 -> 527.5 MiB;
    cuDNN 12.7 -> 39.6 MiB)."""

    def plan(attention: str, seq_len: int) -> tuple[dict, str]:
        out = tmp_path / f"{attention}-{seq_len}.json"
        r = plan_cli(
            TINY, "--device", "H100-80G", "--devices", "2", *SHAPE, "--json", str(out),
            "--config.model.n_heads=2", "--config.train.batch_size=4", "--config.model.dtype=bfloat16",
            f"--config.model.attention={attention}", f"--config.data.seq_len={seq_len}",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "attention: cudnn on gpu (NVIDIA H100 80GB HBM3)" in r.stdout, r.stdout
        assert "cudart_stub" not in r.stderr and "absl" not in r.stderr  # the plugin's no-GPU logging is dropped
        return json.loads(out.read_text()), r.stdout

    short, stdout = plan("auto", 512)
    assert short["platform"] == "gpu" and short["device_kind"] == "NVIDIA H100 80GB HBM3" and short["devices"] == 2
    assert "XLA's GPU compiler" in stdout
    matrices, vectors = V * D + L * (4 * D * D + 2 * D * F), L * 2 * D + D
    assert short["params_bytes"] == 4 * (matrices + vectors)  # data parallel: a full copy per device
    long, _ = plan("cudnn", 2048)
    assert long["temp_bytes"] < 4.5 * short["temp_bytes"]  # 4x the tokens: linear, not 16x


@pytest.mark.parametrize("status, shown", [(0, False), (2, False), (1, True)])
def test_a_gpu_plan_shows_the_compilers_logging_only_when_it_fails(capsys, status, shown):
    log = "E1202 05:22:03.046561    2189 gpu_hlo_schedule.cc:968] The byte size of input/output arguments"
    code = f"import sys; print({log!r}, file=sys.stderr); print('lmjax: error: x', file=sys.stderr); sys.exit({status})"
    assert plan_in_child([sys.executable, "-c", code], dict(os.environ), drop_cxx_logging=True) == status
    err = capsys.readouterr().err
    assert "lmjax: error: x" in err and (log in err) == shown


def test_a_planning_process_stopped_by_a_signal_says_so(capsys):
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert plan_in_child([sys.executable, "-c", code], dict(os.environ), drop_cxx_logging=True) == 128 + 15
    assert "stopped by signal 15" in capsys.readouterr().err
