"""Causal attention on every platform, and the one place that chooses how it runs.

`model.attention` (auto | xla | cudnn | splash | cpu) names the implementation:

- cudnn: cuDNN's fused (flash) attention, jax.nn.dot_product_attention(implementation='cudnn'),
  on NVIDIA GPUs of compute capability 8.0 or later, in bfloat16 or float16, head size a
  multiple of 8 up to 128 (256 from Hopper on). Never holds the T x T probabilities.
- splash: Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention) on TPU,
  sequence length a multiple of 128. Document masks are its segment ids.
- cpu: the hand-written kernel of lmjax.models.ops (a faster backward pass on XLA:CPU).
- xla: jax.nn.dot_product_attention's XLA implementation, which runs everywhere.

`auto` takes cudnn on an NVIDIA GPU, splash on a TPU and cpu on the CPU when the shapes
allow it, else xla. An explicit choice the device cannot run is a UserError naming the key.
The same boundary decides whether the hand-written norm and GELU gradients apply
(`model.cpu_kernels`, CPU only): without them the model is plain JAX, so jax.jvp works.

Choices are made when the model is traced, for the device it runs on (`current_device`);
`compiling_for` names another device, for compiling ahead of time for a target not present.
Tensor names: B batch, T queries, S keys, N query heads, K key/value heads, H head size.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lmjax.errors import UserError
from lmjax.models import ops

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "cpu")
SPLASH_BLOCK = 128  # splash attention's tiles: sequence lengths must be a multiple of this


@dataclasses.dataclass(frozen=True)
class Device:
    """What the choice depends on: the platform ('cpu', 'gpu', 'tpu'), the device kind and,
    for NVIDIA GPUs, the CUDA compute capability ('9.0'); '' where there is none."""

    platform: str
    kind: str
    compute_capability: str = ""
    count: int = 1  # devices of this kind the program runs on

    @classmethod
    def of(cls, device, count: int = 1) -> Device:
        return cls(device.platform, device.device_kind, str(getattr(device, "compute_capability", "") or ""), count)


@dataclasses.dataclass(frozen=True)
class Choice:
    implementation: str  # one of IMPLEMENTATIONS except 'auto'
    reason: str


_TARGET: contextvars.ContextVar[Device | None] = contextvars.ContextVar("lmjax_attention_target", default=None)


@contextlib.contextmanager
def compiling_for(device: Device):
    """Trace the model for `device` instead of the one present (ahead-of-time compilation)."""
    token = _TARGET.set(device)
    try:
        yield
    finally:
        _TARGET.reset(token)


def current_device() -> Device:
    """The device the model is traced for: `compiling_for`'s, else JAX's first device."""
    return _TARGET.get() or Device.of(jax.devices()[0], jax.device_count())


def _capability(device: Device) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in device.compute_capability.split("."))
    except ValueError:
        return ()


def cudnn_obstacle(device: Device, dtype: str, head_dim: int, seq_len: int, document_mask: bool) -> str:
    """Why cuDNN's fused attention cannot run here ('' if it can), as jax 0.10's checks have it."""
    if device.platform != "gpu" or not device.compute_capability:
        return f"it needs an NVIDIA GPU (this is {device.platform}: {device.kind})"
    cc = _capability(device)
    if cc < (8, 0):
        return f"it needs compute capability 8.0 or later ({device.kind} has {device.compute_capability})"
    if dtype not in ("bfloat16", "float16"):
        return f"it takes bfloat16 or float16 only (model.dtype={dtype})"
    limit = 256 if cc >= (9, 0) else 128
    if head_dim % 8 or head_dim > limit:
        return f"the head size (model.d_model / model.n_heads = {head_dim}) must be a multiple of 8 up to {limit}"
    if document_mask and seq_len % 2:
        return f"with document masks the sequence length must be even (data.seq_len={seq_len})"
    return ""


def splash_obstacle(device: Device, seq_len: int) -> str:
    """Why Pallas splash attention cannot run here ('' if it can)."""
    if device.platform != "tpu":
        return f"it needs a TPU (this is {device.platform}: {device.kind})"
    if seq_len % SPLASH_BLOCK:
        return f"the sequence length must be a multiple of {SPLASH_BLOCK} (data.seq_len={seq_len})"
    return ""


def cpu_obstacle(device: Device) -> str:
    return "" if device.platform == "cpu" else f"it is written for the CPU (this is {device.platform}: {device.kind})"


def choose(
    requested: str,
    device: Device,
    dtype: str,
    head_dim: int,
    seq_len: int,
    document_mask: bool = False,
    cpu_kernels: bool = True,
) -> Choice:
    """The implementation `model.attention=requested` takes on `device`, and why.

    Raises UserError when an explicit choice cannot run there (never a silent fallback)."""
    if requested not in IMPLEMENTATIONS:
        raise UserError(f"config key 'model.attention' is '{requested}'; choose one of {', '.join(IMPLEMENTATIONS)}")
    obstacles = {
        "cudnn": lambda: cudnn_obstacle(device, dtype, head_dim, seq_len, document_mask),
        "splash": lambda: splash_obstacle(device, seq_len),
        "cpu": lambda: cpu_obstacle(device),
        "xla": lambda: "",
    }
    if requested != "auto":
        why_not = obstacles[requested]()
        if why_not:
            raise UserError(
                f"model.attention={requested} cannot run here: {why_not}; set --config.model.attention=auto (or xla)"
            )
        return Choice(requested, "chosen by model.attention")
    if device.platform == "cpu":
        if cpu_kernels:
            return Choice("cpu", "CPU: lmjax's hand-written kernel")
        return Choice("xla", "CPU with model.cpu_kernels=False")
    fused = {"gpu": "cudnn", "tpu": "splash"}.get(device.platform)
    if fused is None:
        return Choice("xla", f"no fused kernel for {device.platform}")
    why_not = obstacles[fused]()
    if not why_not and fused == "splash" and device.count > 1:
        # Without a shard_map of its own the kernel's operands would be gathered onto every chip.
        why_not = f"on {device.count} chips it is not partitioned yet (model.attention=splash forces it)"
    if why_not:
        return Choice("xla", f"{fused} cannot run: {why_not}")
    return Choice(fused, f"fused kernel for {device.kind}")


def hand_written_gradients(cpu_kernels: bool, device: Device | None = None) -> bool:
    """Whether the norm and GELU use lmjax.models.ops' hand-written gradients: CPU only."""
    return cpu_kernels and (device or current_device()).platform == "cpu"


