"""Decoder-only Transformer (Flax Linen): GPT-2 and LLaMA families as options of one model.

Tensor names carry shapes: B batch, T query length, S key length, D width, N query heads,
K key/value heads, H head size, F MLP width, V vocabulary. Parameters carry logical axis
names ('embed', 'mlp', 'heads', ...); `lmjax.train.parallel` maps them to a device mesh.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models import attention, ops

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The model's keys, declared once: `lmjax.config.base_config()` builds its `model` section
    from these fields and defaults, and `TransformerConfig(**section)` reads it back.
    0 means "derive it" where a comment says so."""

    vocab_size: int = 0  # 0 = the tokenizer's
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads; 1 = multi-query; else grouped-query
    d_ff: int = 0  # 0 = 4 * d_model (gelu) or 8/3 * d_model rounded up to a multiple of 256 (swiglu)
    max_len: int = 0  # 0 = data.seq_len
    positions: str = "learned"
    rope_base: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: bool = False
    remat: str = "none"
    # auto = cuDNN's fused kernel on NVIDIA GPUs, splash on TPU, lmjax's kernel on CPU, else xla
    attention: str = "auto"  # auto | xla | cudnn | splash | cpu (lmjax.models.attention)
    cpu_kernels: bool = True  # hand-written gradients on CPU; False: plain JAX (jax.jvp works)

    def __post_init__(self):  # derive what 0 leaves open and the fields alone decide
        if not self.n_kv_heads:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if not self.d_ff:
            swiglu = 256 * math.ceil(8 * self.d_model / 3 / 256)
            object.__setattr__(self, "d_ff", 4 * self.d_model if self.mlp == "gelu" else swiglu)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_config(cls, m, vocab_size: int, seq_len: int) -> TransformerConfig:
        """The `model` config section, with the tokenizer's vocabulary and the data's sequence
        length where it leaves them 0."""
        keys = {f.name: m[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**keys, "vocab_size": m.vocab_size or vocab_size, "max_len": m.max_len or seq_len})


def as_rows(x_BxTxD: Array) -> Array:
    """B,T,D → B*T,D. Products take their input as one row per token: autodiff's weight
    gradient is then a plain 2-D product, where a contraction over B and T makes XLA:CPU
    write transposed copies of the activations first (README, "Speed on CPU")."""
    return x_BxTxD.reshape(-1, x_BxTxD.shape[-1])


