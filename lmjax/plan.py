"""`lmjax plan EXPERIMENT`: what the train step needs per device, known before renting one.

The step is built from the config exactly as `lmjax train` builds it (build_run,
make_train_step, MeshParallel.compile_step), lowered with abstract inputs (ShapeDtypeStructs
that carry their shardings) and compiled ahead of time. Nothing runs: no data are read, no
tokenizer is trained, no parameter is initialised.

The devices are N simulated CPU devices (XLA's --xla_force_host_platform_device_count, set
before JAX starts), or, when --device names an NVIDIA GPU and the CUDA plugin is installed
(or in .gpu-compile/, scripts/setup_gpu_compile.sh), N compile-only devices of that GPU
(lmjax.devices), in a child process that keeps the plugin's C++ logging out of the output.
Parameters and optimizer state are exact for any platform (they are the shards' sizes);
temporaries (activations, gradients, attention) are the compiled program's, which differ
between compilers (see the README, "Know before you rent").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmjax.devices import DEVICE_MEMORY, GPU_SPECS, GiB, cuda_plugin_installed, gpu_compile_dir, gpu_devices
from lmjax.errors import UserError

# build_tokenizer's vocabulary for tokenizer.kind='bpe' with tokenizer.vocab_size=0.


@dataclass
class ArrayPlan:
    """One array of the train state: its global shape and what one device holds of it."""

    name: str
    shape: tuple
    dtype: str
    spec: str
    device_shape: tuple
    device_bytes: int


@dataclass
class Plan:
    """Per-device bytes of one compiled train step, and what it was compiled for."""

    experiment: str
    devices: int
    platform: str
    device_kind: str
    mesh: str
    model: str
    n_params: int
    vocab_size: int
    vocab_source: str
    tokens_per_step: int
    params_bytes: int  # per device
    opt_state_bytes: int  # per device
    other_state_bytes: int  # step counter, dropout key, skipped counter
    batch_bytes: int  # per device
    temp_bytes: int  # per device: activations, gradients, workspaces of the compiled program
    peak_bytes: int  # per device: live inputs + outputs not donated + temporaries
    flops_per_step: float | None  # model FLOPs (lmjax.flops), all devices together
    attention: str = ""  # the implementation the step was traced with, and why
    largest: list[ArrayPlan] = field(default_factory=list)

    def fits(self, device_name: str) -> tuple[bool, float]:
        """(whether the peak fits, bytes JAX can use) on one device of `device_name`."""
        total, fraction = DEVICE_MEMORY[device_name]
        if device_name.startswith(("A", "H")) and os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"):
            fraction = float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])
        usable = total * fraction
        return self.peak_bytes <= usable, usable


def vocab_size_without_data(cfg) -> tuple[int, str]:
    """(vocabulary size, where it came from), known without reading the corpus."""
    from lmjax.data.tokenizers import DEFAULT_BPE_VOCAB, ByteTokenizer, build_tokenizer

    tok = cfg.tokenizer
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    if tok.kind == "byte":
        return ByteTokenizer.vocab_size, "byte tokenizer"
    if tok.kind == "bpe":
        return tok.vocab_size or DEFAULT_BPE_VOCAB, "bpe target size; a small corpus may give fewer"
    if tok.kind in ("hf", "tiktoken"):
        return build_tokenizer(tok, ()).vocab_size, f"{tok.kind} file {tok.path}"
    if tok.kind in ("char", "word") and tok.vocab_size:
        return tok.vocab_size, f"tokenizer.vocab_size cap of the {tok.kind} tokenizer"
    raise UserError(
        f"the vocabulary of tokenizer.kind='{tok.kind}' with tokenizer.vocab_size=0 is known only after "
        "reading the corpus; set model.vocab_size (or tokenizer.vocab_size) to plan without data"
    )


def _device_bytes(shape: tuple, dtype, sharding) -> tuple[tuple, int]:
    import numpy as np

    device_shape = tuple(sharding.shard_shape(shape))
    return device_shape, int(math.prod(device_shape)) * np.dtype(dtype).itemsize


def _tree_bytes(tree) -> int:
    import jax

    return sum(_device_bytes(x.shape, x.dtype, x.sharding)[1] for x in jax.tree.leaves(tree))


def _abstract_batch(cfg, parallel) -> dict:
    """ShapeDtypeStructs of one global batch, with the keys and dtypes the data pipeline makes."""
    import jax
    import numpy as np

    from lmjax.data.batches import windows
    from lmjax.data.cache import TokenSplit

    t = cfg.data.seq_len
    one_doc = TokenSplit(np.zeros(t + 1, np.uint16), np.array([0, t + 1]), np.array([t + 1]))
    row = windows(one_doc, np.zeros(1, np.int64), t, cfg.data.document_mask)
    return {
        k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape[1:]), v.dtype, sharding=parallel.batch_sharding)
        for k, v in row.items()
    }


def _largest(state, count: int) -> list[ArrayPlan]:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(state)
    leaves.sort(key=lambda kv: -math.prod(kv[1].shape) * kv[1].dtype.itemsize)
    out = []
    for path, x in leaves[:count]:
        device_shape, nbytes = _device_bytes(x.shape, x.dtype, x.sharding)
        out.append(
            ArrayPlan(
                jax.tree_util.keystr(path, simple=True, separator="/"),
                tuple(x.shape),
                str(x.dtype),
                str(x.sharding.spec),
                device_shape,
                nbytes,
            )
        )
    return out


def make_plan(cfg, experiment: str = "", devices=None, largest: int = 6) -> Plan:
    """Compile the train step of `cfg` ahead of time on `devices` (default: all JAX devices)."""
    import jax

    from lmjax.flops import flops_per_token
    from lmjax.models import attention
    from lmjax.run import build_run, count_params
    from lmjax.train.parallel import MeshParallel, check_batch, restore_target

    vocab_size, vocab_source = vocab_size_without_data(cfg)
    parallel_cfg = cfg.parallel
    if parallel_cfg.strategy == "single":
        devices = (devices or jax.devices())[:1]
    # pmap keeps a full copy per device, as the data-parallel mesh does: plan it as that mesh.
    parallel = MeshParallel(parallel_cfg, devices)
    check_batch(cfg.train.batch_size, cfg.train.grad_accum, parallel)
    run = build_run(cfg, Path(os.devnull), vocab_size, parallel)  # the run directory is never written
    state = restore_target(run.abstract_state(), run.shardings)
    batch = _abstract_batch(cfg, parallel)
    step = run.compile_train_step()
    # Without a GPU to autotune on, XLA can fail to tile small matmuls for Triton; cuBLAS needs no tiling.
    options = {"xla_gpu_enable_triton_gemm": False} if parallel.mesh.devices.flat[0].platform == "gpu" else None
    target = attention.Device.of(parallel.mesh.devices.flat[0], parallel.n_devices)
    with attention.compiling_for(target):  # the target's kernels, not those of the device present
        compiled = step.lower(state, batch).compile(compiler_options=options)
    choice = attention.for_config(cfg, target)[0] if cfg.model.kind == "transformer" else None
    params = _tree_bytes(state.params)
    opt = _tree_bytes(state.opt_state)
    everything = _tree_bytes(state)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    per_token = flops_per_token(getattr(run.model, "cfg", None), cfg.data.seq_len)
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return Plan(
        experiment=experiment,
        devices=parallel.n_devices,
        platform=parallel.mesh.devices.flat[0].platform,
        device_kind=parallel.mesh.devices.flat[0].device_kind,
        mesh=parallel.describe(),
        model=cfg.model.kind,
        n_params=count_params(state.params),
        vocab_size=vocab_size,
        vocab_source=vocab_source,
        tokens_per_step=tokens,
        params_bytes=params,
        opt_state_bytes=opt,
        other_state_bytes=everything - params - opt,
        batch_bytes=_tree_bytes(batch),
        temp_bytes=int(m.temp_size_in_bytes),
        peak_bytes=int(peak),
        flops_per_step=per_token * tokens if per_token else None,
        attention=attention.describe(choice, target) if choice else "",
        largest=_largest(state, largest),
    )


def _size(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:8.2f} GiB"
    return f"{n / 2**20:8.1f} MiB" if n >= 2**20 else f"{n / 2**10:8.1f} KiB"


def format_plan(p: Plan, cfg) -> str:
    micro = cfg.train.batch_size // cfg.train.grad_accum
    lines = [
        (
            f"plan for {p.experiment}: {p.model}, {p.n_params:,} parameters, "
            f"vocabulary {p.vocab_size:,} ({p.vocab_source})"
        ),
        (
            f"{p.mesh}; step of {cfg.train.batch_size} x {cfg.data.seq_len} = {p.tokens_per_step:,} tokens "
            f"({cfg.train.grad_accum} micro-batch{'es' if cfg.train.grad_accum > 1 else ''} of {micro}), "
            f"model.dtype={cfg.model.dtype}, model.remat={cfg.model.remat}"
        ),
        f"compiled ahead of time by XLA's {p.platform.upper()} compiler for {p.device_kind}; nothing was run"
        + ("" if p.platform == "gpu" else " (temporaries: see the README on how a GPU's differ)"),
        *([p.attention] if p.attention else []),
        "per device:",
        f"  parameters        {_size(p.params_bytes)}",
        f"  optimizer state   {_size(p.opt_state_bytes)}",
        f"  other state       {_size(p.other_state_bytes)}   (step, dropout key)",
        f"  batch             {_size(p.batch_bytes)}",
        f"  temporaries       {_size(p.temp_bytes)}   (activations, gradients, workspaces of the compiled step)",
        f"  peak              {_size(p.peak_bytes)}   (inputs + outputs not donated + temporaries)",
    ]
    if p.flops_per_step:
        lines.append(f"model FLOPs per step  {p.flops_per_step:.4g} ({p.flops_per_step / p.devices:.4g} per device)")
    else:
        lines.append("model FLOPs per step  not counted for this model kind")
    lines.append("largest arrays of the train state (global shape, sharding, one device's share):")
    for a in p.largest:
        lines.append(
            f"  {a.name:40} {list(a.shape)!s:16} {a.dtype:8} {a.spec:28} "
            f"{list(a.device_shape)!s:16} {_size(a.device_bytes).strip()}"
        )
    lines.append(
        "fits one device of (by the peak above; GPUs: JAX's default 75% share unless "
        "XLA_PYTHON_CLIENT_MEM_FRACTION is set):"
    )
    for name in DEVICE_MEMORY:
        ok, usable = p.fits(name)
        lines.append(f"  {name:10} {'yes' if ok else 'no ':3}  usable {usable / GiB:6.1f} GiB")
    return "\n".join(lines)


def check_device(p: Plan, device_name: str) -> None:
    """UserError when the plan does not fit one device of `device_name`."""
    ok, usable = p.fits(device_name)
    if not ok:
        raise UserError(
            f"the train step needs {p.peak_bytes / GiB:.2f} GiB per device but a {device_name} gives JAX "
            f"{usable / GiB:.1f} GiB; raise train.grad_accum, set model.remat='full', lower "
            "train.batch_size, or shard the state with parallel.fsdp"
        )


def device_name(name: str) -> str:
    """The DEVICE_MEMORY key for `name`, matched without case or punctuation ('h100' is H100-80G)."""

    def norm(s):
        return "".join(ch for ch in s.lower() if ch.isalnum())

    exact = [key for key in DEVICE_MEMORY if norm(key) == norm(name)]
    prefixed = [key for key in DEVICE_MEMORY if norm(key).startswith(norm(name))]
    if exact or len(prefixed) == 1:
        return (exact or prefixed)[0]
    raise UserError(f"unknown --device '{name}'; choose one of {', '.join(DEVICE_MEMORY)}")


def default_devices(parallel_cfg) -> int:
    """Devices the config's mesh names (an axis of -1 counts as 1)."""
    if parallel_cfg.strategy == "single":
        return 1
    return math.prod(max(s, 1) for s in (parallel_cfg.data, parallel_cfg.fsdp, parallel_cfg.tensor))


