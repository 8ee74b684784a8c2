"""The devices `lmjax plan` knows: memory per device, and what XLA's GPU compiler needs to
compile for an NVIDIA GPU without one (deviceless ahead-of-time compilation through the
CUDA plugin: jax-cuda12-plugin, no GPU or driver needed)."""

from __future__ import annotations

from lmjax.errors import UserError

GiB = 2**30

# Memory per JAX device in bytes (what the device reports), and the share JAX's allocator takes
# by default: 75% on a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION changes it), nearly all on a TPU.
# A TPU v4 or v5p chip is one JAX device (megacore); v5e and v6e have one core per chip.
DEVICE_MEMORY: dict[str, tuple[int, float]] = {
    "A100-40G": (42_331_013_120, 0.75),
    "A100-80G": (85_100_068_864, 0.75),
    "H100-80G": (84_942_979_072, 0.75),
    "H200-141G": (151_397_597_184, 0.75),
    "TPU-v4": (32 * GiB, 1.0),
    "TPU-v5e": (16 * GiB, 1.0),
    "TPU-v5p": (95 * GiB, 1.0),
    "TPU-v6e": (32 * GiB, 1.0),
}

# What XLA's GPU compiler needs to know of a device to compile for it without one, from XLA's
# own device specs (xla/backends/gpu/target_config/specs): compute capability major, SMs,
# shared memory per SM and per block (opt-in), L2 bytes, clock GHz, memory bandwidth B/s, name.
GPU_SPECS: dict[str, tuple] = {
    "A100-40G": (8, 108, 167_936, 166_912, 41_943_040, 1.41, 1_555_200_000_000, "NVIDIA A100-SXM4-40GB"),
    "A100-80G": (8, 108, 167_936, 166_912, 41_943_040, 1.41, 2_039_040_000_000, "NVIDIA A100-SXM4-80GB"),
    "H100-80G": (9, 132, 233_472, 232_448, 52_428_800, 1.98, 3_352_320_000_000, "NVIDIA H100 80GB HBM3"),
    "H200-141G": (9, 132, 233_472, 232_448, 52_428_800, 1.98, 4_800_000_000_000, "NVIDIA H200 141GB HBM3e"),
}


def gpu_target_config(name: str) -> str:
    """stream_executor.GpuTargetConfigProto (text format) of the GPU `name` of GPU_SPECS."""
    major, sms, smem_core, smem_optin, l2, clock, bandwidth, full_name = GPU_SPECS[name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core} shared_memory_per_block_optin: {smem_optin} threads_per_core_limit: 2048
  core_count: {sms} fpus_per_core: {64 if major == 8 else 128} memory_bandwidth: {bandwidth} l2_cache_size: {l2}
  clock_rate_ghz: {clock} device_memory_size: {DEVICE_MEMORY[name][0]}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{full_name}"
"""


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin is installed (found without importing it or starting CUDA)."""
    import importlib.util

    return any(
        importlib.util.find_spec(f"jax_plugins.xla_cuda{v}")
        for v in (12, 13)
        if importlib.util.find_spec("jax_plugins")
    )


def gpu_compile_dir() -> str:
    """.gpu-compile/ of this checkout (scripts/setup_gpu_compile.sh: the CUDA plugin and cuDNN,
    kept off the default path so that GPU-less runs do not load them), or '' if not made."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / ".gpu-compile"
    return str(folder) if (folder / "jax_plugins" / "xla_cuda12").is_dir() else ""


def gpu_devices(name: str, count: int) -> list:
    """`count` compile-only devices of the GPU `name` (deviceless AOT through the CUDA plugin)."""
    import jax
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            "lmjax", "cuda", target_config=gpu_target_config(name), topology=f"1x1x{count}"
        )
    except (jax.errors.JaxRuntimeError, NotImplementedError, RuntimeError) as e:
        raise UserError(
            f"compiling for a {name} without one failed ({str(e).splitlines()[0]}); it needs the CUDA "
            "plugin (bash scripts/setup_gpu_compile.sh), or plan on simulated CPU devices with --compiler cpu"
        ) from None
    return list(topology.devices)
