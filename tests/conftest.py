"""Shared fixtures: a small real corpus on disk, a tiny config, and an isolated cache."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Many tests (and their subprocesses) compile the same tiny programs: share the compiled
# executables through JAX's persistent cache, in a folder of this pytest run alone (removed at
# its end), so that no earlier run, other checkout or other user hands its executables to this
# one. Set before JAX is imported anywhere.
# Subprocesses (and experiment files that import this module) inherit the folder.
OWN_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    OWN_JAX_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmjax-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def machine_description() -> str:
    """The CPU the tests run on and the vector instructions that change numerics: XLA and the
    BLAS libraries pick their kernels by them (CI machines differ from the one tests were written on)."""
    import platform

    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):  # x86, ARM
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "asimd", "sve", "bf16")
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(f for f in wanted if f in flags) or 'no vector flags read'}"


def pytest_report_header(config):
    return f"machine: {machine_description()}"


def pytest_unconfigure(config):
    if OWN_JAX_CACHE:
        shutil.rmtree(OWN_JAX_CACHE, ignore_errors=True)


@pytest.fixture
def float32_products():
    """float32 matrix products computed in float32 during the test: under the default precision
    a GPU uses TF32, and a CPU with bfloat16 units may compute them from bfloat16 parts
    (test_hf_interop: test_the_logit_bound_sees_float32_products_made_of_bfloat16)."""
    import jax

    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LMJAX_CACHE", str(tmp_path_factory.getbasetemp() / "lmjax_cache"))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """40 real text documents: standard library modules, copied as .txt files."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p for p in stdlib.glob("*.py"))[:40]
    for p in names:
        text = p.read_text(encoding="utf-8", errors="replace")[:6000]
        (out / (p.stem + ".txt")).write_text(text, encoding="utf-8")
    return out


def tiny_config(corpus_dir: Path, **overrides):
    """A 2-layer, width-32 Transformer on the fixture corpus; `overrides` as 'a.b': value."""
    from lmjax.config import base_config, set_value

    c = base_config()
    c.data.source = "files"
    c.data.paths = str(corpus_dir / "*.txt")
    c.data.heldout_fraction = 0.2
    c.data.seq_len = 32
    c.model.d_model = 32
    c.model.n_layers = 2
    c.model.n_heads = 2
    c.optim.warmup_steps = 2
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.save_every = 3
    c.train.eval_batches = 2
    c.train.tensorboard = False
    for key, value in overrides.items():
        set_value(c, key, value)
    return c


def losses_on_one_batch(model, params, tokens_BxT1, lr: float, steps: int) -> list[float]:
    """Losses of `steps` real train steps (Adam, dropout as configured) on one fixed batch;
    tokens_BxT1 holds inputs and their next-token targets."""
    import jax
    import optax

    from lmjax.train.step import create_state, make_train_step

    tx = optax.adam(lr)
    batch = {"inputs": tokens_BxT1[:, :-1], "targets": tokens_BxT1[:, 1:]}
    state = create_state(params, tx, jax.random.PRNGKey(3))
    step = jax.jit(make_train_step(model, tx, lambda s: lr))
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m lmjax.cli ARGS` in a subprocess; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lmjax.cli", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_experiment(path: Path, corpus_dir: Path, body: str = "") -> Path:
    """An experiment file using the tiny config, plus extra lines of `body` (indented)."""
    extra = "\n".join("    " + line for line in body.strip().splitlines()) if body.strip() else ""
    path.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import tiny_config
from pathlib import Path


def get_config():
    c = tiny_config(Path({str(corpus_dir)!r}))
{extra}
    return c
""")
    return path