def simulated_env(devices: int, environ=None) -> dict:
    """The environment of a process whose JAX sees `devices` CPU devices."""
    env = dict(os.environ if environ is None else environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


# The C++ logging of the CUDA plugin and XLA's GPU compiler: "no CUDA driver found" on every
# start without a GPU, and the compiler's own notes (e.g. that the program exceeds the device's
# memory, which the plan says in its own words). Python errors are not logging: they show.
CXX_LOG_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\] )"
)


PLAN_CHILD = "LMJAX_PLAN_CHILD"  # set in the child process that makes the plan


def plan_in_child(argv: list[str], env: dict, drop_cxx_logging: bool) -> int:
    """Run `argv` (a `python -m lmjax.plan` command) and return its exit status. With
    drop_cxx_logging, the child's C++ log lines (CXX_LOG_LINE) are held back, and shown only
    when it ends with neither a plan (status 0) nor a one-line error (status 2)."""
    if not drop_cxx_logging:
        code = subprocess.run(argv, env=env, check=False).returncode
    else:
        held = []
        with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, encoding="utf-8", errors="replace") as child:
            for line in child.stderr:
                if CXX_LOG_LINE.match(line):
                    held.append(line)
                else:
                    sys.stderr.write(line)
        code = child.returncode
        if code not in (0, 2):
            sys.stderr.writelines(held[-50:])
    if code < 0:
        print(f"lmjax: error: the planning process was stopped by signal {-code}", file=sys.stderr)
        return 128 - code
    return code


