"""Model FLOPs per token, the peak FLOP/s of the devices, and MFU (model FLOPs utilisation).

MFU = flops_per_token × tokens/s / (peak FLOP/s per device × devices). It counts the work the
model needs, not what the hardware did: recomputation (model.remat) and the masked half of
causal attention are not counted, so MFU ≤ hardware utilisation.

The peak comes from, in order: train.peak_flops in the config; a table of accelerators keyed
by `jax.Device.device_kind`; on CPU, a short float32 matmul probe run at each start (the best
of XLA and the BLAS numpy uses, at sizes up to 2048), of which the machine's best is kept in
the lmjax cache directory. The theoretical FMA peak is not used: a virtual machine does not
report its clock reliably.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lmjax import default_cache_dir
from lmjax.models.transformer import TransformerConfig


def flops_per_token(model_cfg, seq_len: int) -> float | None:
    """Training FLOPs (forward + backward) per token of a Transformer; None for other models.

    `model_cfg` is the resolved `TransformerConfig` (e.g. `run.model.cfg`): D = d_model,
    L = n_layers, N query heads and K key/value heads of size H = D / N, F = d_ff, V = vocab,
    T = seq_len.

    Derivation. A matmul of a [1, a] activation with an [a, b] weight costs 2·a·b FLOPs (a
    multiply and an add per weight). In the backward pass each weight matmul is done twice
    more (gradient with respect to the input and with respect to the weight), so each weight
    used in a matmul costs 2 + 4 = 6 FLOPs per token: 6·P for P matmul weights, where

        P = L · (D·N·H + 2·D·K·H + N·H·D       query, key, value, out projections
                 + m·D·F)                      MLP: m = 2 (gelu: fc, proj), 3 (swiglu: gate, up, proj)
            + D·V                              output projection (counted even when tied to the
                                               embedding: the matmul is done either way)

    Embedding lookups (wte, wpe) are gathers, not matmuls, and are left out; so are biases,
    norms, activations and the softmax (O(D) per token, small next to O(D²)).

    Attention adds two matmuls per layer that have no weights: scores Q·Kᵀ and the weighted
    sum A·V. Per query token each costs 2·T·N·H = 2·T·D FLOPs forward if all T keys are used,
    so 4·T·D forward and 12·T·D forward + backward per layer: 12·L·D·T. With a causal mask,
    query t looks at t + 1 keys, T/2 on average, so the work needed is half: 6·L·D·T.

        flops_per_token = 6·P + 6·L·D·T
    """
    if not isinstance(model_cfg, TransformerConfig):
        return None
    c = model_cfg
    d, h = c.d_model, c.head_dim
    attention_weights = d * c.n_heads * h + 2 * d * c.n_kv_heads * h + c.n_heads * h * d
    mlp_weights = (2 if c.mlp == "gelu" else 3) * d * c.d_ff
    matmul_params = c.n_layers * (attention_weights + mlp_weights) + d * c.vocab_size
    return float(6 * matmul_params + 6 * c.n_layers * d * seq_len)


# Dense peak FLOP/s per JAX device (no sparsity), as (match in device_kind, bf16, float32).
# "float32" is what a float32 matmul reaches at JAX's default precision: TF32 tensor cores on
# NVIDIA Ampere and later, one bfloat16 pass on TPU. First match wins, so specific names
# (PCIe, lite) come before general ones. TPU v2/v3 show each of a chip's 2 cores as a device.
PEAK_FLOPS_TABLE: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756e12, 378e12),
    ("h100 nvl", 835e12, 418e12),
    ("h100", 989e12, 495e12),  # SXM
    ("h200", 989e12, 495e12),
    ("a100", 312e12, 156e12),
    ("a10g", 70e12, 35e12),  # AWS A10G
    ("a10", 125e12, 62.5e12),
    ("l40s", 362e12, 183e12),
    ("l40", 181e12, 90.5e12),
    ("l4", 121e12, 60e12),
    ("v100", 125e12, 15.7e12),  # no bf16: half precision runs on fp16 tensor cores at best
    ("tpu v2", 23e12, 23e12),
    ("tpu v3", 61.5e12, 61.5e12),
    ("tpu v4", 275e12, 275e12),
    ("tpu v5 lite", 197e12, 197e12),  # v5e
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5", 459e12, 459e12),  # v5p
    ("tpu v6 lite", 918e12, 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12, 918e12),
)


def table_peak(device_kind: str, dtype: str) -> tuple[str, float] | None:
    """(matched name, peak FLOP/s per device) for a `device_kind` and compute dtype, or None."""
    kind = device_kind.lower()
    for name, bf16, fp32 in PEAK_FLOPS_TABLE:
        if name in kind:
            return name, (bf16 if dtype == "bfloat16" else fp32)
    return None


# Matrix sizes of the CPU probe. Small products (256, 512) reach well under the machine's
# peak on CPU; up to 2048 the best BLAS kernels are near it. The full probe runs when the
# cache has no figure for this machine yet; later starts run the quick one and keep the best.
CPU_PROBE_SIZES = (512, 2048)
QUICK_PROBE_SIZES = (512,)
PROBE_FLOPS_PER_TRIAL = 2e9  # each timed trial repeats a product up to about this much work


def _repeats(n: int) -> int:
    return max(1, int(PROBE_FLOPS_PER_TRIAL // (2.0 * n**3)))


def measure_matmul_flops(sizes: tuple[int, ...] = CPU_PROBE_SIZES, repeats: int = 0, trials: int = 2) -> float:
    """Best FLOP/s of n×n float32 matmuls under XLA on the default device, over `sizes` and
    `trials` (`repeats` products per trial; 0: about PROBE_FLOPS_PER_TRIAL of work)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def matmul_probe(x):  # named: the compile is counted by tests that watch for recompilation
        return x @ x

    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        matmul_probe(a).block_until_ready()  # compile
        r = repeats or _repeats(n)
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(r):
                out = matmul_probe(a)
            out.block_until_ready()
            best = max(best, 2.0 * n**3 * r / (time.perf_counter() - t0))
    return best