def _init(std: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _matrix_init(std: float, names: tuple, in_axes: int):
    """normal(std) for a kernel with several in or out axes, drawn as the 2-D matrix
    (prod(shape[:in_axes]), prod(shape[in_axes:])) as nn.DenseGeneral draws it: the same numbers for a seed."""

    def init(key, shape, dtype):
        return nn.initializers.normal(std)(
            key, (math.prod(shape[:in_axes]), math.prod(shape[in_axes:])), dtype
        ).reshape(shape)

    return nn.with_logical_partitioning(init, names)


def _zeros(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


class Norm(nn.Module):
    """LayerNorm or RMSNorm, computed in float32 for stability, returned in the input dtype."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        c = self.cfg
        scale = self.param("scale", _ones(("norm",)), (c.d_model,), jnp.float32)
        bias = self.param("bias", _zeros(("norm",)), (c.d_model,), jnp.float32) if c.bias else None
        norm = ops.norm if attention.hand_written_gradients(c.cpu_kernels) else ops.plain_norm
        x = norm(x_BxTxD.astype(jnp.float32), scale, bias, c.norm_eps, c.norm == "layernorm")
        return x.astype(x_BxTxD.dtype)


def rotary(x_BxTxNxH: Array, positions_BxT: Array, base: float) -> Array:
    """Rotary position embedding, rotate-half layout (as in LLaMA / Hugging Face)."""
    h = x_BxTxNxH.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(jnp.concatenate([angles_BxTxH2] * 2, -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles_BxTxH2] * 2, -1))[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


class HeadsProjection(nn.Module):
    """The parameters of a D → heads x H projection, as nn.DenseGeneral names and initialises
    them ('kernel' DxNxH, 'bias' NxH); the caller applies several at once (`project`)."""

    cfg: TransformerConfig
    heads: int
    heads_axis: str  # logical axis name: 'heads' or 'kv_heads'

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None]:
        c = self.cfg
        names = ("embed", self.heads_axis, "head_dim")
        shape = (c.d_model, self.heads, c.head_dim)
        kernel = self.param("kernel", _matrix_init(0.02, names, 1), shape, jnp.float32)
        bias = self.param("bias", _zeros(names[1:]), shape[1:], jnp.float32) if c.bias else None
        return kernel, bias


def project(x_BxTxD: Array, projections: list[tuple[Array, Array | None]], dtype) -> list[Array]:
    """Apply projections with the same number of heads as one matrix product, D x (N*P*H):
    one large product runs closer to the CPU's peak than P small ones. → P arrays BxTxNxH."""
    # Heads outermost in the product's columns (N x P x H): a tensor-parallel split of the heads
    # is then a split of those columns, and no device needs another's kernel.
    kernel_DxNxPxH = jnp.stack([k for k, _ in projections], 2).astype(dtype)
    out_BTxNPH = as_rows(x_BxTxD.astype(dtype)) @ kernel_DxNxPxH.reshape(x_BxTxD.shape[-1], -1)
    out_BxTxNxPxH = out_BTxNPH.reshape(*x_BxTxD.shape[:2], *kernel_DxNxPxH.shape[1:])
    if projections[0][1] is not None:
        out_BxTxNxPxH = out_BxTxNxPxH + jnp.stack([b for _, b in projections], 1).astype(dtype)
    return [out_BxTxNxPxH[:, :, :, i] for i in range(len(projections))]


class Attention(nn.Module):
    """Causal multi-head attention; K < N key/value heads is grouped-query (K = 1: multi-query)."""

    cfg: TransformerConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None) -> Array:
        c = self.cfg
        dtype = jnp.dtype(c.dtype)
        std = 0.02
        query = HeadsProjection(c, c.n_heads, "heads", name="query")()
        key = HeadsProjection(c, c.n_kv_heads, "kv_heads", name="key")()
        value = HeadsProjection(c, c.n_kv_heads, "kv_heads", name="value")()
        if c.n_kv_heads == c.n_heads:
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = project(x_BxTxD, [query, key, value], dtype)
        else:  # grouped-query: the key/value heads are fewer than the query heads
            (q_BxTxNxH,) = project(x_BxTxD, [query], dtype)
            k_BxTxKxH, v_BxTxKxH = project(x_BxTxD, [key, value], dtype)
        if c.positions == "rope":
            q_BxTxNxH = rotary(q_BxTxNxH, positions_BxT, c.rope_base)
            k_BxTxKxH = rotary(k_BxTxKxH, positions_BxT, c.rope_base)

        if self.decode:
            # Key/value cache: write this chunk at the cache index, attend to all written keys.
            b, t = x_BxTxD.shape[:2]
            shape = (b, c.max_len, c.n_kv_heads, c.head_dim)
            cache_k = self.variable("cache", "cached_key", jnp.zeros, shape, dtype)
            cache_v = self.variable("cache", "cached_value", jnp.zeros, shape, dtype)
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            i = index.value
            cache_k.value = jax.lax.dynamic_update_slice(cache_k.value, k_BxTxKxH.astype(dtype), (0, i, 0, 0))
            cache_v.value = jax.lax.dynamic_update_slice(cache_v.value, v_BxTxKxH.astype(dtype), (0, i, 0, 0))
            index.value = i + t
            k_BxTxKxH, v_BxTxKxH = cache_k.value, cache_v.value
            q_pos_T = i + jnp.arange(t)
            mask = (jnp.arange(c.max_len)[None, :] <= q_pos_T[:, None])[None, None]  # 1x1xTxS
            out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask)
        elif self.is_initializing():  # init traces a short dummy row (splash needs 128s); no kernel owns parameters
            out_BxTxNxH = attention.causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, "xla")
        else:
            choice = attention.choose(
                c.attention,
                attention.current_device(),
                c.dtype,
                c.head_dim,
                x_BxTxD.shape[1],
                segment_ids_BxT is not None,
                c.cpu_kernels,
            )
            out_BxTxNxH = attention.causal_attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, choice.implementation
            )

        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers).
        out_std = std / math.sqrt(2 * c.n_layers)
        return OutProjection(c, out_std, name="out")(out_BxTxNxH)


class OutProjection(nn.Module):
    """Heads back to the width: 'kernel' NxHxD and 'bias' D, named and initialised as
    nn.DenseGeneral(axis=(-2, -1)) does, applied as one product over the rows N*H → D."""

    cfg: TransformerConfig
    std: float

    @nn.compact
    def __call__(self, x_BxTxNxH: Array) -> Array:
        c = self.cfg
        b, t, n, h = x_BxTxNxH.shape
        kernel = self.param(
            "kernel", _matrix_init(self.std, ("heads", "head_dim", "embed"), 2), (n, h, c.d_model), jnp.float32
        )
        dtype = jnp.dtype(c.dtype)
        y_BTxD = x_BxTxNxH.reshape(b * t, n * h).astype(dtype) @ kernel.reshape(n * h, c.d_model).astype(dtype)
        if c.bias:
            y_BTxD = y_BTxD + self.param("bias", _zeros(("embed",)), (c.d_model,), jnp.float32).astype(dtype)
        return y_BTxD.reshape(b, t, c.d_model)


