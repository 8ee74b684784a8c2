"""With 8 simulated CPU devices, the pmapped step and a single-device step give the same
losses, gradient norms and parameters (clipping off: a global-norm clip would hide a gradient
scale error; Adam's scale invariance hides it from the losses, not from the gradient norm).

Mutation caught (tried once by hand in lmjax/train/step.py): the gradients averaged (pmean)
instead of summed (psum) over the pmap axis: pmap's gradient norm is then 1/8 of one device's.
"""

import pytest

pytestmark = pytest.mark.slow

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    import jax, numpy as np
    from conftest import tiny_config
    from lmjax.data import prepare
    from lmjax.data.batches import TrainBatches
    from lmjax.run import build_run
    from lmjax.train.parallel import PmapParallel, build_parallel
    from lmjax.train.step import make_train_step
    from functools import partial

    assert jax.device_count() == 8
    cfg = tiny_config(Path(sys.argv[2]), **{"train.batch_size": 16, "optim.clip_norm": 0.0})
    data = prepare(cfg, Path(sys.argv[3]), log=lambda *_: None)
    batches = TrainBatches(data.train, cfg.data.seq_len, 16, cfg.data.seed)
    out = {}
    for name in ("single", "pmap"):
        cfg.parallel.strategy = name
        parallel = build_parallel(cfg.parallel)
        run = build_run(cfg, Path(sys.argv[3]), data.tokenizer.vocab_size, parallel)
        state = parallel.init_state(run.init_state, run.shardings, jax.random.PRNGKey(cfg.seed))
        step = parallel.compile_step(partial(make_train_step, run.model, run.tx, run.lr), run.shardings)
        losses, norms = [], []
        for s in range(3):
            state, m = step(state, parallel.put_batch(batches(s)))
            losses.append(float(parallel.fetch(m)["loss"]))
            norms.append(float(parallel.fetch(m)["grad_norm"]))
        params = parallel.fetch(state.params) if name == "pmap" else jax.device_get(state.params)
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]).astype(np.float64)
        out[name] = {"losses": losses, "grad_norms": norms, "params": flat.tolist()}
    print(json.dumps(out))
""")


def test_pmap_matches_single_device(corpus_dir, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(ROOT / "tests"), str(corpus_dir), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    single, pmap = out["single"], out["pmap"]
    for a, b in zip(single["losses"], pmap["losses"]):
        assert abs(a - b) < 1e-5, (single["losses"], pmap["losses"])
    for a, b in zip(single["grad_norms"], pmap["grad_norms"]):
        assert abs(a - b) / b < 1e-5, (single["grad_norms"], pmap["grad_norms"])
    a, b = np.array(single["params"]), np.array(pmap["params"])
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5
