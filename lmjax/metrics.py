"""Seeing a run: metrics.jsonl (always), TensorBoard and Weights & Biases (optional), the
console, a profiler trace; and comparing runs after: loss plots and a table of runs.

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
from typing import Iterable

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
        raise UserError("train.wandb=True but the wandb package is not installed; `pip install wandb` "
                        "(and `wandb login`), or set train.wandb=False") from None
    id_file = run_dir / "wandb_id"  # the same W&B run continues across resumes
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "lmjax"), name=run_dir.name, id=run_id,
                      resume="allow", dir=str(run_dir), config=hparams or {})


class MetricsWriter:
    """Write a step's metrics to metrics.jsonl, and to TensorBoard and W&B when asked.

    `started` is the time.time() the run (this process) started; `resumed_step` drops
    TensorBoard events past that step left by an earlier, interrupted run.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False, hparams: dict | None = None,
                 wandb: bool = False, started: float | None = None, resumed_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        self._session_end = None  # TensorBoard hparams: written on close
        self.started = time.time() if started is None else started
        earlier = [r["time"] for r in read_jsonl(self.path) if isinstance(r.get("time"), (int, float))] if enabled else []
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
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                    TextColumn("{task.fields[info]}"), TextColumn("eta"), TimeRemainingColumn())
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
            import jax

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


def sample_text(model, params, tokenizer, sample_cfg, max_new_tokens: int = 100) -> str:
    """A short sample (prompt + continuation) for the logs, with the config's `sample` settings."""
    from lmjax.sample import generate

    prompt = sample_cfg.prompt or "\n"
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    max_len = getattr(getattr(model, "cfg", None), "max_len", None)
    try:
        new = generate(model, params, [ids], max_new_tokens, temperature=sample_cfg.temperature,
                       top_k=sample_cfg.top_k, top_p=sample_cfg.top_p, seed=sample_cfg.seed,
                       eot_id=tokenizer.eot_id, max_len=max_len)[0]
    except UserError as e:  # e.g. a prompt longer than the context: the run itself is fine
        return f"(no sample: {e})"
    return prompt + tokenizer.decode(new)


# ---- comparing runs after: plots and a table -------------------------------------------

X_AXES = {"step": "step", "tokens": "tokens seen", "time": "wall time (s)"}


def _x_values(records: list[dict], x: str, run_dir: Path) -> list[float]:
    if x == "step":
        return [r["step"] for r in records]
    if x == "time":
        if any("time" not in r for r in records):
            raise UserError(f"{run_dir}/metrics.jsonl has entries without 'time' (written before it was recorded); use --x step or --x tokens")
        return [r["time"] for r in records]
    per_step = next((r["tokens_seen"] / r["step"] for r in records if r.get("tokens_seen") and r["step"] > 0), None)
    if per_step is None:
        raise UserError(f"{run_dir}/metrics.jsonl has no 'tokens_seen'; use --x step")
    return [r.get("tokens_seen", r["step"] * per_step) for r in records]


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def plot_runs(run_dirs: Iterable[str | Path], out: str | Path, x: str = "step", log_x: bool = False) -> Path:
    """Training (solid) and held-out (dashed) loss of each run on one axes → a PNG at `out`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise UserError(f"--x must be one of {', '.join(X_AXES)}, got '{x}'")
    run_dirs = [Path(d) for d in run_dirs]
    fig = Figure(figsize=(9, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (run_dir, name) in enumerate(zip(run_dirs, _labels(run_dirs))):
        records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r]
        if not records:
            raise UserError(f"{run_dir} has no metrics.jsonl entries; pass the --workdir of a `lmjax train` run")
        xs = _x_values(records, x, run_dir)
        prefix = f"{name} " if len(run_dirs) > 1 else ""
        for key, style, label in (("loss", dict(lw=1.3, alpha=0.85), "train"),
                                  ("heldout_loss", dict(ls="--", marker="o", ms=4, lw=1.3), "held-out")):
            pts = [(xv, r[key]) for xv, r in zip(xs, records) if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i % 10}", label=prefix + label, **style)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("training and held-out loss" if len(run_dirs) > 1 else f"{run_dirs[0].name}: training and held-out loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def find_runs(root: str | Path) -> list[Path]:
    """Run directories (holding metrics.jsonl) at or under `root`, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass the folder that holds your runs (default runs/)")
    return sorted(p.parent for p in root.rglob("metrics.jsonl"))


def run_summary(run_dir: Path) -> dict:
    """Steps done (and planned), best held-out loss and perplexity, tokens seen, wall time."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    planned = None
    try:
        planned = json.loads((run_dir / "config.json").read_text())["train"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    heldout = [r["heldout_loss"] for r in records if isinstance(r.get("heldout_loss"), (int, float))
               and math.isfinite(r["heldout_loss"])]
    best = min(heldout, default=None)
    return {
        "run": str(run_dir), "steps": max((r.get("step", 0) for r in records), default=0), "planned": planned,
        "best_heldout_loss": best, "best_heldout_ppl": math.exp(min(best, 50)) if best is not None else None,
        "tokens_seen": max((r["tokens_seen"] for r in records if "tokens_seen" in r), default=None),
        "time": max((r["time"] for r in records if "time" in r), default=None),
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_runs(summaries: list[dict], root: Path | None = None) -> str:
    """A plain-text table of `run_summary` rows, paths relative to `root`."""
    header = ("run", "steps", "best held-out", "perplexity", "tokens seen", "wall time")
    rows = []
    for s in summaries:
        name = str(Path(s["run"]).relative_to(root)) if root is not None else s["run"]
        steps = f"{s['steps']:,}" + (f"/{s['planned']:,}" if s["planned"] else "")
        rows.append((name if name != "." else str(root), steps,
                     "-" if s["best_heldout_loss"] is None else f"{s['best_heldout_loss']:.4f}",
                     "-" if s["best_heldout_ppl"] is None else f"{s['best_heldout_ppl']:.3f}",
                     "-" if s["tokens_seen"] is None else f"{int(s['tokens_seen']):,}",
                     _duration(s["time"])))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(lines)
