"""Resume is exact: N steps, stop, resume to 2N equals 2N straight, bit for bit (CPU), in the
whole train state (parameters, optimizer moments, dropout RNG, step counters) and the losses.

Mutations caught (each tried once by hand in lmjax/train/loop.py `Run.restore`): the dropout
RNG replaced by a fresh key on restore; the optimizer moments zeroed on restore. Both fail
both tests below (state leaves and losses differ after the resumed step).
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config, write_experiment

from lmjax.checkpoint import Checkpoints
from lmjax.metrics import read_jsonl
from lmjax.run import build_run
from lmjax.train.loop import train


def _final_state(run_dir, cfg, vocab_size=257):
    """(step, every leaf of the latest TrainState as numpy) as eval/sample and resume read it."""
    run = build_run(cfg, run_dir, vocab_size)
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True)
    state = run.restore(ckpts, ckpts.latest_step())
    # eval and sample read the parameters alone (no optimizer moments): the same values
    params_only = run.restore_params(ckpts, ckpts.latest_step())
    assert jax.tree.structure(params_only) == jax.tree.structure(state.params)
    for x, y in zip(jax.tree.leaves(params_only), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(x, y)
    return int(state.step), [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def _assert_same_state(a, b):
    (step_a, leaves_a), (step_b, leaves_b) = a, b
    assert step_a == step_b and len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def test_stop_and_resume_is_bit_identical(corpus_dir, tmp_path):
    cfg = tiny_config(
        corpus_dir, **{"train.steps": 8, "train.save_every": 100, "train.eval_every": 4, "model.dropout": 0.1}
    )
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, straight, log=lambda *_: None)
    first = train(cfg, split, log=lambda *_: None, stop_at=4)
    assert first["step"] == 4
    second = train(cfg, split, log=lambda *_: None)
    assert second["start_step"] == 4

    a, b = _final_state(straight, cfg), _final_state(split, cfg)
    assert a[0] == 8
    _assert_same_state(a, b)
    la, lb = _losses(straight), _losses(split)
    assert sorted(lb) == list(range(1, 9))  # every step once, none duplicated
    assert [la[s] for s in range(5, 9)] == [lb[s] for s in range(5, 9)]

    # Resuming with more steps says what happens to the (cosine) schedule, in one line.
    lines = []
    cfg.train.steps = 10
    train(cfg, split, log=lines.append)
    assert any(
        line.startswith("resume: config change allowed: train.steps 8 -> 10: the cosine decay now ends at step 10")
        for line in lines
    ), lines


@pytest.mark.slow
def test_kill9_and_resume_in_fresh_processes_without_compilation_cache(corpus_dir, tmp_path):
    """`lmjax train` killed with SIGKILL after its step-4 checkpoint, resumed by a new process;
    the reference is another process run straight through. No process reads or writes JAX's
    compilation cache, so each compiles its own programs: a state only a recompile or a fresh
    process restores would show here."""
    exp = write_experiment(
        tmp_path / "exp.py",
        corpus_dir,
        "\n".join(["c.train.steps = 8", "c.train.save_every = 2", "c.train.eval_every = 4", "c.model.dropout = 0.1"]),
    )
    cache = tmp_path / "jax_cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.update(PYTHONPATH=str(ROOT), JAX_ENABLE_COMPILATION_CACHE="false", JAX_COMPILATION_CACHE_DIR=str(cache))

    def cli(run_dir):
        return [sys.executable, "-m", "lmjax.cli", "train", str(exp), "--workdir", str(run_dir)]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(cli(straight), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(cli(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (killed / "checkpoints" / "4").is_dir():  # a finished save is renamed to its step
            assert proc.poll() is None, f"training ended ({proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    assert max(_losses(killed)) < 8, "the kill came too late to test a resume"

    resumed = subprocess.run(cli(killed), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(resumed.stdout.split("resuming from checkpoint at step ")[1].split()[0])
    assert start >= 4
    assert not cache.exists() or not any(cache.iterdir()), "the compilation cache was used"

    cfg = tiny_config(corpus_dir, **{"train.steps": 8, "model.dropout": 0.1})
    _assert_same_state(_final_state(straight, cfg), _final_state(killed, cfg))
    la, lb = _losses(straight), _losses(killed)
    assert sorted(lb) == list(range(1, 9)) and lb == la