def run_plan(
    experiment: str, overrides, devices: int = 0, device: str = "", json_out: str = "", compiler: str = "auto"
) -> int:
    """`lmjax plan`: load the config, compile the step ahead of time, print the plan.

    compiler 'gpu' (or 'auto' when `device` names an NVIDIA GPU and the CUDA plugin is
    installed, or in .gpu-compile/) compiles for that GPU without one; 'cpu' compiles for
    simulated CPU devices.
    JAX fixes its CPU device count when it starts, so a process where JAX has already started
    (a test calling the CLI) plans in a child process; so does every GPU plan (plan_in_child).
    """
    from lmjax import config as config_lib

    cfg = config_lib.load(experiment, overrides)
    name = device_name(device) if device else ""
    if devices < 0:
        raise UserError(f"--devices {devices} must be positive")
    if compiler == "gpu" and name not in GPU_SPECS:
        raise UserError(f"--compiler gpu needs --device naming one of {', '.join(GPU_SPECS)}")
    folder, installed = gpu_compile_dir(), cuda_plugin_installed()
    gpu = compiler == "gpu" or (compiler == "auto" and name in GPU_SPECS and (installed or bool(folder)))
    n = devices or default_devices(cfg.parallel)
    env = simulated_env(n)
    if gpu and not installed and folder:  # .gpu-compile/ is on the path of a GPU plan's process only
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, env.get("PYTHONPATH")]))
    ready = all(os.environ.get(k) == env.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH"))
    if os.environ.get(PLAN_CHILD) != "1" and (gpu or ("jax" in sys.modules and not ready)):
        argv = [sys.executable, "-m", "lmjax.plan", experiment, "--devices", str(n), *overrides]
        argv += ["--device", name] if name else []
        argv += ["--json", json_out] if json_out else []
        argv += ["--compiler", "gpu" if gpu else "cpu"]
        return plan_in_child(argv, {**env, PLAN_CHILD: "1"}, drop_cxx_logging=gpu)
    os.environ.update(env)
    p = make_plan(cfg, experiment, gpu_devices(name, n) if gpu else None)
    print(format_plan(p, cfg), flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(asdict(p), indent=2))
    if name:
        check_device(p, name)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lmjax plan` (the command line's and `python -m lmjax.plan`'s)."""
    parser.add_argument("experiment", help="experiments/NAME.py")
    parser.add_argument(
        "--devices",
        type=int,
        default=0,
        help="devices to plan for (default: the config's mesh, an axis of -1 counting as 1)",
    )
    parser.add_argument(
        "--device", default="", help=f"exit 2 unless the step fits one of these: {', '.join(DEVICE_MEMORY)}"
    )
    parser.add_argument(
        "--compiler",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="auto: for the --device GPU when the CUDA plugin is installed or in .gpu-compile/ (no GPU needed), "
        "else for simulated CPU devices",
    )
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")


def main(argv=None) -> int:
    """`python -m lmjax.plan EXPERIMENT [--devices N] [--device NAME] [--config.KEY=VALUE ...]`."""
    parser = argparse.ArgumentParser(prog="lmjax plan")
    add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    try:
        return run_plan(args.experiment, overrides, args.devices, args.device, args.json, args.compiler)
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
