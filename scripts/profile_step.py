"""Where a train step's time goes: per-op times from a jax.profiler trace, named by the XLA dump.

    PYTHONPATH=$PWD python scripts/profile_step.py small --steps 5 --top 25

Runs the real train step of a reference config (scripts/bench_train.py), traces a few steps,
and joins each traced op with its instruction in XLA's optimized HLO (--xla_dump_to) to say
what it is (matrix product, attention product, elementwise, reduction, copy/transpose) and
where it comes from (forward, backward or optimizer; attention, MLP, norm). Each op counts
with its fastest run over the traced steps, so other load on the machine matters less. It
also times each of the step's products alone (same shapes and dimension numbers, best of 10):
the MFU the matrix kernels allow if nothing else ran.

The step runs with XLA:CPU's default settings, as in training. Most matrix products run
through YNNPACK (fusions named ynn_fusion); XLA:CPU sends some, such as weight gradients that
contract over the rows, to Eigen as plain `dot` calls, which finish asynchronously: their trace
event ends before their work does, so that work shows up in the ops that overlap them. The
script counts these (FLOPs from the HLO) and marks them * where their traced time implies more
than the measured peak.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lmjax import scratch_cache

if __name__ == "__main__":
    scratch_cache.use_in_this_process()  # profile the step as `lmjax train` runs it
DUMP = tempfile.mkdtemp(prefix="lmjax_hlo_")
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_dump_to={DUMP}",
        "--xla_dump_hlo_as_text",
        "--xla_dump_hlo_module_re=.*train_step.*",
    ]
)
# A persistent-cache hit compiles nothing and so dumps no HLO: this process always compiles.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
sys.path.insert(0, str(ROOT / "scripts"))

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")


def dims(shape: str) -> list[int]:
    """'f32[768,128]{1,0}' → [768, 128]."""
    inside = re.search(r"\[([\d,]*)\]", shape).group(1)
    return [int(d) for d in inside.split(",") if d]


def dim_list(text: str, key: str) -> list[int]:
    """'lhs_contracting_dims={0,2}' in text → [0, 2]; [] where the key is absent."""
    m = re.search(key + r"=\{([\d,]*)\}", text)
    return [int(i) for i in m.group(1).split(",") if i] if m else []


def products(path: str) -> list[dict]:
    """Every matrix/attention product (`dot`) of an optimized HLO dump, in fusions or not:
    name, whether it is a top-level library call, operand dims, dimension numbers, FLOPs."""
    shapes, out, in_entry = {}, [], False
    for line in open(path):
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            in_entry = line.startswith("ENTRY")
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = shape
        if op != "dot":
            continue
        numbers = {
            key: dim_list(rest, key)
            for key in ("lhs_contracting_dims", "rhs_contracting_dims", "lhs_batch_dims", "rhs_batch_dims")
        }
        lhs, rhs = (dims(shapes[x]) for x in re.findall(r"%([\w.\-]+)", rest.split(")")[0])[:2])
        k = math.prod(lhs[i] for i in numbers["lhs_contracting_dims"])
        out.append(
            {
                "name": name,
                "top_level": in_entry,
                "lhs": lhs,
                "rhs": rhs,
                **numbers,
                "flops": 2 * math.prod(dims(shape)) * k,
            }
        )
    return out


def library_dot_flops(found: list[dict]) -> dict:
    """Name → FLOPs of each top-level `dot` among `products()` (a library call, e.g. Eigen, not a
    fused kernel). These may run asynchronously: their trace event can end before their work does."""
    return {p["name"]: p["flops"] for p in found if p["top_level"]}


def products_alone_seconds(found: list[dict], repeats: int = 10) -> float:
    """Sum over the products of each one's best time run alone (as its own program, inputs of
    the same shapes), less the cost of calling an empty program: what the step's products
    need if nothing else ran and none waited for another."""
    import jax
    import jax.numpy as jnp

    def best(fn, *args):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t)
        return min(times)

    call = best(jax.jit(lambda x: x + 1), jnp.ones(()))
    total = 0.0
    for p in found:
        numbers = (
            (tuple(p["lhs_contracting_dims"]), tuple(p["rhs_contracting_dims"])),
            (tuple(p["lhs_batch_dims"]), tuple(p["rhs_batch_dims"])),
        )
        fn = jax.jit(lambda a, b, n=numbers: jax.lax.dot_general(a, b, n))
        total += best(fn, jnp.full(p["lhs"], 0.01), jnp.full(p["rhs"], 0.01)) - call
    return total


def read_hlo(path: str) -> dict:
    """Instruction name → (shape, kind, op_name metadata) for every top-level instruction."""
    computations, current = {}, None
    for line in open(path):
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            computations[current] = []
        elif current and line.startswith(" "):
            computations[current].append(line)
    ops = {}
    for lines in computations.values():
        for line in lines:
            m = INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, op, rest = m.groups()
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            body = computations.get(called.group(1), []) if called else []
            body_ops = {INSTRUCTION.match(x).group(3) for x in body if INSTRUCTION.match(x)}
            meta = re.search(r'op_name="([^"]*)"', rest)
            ops[name] = (shape, kind(op, body_ops, rest + "".join(body)), meta.group(1) if meta else "")
    return ops


def kind(op: str, body_ops: set, text: str) -> str:
    ops = body_ops | {op}
    if op in ("while", "call", "conditional"):
        return "control"
    if "dot" in ops or "convolution" in ops:  # batched products are attention's
        return "attention product" if "lhs_batch_dims" in text else "matrix product"
    if ops & {"scatter", "gather"}:
        return "gather/scatter"
    if ops & {"reduce", "reduce-window"}:
        return "reduction"
    if ops <= {"fusion", "copy", "transpose", "bitcast", "parameter"}:
        return "copy/transpose"
    return "elementwise"


def origin(op_name: str) -> str:
    phase = "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else "optimizer/other"
    part = next((p for p in ("attn", "mlp", "norm") if f"/{p}" in op_name), "")
    return f"{phase} {part}".strip()


def main():
    import bench_train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", choices=[*bench_train.REFERENCE, *bench_train.EXTRA])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--kinds", nargs="*", help="list only top ops of these kinds, e.g. elementwise reduction")
    a = ap.parse_args()

    import jax
    import numpy as np

    from lmjax.run import build_run

    cfg, vocab = bench_train.reference_config(a.config)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(cfg, Path(tmp), vocab)
    par = run.parallel
    state = par.init_state(run.init_state, run.shardings, jax.random.PRNGKey(cfg.seed))
    toks = np.random.default_rng(0).integers(0, vocab, (cfg.train.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
    batch = par.put_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]})
    step = run.compile_train_step()
    step = step.lower(state, batch).compile()
    state, _ = step(state, batch)
    with tempfile.TemporaryDirectory(prefix="lmjax_trace_") as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(a.steps):
                state, m = step(state, batch)
                jax.block_until_ready(m)
        profile = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])

    hlo_path = glob.glob(f"{DUMP}/*train_step*cpu_after_optimizations.txt")[0]
    hlo = read_hlo(hlo_path)
    runs = collections.defaultdict(list)
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in hlo and hlo[event.name][1] != "control":
                    runs[event.name].append(event.duration_ns / 1e6)
    per_step = {n: min(t) * max(1, round(len(t) / a.steps)) for n, t in runs.items()}
    total = sum(per_step.values())
    print(f"{a.config}: {len(per_step)} ops, {total:.1f} ms per step (sum of each op's fastest run)")
    from lmjax.flops import flops_per_token
    from lmjax.models.transformer import TransformerConfig

    model_flops = (
        flops_per_token(TransformerConfig.from_config(cfg.model, vocab, cfg.data.seq_len), cfg.data.seq_len)
        * cfg.train.batch_size
        * cfg.data.seq_len
    )
    peak = bench_train.matmul_peak()
    print(
        f"model FLOPs per step {model_flops / 1e9:.2f} G; matmul peak {peak / 1e9:.0f} GFLOP/s (probe); "
        f"MFU of this profile {model_flops / (total / 1e3) / peak:.1%}"
    )
    # The ceiling the matrix kernels allow: the step's products, each timed alone.
    found = products(hlo_path)
    flops, seconds = sum(p["flops"] for p in found), products_alone_seconds(found)
    print(
        f"the {len(found)} matrix and attention products run alone, one after another: {seconds * 1e3:.1f} ms for "
        f"{flops / 1e9:.2f} GFLOP ({flops / seconds / peak:.0%} of the probe); MFU if nothing else ran: "
        f"{model_flops / seconds / peak:.1%}"
    )
    too_fast = {n: f for n, f in library_dot_flops(found).items() if n in per_step and f / (per_step[n] / 1e3) > peak}
    if too_fast:
        print(
            f"{len(too_fast)} library products ({sum(per_step[n] for n in too_fast):.1f} ms) traced faster than the "
            "peak: "
            f"they run asynchronously, and their work ({sum(too_fast.values()) / 1e9:.2f} GFLOP) is counted in the "
            f"ops that overlap them (marked * below)"
        )
    for title, key in (
        ("by kind", lambda n: hlo[n][1]),
        ("by origin", lambda n: origin(hlo[n][2])),
        ("by origin and kind", lambda n: f"{origin(hlo[n][2])}: {hlo[n][1]}"),
    ):
        groups = collections.Counter()
        for n, t in per_step.items():
            groups[key(n)] += t
        print(title + ":")
        for g, t in groups.most_common():
            print(f"  {g:40} {t:9.2f} ms {t / total:6.1%}")
    listed = [n for n in per_step if not a.kinds or hlo[n][1] in a.kinds]
    print(f"top {a.top} ops{' of kinds ' + ', '.join(a.kinds) if a.kinds else ''} (HLO in {DUMP}):")
    for n in sorted(listed, key=lambda n: -per_step[n])[: a.top]:
        shape, k, meta = hlo[n]
        mark = "*" if n in too_fast else " "
        print(f"  {per_step[n]:8.2f} ms{mark} {k:18} {shape:34} {origin(meta):20} {n:28} {meta.split('/')[-1]}")


if __name__ == "__main__":
    main()