def blas_name() -> str:
    """The BLAS numpy calls for matmul (e.g. 'scipy-openblas'), as numpy's build records it."""
    import numpy as np

    try:
        return str(np.__config__.CONFIG["Build Dependencies"]["blas"]["name"])
    except (AttributeError, KeyError, TypeError):
        return "unknown BLAS"


def measure_blas_flops(sizes: tuple[int, ...] = CPU_PROBE_SIZES, repeats: int = 0, trials: int = 2) -> float:
    """Best FLOP/s of n×n float32 matmuls through numpy's BLAS, over `sizes` and `trials`."""
    import numpy as np

    best = 0.0
    for n in sizes:
        a = np.random.default_rng(0).standard_normal((n, n), np.float32)
        out = np.empty_like(a)
        np.matmul(a, a, out=out)  # thread pool start-up
        r = repeats or _repeats(n)
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(r):
                np.matmul(a, a, out=out)
            best = max(best, 2.0 * n**3 * r / (time.perf_counter() - t0))
    return best


def measure_cpu_peak(full: bool = True) -> tuple[float, str]:
    """(FLOP/s, which) of the CPU: the best of XLA's and numpy's BLAS float32 matmuls at
    CPU_PROBE_SIZES (QUICK_PROBE_SIZES unless `full`). A model's matmuls could run on either
    library, so the faster one is the machine's attainable peak (XLA:CPU's kernels alone
    understate it)."""
    chosen = CPU_PROBE_SIZES if full else QUICK_PROBE_SIZES
    sizes = "/".join(map(str, chosen))
    xla, blas = measure_matmul_flops(chosen), measure_blas_flops(chosen)
    if blas > xla:
        return blas, f"numpy's BLAS ({blas_name()}) at n={sizes}, above XLA's {xla / 1e9:.0f} GFLOP/s"
    return xla, f"XLA at n={sizes}, above numpy's BLAS ({blas_name()}) {blas / 1e9:.0f} GFLOP/s"


