"""A sweep directory read back: its points ranked by held-out loss with the swept keys as columns
(`lmjax runs DIR`), and held-out loss against one swept key (`lmjax plot DIR --x KEY`).

A point's held-out loss is the one its run measured at its last step (train.eval_batches
held-out batches, the same for every point of a sweep of one experiment).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

from lmjax.errors import UserError
from lmjax.metrics import read_jsonl, wall_time
from lmjax.study.sweep import SPEC_FILE, read_spec_file


def is_sweep(directory: str | Path) -> bool:
    """Whether `directory` was made by `lmjax sweep` or `lmjax study`."""
    return (Path(directory) / SPEC_FILE).is_file()


def read_spec(out: str | Path) -> dict:
    path = Path(out) / SPEC_FILE
    if not path.is_file():
        raise UserError(
            f"{out} is not a sweep directory (no {SPEC_FILE}); pass the --out of `lmjax sweep` or `lmjax study`"
        )
    return read_spec_file(path)


def final_heldout(run_dir: Path) -> tuple[int, float] | None:
    """(step, held-out loss) of the last held-out evaluation in a run's metrics.jsonl, or None."""
    found = [
        (r["step"], r["heldout_loss"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if isinstance(r.get("heldout_loss"), (int, float)) and "step" in r
    ]
    return max(found) if found else None


def point_rows(out: str | Path) -> list[dict]:
    """One row per point: name, values of the swept keys, steps done and planned, held-out loss, wall time."""
    out = Path(out)
    spec = read_spec(out)
    rows = []
    for name, point in spec["points"].items():
        run_dir = out / name
        records = read_jsonl(run_dir / "metrics.jsonl")
        planned = next(
            (int(o.split("=", 1)[1]) for o in point["overrides"] if o.startswith("train.steps=")),
            spec["base_config"]["train"]["steps"],
        )
        last = final_heldout(run_dir)
        done = max((r.get("step", 0) for r in records), default=0)
        loss = last[1] if last and last[0] == planned and math.isfinite(last[1]) else None
        rows.append(
            {
                "run": name,
                "values": point["values"],
                "steps": done,
                "planned": planned,
                "heldout_loss": loss,
                "time": wall_time(records),
            }
        )
    return sorted(rows, key=lambda r: (r["heldout_loss"] is None, r["heldout_loss"] or 0.0, r["run"]))


def _cell(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def format_points(out: str | Path) -> str:
    """The `lmjax runs DIR` table of a sweep: points ranked by final held-out loss."""
    spec = read_spec(out)
    columns = spec["columns"]
    header = ("rank", *columns, "steps", "held-out loss", "wall time", "run")
    rows = []
    for i, r in enumerate(point_rows(out), 1):
        t, loss = r["time"], r["heldout_loss"]
        rows.append(
            (
                "-" if loss is None else str(i),
                *(_cell(r["values"].get(c, "")) for c in columns),
                f"{r['steps']:,}/{r['planned']:,}",
                "-" if loss is None else f"{loss:.4f}",
                "-" if t is None else f"{t:.0f}s",
                r["run"],
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == len(header) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    title = f"{spec['kind']} {out} of {spec['experiment']}: {len(rows)} points, ranked by held-out loss at the end"
    return "\n".join([title, *lines])


def resolve_column(spec: dict, key: str) -> str:
    """A column of the sweep by its full key ('optim.lr') or its last part ('lr')."""
    columns = spec["columns"]
    if key in columns:
        return key
    matches = [c for c in columns if c.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    close = difflib.get_close_matches(key, columns, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"--x {key} is not a swept key of this sweep (swept: {', '.join(columns)}; or step, tokens, time "
        f"for training curves){hint}"
    )


def plot_points(out: str | Path, key: str, path: str | Path, log_x: bool = False) -> Path:
    """Final held-out loss against swept key `key`, one line per combination of the other swept keys → PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = read_spec(out)
    key = resolve_column(spec, key)
    others = [c for c in spec["columns"] if c != key]
    lines: dict[str, list] = {}
    for r in point_rows(out):
        x = r["values"].get(key)
        if r["heldout_loss"] is None or not isinstance(x, (int, float)) or isinstance(x, bool):
            continue
        label = ", ".join(f"{c.split('.')[-1]}={_cell(r['values'].get(c))}" for c in others) or "held-out loss"
        lines.setdefault(label, []).append((x, r["heldout_loss"]))
    if not lines:
        raise UserError(f"no finished point of {out} has a numeric '{key}'; run the sweep to the end first")
    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(sorted(lines.items())):
        ax.plot(*zip(*sorted(pts)), marker="o", color=f"C{i % 10}", label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("held-out loss at the last step (nats per token)")
    ax.set_title(f"{Path(out).name}: held-out loss against {key}")
    ax.grid(True, alpha=0.3)
    if len(lines) > 1 or others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