class MLP(nn.Module):
    """GPT-2's GELU MLP (fc → gelu → proj) or LLaMA's SwiGLU (silu(gate) * up → proj)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        c = self.cfg
        dtype = jnp.dtype(c.dtype)

        def dense(feats, std, names, name):
            return nn.Dense(
                feats,
                use_bias=c.bias,
                dtype=dtype,
                param_dtype=jnp.float32,
                name=name,
                kernel_init=_init(std, names),
                bias_init=_zeros(names[1:]),
            )

        out_std = 0.02 / math.sqrt(2 * c.n_layers)
        x_BTxD = as_rows(x_BxTxD)
        if c.mlp == "gelu":
            gelu = ops.gelu if attention.hand_written_gradients(c.cpu_kernels) else ops.plain_gelu
            h_BTxF = gelu(dense(c.d_ff, 0.02, ("embed", "mlp"), "fc")(x_BTxD))
        else:
            gate = dense(c.d_ff, 0.02, ("embed", "mlp"), "gate")(x_BTxD)
            up = dense(c.d_ff, 0.02, ("embed", "mlp"), "up")(x_BTxD)
            h_BTxF = nn.silu(gate) * up
        return dense(c.d_model, out_std, ("mlp", "embed"), "proj")(h_BTxF).reshape(x_BxTxD.shape)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: TransformerConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None):
        c = self.cfg
        drop = nn.Dropout(c.dropout, deterministic=self.deterministic)
        h = Attention(c, self.decode, name="attn")(Norm(c, name="norm1")(x_BxTxD), positions_BxT, segment_ids_BxT)
        x_BxTxD = x_BxTxD + drop(h)
        h = MLP(c, name="mlp")(Norm(c, name="norm2")(x_BxTxD))
        x_BxTxD = x_BxTxD + drop(h)
        return x_BxTxD, None  # (carry, output) so the block also runs under nn.scan


REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """tokens int32[B, T] → logits float32[B, T, V].

    positions_BxT: position of each token (default 0..T-1); with packed documents they
    restart at 0 at each document, and segment_ids_BxT (1, 2, ... per document) keeps
    attention inside a document. decode=True: attend to the key/value cache in the 'cache'
    collection and append this chunk to it; pass the chunk's positions (the caller tracks
    them, see lmjax.sample), and never more than max_len tokens in all.
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxT: Array,
        positions_BxT: Array | None = None,
        segment_ids_BxT: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        c = self.cfg
        b, t = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        wte = self.param("wte", _init(0.02, ("vocab", "embed")), (c.vocab_size, c.d_model), jnp.float32)
        x_BxTxD = jnp.take(wte, tokens_BxT, axis=0)
        if c.positions == "learned":
            wpe = self.param("wpe", _init(0.01, ("pos", "embed")), (c.max_len, c.d_model), jnp.float32)  # GPT-2's std
            x_BxTxD = x_BxTxD + jnp.take(wpe, positions_BxT, axis=0)
        x_BxTxD = nn.Dropout(c.dropout, deterministic=deterministic)(x_BxTxD).astype(jnp.dtype(c.dtype))

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxTxD, _ = stack(c, deterministic, decode, name="layers")(x_BxTxD, positions_BxT, segment_ids_BxT)
        else:
            for i in range(c.n_layers):
                x_BxTxD, _ = block(c, deterministic, decode, name=f"block_{i}")(x_BxTxD, positions_BxT, segment_ids_BxT)

        # Final norm on float32 input, so the head sees the hidden state unrounded.
        x_BxTxD = Norm(c, name="norm_f")(x_BxTxD.astype(jnp.float32))
        if c.tie_embeddings:
            head_DxV = wte.T
        else:
            head_DxV = self.param("lm_head", _init(0.02, ("embed", "vocab")), (c.d_model, c.vocab_size), jnp.float32)
        # Logits in float32 whatever the compute dtype: the softmax over V needs the range.
        return (as_rows(x_BxTxD) @ head_DxV).reshape(b, t, -1)


def stack_layers(params: dict, n_layers: int) -> dict:
    """Parameters of an unscanned model (block_0 ... block_{L-1}) → a scanned one ('layers',
    each leaf with a leading layer axis). Inverse of `unstack_layers`."""
    blocks = [params[f"block_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("block_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Parameters of a scanned model → an unscanned one (block_0 ... block_{L-1})."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"block_{i}": jax.tree.map(lambda x: x[i], params["layers"]) for i in range(n_layers)}}
