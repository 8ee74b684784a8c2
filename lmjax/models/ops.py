"""Layer functions with hand-written backward passes (jax.custom_vjp), written for training
speed on XLA:CPU. They apply on the CPU only, and only with model.cpu_kernels=True (the
choice is made in lmjax.models.attention); elsewhere the model uses the plain formulas
(`plain_norm`, `plain_gelu`), so forward-mode autodiff (jax.jvp) works through it.

Forward values are the plain formulas (attention scales the queries rather than the logits);
the gradients are written by hand, in fewer and larger steps than autodiff produces. On
XLA:CPU that matters:

- `norm`: autodiff of LayerNorm leaves, per layer, a broadcast term that XLA adds into the
  residual-stream gradient; its fusion pass then recomputes the whole chain of these adds
  in every consumer, a cost that grows with the square of the depth. The hand-written
  gradient is one fused expression per norm.
- `gelu`: autodiff of the tanh form saves the tanh and sums two gradient paths, which XLA
  writes as extra full-size tensors; the hand-written gradient saves only the input.
- `causal_attention`: the softmax backward as FlashAttention writes it (the row sum
  taken over the head dimension, sum(dO * O), not over the keys), every product in a
  batch-major layout in which no key x key matrix is ever transposed, and one saved key x
  key tensor per layer instead of two (a third less training memory on long contexts).
  From 256 queries on, blocks of queries skip the keys they cannot see.

Tensor names as in transformer.py: B batch, T queries, S keys, N query heads, K key/value
heads, G = N / K query heads per key/value head, H head size, D width.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array

# The masked-logit value of jax.nn.dot_product_attention: finite, so a row never becomes NaN.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


# ---------------------------------------------------------------------------------------- norm


def plain_norm(x_BxTxD: Array, scale_D: Array, bias_D: Array | None, eps: float, center: bool) -> Array:
    """`norm` without the hand-written gradient: plain JAX, differentiable in both modes."""
    return _norm_forward(x_BxTxD, scale_D, bias_D, eps, center)[0]


def _norm_forward(x, scale, bias, eps, center):
    if center:
        x = x - x.mean(-1, keepdims=True)
    r = jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat = x * r
    y = xhat * scale
    if bias is not None:
        y = y + bias
    return y, xhat, r


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm(x_BxTxD: Array, scale_D: Array, bias_D: Array | None, eps: float, center: bool) -> Array:
    """LayerNorm (center=True) or RMSNorm (center=False) over the last axis, in x's dtype."""
    return _norm_forward(x_BxTxD, scale_D, bias_D, eps, center)[0]


def _norm_fwd(x, scale, bias, eps, center):
    y, xhat, r = _norm_forward(x, scale, bias, eps, center)
    return y, (xhat, r, scale, bias)


def _norm_bwd(eps, center, residuals, dy):
    xhat, r, scale, bias = residuals
    g = dy * scale
    dx = g - xhat * (g * xhat).mean(-1, keepdims=True)
    if center:
        dx = dx - g.mean(-1, keepdims=True)
    rows = tuple(range(dy.ndim - 1))
    return dx * r, (dy * xhat).sum(rows), (None if bias is None else dy.sum(rows))


norm.defvjp(_norm_fwd, _norm_bwd)


