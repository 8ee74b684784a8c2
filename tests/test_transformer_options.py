"""Every Transformer option: output shape, causality, a falling loss, and what makes it that
option (parameter shapes, init, dtypes, equivalences between layouts)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import losses_on_one_batch

from lmjax.config import base_config
from lmjax.models import build_model
from lmjax.models.transformer import rotary, stack_layers, unstack_layers

VOCAB, T = 61, 16

OPTIONS = {
    "gpt2": {},
    "rope": {"positions": "rope"},
    "no_positions": {"positions": "none"},
    "rmsnorm": {"norm": "rmsnorm"},
    "no_bias": {"bias": False},
    "swiglu": {"mlp": "swiglu", "d_ff": 48},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "untied": {"tie_embeddings": False},
    "dropout": {"dropout": 0.1},
    "bfloat16": {"dtype": "bfloat16"},
    # scan_layers and remat together; scan alone: test_scanned_*, each policy: test_remat_*
    "remat_scan": {"remat": "dots_saveable", "scan_layers": True},
    "llama": {
        "positions": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "bias": False,
        "tie_embeddings": False,
        "n_kv_heads": 2,
        "d_ff": 64,
    },
}


def make(d_model=32, n_layers=2, n_heads=4, **opts):
    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads = d_model, n_layers, n_heads
    for k, v in opts.items():
        c.model[k] = v
    return build_model(c.model, VOCAB, T)


def init(model, seed=0):
    return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32))["params"])


def param_shapes(model) -> dict:
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))["params"]
    return {k: v.shape for k, v in flat(nn.unbox(boxed)).items()}


def flat(params) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(params)
    }


def tokens(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_option_shape_causality_and_learning(opts):
    model = make(**opts)
    params = init(model)

    # Causality: row j changes token j only, so logits before j are bit-identical and
    # logits at j differ (the check can fail).
    base = tokens((T,))
    rows = jnp.stack([base.at[j].set((base[j] + 1) % VOCAB) for j in range(T)] + [base])
    logits = jax.jit(model.apply)({"params": params}, rows)
    assert logits.shape == (T + 1, T, VOCAB) and logits.dtype == jnp.float32
    logits = np.asarray(logits)
    for j in range(T):
        np.testing.assert_array_equal(logits[j, :j], logits[T, :j], err_msg=f"position < {j} saw token {j}")
        assert np.abs(logits[j, j] - logits[T, j]).max() > 1e-4, f"changing token {j} did not change its logits"

    # Learning: the real train step (dropout on) on one fixed batch.
    losses = losses_on_one_batch(model, params, tokens((4, T + 1), seed=2), 1e-2, 20)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("positions", ["learned", "rope", "none"])
def test_packed_documents_match_each_document_alone(positions):
    """With segment ids and positions restarting per document, a packed row's logits equal
    those of each document run by itself (padded at the end, which causality ignores)."""
    model = make(positions=positions, n_kv_heads=2)
    params = init(model)
    lengths = [5, 7, 4]
    row = np.asarray(tokens((T,), seed=4))
    starts = np.cumsum([0] + lengths[:-1])
    restart = np.concatenate([np.arange(n) for n in lengths])
    alone = [np.concatenate([row[s : s + n], np.zeros(T - n, np.int32)]) for s, n in zip(starts, lengths)]
    batch = np.stack([row, *alone, row])
    segment_ids = np.ones((5, T), np.int32)
    segment_ids[0] = np.repeat(np.arange(1, 4), lengths)  # row 4: same positions, no segment mask
    positions_ = np.stack([restart] + [np.arange(T)] * 3 + [restart])
    out = np.asarray(jax.jit(model.apply)({"params": params}, batch, positions_, segment_ids))
    for i, (s, n) in enumerate(zip(starts, lengths)):
        np.testing.assert_allclose(out[0, s : s + n], out[1 + i, :n], atol=1e-5)
    assert np.abs(out[4, 5:] - out[0, 5:]).max() > 1e-4, "the segment mask made no difference"


def test_scanned_layers_equal_unscanned_with_restacked_params():
    loop, scanned = make(n_layers=3), make(n_layers=3, scan_layers=True)
    params = init(loop)
    stacked = stack_layers(params, 3)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, init(scanned))
    x = tokens((2, T))
    np.testing.assert_allclose(
        jax.jit(scanned.apply)({"params": stacked}, x), jax.jit(loop.apply)({"params": params}, x), atol=1e-5
    )
    back = unstack_layers(stacked, 3)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, params))


def test_remat_policies_change_neither_logits_nor_gradients():
    x = tokens((2, T + 1))
    params = init(make())

    def grads(**opts):
        model = make(**opts)

        def loss(p):
            logits = model.apply({"params": p}, x[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

        return jax.jit(jax.grad(loss))(params)

    plain = grads()
    for policy in ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, grads(remat=policy))


def test_bfloat16_computes_in_bf16_with_float32_params_and_logits():
    f32, bf16 = make(), make(dtype="bfloat16")
    params = init(bf16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    x = tokens((2, T))
    lo32, lo16 = jax.jit(f32.apply)({"params": params}, x), jax.jit(bf16.apply)({"params": params}, x)
    assert lo16.dtype == jnp.float32
    err = float(jnp.abs(lo32 - lo16).max())
    assert 0 < err < 0.05 * float(jnp.abs(lo32).max()), err  # bf16 rounding, but not wrong
    hidden = jax.eval_shape(
        lambda: bf16.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])[1]
    )
    dtypes = {k: v.dtype for k, v in flat(hidden).items() if "mlp/fc/__call__" in k}
    assert dtypes and all(d == jnp.bfloat16 for d in dtypes.values()), dtypes


def test_gpt2_init_scales_residual_projections():
    layers = 6
    model = make(d_model=256, n_layers=layers, n_heads=4)
    p = flat(init(model))
    std = lambda k: float(np.std(p[k]))  # noqa: E731
    resid = 0.02 / np.sqrt(2 * layers)
    for k in ["block_0/attn/out/kernel", "block_5/mlp/proj/kernel"]:
        assert abs(std(k) - resid) / resid < 0.05, (k, std(k))
    for k in ["wte", "block_0/attn/query/kernel", "block_3/mlp/fc/kernel"]:
        assert abs(std(k) - 0.02) / 0.02 < 0.05, (k, std(k))
    assert all(float(np.abs(v).max()) == 0 for k, v in p.items() if k.endswith("bias"))
    assert all(bool((v == 1).all()) for k, v in p.items() if k.endswith("scale"))
    assert not np.array_equal(p["block_0/mlp/fc/kernel"], p["block_1/mlp/fc/kernel"])


def test_scanned_init_gives_each_layer_its_own_weights():
    p = flat(init(make(n_layers=3, scan_layers=True)))
    fc = p["layers/mlp/fc/kernel"]
    assert fc.shape == (3, 32, 128) and not np.array_equal(fc[0], fc[1])


def test_option_parameter_shapes():
    shapes = lambda **o: param_shapes(make(**o))  # noqa: E731
    gpt2 = shapes()
    assert gpt2["wpe"] == (T, 32) and gpt2["block_0/mlp/fc/kernel"] == (32, 128) and "lm_head" not in gpt2
    assert gpt2["block_0/attn/key/kernel"] == (32, 4, 8)
    assert shapes(n_kv_heads=2)["block_0/attn/key/kernel"] == (32, 2, 8)
    mqa = shapes(n_kv_heads=1)
    assert mqa["block_0/attn/value/kernel"] == (32, 1, 8) and mqa["block_0/attn/query/kernel"] == (32, 4, 8)
    assert shapes(mlp="gelu", d_ff=48)["block_0/mlp/fc/kernel"] == (32, 48)
    swiglu = shapes(mlp="swiglu")
    assert swiglu["block_0/mlp/gate/kernel"] == (32, 256) and swiglu["block_0/mlp/proj/kernel"] == (256, 32)
    assert "wpe" not in shapes(positions="rope") and "wpe" not in shapes(positions="none")
    assert shapes(tie_embeddings=False)["lm_head"] == (32, VOCAB)
    assert not any(k.endswith("bias") for k in shapes(bias=False))
    assert "block_0/norm1/bias" not in shapes(norm="rmsnorm", bias=False)
    assert "block_0/norm1/bias" in shapes(norm="layernorm")


def test_swiglu_default_width_follows_llama():
    from lmjax.models.transformer import TransformerConfig

    c = base_config()
    c.model.mlp, c.model.d_model = "swiglu", 4096
    assert TransformerConfig.from_config(c.model, 100, 16).d_ff == 11008  # LLaMA-7B
    c.model.mlp = "gelu"
    assert TransformerConfig.from_config(c.model, 100, 16).d_ff == 4 * 4096


def test_norms_compute_what_they_claim():
    from lmjax.models.transformer import Norm, TransformerConfig

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8)) * 3 + 1
    for kind in ["layernorm", "rmsnorm"]:
        cfg = TransformerConfig(vocab_size=4, d_model=8, norm=kind, bias=False)
        y = Norm(cfg).apply({"params": {"scale": jnp.ones(8)}}, x)
        centred = x - x.mean(-1, keepdims=True) if kind == "layernorm" else x
        expect = centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, expect, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 2, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2, 8))
    at = lambda x, p, base=10000.0: rotary(x, jnp.array([[p]]), base)  # noqa: E731
    score = lambda pq, pk, base=10000.0: float((at(q, pq, base) * at(k, pk, base)).sum())  # noqa: E731
    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert score(3, 1, 500.0) != pytest.approx(score(3, 1), abs=1e-3)  # rope_base is used
    np.testing.assert_allclose(at(q, 0), q, atol=1e-7)  # position 0 is the identity


def test_rope_base_reaches_the_model():
    a, b = make(positions="rope"), make(positions="rope", rope_base=500.0)
    params = init(a)
    x = tokens((1, T))
    la, lb = jax.jit(a.apply)({"params": params}, x), jax.jit(b.apply)({"params": params}, x)
    assert float(jnp.abs(la - lb).max()) > 1e-4


def test_dropout_is_random_in_training_and_off_in_eval():
    model = make(dropout=0.2)
    params = init(model)
    x = tokens((2, T))
    apply = jax.jit(model.apply, static_argnames="deterministic")
    train = lambda seed: apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)})  # noqa: E731
    assert float(jnp.abs(train(0) - train(1)).max()) > 1e-4
    np.testing.assert_array_equal(train(0), train(0))
    np.testing.assert_array_equal(apply({"params": params}, x), jax.jit(make().apply)({"params": params}, x))
