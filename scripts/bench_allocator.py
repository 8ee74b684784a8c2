"""Does lmjax's scratch shim (lmjax.scratch_cache) still beat a stock allocator told to keep memory?

Times the real train step of bench_train.py's 'medium' shape (4 x 128: 100 MiB of scratch a step)
under each allocator setting in turn, the settings alternating round by round so that drifting
load on a shared machine hits them alike, and prints the median step time of each as a ratio
to the shim's, with page faults per step and peak RSS:

- shim: lmjax.scratch_cache preloaded (what `lmjax train` does on CPU);
- glibc: the default malloc, which maps a block this large fresh at every step;
- glibc tunables: GLIBC_TUNABLES that keep large blocks in the heap and never trim it;
- jemalloc: libjemalloc.so.2 (Debian/Ubuntu: apt-get install libjemalloc2) in LD_PRELOAD, with
  freed pages kept (MALLOC_CONF dirty_decay_ms:-1,muzzy_decay_ms:-1).

    PYTHONPATH=$PWD nice -n 10 python scripts/bench_allocator.py [--rounds 2] [--steps 15]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GLIBC_KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"  # no mmap, never give back
JEMALLOC_KEEP = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def jemalloc() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/libjemalloc.so.2") + glob.glob("/usr/lib/libjemalloc.so.2"))
    return found[0] if found else None


def settings() -> dict[str, dict[str, str]]:
    """Allocator setting → environment of the worker."""
    out = {
        "shim": {"LMJAX_SCRATCH_CACHE": "1"},
        "glibc": {"LMJAX_SCRATCH_CACHE": "0"},
        "glibc tunables": {"LMJAX_SCRATCH_CACHE": "0", "GLIBC_TUNABLES": GLIBC_KEEP},
    }
    lib = jemalloc()
    if lib:
        out["jemalloc"] = {"LD_PRELOAD": lib, "MALLOC_CONF": JEMALLOC_KEEP}
    return out


def timed(env: dict[str, str], steps: int) -> dict:
    """One run of the train benchmark's worker (scripts/bench_train.py) with `env`."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_train import run_worker

    saved = {k: os.environ.get(k) for k in ("LMJAX_SCRATCH_CACHE", "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")}
    try:
        for k in saved:
            os.environ.pop(k, None)
        os.environ.update(env)
        return run_worker(["medium", "--steps", str(steps)])
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per run (after compilation)")
    ap.add_argument("--only", nargs="*", help="settings to time besides the shim, e.g. jemalloc")
    a = ap.parse_args()
    chosen = {name: env for name, env in settings().items() if name == "shim" or not a.only or name in a.only}
    runs = {name: [] for name in chosen}
    if "jemalloc" not in settings():
        print("jemalloc: libjemalloc.so.2 not found (apt-get install libjemalloc2); timing the others")
    print(
        f"'medium' train step (4 x 128), {a.steps} steps per run, {a.rounds} alternating rounds, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for r in range(a.rounds):
        for name, env in chosen.items():
            runs[name].append(timed(env, a.steps))
            print(f"  round {r + 1} {name:15} {runs[name][-1]['step_ms']:7.1f} ms/step", flush=True)
    shim = statistics.median(x["step_ms"] for x in runs["shim"])
    print(
        f"{'allocator':15} {'step ms':>8} {'/ shim':>7} {'per round / shim':>20} {'faults/step':>12} "
        f"{'RSS GiB':>8} {'first loss':>10}"
    )
    for name, rs in runs.items():
        step = statistics.median(x["step_ms"] for x in rs)
        per_round = " ".join(f"{x['step_ms'] / s['step_ms']:.2f}" for x, s in zip(rs, runs["shim"]))
        print(
            f"{name:15} {step:8.1f} {step / shim:7.2f} {per_round:>20} "
            f"{statistics.median(x['faults_per_step'] for x in rs):12.0f} "
            f"{max(x['peak_rss_gib'] for x in rs):8.2f} {rs[0]['first_loss']:10.6f}"
        )


if __name__ == "__main__":
    main()