# ---------------------------------------------------------------------------------------- gelu

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def plain_gelu(x: Array) -> Array:
    """`gelu` without the hand-written gradient."""
    return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """GPT-2's GELU (tanh approximation), exactly jax.nn.gelu(x, approximate=True)."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, dy):
    # Only the input is saved (the matrix product's output, kept anyway); the derivative is
    # recomputed in one fused pass with dy, instead of autodiff's saved tanh and two gradient paths.
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    t = jnp.tanh(u)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return (dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# ----------------------------------------------------------------------------------- attention


def _dot(a, b, contract_a: int, contract_b: int) -> Array:
    """Batched matmul over the two leading axes, accumulated in float32."""
    return jax.lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32
    )


def _queries_by_kv_head(q_BxTxNxH: Array, kv_heads: int) -> Array:
    """B,T,N,H → B,K,G*T,H: the G query heads of a key/value head become extra rows."""
    b, t, n, h = q_BxTxNxH.shape
    q = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    return q.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, n // kv_heads * t, h)


def _attention_forward(q, k, v, mask, scale):
    b, t, n, h = q.shape
    kv = k.shape[2]
    # The scale goes on the queries (G*T x H), not on the logits (G*T x S): the smaller tensor.
    q_BxKxGTxH = _queries_by_kv_head(q, kv) * jnp.asarray(scale, q.dtype)
    k_BxKxSxH, v_BxKxSxH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = _dot(q_BxKxGTxH, k_BxKxSxH, 3, 3)
    mask_GTxS = jnp.broadcast_to(mask[:, :, None], (mask.shape[0], 1, n // kv, t, mask.shape[-1]))
    logits = jnp.where(mask_GTxS.reshape(mask.shape[0], 1, n // kv * t, -1), logits, jnp.float32(MASKED_LOGIT))
    probs_BxKxGTxS = jax.nn.softmax(logits, axis=-1)
    out_BxKxGTxH = _dot(probs_BxKxGTxS.astype(v.dtype), v_BxKxSxH, 3, 2)
    out = out_BxKxGTxH.reshape(b, kv, n // kv, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out.astype(q.dtype), (q_BxKxGTxH, k_BxKxSxH, v_BxKxSxH, probs_BxKxGTxS, out_BxKxGTxH)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
    return _attention_forward(q, k, v, mask, scale)[0]


def _attention_bwd(scale, residuals, dout_BxTxNxH):
    q, k, v, probs, out = residuals  # B,K,GT,H (scaled); B,K,S,H; B,K,S,H; B,K,GT,S (f32); B,K,GT,H (f32)
    b, kv, _, h = q.shape
    dout = _queries_by_kv_head(dout_BxTxNxH, kv)
    # Softmax backward: dlogits = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dO * O).
    dprobs = _dot(dout, v, 3, 3)
    row = jnp.sum(dout.astype(jnp.float32) * out, -1, keepdims=True)
    dlogits = (probs * (dprobs - row)).astype(q.dtype)
    dq = _dot(dlogits, k, 3, 2) * jnp.float32(scale)
    # dK and dV contract over the query rows: computed transposed (H x S) so that the
    # G*T x S matrices are used as they lie; the small H-wide operands are transposed instead.
    dk_BxKxHxS = _dot(q.swapaxes(2, 3), dlogits, 3, 2)
    dv_BxKxHxS = _dot(dout.swapaxes(2, 3), probs.astype(dout.dtype), 3, 2)
    n, t = dout_BxTxNxH.shape[2], dout_BxTxNxH.shape[1]
    dq = dq.reshape(b, kv, n // kv, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    dk = dk_BxKxHxS.transpose(0, 3, 1, 2)
    dv = dv_BxKxHxS.transpose(0, 3, 1, 2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_forward, _attention_bwd)  # the forward returns (output, residuals)


# Query rows per block of the CPU attention: long sequences are split into blocks of this many
# queries (at most MAX_QUERY_BLOCKS blocks), each multiplied only with the keys up to its last
# row, so the products skip most of the masked upper triangle (a quarter at 2 blocks). Smaller blocks
# than this make products too small to run fast on CPU (measured: T = 64, 128 gain nothing).
QUERY_BLOCK = 128
MAX_QUERY_BLOCKS = 8  # 7/16 of the products skipped at 8; more blocks only grow the program


def causal_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_Bx1xTxS: Array | None = None) -> Array:
    """Causal softmax attention, as jax.nn.dot_product_attention(..., is_causal=True), with the
    hand-written gradient (for the CPU: lmjax.models.attention chooses where it runs).

    `mask_Bx1xTxS` (bool, optional) further restricts which keys each query sees, e.g. to
    its own document; grouped-query attention when K divides N. Logits and softmax are
    float32 whatever the input dtype.
    """
    t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    causal = jnp.tril(jnp.ones((t, s), bool))[None, None]
    if mask_Bx1xTxS is not None:
        causal = causal & mask_Bx1xTxS
    scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])
    if t != s or t < 2 * QUERY_BLOCK:
        return _attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, causal, scale)
    blocks = min(t // QUERY_BLOCK, MAX_QUERY_BLOCKS)
    bounds = [(j * t // blocks, (j + 1) * t // blocks) for j in range(blocks)]
    return jnp.concatenate(
        [
            _attention(q_BxTxNxH[:, lo:hi], k_BxSxKxH[:, :hi], v_BxSxKxH[:, :hi], causal[:, :, lo:hi, :hi], scale)
            for lo, hi in bounds
        ],
        axis=1,
    )
