"""Run the points of a sweep: one ordinary run directory per point under the sweep directory.

A sweep directory holds `sweep.json` (the experiment's resolved base config and every point's
overrides), `sweep.lock` while a sweep runs, and one run directory per point. A point is finished
when its checkpoints hold step `train.steps` (a checkpoint is complete or invisible, so a kill
never fakes one); running the same command again skips finished points and resumes the others
from their latest checkpoint, so a killed sweep loses only the steps since each run's last save.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmjax import checks
from lmjax import config as config_lib
from lmjax.errors import UserError
from lmjax.runlock import RunLock
from lmjax.study.grid import Point

SPEC_FILE = "sweep.json"
LOCK_FILE = "sweep.lock"
LOG_FILE = "train.log"  # each point's own output, inside its run directory


def say(line: str) -> None:
    """A line of the sweep's own progress, shown at once even when stdout is a file."""
    print(line, flush=True)


class SweepLock(RunLock):
    """Exclusive use of a sweep directory: lmjax.runlock's lock (flock, the holder named, a dead
    holder's lock taken over), as sweep.lock."""

    def __init__(self, out: Path, log=say):
        Path(out).mkdir(parents=True, exist_ok=True)
        super().__init__(out, log, name=LOCK_FILE, what="sweep", user="sweep", flag="--out")


def open_spec(
    out: Path, experiment: str, base, kind: str, points: list[Point], columns: list[str], extra: dict
) -> dict:
    """Write (or extend) `sweep.json`; refuse a directory made from another experiment's config.
    `columns` are the keys of the points' values that tables and plots show."""
    path = Path(out) / SPEC_FILE
    spec = {
        "kind": kind,
        "experiment": str(experiment),
        "columns": columns,
        "base_config": base.to_dict(),
        "points": {},
        **extra,
    }
    if path.is_file():
        old = read_spec_file(path)
        if old.get("kind") != kind:
            raise UserError(f"{out} holds a {old.get('kind')}, not a {kind} ({path}); choose another --out")
        saved = config_lib.from_json(json.dumps(old["base_config"]))
        refused, _ = config_lib.resume_differences(saved, base)
        if refused:
            raise UserError(
                f"{out} holds a {kind} of a different experiment ({'; '.join(refused)}); use the same "
                "experiment and --config overrides, or choose another --out"
            )
        spec["points"] = old.get("points", {})
    spec["points"].update({p.name: {"overrides": list(p.overrides), "values": p.values} for p in points})
    checks.write_json_atomic(path, spec)
    return spec


def read_spec_file(path: Path) -> dict:
    """A sweep directory's record (sweep.json), or one line saying how to mend it."""
    fix = "delete it and run the same sweep or study command again (finished runs are kept)"
    spec = checks.read_json_object(path, "the sweep record", fix)
    if not isinstance(spec.get("base_config"), dict):
        raise UserError(f"the sweep record {path} has no base_config; {fix}")
    return spec


def finished_step(run_dir: Path) -> int | None:
    """The latest complete checkpoint of a run directory, or None."""
    from lmjax.checkpoint import Checkpoints

    if not (run_dir / "checkpoints").is_dir():
        return None
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True)
    try:
        return ckpts.latest_step()
    finally:
        ckpts.close()


