"""Subprocess worker for tests/test_parallel.py: one case per process, JSON on stdout.

Run as `python tests/parallel_worker.py CASE '{"json": "args"}'` with XLA_FLAGS (simulated
device count) set by the caller before JAX is imported. The last stdout line is
`RESULT {...}`. Cases build the real pieces (config → Run → parallel → step) on a tiny
Transformer whose widths divide every mesh axis, so fsdp and tensor really shard.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def tiny_mesh_config(**overrides):
    """Width 32, 4 heads, MLP 128, vocabulary 256: every dimension divides 8."""
    from lmjax.config import base_config, set_value

    c = base_config()
    c.data.seq_len = 16
    c.model.d_model, c.model.n_layers, c.model.n_heads = 32, 1, 4
    c.model.vocab_size = 256
    c.optim.warmup_steps, c.optim.lr = 0, 3e-3
    c.train.steps, c.train.batch_size = 20, 16
    for key, value in overrides.items():
        set_value(c, key, value)
    return c


def synthetic_split(n_tokens: int = 4096, vocab: int = 256, seed: int = 0):
    """A token stream with structure (a noisy repeating pattern) so the loss can fall."""
    import numpy as np

    from lmjax.data.cache import TokenSplit

    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, vocab, 37)
    tokens = np.resize(pattern, n_tokens)
    noise = rng.random(n_tokens) < 0.1
    tokens[noise] = rng.integers(0, vocab, int(noise.sum()))
    return TokenSplit(tokens=tokens.astype(np.uint16), doc_starts=np.array([0, n_tokens]),
                      doc_bytes=np.array([n_tokens]))


def build(cfg, parallel=None):
    """cfg → (run, parallel, state, step_fn, batches)."""
    from functools import partial

    import jax

    from lmjax.data.batches import TrainBatches
    from lmjax.run import build_run
    from lmjax.train.parallel import build_parallel, check_batch
    from lmjax.train.step import make_train_step

    parallel = parallel or build_parallel(cfg.parallel)
    check_batch(cfg.train.batch_size, cfg.train.grad_accum, parallel)
    run = build_run(cfg, Path("."), cfg.model.vocab_size, parallel)
    state = parallel.init_state(run.init_state, run.shardings, jax.random.PRNGKey(cfg.seed))
    step_fn = parallel.compile_step(partial(make_train_step, run.model, run.tx, run.lr, cfg.train.grad_accum), run.shardings)
    batches = TrainBatches(synthetic_split(), cfg.data.seq_len, cfg.train.batch_size, cfg.data.seed,
                           parallel.process_block)
    return run, parallel, state, step_fn, batches


def train_losses(cfg, steps: int, parallel=None):
    run, parallel, state, step_fn, batches = build(cfg, parallel)
    losses = []
    for s in range(steps):
        state, m = step_fn(state, parallel.put_batch(batches(s)))
        losses.append(float(parallel.fetch(m)["loss"]))
    return losses, state, run, parallel


def spec_of(x) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def case_layouts(args):
    """#1 losses per layout, #7 bytes per device under fsdp=8, what tensor=8 gathers,
    #2 accumulation, #3 bfloat16."""
    import jax
    import numpy as np

    out = {"devices": jax.device_count(), "losses": {}, "specs": {}, "shard_shapes": {}}
    layouts = {
        "single": {"parallel.strategy": "single"},
        "pmap": {"parallel.strategy": "pmap"},
        "data8": {"parallel.strategy": "mesh", "parallel.data": 8},
        "fsdp8": {"parallel.strategy": "mesh", "parallel.data": 1, "parallel.fsdp": 8},
        "data2_fsdp2_tensor2": {"parallel.strategy": "mesh", "parallel.data": 2, "parallel.fsdp": 2, "parallel.tensor": 2},
    }
    watched = {"wte": ("wte",), "fc": ("block_0", "mlp", "fc", "kernel"), "query": ("block_0", "attn", "query", "kernel"),
               "proj": ("block_0", "mlp", "proj", "kernel")}
    for name, overrides in layouts.items():
        cfg = tiny_mesh_config(**overrides)
        losses, state, run, parallel = train_losses(cfg, 3)
        out["losses"][name] = losses
        if parallel.kind == "mesh":
            def leaf(tree, path):
                for p in path:
                    tree = tree[p]
                return tree
            out["specs"][name] = {k: spec_of(leaf(state.params, p)) for k, p in watched.items()}
            out["specs"][name]["adam_mu_fc"] = spec_of(leaf(state.opt_state[1][0].mu, watched["fc"]))
            out["shard_shapes"][name] = {k: list(leaf(state.params, p).addressable_data(0).shape) for k, p in watched.items()}
        if name == "fsdp8":  # #7: what one device holds vs the whole state
            dev0 = jax.devices()[0]
            def on_dev0(tree):
                return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev0)
            total = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
            out["memory"] = {"params_dev0": on_dev0(state.params), "params_total": total(state.params),
                             "opt_dev0": on_dev0(state.opt_state), "opt_total": total(state.opt_state)}
        del state

    # Tensor parallelism alone gathers no matrix and no activation (8 heads: 8 ways).
    cfg = tiny_mesh_config(**{"parallel.strategy": "mesh", "parallel.data": 1, "parallel.tensor": 8, "model.n_heads": 8})
    run, parallel, state, step_fn, batches = build(cfg)
    hlo = step_fn.lower(state, parallel.put_batch(batches(0))).compile().as_text()
    out["tensor8_gathers"] = [dims for shape in re.findall(r"= (.+?) all-gather(?:-start)?\(", hlo)
                              for dims in re.findall(r"\[([\d,]*)\]", shape)]
    del state

    # #2: 4 micro-batches vs the full batch, one update from the same state, on a sharded mesh.
    # SGD: the update is the gradient itself (Adam would normalise away ~0 gradients, e.g. of
    # the attention key bias, turning float noise into full-size steps).
    def one_update(grad_accum: int, optim: str):
        cfg = tiny_mesh_config(**{"parallel.data": 2, "parallel.fsdp": 2, "parallel.tensor": 2,
                                  "train.grad_accum": grad_accum, "optim.name": optim, "optim.lr": 0.5})
        run, parallel, state, step_fn, batches = build(cfg)
        before = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])
        state, m = step_fn(state, parallel.put_batch(batches(0)))
        after = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])
        return before, after, float(parallel.fetch(m)["loss"])

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(a))

    p0, full, loss_full = one_update(1, "sgd")
    _, accum, loss_accum = one_update(4, "sgd")
    out["accum"] = {"params_rel": rel(full, accum), "update_rel": rel(full - p0, accum - p0),
                    "loss_full": loss_full, "loss_accum": loss_accum}

    # #3: bfloat16 compute, float32 params / optimizer state / logits / loss.
    cfg = tiny_mesh_config(**{"model.dtype": "bfloat16", "parallel.data": 2, "parallel.fsdp": 2, "parallel.tensor": 2})
    losses, state, run, parallel = train_losses(cfg, 12)
    batch = parallel.put_batch(build(cfg, parallel)[4](0))
    logits = jax.jit(lambda p, x: run.model.apply({"params": p}, x))(state.params, batch["inputs"])
    jaxpr = str(jax.make_jaxpr(lambda p, x: run.model.apply({"params": p}, x))(state.params, batch["inputs"]))
    from lmjax.train.loss import token_nll
    nll, count = jax.jit(token_nll)(logits, batch["targets"])
    out["bf16"] = {
        "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
        "opt_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0}),
        "logits_dtype": str(logits.dtype), "loss_dtype": str((nll / count).dtype),
        "bf16_dot_generals": jaxpr.count("bf16[") > 0 and "dot_general" in jaxpr,
        "losses": losses,
    }
    return out


def case_loop(args):
    """Run lmjax.train.loop.train with the given config overrides in `workdir`; with
    args['count_compiles'] also count XLA compilations by function name."""
    import jax

    from conftest import tiny_config
    from lmjax.train.loop import train

    compiles = []
    if args.get("count_compiles"):
        from jax._src import monitoring

        def listener(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                compiles.append(kw.get("fun_name", "?"))

        monitoring.register_event_duration_secs_listener(listener)
    results = []
    for run in args["runs"]:
        before = len(compiles)
        cfg = tiny_config(Path(args["corpus"]), **run["overrides"])
        result = train(cfg, run["workdir"], log=lambda *_: None)
        results.append({"compiles": compiles[before:], "train_loss": result["train_loss"],
                        "heldout_loss": result["heldout_loss"], "start_step": result["start_step"]})
    return {"devices": jax.device_count(), "process": jax.process_index(), "results": results}


CASES = {"layouts": case_layouts, "loop": case_loop}

if __name__ == "__main__":
    case, raw = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    result = CASES[case](json.loads(raw))
    print("RESULT " + json.dumps(result), flush=True)