def measured_peak(device_kind: str, cache_dir: Path, measure=measure_cpu_peak) -> tuple[float, bool, str]:
    """(machine FLOP/s, whether an earlier probe was higher, which probe) for this device kind
    and core count. `measure(full=...)` returns FLOP/s, or (FLOP/s, which); it is full (about a
    second) when the cache has no figure yet, quick otherwise.

    The probe runs at every start and the machine's best is kept in the cache: one probe taken
    while other jobs loaded the cores would otherwise stick as the peak and put MFU above 100%.
    """
    import jax

    path = Path(cache_dir) / "peak_flops.json"
    # Another jax or other XLA flags may change the matmul kernels: each gets its own best.
    key = (
        f"{device_kind}|{os.cpu_count()} cores|float32 matmul, best of XLA and BLAS|jax {jax.__version__}|"
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '').strip()}"
    )
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached.get(key), dict) else {}
    earlier, earlier_how = float(entry.get("flops", 0.0)), str(entry.get("source", ""))
    measured = measure(full=not earlier)
    value, how = measured if isinstance(measured, tuple) else (measured, "probe")
    if earlier >= value:
        return earlier, True, earlier_how
    cached[key] = {"flops": value, "source": how}
    try:  # a cache we cannot write only loses this probe's figure
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass
    return value, False, how


@dataclass(frozen=True)
class Peak:
    per_device: float  # FLOP/s
    source: str  # where the figure came from, for the first lines of a run


def peak_flops(
    device,
    dtype: str,
    override: float = 0.0,
    cache_dir: Path | None = None,
    local_devices: int = 1,
    measure=measure_cpu_peak,
) -> Peak:
    """Peak FLOP/s per device: `override` (train.peak_flops), else the table, else measured.

    On CPU the probe measures the whole machine; JAX's CPU devices share its cores, so the
    figure is divided by `local_devices`.
    """
    if override > 0:
        return Peak(override, "train.peak_flops")
    found = table_peak(device.device_kind, dtype)
    if found is not None:
        return Peak(found[1], f"table '{found[0]}' ({'bf16' if dtype == 'bfloat16' else 'float32'})")
    if device.platform == "cpu" and cache_dir is not None:
        machine, earlier, which = measured_peak(device.device_kind, cache_dir, measure)
        when = "an earlier run's probe, above this run's" if earlier else "this run's probe"
        return Peak(
            machine / max(local_devices, 1), f"measured float32 matmul peak, {which} ({when}, {os.cpu_count()} cores)"
        )
    return Peak(0.0, f"unknown device '{device.device_kind}': set train.peak_flops for MFU")


def devices_used(parallel) -> int:
    """Devices the train step runs on, over all processes."""
    return parallel.n_devices


def mfu(flops_per_token: float | None, tokens_per_s: float, peak_per_device: float, n_devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when either FLOP count is unknown)."""
    if not flops_per_token or peak_per_device <= 0 or n_devices <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_per_device * n_devices)


@dataclass(frozen=True)
class Utilisation:
    """What a run needs to turn tokens/s into MFU: its FLOPs per token, peak and devices."""

    flops_per_token: float | None
    peak: Peak
    n_devices: int

    @classmethod
    def for_run(cls, cfg, model, parallel) -> Utilisation:
        """From the config, the built model and the parallel strategy (may probe the CPU once)."""
        import jax

        n_devices = devices_used(parallel)
        local = max(n_devices // jax.process_count(), 1)
        peak = peak_flops(
            jax.local_devices()[0], cfg.model.dtype, cfg.train.peak_flops, default_cache_dir(cfg.data.cache_dir), local
        )
        return cls(flops_per_token(getattr(model, "cfg", None), cfg.data.seq_len), peak, n_devices)

    def mfu(self, tokens_per_s: float) -> float | None:
        return mfu(self.flops_per_token, tokens_per_s, self.peak.per_device, self.n_devices)

    def fields(self, tokens_per_s: float) -> dict:
        """{'mfu': value} for a metrics record, or {} when MFU is unknown."""
        value = self.mfu(tokens_per_s)
        return {} if value is None else {"mfu": value}

    def describe(self) -> str:
        if self.flops_per_token is None:
            return "MFU: not computed (no FLOP count for this model kind)"
        head = f"MFU: {self.flops_per_token:,.0f} model FLOPs per token"
        if self.peak.per_device <= 0:
            return f"{head}; peak unknown ({self.peak.source})"
        return (
            f"{head}; peak {self.peak.per_device / 1e12:.4g} TFLOP/s per device x {self.n_devices} "
            f"devices, from {self.peak.source}"
        )
