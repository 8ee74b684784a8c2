"""lmjax.backend and scripts/setup.sh: which platform a run will use, decided before JAX starts;
what the run's first lines say about it; which JAX extra the set-up installs."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lmjax import backend, cli
from lmjax.config import base_config

ROOT = Path(__file__).resolve().parents[1]
GPU_PLUGINS = ["jax-cuda12-pjrt", "jax-cuda12-plugin"]


@pytest.mark.parametrize(
    "environ,plugins,files,expected",
    [
        ({}, [], set(), "cpu"),
        ({}, GPU_PLUGINS, {"gpu"}, "gpu"),
        ({}, GPU_PLUGINS, set(), "cpu"),  # the CUDA plugin installed on a machine without a GPU
        ({}, ["libtpu"], {"tpu"}, "tpu"),
        ({"JAX_PLATFORMS": "cpu"}, GPU_PLUGINS, {"gpu"}, "cpu"),  # the user's choice wins
        ({"JAX_PLATFORMS": "cuda,cpu"}, [], set(), "gpu"),
        ({"JAX_PLATFORMS": "tpu"}, [], set(), "tpu"),
    ],
)
def test_expected_platform_without_starting_jax(environ, plugins, files, expected):
    assert backend.expected_platform(environ, plugins, lambda platform: platform in files) == expected


def test_installed_plugins_are_the_accelerator_backends_only():
    names = [
        "jax",
        "jaxlib",
        "flax",
        "jax-cuda12-plugin",
        "jax_cuda13_pjrt",
        "jax-rocm7-plugin",
        "libtpu",
        "libtpu-nightly",
        "jax-tpu-embedding",
        "jaxtyping",
    ]
    assert backend.installed_plugins(names) == [
        "jax-cuda12-plugin",
        "jax-rocm7-plugin",
        "jax_cuda13_pjrt",
        "libtpu",
        "libtpu-nightly",
    ]
    assert set(backend.installed_plugins()) <= {
        "jax-cuda12-plugin",
        "jax-cuda12-pjrt",
        "jax-cuda13-plugin",
        "jax-cuda13-pjrt",
        "libtpu",
    }


def test_nvidia_smi_listing_and_the_unused_gpu_warning(monkeypatch):
    monkeypatch.setattr(backend.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    listing = types.SimpleNamespace(
        returncode=0, stdout="GPU 0: NVIDIA H200 (UUID: GPU-1)\nGPU 1: NVIDIA H200 (UUID: GPU-2)\n"
    )
    gpus = backend.nvidia_gpus(run=lambda *a, **k: listing)
    assert gpus == ["GPU 0: NVIDIA H200 (UUID: GPU-1)", "GPU 1: NVIDIA H200 (UUID: GPU-2)"]
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    warning = backend.unused_gpu_warning("cpu", gpus)
    assert warning.startswith("warning: nvidia-smi sees 2 GPU(s) (GPU 0: NVIDIA H200) but JAX runs on cpu")
    assert "scripts/setup.sh" in warning and "\n" not in warning
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert "unset it" in backend.unused_gpu_warning("cpu", gpus)
    assert backend.unused_gpu_warning("gpu", gpus) is None
    assert backend.unused_gpu_warning("cpu", []) is None


def test_startup_lines_name_the_backend_the_attention_and_the_cpu_kernels():
    cfg = base_config()
    lines = backend.startup_lines(cfg, gpus=["GPU 0: NVIDIA H200 (UUID: GPU-1)"])
    assert lines[0].startswith("backend: cpu, ")
    assert lines[1].startswith("attention: cpu on cpu") and "hand-written" in lines[1]
    assert lines[2].endswith("on (model.cpu_kernels=True)")
    assert lines[3].startswith("warning: nvidia-smi sees 1 GPU(s)")
    with cfg.unlocked():
        cfg.model.cpu_kernels = False
    lines = backend.startup_lines(cfg, gpus=[])
    assert lines[1].startswith("attention: xla on cpu") and len(lines) == 3


def test_train_refuses_an_attention_the_device_cannot_run_in_one_line(capsys, tmp_path):
    code = cli.main(
        [
            "train",
            str(ROOT / "experiments" / "tiny.py"),
            "--workdir",
            str(tmp_path / "run"),
            "--config.model.attention=cudnn",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("lmjax: error: model.attention=cudnn cannot run here") and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def setup_dry_run(tmp_path, cuda_version: str | None, *extras: str, **env) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    if cuda_version:  # a stand-in for the driver's tool, as on a GPU machine
        smi = bin_dir / "nvidia-smi"
        smi.write_text(
            "#!/bin/sh\nif [ \"$1\" = -L ]; then echo 'GPU 0: NVIDIA H200 (UUID: GPU-1)'; exit 0; fi\n"
            f"echo '| NVIDIA-SMI 580.1  Driver Version: 580.1  CUDA Version: {cuda_version} |'\n"
        )
        smi.chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"  # nothing else that could look like an accelerator
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh"), *extras],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LMJAX_SETUP_DRY_RUN": "1", **env},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.path.exists("/dev/accel0"), reason="Linux, no TPU")
def test_setup_picks_the_jax_extra_for_the_machine_and_says_which(tmp_path):
    out = setup_dry_run(tmp_path, "12.8", "dev")
    assert "JAX backend cuda12 (nvidia-smi: GPU 0: NVIDIA H200)" in out
    assert "-c constraints.txt" in out and "-e .[cuda12,dev]" in out and "whl/cpu" in out
    assert "-e .[cuda13]" in setup_dry_run(tmp_path, "13.0")
    out = setup_dry_run(tmp_path / "none", None, "tiktoken")
    assert "JAX backend cpu" in out and "-e .[tiktoken]" in out and "whl/cpu" not in out
    assert "JAX backend tpu (LMJAX_PLATFORM=tpu)" in setup_dry_run(tmp_path / "none", None, LMJAX_PLATFORM="tpu")


def test_constraints_pin_every_dependency_inside_its_range():
    """Each exact version in constraints.txt satisfies pyproject.toml's range for that package."""
    import tomllib
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for text in requirements:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req.specifier}"
        assert any(s.operator == "<" for s in req.specifier), f"{name}: no tested upper bound"
    assert {"jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu"} <= set(pins)


@pytest.mark.parametrize("platforms,loaded", [("cuda", "False"), ("tpu", "False"), ("cpu", "True")])
def test_the_scratch_allocator_loads_only_for_cpu_runs(platforms, loaded):
    from lmjax import scratch_cache

    if not scratch_cache.usable():
        pytest.skip("needs Linux, glibc, a C compiler, no LD_PRELOAD")
    code = "from lmjax import scratch_cache as s; s.use_in_this_process(); print(s.active())"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
        env={**os.environ, "JAX_PLATFORMS": platforms, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [loaded]
