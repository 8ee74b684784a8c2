"""`lmjax sweep` and `lmjax study`: check every point, lock the directory, train what is not
finished, then print the table (and for a study, fit and plot)."""

from __future__ import annotations

import time
from pathlib import Path

from lmjax import checks
from lmjax import config as config_lib
from lmjax.errors import UserError
from lmjax.metrics import read_jsonl, wall_time
from lmjax.study import grid as grid_lib
from lmjax.study import sweep as sweep_lib


def add_parsers(sub) -> None:
    """The `sweep` and `study` subcommands, added to the CLI's subparsers."""
    s = sub.add_parser(
        "sweep",
        help="train one run per point of a grid of config values (resumable)",
        description="Extra --config.KEY=VALUE arguments set the base config of every point.",
    )
    s.add_argument("experiment", help="experiments/NAME.py")
    s.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a config key and its values (repeat for more keys: every combination is a point)",
    )
    s.add_argument("--random", type=int, default=0, metavar="N", help="train N points drawn from the grid")
    s.add_argument("--seed", type=int, default=0, help="which points --random draws")
    _common(s)

    t = sub.add_parser(
        "study",
        help="a compute-optimal scaling study: IsoFLOP runs per budget, fitted laws",
        description="Extra --config.KEY=VALUE arguments set the base config of every run.",
    )
    t.add_argument("experiment", help="experiments/NAME.py (a Transformer)")
    t.add_argument("--budgets", required=True, help="training FLOP budgets, e.g. 1e12,3e12,1e13")
    t.add_argument("--per-budget", type=int, default=4, help="model sizes per budget (at least 3)")
    t.add_argument("--bootstrap", type=int, default=200, help="resamples for the 95%% intervals")
    _common(t)


def _common(p) -> None:
    p.add_argument("--out", required=True, help="the sweep directory: one run directory per point")
    p.add_argument("--parallel", type=int, default=1, help="points trained at once, one per GPU (subprocesses)")
    p.add_argument("--slurm", action="store_true", help="write DIR/sweep.slurm (an array job) instead of training")


def cmd_sweep(args, overrides) -> int:
    base = config_lib.load(args.experiment, overrides)
    grid = grid_lib.parse_grid(args.grid, base)
    points = grid_lib.expand(grid, base, args.random, args.seed)
    extra = {"grid": grid, "random": args.random, "seed": args.seed}
    failed = _train(args, overrides, base, points, "sweep", list(grid), extra)
    if failed is None:
        return 0
    from lmjax.study.report import format_points

    print(format_points(args.out))
    return 1 if failed else 0


def _train(args, overrides, base, points, kind: str, columns: list[str], extra: dict) -> list | None:
    """Validate, lock, record and train the points; the failed outcomes (None when only a SLURM script was written)."""
    if args.parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {args.parallel}")
    cfgs = {p.name: grid_lib.point_config(base, p) for p in points}  # every point checked before any run
    out = Path(args.out)
    with sweep_lib.SweepLock(out):
        sweep_lib.open_spec(out, args.experiment, base, kind, points, columns, extra)
        if args.slurm:
            todo = [p for p in points if (sweep_lib.finished_step(out / p.name) or 0) < cfgs[p.name].train.steps]
            if not todo:
                print(f"every point of {out} is finished")
                return None
            path = sweep_lib.slurm_script(out, args.experiment, overrides, todo)
            tasks = f"{len(todo)} array task{'s' * (len(todo) != 1)}"
            print(
                f"wrote {path} ({tasks}); submit with `sbatch {path}`, then run this command again (without --slurm) "
                "to see the results"
            )
            return None
        try:
            outcomes = sweep_lib.run_points(out, args.experiment, overrides, points, cfgs, args.parallel)
        except sweep_lib.Stopped as e:
            print(f"lmjax: {e}", flush=True)
            raise SystemExit(e.status) from None
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        print(f"failed: {o.point.name}: {o.message}")
    return failed


