"""Hand-written gradients (lmjax.models.ops) against JAX autodiff of the plain formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models import ops


def plain_norm(x, scale, bias, eps, center):
    if center:
        x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * scale
    return x + bias if bias is not None else x


def value_and_grads(f, args, cotangent):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(cotangent)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_norm_matches_autodiff(center, with_bias):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = 3.0 * jax.random.normal(k[0], (2, 7, 16)) + 1.0
    scale = 1.0 + 0.1 * jax.random.normal(k[1], (16,))
    bias = 0.1 * jax.random.normal(k[2], (16,)) if with_bias else None
    dy = jax.random.normal(k[3], x.shape)
    args = (x, scale) + ((bias,) if with_bias else ())

    def fused(x, scale, *b):
        return ops.norm(x, scale, b[0] if b else None, 1e-5, center)

    def plain(x, scale, *b):
        return plain_norm(x, scale, b[0] if b else None, 1e-5, center)

    out, grads = value_and_grads(jax.jit(fused), args, dy)
    ref_out, ref_grads = value_and_grads(jax.jit(plain), args, dy)
    np.testing.assert_array_equal(out, ref_out)  # forward is the same formula
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)


def test_gelu_matches_autodiff_and_float64():
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(3), (4, 9, 32))
    dy = jax.random.normal(jax.random.PRNGKey(4), x.shape)
    out, (grad,) = value_and_grads(jax.jit(ops.gelu), (x,), dy)
    ref_out, (autodiff,) = value_and_grads(jax.jit(lambda x: jax.nn.gelu(x, approximate=True)), (x,), dy)
    np.testing.assert_array_equal(out, ref_out)
    # The exact derivative in float64: ours is as close to it as autodiff's (float32 tanh near ±1).
    x64, c = np.asarray(x, np.float64), np.sqrt(2 / np.pi)
    t = np.tanh(c * (x64 + 0.044715 * x64**3))
    exact = np.asarray(dy, np.float64) * (0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * c * (1 + 3 * 0.044715 * x64**2))
    ours_err, autodiff_err = np.abs(grad - exact).max(), np.abs(autodiff - exact).max()
    assert ours_err < 1e-5 and ours_err <= 1.5 * autodiff_err, (ours_err, autodiff_err)


def reference_attention(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)


@pytest.mark.parametrize(
    "t,heads,kv_heads,segments",
    [
        (12, 4, 4, False),
        (12, 4, 4, True),
        (12, 4, 2, True),
        (12, 4, 1, False),
        # from 2 * QUERY_BLOCK queries on, query blocks: 2 even ones, 3 uneven ones with documents
        (2 * ops.QUERY_BLOCK, 2, 2, False),
        (3 * ops.QUERY_BLOCK + 5, 4, 2, True),
    ],
)
def test_causal_attention_matches_reference(t, heads, kv_heads, segments):
    b, h = 2, 8
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(k[0], (b, t, heads, h))
    kk = jax.random.normal(k[1], (b, t, kv_heads, h))
    v = jax.random.normal(k[2], (b, t, kv_heads, h))
    dout = jax.random.normal(k[3], q.shape)
    mask = None
    if segments:  # three documents per row, the last one shorter
        seg = jnp.asarray(np.repeat((np.arange(t) * 5 // (2 * t))[None], b, 0))
        mask = (seg[:, :, None] == seg[:, None, :])[:, None]

    out, grads = value_and_grads(jax.jit(lambda q, k, v: ops.causal_attention(q, k, v, mask)), (q, kk, v), dout)
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference_attention(q, k, v, mask), (q, kk, v), dout)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [16, 2 * ops.QUERY_BLOCK])  # one block, and query blocks
def test_causal_attention_bfloat16_close_to_float32(t):
    k = jax.random.split(jax.random.PRNGKey(2), 4)
    q, kk, v, dout = (jax.random.normal(k[i], (2, t, 2, 8)) for i in range(4))
    f = ops.causal_attention
    out32, g32 = value_and_grads(f, (q, kk, v), dout)
    low = tuple(x.astype(jnp.bfloat16) for x in (q, kk, v))
    out16, g16 = value_and_grads(f, low, dout.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g16)
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=5e-2)
    for g, r in zip(g16, g32):
        np.testing.assert_allclose(g.astype(jnp.float32), r, atol=1e-1)


def _model_and_inputs(cpu_kernels: bool):
    from lmjax.models.transformer import Transformer, TransformerConfig

    model = Transformer(
        TransformerConfig(
            vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_len=12, cpu_kernels=cpu_kernels
        )
    )  # LayerNorm and GELU: both have kernels
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 40)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(7)), list(range(12))], jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)
    return (lambda p: model.apply(p, tokens, positions, segment_ids)), params


def test_jvp_through_the_whole_model_with_the_cpu_kernels_off():
    """Forward mode (Hessian-vector products, jax.linearize) works with model.cpu_kernels=False, and
    agrees with reverse mode: <J t, c> = <t, J^T c> for a random tangent t and cotangent c."""
    f, params = _model_and_inputs(cpu_kernels=False)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    tangent = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    logits, jt = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,)))(params, tangent)
    cotangent = jax.random.normal(jax.random.PRNGKey(3), logits.shape)
    (jtc,) = jax.jit(lambda p, c: jax.vjp(f, p)[1](c))(params, cotangent)
    forward = float(jnp.vdot(jt, cotangent))
    reverse = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(tangent), jax.tree.leaves(jtc))))
    assert np.isfinite(forward) and abs(forward) > 1e-3
    np.testing.assert_allclose(forward, reverse, rtol=1e-4)
    # The same model with the kernels on (the CPU default) has reverse mode only: the switch matters.
    f_kernels, _ = _model_and_inputs(cpu_kernels=True)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f_kernels, (params,), (tangent,))
    np.testing.assert_allclose(jax.jit(f_kernels)(params), logits, rtol=1e-5, atol=1e-5)  # same forward values