def document_mask_Bx1xTxS(segment_ids_BxT: Array | None) -> Array | None:
    """Segment ids (one per document in a packed row) → which keys each query may see."""
    if segment_ids_BxT is None:
        return None
    return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def causal_attention(
    q_BxTxNxH: Array,
    k_BxTxKxH: Array,
    v_BxTxKxH: Array,
    segment_ids_BxT: Array | None,
    implementation: str,
    interpret: bool = False,
) -> Array:
    """Causal softmax attention with the named implementation (not 'auto': see `choose`).

    Queries attend only to keys of their own segment (document) when segment ids are given;
    grouped-query attention when K divides N. `interpret` runs splash in Pallas' interpreter
    (for testing on a CPU)."""
    if implementation == "splash":
        return splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, interpret)
    mask = document_mask_Bx1xTxS(segment_ids_BxT)
    if implementation == "cpu":
        return ops.causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask)
    if implementation in ("xla", "cudnn"):
        # cuDNN takes the document mask as an additive B x 1 x T x S bias: one per row, never per head.
        return jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask, is_causal=True, implementation=implementation
        )
    raise ValueError(f"unknown attention implementation '{implementation}'")


@functools.cache
def _splash_kernel(seq_len: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = 512 if seq_len % 512 == 0 else SPLASH_BLOCK
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len)) for _ in range(heads)])
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(
    q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, segment_ids_BxT: Array | None, interpret: bool = False
) -> Array:
    """Pallas splash attention (TPU): the kernel works per sequence on N,T,H; vmapped over the batch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, t, n, h = q_BxTxNxH.shape
    kernel = _splash_kernel(t, n, interpret)
    # The kernel does not scale the logits: scale the queries (the smaller tensor).
    q_BxNxTxH = (q_BxTxNxH * jnp.asarray(1.0 / math.sqrt(h), q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
    k_BxKxTxH, v_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)
    if segment_ids_BxT is None:
        out = jax.vmap(kernel)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH)
    else:
        seg = segment_ids_BxT.astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
            q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, seg
        )
    return out.transpose(0, 2, 1, 3).astype(q_BxTxNxH.dtype)


def describe(choice: Choice, device: Device) -> str:
    """The run's first-lines report of the choice."""
    return f"attention: {choice.implementation} on {device.platform} ({device.kind}): {choice.reason}"


def head_dim_of(model_cfg) -> int:
    return model_cfg.d_model // max(model_cfg.n_heads, 1)


def for_config(cfg, device: Device | None = None) -> tuple[Choice, Device]:
    """The choice for a full experiment config (the `model` and `data` sections) on `device`."""
    device = device or current_device()
    m = cfg.model
    return choose(
        m.attention, device, m.dtype, head_dim_of(m), cfg.data.seq_len, cfg.data.document_mask, m.cpu_kernels
    ), device
