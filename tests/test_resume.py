"""Resume is exact: N steps, stop, resume to 2N equals 2N straight, bit for bit (CPU)."""

import jax
import numpy as np

from conftest import tiny_config
from lmjax.checkpoint import Checkpoints
from lmjax.metrics import read_jsonl
from lmjax.run import build_run
from lmjax.train.loop import train


def _final_params(run_dir, vocab_size, cfg):
    run = build_run(cfg, run_dir, vocab_size)
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True)
    state = run.restore(ckpts, ckpts.latest_step())
    # eval and sample read the parameters alone (no optimizer moments): the same values
    params_only = run.restore_params(ckpts, ckpts.latest_step())
    assert jax.tree.structure(params_only) == jax.tree.structure(state.params)
    for x, y in zip(jax.tree.leaves(params_only), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(x, y)
    return jax.device_get(state.params), int(state.step)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def test_stop_and_resume_is_bit_identical(corpus_dir, tmp_path):
    cfg = tiny_config(corpus_dir, **{"train.steps": 8, "train.save_every": 100, "train.eval_every": 4,
                                     "model.dropout": 0.1})
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, straight, log=lambda *_: None)
    first = train(cfg, split, log=lambda *_: None, stop_at=4)
    assert first["step"] == 4
    second = train(cfg, split, log=lambda *_: None)
    assert second["start_step"] == 4

    a, step_a = _final_params(straight, 257, cfg)
    b, step_b = _final_params(split, 257, cfg)
    assert step_a == step_b == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    la, lb = _losses(straight), _losses(split)
    assert sorted(lb) == list(range(1, 9))  # every step once, none duplicated
    assert [la[s] for s in range(5, 9)] == [lb[s] for s in range(5, 9)]
