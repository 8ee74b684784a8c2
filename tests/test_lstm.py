"""The LSTM language model: its own properties, and the same train / eval / sample /
checkpoint machinery as the Transformer."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import losses_on_one_batch, tiny_config

from lmjax.config import base_config
from lmjax.models import build_model
from lmjax.models.lstm import LSTMLanguageModel

VOCAB, T = 53, 12


def make(**opts):
    c = base_config()
    c.model.kind, c.model.d_model, c.model.n_layers = "lstm", 24, 2
    for k, v in opts.items():
        c.model[k] = v
    return build_model(c.model, VOCAB, T)


def init(model):
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))


def test_build_model_gives_an_lstm_with_named_axes_and_uniform_init():
    model = make(tie_embeddings=False)
    assert isinstance(model, LSTMLanguageModel) and model.cfg.d_model == 24
    boxed = init(model)
    specs = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(s)
        for path, s in jax.tree_util.tree_leaves_with_path(
            nn.get_partition_spec(boxed)["params"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
    }
    assert specs == {
        "wte": ("vocab", "embed"),
        "lm_head": ("embed", "vocab"),
        "output_bias": ("vocab",),
        **{
            f"lstm_{i}/{n}": s
            for i in range(2)
            for n, s in [("input_kernel", ("embed", "mlp")), ("recurrent_kernel", ("embed", "mlp")), ("bias", ("mlp",))]
        },
    }
    params = nn.unbox(boxed)["params"]
    assert params["lstm_1"]["recurrent_kernel"].shape == (24, 96)
    for leaf in jax.tree.leaves(params):
        assert float(jnp.abs(leaf).max()) <= 0.1 and float(jnp.abs(leaf).max()) > 0.09  # U(-0.1, 0.1)
    assert "lm_head" not in nn.unbox(init(make(tie_embeddings=True)))["params"]


def test_shape_causality_and_learning_with_dropout():
    model = make(dropout=0.2)
    params = nn.unbox(init(model))["params"]
    base = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, T), jnp.int32)
    rows = jnp.stack([base.at[j].set((base[j] + 1) % VOCAB) for j in range(T)] + [base])
    logits = np.asarray(jax.jit(model.apply)({"params": params}, rows))
    assert logits.shape == (T + 1, T, VOCAB) and logits.dtype == np.float32
    for j in range(T):
        np.testing.assert_array_equal(logits[j, :j], logits[T, :j])
        assert np.abs(logits[j, j] - logits[T, j]).max() > 1e-5

    toks = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (4, T + 1)), jnp.int32)
    losses = losses_on_one_batch(model, params, toks, 5e-2, 30)
    assert losses[-1] < 0.7 * losses[0], losses


def test_segment_ids_reset_the_state_at_document_boundaries():
    model = make()
    params = nn.unbox(init(model))["params"]
    row = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (1, T)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    packed = np.asarray(model.apply({"params": params}, row, segment_ids_BxT=seg))
    second_alone = np.asarray(model.apply({"params": params}, row[:, 5:]))
    np.testing.assert_allclose(packed[:, 5:], second_alone, atol=1e-6)
    unreset = np.asarray(model.apply({"params": params}, row))
    assert np.abs(unreset[:, 5:] - packed[:, 5:]).max() > 1e-5


def test_lstm_trains_evaluates_and_samples_through_the_common_machinery(corpus_dir, tmp_path):
    from lmjax.eval_run import evaluate_run
    from lmjax.run import load_run
    from lmjax.sample import generate
    from lmjax.train.loop import train

    cfg = tiny_config(
        corpus_dir,
        **{
            "model.kind": "lstm",
            "model.d_model": 48,
            "model.n_layers": 2,
            "model.dropout": 0.1,
            "model.tie_embeddings": False,
            "optim.lr": 1e-2,
            "train.steps": 12,
            "train.eval_every": 6,
            "train.save_every": 6,
        },
    )
    result = train(cfg, tmp_path / "run", log=lambda *_: None)
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < losses[0] - 0.5, losses
    assert math.isfinite(result["heldout_loss"]) and result["heldout_loss"] < math.log(257)

    report, step = evaluate_run(str(tmp_path / "run"), "latest", 0, 8)
    assert step == 12 and report["tokens"] > 0
    assert report["nats_per_token"] < math.log(257)

    _, run, params, tok, _ = load_run(tmp_path / "run")
    assert isinstance(run.model, LSTMLanguageModel)
    outs = generate(run.model, params, [tok.encode("def "), tok.encode("import os\n")], 16, temperature=0.8, seed=0)
    assert [len(o) for o in outs] == [16, 16]
    assert all(0 <= t < tok.vocab_size for o in outs for t in o)
    assert isinstance(tok.decode(outs[0]), str)


MESH_SCRIPT = r"""
import json
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from lmjax.config import base_config
from lmjax.models import build_model
from lmjax.train.parallel import MeshParallel
from lmjax.train.step import create_state, make_train_step

c = base_config()
c.model.kind, c.model.d_model, c.model.n_layers, c.model.tie_embeddings = "lstm", 32, 2, False
model = build_model(c.model, 64, 16)
tx = optax.sgd(0.5)


def init_state(rng):
    return create_state(nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]), tx, rng)


toks = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
out = {}
for name, shape in [("single", (1, 1, 1)), ("mesh", (2, 2, 2))]:
    par = MeshParallel(ConfigDict(dict(zip(["data", "fsdp", "tensor"], shape))), jax.devices()[:int(np.prod(shape))])
    shardings = par.state_shardings(model, tx, init_state, jax.random.PRNGKey(0))
    state = par.init_state(init_state, shardings, jax.random.PRNGKey(0))
    step = par.compile_step(partial(make_train_step, model, tx, lambda s: 0.5), shardings)
    out[name] = []
    for _ in range(3):
        state, m = step(state, par.put_batch(batch))
        out[name].append(float(m["loss"]))
    out[name + "_spec"] = [list(state.params["lstm_0"]["recurrent_kernel"].sharding.spec),
                           list(state.params["wte"].sharding.spec)]
print(json.dumps(out))
"""


def test_lstm_shards_over_a_mesh_and_matches_one_device(tmp_path):
    """data=2 x fsdp=2 x tensor=2 over 8 CPU devices: the logical axis names shard the
    LSTM's weights, and the losses equal a single device's."""
    import os
    import subprocess
    import sys

    script = tmp_path / "mesh_lstm.py"
    script.write_text(MESH_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mesh_spec"] == [["fsdp", "tensor"], ["tensor", "fsdp"]], out["mesh_spec"]
    np.testing.assert_allclose(out["mesh"], out["single"], rtol=1e-5)
    assert out["single"][-1] < out["single"][0]
