"""Metrics: metrics.jsonl (always), TensorBoard (optional), and the console.

Only process 0 writes. After a resume, entries past the resumed step are dropped so the
file has each step once; every line is written whole, and a torn last line (kill -9
mid-write) is dropped on the next start.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


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
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False, hparams: dict | None = None,
                 resumed_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            # After a resume, TensorBoard hides the earlier run's events past the resumed step.
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)
            if hparams:
                self.tb.add_text("config", "```\n" + json.dumps(hparams, indent=2) + "\n```", 0)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if not isinstance(v, (str, bool)) else v) for k, v in values.items()}}
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as f:  # one write per line: a kill leaves at most one torn line
            f.write(line)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float):
                    self.tb.add_scalar(k, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A rich progress bar on a terminal; a plain line every `every` steps otherwise."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self.every = every
        self.bar = None
        self.t0 = time.time()
        self.start = start
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: dict) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=text)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {text}  eta {eta:.0f}s", flush=True)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
