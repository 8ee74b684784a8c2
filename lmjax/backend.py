"""Which platform a run uses: predicted before JAX starts, and reported once it has.

`expected_platform` answers from the environment alone (JAX_PLATFORMS, the installed PJRT
plugins, the device files), without initialising CUDA or a TPU: CPU-only tuning (the
scratch allocator, lmjax.scratch_cache) must be decided before the process starts its work.
`startup_lines` are the run's first lines: backend, device kind, the attention
implementation and why, and a one-line warning when an NVIDIA GPU sits unused.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import subprocess

# Names JAX_PLATFORMS accepts → our platform names (as jax.Device.platform reports them).
_PLATFORM_OF = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "rocm": "gpu", "tpu": "tpu"}
# Distributions that bring an accelerator backend to jaxlib (jax[cuda12], jax[cuda13], jax[tpu], ROCm).
_PLUGIN = re.compile(r"^(jax[-_]cuda\d+[-_](plugin|pjrt)|jax[-_]rocm\d*[-_](plugin|pjrt)|libtpu(-nightly)?)$")


def installed_plugins(names=None) -> list[str]:
    """Those of the installed distributions (or of `names`) that add a GPU or TPU backend to JAX."""
    if names is None:
        names = {(d.metadata["Name"] or "") for d in importlib.metadata.distributions()}
    return sorted(n.lower() for n in names if _PLUGIN.match(n.lower()))


def _device_files(platform: str) -> bool:
    if platform == "gpu":
        return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))  # TPU VMs: accel (v2-v4) or vfio


def expected_platform(environ=None, plugins: list[str] | None = None, device_files=_device_files) -> str:
    """'cpu', 'gpu' or 'tpu': where JAX will run, decided without initialising any backend.

    JAX_PLATFORMS (its first entry) decides when set; otherwise an installed GPU or TPU
    plugin with its device files present means that accelerator, and anything else the CPU."""
    environ = os.environ if environ is None else environ
    chosen = (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").split(",")[0].strip().lower()
    if chosen:
        return _PLATFORM_OF.get(chosen, chosen)
    plugins = installed_plugins() if plugins is None else plugins
    for platform, marker in (("tpu", "libtpu"), ("gpu", "jax")):
        if any(p.startswith(marker) for p in plugins) and device_files(platform):
            return platform
    return "cpu"


def nvidia_gpus(run=subprocess.run) -> list[str]:
    """The GPUs `nvidia-smi -L` lists ('GPU 0: NVIDIA H200 (UUID: ...)'); [] without it."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")] if out.returncode == 0 else []


def unused_gpu_warning(platform: str, gpus: list[str]) -> str | None:
    """One line when nvidia-smi sees a GPU but JAX runs elsewhere (the CPU), with the fix."""
    if platform == "gpu" or not gpus:
        return None
    fix = (
        "JAX_PLATFORMS is set to cpu: unset it"
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu")
        else "install JAX's CUDA backend: bash scripts/setup.sh (it picks the cuda12 extra), or "
        "pip install -c constraints.txt -e '.[cuda12]'"
    )
    first = gpus[0].split(" (UUID")[0]
    return f"warning: nvidia-smi sees {len(gpus)} GPU(s) ({first}) but JAX runs on {platform}; {fix}"


def startup_lines(cfg, device=None, gpus: list[str] | None = None) -> list[str]:
    """The run's first lines: backend and device, the attention implementation and why,
    whether the CPU kernels apply, and the unused-GPU warning. Raises UserError for an
    attention choice this device cannot run."""
    import jax

    from lmjax.models import attention

    device = device or jax.devices()[0]
    where = attention.Device.of(device, jax.device_count())
    lines = [
        f"backend: {where.platform}, {jax.device_count()} x {where.kind}"
        + (f" (compute capability {where.compute_capability})" if where.compute_capability else "")
    ]
    if cfg.model.kind == "transformer":
        choice, _ = attention.for_config(cfg, where)
        lines.append(attention.describe(choice, where))
        kernels = attention.hand_written_gradients(cfg.model.cpu_kernels, where)
        if where.platform == "cpu":
            lines.append(
                f"CPU kernels (hand-written norm and GELU gradients): {'on' if kernels else 'off'} "
                f"(model.cpu_kernels={cfg.model.cpu_kernels})"
            )
    warning = unused_gpu_warning(where.platform, nvidia_gpus() if gpus is None else gpus)
    if warning:
        lines.append(warning)
    return lines
