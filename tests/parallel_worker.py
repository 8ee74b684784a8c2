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
    return TokenSplit(
        tokens=tokens.astype(np.uint16), doc_starts=np.array([0, n_tokens]), doc_bytes=np.array([n_tokens])
    )


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
    step_fn = parallel.compile_step(
        partial(make_train_step, run.model, run.tx, run.lr, cfg.train.grad_accum), run.shardings
    )
    batches = TrainBatches(
        synthetic_split(), cfg.data.seq_len, cfg.train.batch_size, cfg.data.seed, parallel.process_block
    )
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


def adam_moments(opt_state):
    """The ScaleByAdamState inside an optax chain (wherever clipping or masking put it)."""
    import jax
    import optax

    (adam,) = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(x, optax.ScaleByAdamState)
    ]
    return adam


def flat(tree, parallel=None):
    """Every leaf of a pytree as one float64 vector, fetched from the devices (under pmap, the
    first device's copy of the replicated state)."""
    import jax
    import numpy as np

    host = parallel.fetch(tree) if parallel is not None and parallel.kind == "pmap" else jax.device_get(tree)
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(host)])


def rel(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_gradient(cfg):
    """The gradient at the initial parameters of the mean next-token loss over the global batch
    of step 0, written without lmjax.train.step (plain jax.grad of optax's mean cross-entropy,
    one device, dropout off)."""
    import jax
    import optax

    run, parallel, state, _, batches = build(cfg)
    batch = batches(0)

    def mean_loss(params):
        logits = run.model.apply(
            {"params": params},
            batch["inputs"],
            positions_BxT=batch.get("positions"),
            segment_ids_BxT=batch.get("segment_ids"),
            deterministic=True,
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    return flat(jax.jit(jax.grad(mean_loss))(jax.device_get(state.params)))  # float32, as the step


def train_state_figures(cfg, steps: int, parallel=None) -> dict:
    """Losses of `steps` AdamW steps, the gradient, parameters and second moment after step 1
    (Adam's first moment after one step is (1 - b1) * gradient) and the whole state after the
    last step, as flat vectors."""
    run, parallel, state, step_fn, batches = build(cfg, parallel)
    out = {"losses": []}
    for s in range(steps):
        state, m = step_fn(state, parallel.put_batch(batches(s)))
        out["losses"].append(float(parallel.fetch(m)["loss"]))
        if s == 0:
            out["grad"] = flat(adam_moments(state.opt_state).mu, parallel) / (1 - cfg.optim.b1)
            out["params1"], out["nu1"] = flat(state.params, parallel), flat(adam_moments(state.opt_state).nu, parallel)
    adam = adam_moments(state.opt_state)
    out.update(
        params=flat(state.params, parallel),
        mu=flat(adam.mu, parallel),
        nu=flat(adam.nu, parallel),
        rng=flat(state.rng, parallel),
        counters=[int(flat(adam.count, parallel)[0]), int(flat(state.step, parallel)[0])],
    )
    return out, state, run, parallel


def case_layouts(args):
    """#1 losses, gradients, parameters, optimizer moments and dropout RNG per layout, #7 bytes
    per device under fsdp=8, what tensor=8 gathers, #2 accumulation, #3 bfloat16.

    Clipping is off (a global-norm clip and Adam both damp a uniform scale error of the
    gradient) and the model has no biases (the attention key bias has a zero gradient, and Adam
    turns its float noise into full-size steps: parameters would differ by ~lr per step).
    """
    import jax

    out = {"devices": jax.device_count(), "losses": {}, "specs": {}, "shard_shapes": {}, "state_rel": {}}
    layouts = {
        "single": {"parallel.strategy": "single"},
        "pmap": {"parallel.strategy": "pmap"},
        "data8": {"parallel.strategy": "mesh", "parallel.data": 8},
        "fsdp8": {"parallel.strategy": "mesh", "parallel.data": 1, "parallel.fsdp": 8},
        "data2_fsdp2_tensor2": {
            "parallel.strategy": "mesh",
            "parallel.data": 2,
            "parallel.fsdp": 2,
            "parallel.tensor": 2,
        },
    }
    strict = {"optim.clip_norm": 0.0, "model.bias": False}
    watched = {
        "wte": ("wte",),
        "fc": ("block_0", "mlp", "fc", "kernel"),
        "query": ("block_0", "attn", "query", "kernel"),
        "proj": ("block_0", "mlp", "proj", "kernel"),
    }

    def compare(figures, reference):
        return {k: rel(figures[k], reference[k]) for k in ("grad", "params1", "nu1", "params", "mu", "nu", "rng")} | {
            "losses": max(abs(a - b) for a, b in zip(figures["losses"], reference["losses"])),
            "counters_equal": figures["counters"] == reference["counters"],
        }

    # Without dropout: every layout, pmap included, against one device and the reference gradient.
    reference = None
    for name, overrides in layouts.items():
        cfg = tiny_mesh_config(**overrides, **strict)
        figures, state, run, parallel = train_state_figures(cfg, 3)
        if name == "single":
            reference = figures
            out["grad_vs_plain_jax"] = rel(figures["grad"], reference_gradient(cfg))
        out["losses"][name] = figures["losses"]
        out["state_rel"][name] = compare(figures, reference)
        if parallel.kind == "mesh":

            def leaf(tree, path):
                for p in path:
                    tree = tree[p]
                return tree

            out["specs"][name] = {k: spec_of(leaf(state.params, p)) for k, p in watched.items()}
            out["specs"][name]["adam_mu_fc"] = spec_of(leaf(adam_moments(state.opt_state).mu, watched["fc"]))
            out["shard_shapes"][name] = {
                k: list(leaf(state.params, p).addressable_data(0).shape) for k, p in watched.items()
            }
        if name == "fsdp8":  # #7: what one device holds vs the whole state
            dev0 = jax.devices()[0]

            def on_dev0(tree):
                return sum(
                    s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev0
                )

            total = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
            out["memory"] = {
                "params_dev0": on_dev0(state.params),
                "params_total": total(state.params),
                "opt_dev0": on_dev0(state.opt_state),
                "opt_total": total(state.opt_state),
            }
        del state

    # Dropout 0.1: the mesh layouts draw the same masks as one device; pmap draws each device's
    # rows' masks from fold_in(rng, device index), so its dropout differs (equally valid masks).
    out["dropout_rel"] = {}
    for name in ("single", "data8", "data2_fsdp2_tensor2", "pmap"):
        figures = train_state_figures(tiny_mesh_config(**layouts[name], **strict, **{"model.dropout": 0.1}), 3)[0]
        if name == "single":
            reference = figures
        out["dropout_rel"][name] = compare(figures, reference)

    # Tensor parallelism alone gathers no matrix and no activation (8 heads: 8 ways).
    cfg = tiny_mesh_config(
        **{"parallel.strategy": "mesh", "parallel.data": 1, "parallel.tensor": 8, "model.n_heads": 8}
    )
    run, parallel, state, step_fn, batches = build(cfg)
    hlo = step_fn.lower(state, parallel.put_batch(batches(0))).compile().as_text()
    out["tensor8_gathers"] = [
        dims
        for shape in re.findall(r"= (.+?) all-gather(?:-start)?\(", hlo)
        for dims in re.findall(r"\[([\d,]*)\]", shape)
    ]
    del state

    # #2: 4 micro-batches vs the full batch, one update from the same state, on a sharded mesh.
    # SGD without clipping: the update is -lr x the gradient, compared with the plain-jax gradient.
    def one_update(grad_accum: int):
        cfg = tiny_mesh_config(
            **{
                "parallel.data": 2,
                "parallel.fsdp": 2,
                "parallel.tensor": 2,
                "optim.clip_norm": 0.0,
                "train.grad_accum": grad_accum,
                "optim.name": "sgd",
                "optim.lr": 0.5,
            }
        )
        run, parallel, state, step_fn, batches = build(cfg)
        before = flat(state.params)
        state, m = step_fn(state, parallel.put_batch(batches(0)))
        return before, flat(state.params), float(parallel.fetch(m)["loss"]), cfg

    p0, full, loss_full, cfg = one_update(1)
    _, accum, loss_accum, _ = one_update(4)
    plain = reference_gradient(cfg)
    out["accum"] = {
        "params_rel": rel(accum, full),
        "update_rel": rel(accum - p0, full - p0),
        "full_grad_vs_plain_jax": rel((p0 - full) / 0.5, plain),
        "accum_grad_vs_plain_jax": rel((p0 - accum) / 0.5, plain),
        "loss_full": loss_full,
        "loss_accum": loss_accum,
    }

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
        "logits_dtype": str(logits.dtype),
        "loss_dtype": str((nll / count).dtype),
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
        results.append(
            {
                "compiles": compiles[before:],
                "train_loss": result["train_loss"],
                "heldout_loss": result["heldout_loss"],
                "start_step": result["start_step"],
            }
        )
    return {"devices": jax.device_count(), "process": jax.process_index(), "results": results}


CASES = {"layouts": case_layouts, "loop": case_loop}

if __name__ == "__main__":
    case, raw = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    result = CASES[case](json.loads(raw))
    print("RESULT " + json.dumps(result), flush=True)