class Stopped(Exception):
    """SIGTERM or Ctrl-C stopped the sweep; the run in flight saved first. `status`: the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class Outcome:
    point: Point
    status: str  # skipped | done | failed
    seconds: float = 0.0
    message: str = ""


def train_command(experiment: str, run_dir: Path, overrides) -> list[str]:
    """`lmjax train` of one point, as a subprocess of this Python."""
    return [
        sys.executable,
        "-m",
        "lmjax.cli",
        "train",
        str(experiment),
        "--workdir",
        str(run_dir),
        *(o if o.startswith("--config.") else f"--config.{o}" for o in overrides),
    ]


def _train_here(cfg, run_dir: Path) -> None:
    """Train one point in this process, its output into its train.log."""
    from lmjax.train.loop import train

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_FILE, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        train(cfg, run_dir, log=lambda line: print(line, flush=True))


def run_points(
    out: Path, experiment: str, base_overrides, points: list[Point], cfgs: dict, parallel: int = 1, log=say
) -> list[Outcome]:
    """Train every unfinished point: in this process one after another, or `parallel` subprocesses
    of `lmjax train` at once, each given one GPU (CUDA_VISIBLE_DEVICES; on CPU they share the cores)."""
    todo, outcomes = [], []
    for p in points:
        step = finished_step(out / p.name)
        if step is not None and step >= cfgs[p.name].train.steps:
            outcomes.append(Outcome(p, "skipped"))
        else:
            todo.append((p, step))
    resumed = sum(1 for _, s in todo if s is not None)
    log(
        f"sweep {out}: {len(points)} points; {len(outcomes)} finished (skipped), {resumed} to resume, "
        f"{len(todo) - resumed} new"
    )
    if parallel > 1:
        return outcomes + _run_subprocesses(out, experiment, base_overrides, todo, parallel, log)
    from lmjax.train.loop import Preempted, TrainingHalted

    for i, (p, step) in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {p.name}" + (f" (resuming from step {step})" if step is not None else "")
        log(f"{head}: training, log in {out / p.name / LOG_FILE}")
        t0 = time.time()
        try:
            _train_here(cfgs[p.name], out / p.name)
        except Preempted as e:
            raise Stopped(f"sweep stopped in {p.name}: {e}", 128 + e.signum) from None
        except KeyboardInterrupt as e:  # before its train loop started: nothing of this point to save
            raise Stopped(
                f"sweep stopped before {p.name} started training; run the same command to resume", _status(e)
            ) from None
        except (TrainingHalted, UserError) as e:
            outcomes.append(Outcome(p, "failed", time.time() - t0, str(e)))
            log(f"[{i}/{len(todo)}] {p.name}: failed: {e}")
            continue
        outcomes.append(Outcome(p, "done", time.time() - t0))
        log(f"[{i}/{len(todo)}] {p.name}: done in {time.time() - t0:.0f}s")
    return outcomes


def _die_with_parent() -> None:
    """In a child: SIGTERM it (train saves and stops) if the sweep dies, even by kill -9 (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _devices(n: int) -> list[str]:
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return [visible[i % len(visible)] if visible else str(i) for i in range(n)]


def _run_subprocesses(out: Path, experiment: str, base_overrides, todo, parallel: int, log) -> list[Outcome]:
    queue, free, running, outcomes = list(todo), _devices(parallel), {}, []
    try:
        while queue or running:
            while queue and free:
                (p, step), device = queue.pop(0), free.pop(0)
                run_dir = out / p.name
                run_dir.mkdir(parents=True, exist_ok=True)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
                with open(run_dir / LOG_FILE, "a") as f:
                    proc = subprocess.Popen(
                        train_command(experiment, run_dir, [*base_overrides, *p.overrides]),
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        env=env,
                        preexec_fn=_die_with_parent,
                    )
                running[proc] = (p, device, time.time())
                log(f"{p.name}: training on device {device}" + (f", resuming from step {step}" if step else ""))
            time.sleep(0.2)
            for proc in [q for q in running if q.poll() is not None]:
                p, device, t0 = running.pop(proc)
                free.append(device)
                ok = proc.returncode == 0
                outcomes.append(
                    Outcome(
                        p, "done" if ok else "failed", time.time() - t0, "" if ok else f"exit status {proc.returncode}"
                    )
                )
                what = "done" if ok else f"failed (exit status {proc.returncode})"
                log(f"{p.name}: {what} in {time.time() - t0:.0f}s" + ("" if ok else f"; see {out / p.name / LOG_FILE}"))
    except KeyboardInterrupt as e:
        in_flight, saved = len(running), _stop_children(running)
        raise Stopped(
            f"sweep stopped; {saved} of the {in_flight} runs in flight saved their step and stopped; "
            "run the same command to resume",
            _status(e),
        ) from None
    finally:  # an error here: each child saves on SIGTERM and the next sweep resumes it
        _stop_children(running)
    return outcomes


def _status(stop: KeyboardInterrupt) -> int:
    """128 + the signal: 143 for SIGTERM (lmjax.interrupts.Interrupted), 130 for a plain Ctrl-C."""
    return 128 + getattr(stop, "signum", signal.SIGINT)


def _stop_children(running: dict, timeout: float = 600) -> int:
    """SIGTERM each child `lmjax train` (it saves the step it is in and exits 143), wait for them
    (kill one that outlasts `timeout`), and return how many saved. Empties `running`."""
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    saved, deadline = 0, time.time() + timeout
    for proc in running:
        try:
            proc.wait(max(deadline - time.time(), 0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        saved += proc.returncode == 128 + signal.SIGTERM
    running.clear()
    return saved


def _quoted(overrides) -> str:
    return " ".join(shlex.quote("--config." + o) for o in overrides)


def slurm_script(out: Path, experiment: str, base_overrides, todo: list[Point]) -> Path:
    """A SLURM array script with one task per unfinished point (`sbatch` it; resubmit to resume)."""
    cases = "\n".join(
        f"  {i}) NAME={shlex.quote(p.name)}; ARGS=({_quoted(p.overrides)}) ;;" for i, p in enumerate(todo)
    )
    base = " ".join(shlex.quote(o) for o in base_overrides)
    experiment_path = shlex.quote(str(Path(experiment).absolute()))
    text = f"""#!/bin/bash
# lmjax sweep of {experiment}: one array task per unfinished point. Edit the resources for your cluster.
# On SIGTERM (time limit, preemption) a run saves and stops; submit again and it resumes.
#SBATCH --job-name=lmjax-{out.name}
#SBATCH --array=0-{len(todo) - 1}
#SBATCH --output={out.absolute()}/slurm-%A_%a.out
#SBATCH --gres=gpu:1
set -euo pipefail
case "$SLURM_ARRAY_TASK_ID" in
{cases}
esac
exec ${{LMJAX:-lmjax}} train {experiment_path} --workdir "{out.absolute()}/$NAME" {base} "${{ARGS[@]}}"
"""
    path = out / "sweep.slurm"
    path.write_text(text)
    return path
