"""Seeing a run while it trains: metrics.jsonl (always), TensorBoard and Weights & Biases
(optional), the console, a profiler trace. Reading finished runs (plots, a table) is lmjax.runs.

Only process 0 writes. After a resume, entries past the resumed step are dropped so the
file has each step once; every line is written whole, and a torn last line (kill -9
mid-write) is dropped on the next start. Each entry carries 'time': seconds of wall time
since the run started, added up over resumes (time between the last entry and a crash is
not counted).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

from lmjax.checks import write_text_atomic
from lmjax.errors import UserError


def read_jsonl(path: str | Path) -> list[dict]:
    """Complete JSON lines of a metrics file (a torn last line is skipped)."""
    out = []
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wall_time(records: list[dict]) -> float | None:
    """Seconds a run has trained, resumes included: the largest 'time' of its records (None before any)."""
    return max((r["time"] for r in records if "time" in r), default=None)


def truncate_after(path: Path, step: int) -> int:
    """Keep entries with step ≤ `step` and drop torn lines; return how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    write_text_atomic(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


def flat_config(d: dict, prefix: str = "") -> dict:
    """{'train': {'steps': 5}} → {'train.steps': 5} (leaves only: TensorBoard hparams, W&B)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _open_wandb(run_dir: Path, hparams: dict | None):
    try:
        import wandb
    except ImportError:
        raise UserError(
            "train.wandb=True but the wandb package is not installed; `pip install wandb` "
            "(and `wandb login`), or set train.wandb=False"
        ) from None
    id_file = run_dir / "wandb_id"  # the same W&B run continues across resumes
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "lmjax"),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=hparams or {},
    )


class MetricsWriter:
    """Write a step's metrics to metrics.jsonl, and to TensorBoard and W&B when asked.

    `started` is the time.time() the run (this process) started; `resumed_step` drops
    TensorBoard events past that step left by an earlier, interrupted run.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        tensorboard: bool = False,
        hparams: dict | None = None,
        wandb: bool = False,
        started: float | None = None,
        resumed_step: int = 0,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        self._session_end = None  # TensorBoard hparams: written on close
        self.started = time.time() if started is None else started
        records = read_jsonl(self.path) if enabled else []
        earlier = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
        self.time_before = max(earlier, default=0.0)  # wall time of the runs this one resumes
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter
            from tensorboardX.summary import hparams as hparams_summary

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1)
            if hparams:
                self.tb.add_text("config", "```\n" + json.dumps(hparams, indent=2) + "\n```", resumed_step)
                flat = {k: v for k, v in flat_config(hparams).items() if isinstance(v, (bool, int, float, str))}
                experiment, session_start, self._session_end = hparams_summary(flat, {"loss": 0.0, "heldout_loss": 0.0})
                self.tb.file_writer.add_summary(experiment)
                self.tb.file_writer.add_summary(session_start)
        if enabled and wandb:
            self.wandb = _open_wandb(run_dir, hparams)

    def elapsed(self) -> float:
        """Seconds of wall time since the run first started, over all resumes."""
        return self.time_before + time.time() - self.started

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        values = {"time": self.elapsed(), **values}
        record = {"step": step, **{k: (float(v) if not isinstance(v, (str, bool)) else v) for k, v in values.items()}}
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as f:  # one write per line: a kill leaves at most one torn line
            f.write(line)
        scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, float)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            if self._session_end is not None:
                self.tb.file_writer.add_summary(self._session_end)
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_info(info: dict) -> str:
    """'loss 4.1234  heldout 4.2000  tok/s 12,345  mfu 3.1%' (NaN and None are left out)."""
    parts = []
    for k, v in info.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if k == "mfu":
            parts.append(f"mfu {100 * v:.1f}%")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4f}")
        elif isinstance(v, int):
            parts.append(f"{k} {v:,}")
        else:
            parts.append(f"{k} {v}")
    return "  ".join(parts)


class Progress:
    """A rich progress bar on a terminal; a plain line every `every` steps otherwise."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self.every = every
        self.bar = None
        self.first = None  # (time, step) of the first update: ETA leaves compilation out
        self.t0 = time.time()
        self.start = start
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def eta(self, step: int) -> str:
        """Seconds left at the rate since the first update ('-' before: that one includes compiling)."""
        if self.first is None or step <= self.first[1]:
            return "-"
        t, s = self.first
        return f"{(time.time() - t) / (step - s) * (self.total - step):.0f}s"

    def update(self, step: int, info: dict) -> None:
        if not self.enabled:
            return
        text = format_info(info)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=text)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  {text}  eta {self.eta(step)}", flush=True)
        if self.first is None:
            self.first = (time.time(), step)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(message, highlight=False, markup=False)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class StepTrace:
    """A jax.profiler trace of `steps` train steps, from `first_step` (after the compiling
    one), into `directory` for TensorBoard's profile plugin. Process 0 only."""

    def __init__(self, directory: Path, steps: int, first_step: int, enabled: bool = True):
        self.directory = Path(directory)
        self.first, self.last = first_step, first_step + steps - 1
        self.enabled = enabled and steps > 0
        self.active = False

    def before(self, step: int) -> None:
        """Call before dispatching step `step` (0-based: the update that makes step + 1)."""
        if self.enabled and step == self.first:
            import jax  # here, not at the top: lmjax.runs reads metrics files without loading JAX

            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs) -> bool:
        """Call after dispatching step `step`; True when this ended the trace (one device sync)."""
        if self.active and step >= self.last:
            self.stop(outputs)
            return True
        return False

    def stop(self, outputs=None) -> None:
        if self.active:
            import jax

            if outputs is not None:
                jax.block_until_ready(outputs)  # the trace must hold the traced steps' device work
            jax.profiler.stop_trace()
            self.active = False
