"""Reading finished runs: a plot of their losses and a table of what each reached, from the
metrics.jsonl and config.json that `lmjax train` leaves in a run directory."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from lmjax.errors import UserError
from lmjax.metrics import read_jsonl, wall_time

X_AXES = {"step": "step", "tokens": "tokens seen", "time": "wall time (s)"}


def _x_values(records: list[dict], x: str, run_dir: Path) -> list[float]:
    if x == "step":
        return [r["step"] for r in records]
    if x == "time":
        if any("time" not in r for r in records):
            raise UserError(
                f"{run_dir}/metrics.jsonl has entries without 'time' (written before it was recorded); "
                "use --x step or --x tokens"
            )
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
        for key, style, label in (
            ("loss", {"lw": 1.3, "alpha": 0.85}, "train"),
            ("heldout_loss", {"ls": "--", "marker": "o", "ms": 4, "lw": 1.3}, "held-out"),
        ):
            pts = [
                (xv, r[key])
                for xv, r in zip(xs, records)
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
            ]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i % 10}", label=prefix + label, **style)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss (nats per token)")
    title = "training and held-out loss"
    ax.set_title(title if len(run_dirs) > 1 else f"{run_dirs[0].name}: {title}")
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
    heldout = [
        r["heldout_loss"]
        for r in records
        if isinstance(r.get("heldout_loss"), (int, float)) and math.isfinite(r["heldout_loss"])
    ]
    best = min(heldout, default=None)
    return {
        "run": str(run_dir),
        "steps": max((r.get("step", 0) for r in records), default=0),
        "planned": planned,
        "best_heldout_loss": best,
        "best_heldout_ppl": math.exp(min(best, 50)) if best is not None else None,
        "tokens_seen": max((r["tokens_seen"] for r in records if "tokens_seen" in r), default=None),
        "time": wall_time(records),
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_runs(summaries: list[dict], root: Path | None = None) -> str:
    """A plain-text table of `run_summary` rows, paths relative to `root`."""
    header = ("run", "steps", "best held-out", "perplexity", "tokens seen", "wall time")
    rows = []
    for s in summaries:
        name = str(Path(s["run"]).relative_to(root)) if root is not None else s["run"]
        steps = f"{s['steps']:,}" + (f"/{s['planned']:,}" if s["planned"] else "")
        rows.append(
            (
                name if name != "." else str(root),
                steps,
                "-" if s["best_heldout_loss"] is None else f"{s['best_heldout_loss']:.4f}",
                "-" if s["best_heldout_ppl"] is None else f"{s['best_heldout_ppl']:.3f}",
                "-" if s["tokens_seen"] is None else f"{int(s['tokens_seen']):,}",
                _duration(s["time"]),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    return "\n".join(lines)