def parse_budgets(text: str) -> list[float]:
    """--budgets C1,C2,... as positive FLOP counts."""
    budgets = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--budgets: '{part}' is not a number of FLOPs; e.g. --budgets 1e12,3e12,1e13") from None
        if not value > 0:
            raise UserError(f"--budgets: {part} is not a positive number of FLOPs")
        budgets.append(value)
    return budgets


def cmd_study(args, overrides) -> int:
    from lmjax.study import fit, scaling
    from lmjax.study.figures import format_study, write_plots
    from lmjax.study.report import final_heldout, read_spec

    t0 = time.time()
    if args.bootstrap < 1:
        raise UserError(f"--bootstrap must be at least 1 (resamples for the 95% intervals), got {args.bootstrap}")
    base = config_lib.load(args.experiment, overrides)
    planned = scaling.plan(base, parse_budgets(args.budgets), args.per_budget)
    points = [p for p, _ in planned]
    extra = {"budgets": sorted({f["budget"] for _, f in planned}), "per_budget": args.per_budget}
    columns = ["budget", "model.d_model", "model.n_layers", "N", "D"]
    failed = _train(args, overrides, base, points, "study", columns, extra)
    if failed is None:
        return 0
    out = Path(args.out)
    runs, missing = [], []
    for p, facts in planned:
        steps = int(next(o for o in p.overrides if o.startswith("train.steps=")).split("=")[1])
        last = final_heldout(out / p.name)
        if last is None or last[0] != steps:
            missing.append(p.name)
            continue
        runs.append(
            {
                "name": p.name,
                **facts,
                "loss": last[1],
                "steps": steps,
                "d_model": p.values["model.d_model"],
                "n_layers": p.values["model.n_layers"],
                "time": wall_time(read_jsonl(out / p.name / "metrics.jsonl")),
            }
        )
    if len(runs) < 3:
        raise UserError(
            f"only {len(runs)} runs of {out} finished ({', '.join(missing)} did not); run the command again"
        )
    fits = fit.fit_with_intervals(runs, samples=args.bootstrap)
    plots = write_plots(out, runs, fits)
    spec = read_spec(out)
    record = {
        "experiment": args.experiment,
        "budgets": extra["budgets"],
        "per_budget": args.per_budget,
        "size_rule": scaling.__doc__,
        "base_config": spec["base_config"],
        "runs": runs,
        "fits": fits,
        "unfinished": missing,
        "command_wall_s": time.time() - t0,
        "train_wall_s": sum(r["time"] or 0 for r in runs),
        "plots": [str(p) for p in plots],
    }
    checks.write_json_atomic(out / "study.json", record)  # strict JSON: a fit that diverged is null
    print(format_study(runs, fits))
    print(
        f"wrote {out / 'study.json'} and {', '.join(str(p) for p in plots)}; "
        f"training wall time {record['train_wall_s']:.0f}s (this command {record['command_wall_s']:.0f}s)"
    )
    return 1 if failed or missing else 0


def runs_table(directory: str) -> str | None:
    """`lmjax runs DIR` of a sweep directory (None for another directory)."""
    from lmjax.study.report import format_points, is_sweep

    return format_points(directory) if is_sweep(directory) else None


def plot(directory: str, x: str, out: str | None, log_x: bool) -> Path | None:
    """`lmjax plot DIR --x KEY` of a sweep directory: final held-out loss against a swept key, or with
    --x step | tokens | time every point's loss curves (None when DIR is no sweep directory)."""
    from lmjax.study.report import is_sweep, plot_points, read_spec

    if not is_sweep(directory):
        return None
    if x in ("step", "tokens", "time"):
        from lmjax.runs import plot_runs

        runs = [Path(directory) / name for name in read_spec(directory)["points"]]
        runs = [r for r in runs if (r / "metrics.jsonl").is_file()]
        if not runs:
            raise UserError(f"no point of {directory} has started training; run the sweep first")
        return plot_runs(runs, out or Path(directory) / "loss.png", x, log_x)
    return plot_points(directory, x, out or Path(directory) / f"heldout_vs_{x.replace('.', '_')}.png", log_x)
