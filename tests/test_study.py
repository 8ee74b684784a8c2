"""Sweeps and scaling studies: grid points and names, refusals before any run, the lock, a sweep
killed with kill -9 and run again, the scaling plan, and the fits on losses from a known law."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli, tiny_config, write_experiment

from lmjax.errors import UserError
from lmjax.study import fit, grid, scaling, sweep
from lmjax.study.report import format_points


def test_grid_expands_to_every_combination_named_by_its_values(corpus_dir):
    base = tiny_config(corpus_dir)
    g = grid.parse_grid(["optim.lr=1e-3,0.001,3e-3", "--config.model.d_model=32,64"], base)
    assert g == {"optim.lr": ["1e-3", "3e-3"], "model.d_model": ["32", "64"]}  # 1e-3 and 0.001 are one value
    points = grid.expand(g, base)
    assert [p.name for p in points] == [
        "lr=0.001__d_model=32",
        "lr=0.001__d_model=64",
        "lr=0.003__d_model=32",
        "lr=0.003__d_model=64",
    ]
    assert points[1].overrides == ("optim.lr=1e-3", "model.d_model=64")
    assert points[1].values == {"optim.lr": 0.001, "model.d_model": 64}
    cfg = grid.point_config(base, points[1])
    assert (cfg.optim.lr, cfg.model.d_model, base.model.d_model) == (0.001, 64, 32)

    drawn = grid.expand(g, base, random_points=2, seed=3)
    assert len(drawn) == 2 and set(p.name for p in drawn) <= set(p.name for p in points)
    assert [p.name for p in drawn] == [p.name for p in grid.expand(g, base, random_points=2, seed=3)]
    assert len(grid.expand(g, base, random_points=99)) == 4

    same_leaf = grid.expand(grid.parse_grid(["seed=1", "data.seed=2,3", "tokenizer.kind=byte"], base), base)
    assert same_leaf[0].name == "seed=1__data.seed=2__kind=byte"


@pytest.mark.parametrize(
    "specs, message",
    [
        (
            ["optim.lrr=1e-3,3e-3"],
            "unknown config key 'optim.lrr' in --grid optim.lrr=1e-3,3e-3; did you mean 'optim.lr'?",
        ),
        (["optim.lr=1e-3,fast"], "config key 'optim.lr' expects a float (default 0.001), got 'fast'"),
        (["train.steps=10,2.5"], "config key 'train.steps' expects an int"),
        (["optim.lr="], "--grid optim.lr= has no values"),
        (["optim.lr"], "needs the form KEY=V1,V2"),
        ([], "a sweep needs at least one --grid"),
        (["optim.lr=1e-3", "optim.lr=3e-3"], "names 'optim.lr' twice"),
    ],
)
def test_bad_grids_are_refused_in_one_line(corpus_dir, specs, message):
    with pytest.raises(UserError) as e:
        grid.parse_grid(specs, tiny_config(corpus_dir))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_point_with_an_invalid_config_is_refused_before_any_run(tmp_path, corpus_dir):
    exp = write_experiment(tmp_path / "exp.py", corpus_dir)
    r = run_cli(["sweep", str(exp), "--grid", "model.n_heads=2,3", "--out", str(tmp_path / "sweep")])
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "lmjax: error: sweep point n_heads=3: model.d_model=32 must be divisible by model.n_heads=3"
    )
    assert not (tmp_path / "sweep").exists()


def test_a_second_sweep_on_the_same_directory_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "sweep"
    with sweep.SweepLock(out):
        with pytest.raises(UserError) as e:
            with sweep.SweepLock(out):
                pass
    assert f"in use by another sweep (PID {os.getpid()} on host {socket.gethostname()}" in str(e.value)

    holder = (
        "import os, sys; from lmjax.study.sweep import SweepLock; SweepLock(sys.argv[1]).__enter__(); "
        "os.kill(os.getpid(), 9)"
    )
    r = subprocess.run([sys.executable, "-c", holder, str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -signal.SIGKILL
    said = []
    with sweep.SweepLock(out, log=said.append):
        pass
    assert len(said) == 1 and "took over a stale lock of PID" in said[0] and "(no longer running)" in said[0]


def _files(run_dir: Path) -> dict:
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # an unreaped zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the sweep's children")
def test_a_sweep_killed_with_sigkill_resumes_and_retrains_nothing_finished(tmp_path, corpus_dir):
    exp = write_experiment(
        tmp_path / "exp.py", corpus_dir, "c.train.save_every = 30\nc.train.eval_every = 1000\nc.train.log_every = 20"
    )
    out = tmp_path / "sweep"
    grid_args = ["sweep", str(exp), "--grid", "train.steps=8,300", "--out", str(out)]
    # First with --parallel 2: both points at once as `lmjax train` subprocesses; then kill -9 the sweep.
    first = subprocess.Popen(
        [sys.executable, "-m", "lmjax.cli", *grid_args, "--parallel", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    done, long = out / "steps=8", out / "steps=300"
    deadline = time.time() + 600

    def saved(run_dir: Path) -> list[int]:  # complete checkpoints: orbax renames a step's directory when done
        return [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]

    while not (8 in saved(done) and saved(long)):  # the short point finished, the long one part-way
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() is not None else ""
        time.sleep(0.05)
    children = _children(first.pid)
    first.send_signal(signal.SIGKILL)
    lines = first.communicate()[0].splitlines()
    while any(_running(c) for c in children):  # the trainer saves on the SIGTERM its parent's death sends
        assert time.time() < deadline
        time.sleep(0.05)
    started = [line for line in lines if "training on device" in line]
    assert [line.split("device ")[1] for line in started] == ["0", "1"]
    assert not any(": done in" in line for line in lines[: lines.index(started[1])])  # both ran at once
    killed_at = sweep.finished_step(long)
    assert killed_at is not None and 30 <= killed_at < 300
    assert sweep.finished_step(done) == 8
    before = _files(done)

    again = run_cli(grid_args)  # in this process, one after another
    assert again.returncode == 0, again.stdout + again.stderr
    assert "took over a stale lock" in again.stdout
    assert "2 points; 1 finished (skipped), 1 to resume, 0 new" in again.stdout
    assert _files(done) == before  # not retrained, not rewritten
    assert f"resuming from checkpoint at step {killed_at}" in (long / sweep.LOG_FILE).read_text()
    records = [json.loads(line) for line in (long / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(20, 301, 20))  # each step logged once, across the kill

    table = format_points(out).splitlines()
    assert table[1].split()[:3] == ["rank", "train.steps", "steps"]
    assert [line.split()[1] for line in table[2:]] == ["300", "8"]  # the longer run has the lower loss
    assert not (out / sweep.LOCK_FILE).exists()  # released


def _synthetic_runs(law: dict, budgets, sizes_per_budget: int, noise: float, seed: int) -> list[dict]:
    """IsoFLOP runs with losses from L(N, D) = E + A/N^alpha + B/D^beta, times lognormal noise; C = 6·N·D."""
    e, a, b, alpha, beta = (law[k] for k in ("E", "A", "B", "alpha", "beta"))
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))  # N_opt = g · (C/6)^(beta/(alpha+beta))
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        n_opt = g * (c / 6) ** (beta / (alpha + beta))
        for n in n_opt * np.geomspace(1 / 8, 8, sizes_per_budget):
            d = c / (6 * n)
            loss = (e + a / n**alpha + b / d**beta) * math.exp(rng.normal(0, noise))
            runs.append({"budget": c, "N": n, "D": d, "C": c, "loss": loss})
    return runs


def test_the_fits_recover_a_known_law_within_their_own_intervals():
    law = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022
    a_true, b_true = law["beta"] / (law["alpha"] + law["beta"]), law["alpha"] / (law["alpha"] + law["beta"])
    truths = {
        "parametric.alpha": law["alpha"],
        "parametric.beta": law["beta"],
        "parametric.E": law["E"],
        "parametric.a": a_true,
        "parametric.b": b_true,
        "N_opt_law": a_true,
        "D_opt_law": b_true,
    }
    covered = {k: 0 for k in truths}
    seeds = range(4)  # 95% intervals miss now and then: each truth must be inside at 3 noise draws of 4
    for seed in seeds:
        fits = fit.fit_with_intervals(
            _synthetic_runs(law, [1e18, 1e19, 1e20, 1e21], 6, noise=0.003, seed=seed), samples=40, seed=seed
        )
        p = fits["parametric"]
        assert abs(p["alpha"] - law["alpha"]) < 0.03 and abs(p["beta"] - law["beta"]) < 0.03
        assert all(m["inside"] for m in fits["isoflop"])
        for key, true in truths.items():
            lo, hi = p[f"{key.split('.')[1]}_ci95"] if "." in key else fits[key]["exponent_ci95"]
            assert lo <= (p[key.split(".")[1]] if "." in key else fits[key]["exponent"]) <= hi
            assert hi - lo < 0.2, (key, lo, hi)  # not vacuous
            covered[key] += lo <= true <= hi
    assert all(n >= len(seeds) - 1 for n in covered.values()), covered


def test_a_nearly_straight_isoflop_profile_has_no_minimum():
    """A bootstrap resample of the real stdlib study drew such a profile: its vertex lay e^1000 away
    and the fit died of an OverflowError after all the training (mutation: drop the span check)."""
    n = [1e4, 1e5, 1e6, 1e6]
    log_n = np.log(n)
    straight = 3.0 - 0.1 * log_n + 1e-6 * (log_n - log_n.mean()) ** 2
    assert fit.isoflop_vertex(n, straight) is None
    runs = [{"budget": 1e12, "N": a, "D": 1e12 / (6 * a), "C": 1e12, "loss": b} for a, b in zip(n, straight)]
    assert fit.isoflop_minima(runs)[0]["N_opt"] is None
    curved = 3.0 + 0.1 * (log_n - np.log(3e5)) ** 2
    assert fit.isoflop_vertex(n, curved)["log_n_opt"] == pytest.approx(np.log(3e5))


def test_the_study_plan_matches_budgets_and_refuses_ones_too_small(corpus_dir):
    base = tiny_config(corpus_dir, **{"train.steps": 100, "optim.warmup_steps": 10})
    planned = scaling.plan(base, [3e10, 3e13], per_budget=3)
    assert len(planned) == 6
    tokens = base.train.batch_size * base.data.seq_len
    for point, facts in planned:
        n, fpt = scaling.counts(base, scaling.size(facts["s"]))
        steps = facts["D"] // tokens
        assert abs(fpt * facts["D"] - facts["budget"]) <= fpt * tokens / 2 + 1  # within half a step of the budget
        assert f"train.steps={steps}" in point.overrides and steps >= scaling.MIN_STEPS
        assert f"optim.warmup_steps={max(1, round(steps / 10))}" in point.overrides
        cfg = grid.point_config(base, point)
        assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (32 * facts["s"], facts["s"], facts["s"])
    small, big = ([f["N"] for _, f in planned if f["budget"] == c] for c in (3e10, 3e13))
    assert small == sorted(small) and max(big) > max(small)  # the larger budget's sizes reach further

    with pytest.raises(UserError) as e:
        scaling.plan(base, [1e8, 3e11], per_budget=3)
    smallest = float(str(e.value).rsplit(" ", 1)[1])
    assert str(e.value).startswith("budget 1e+08 FLOPs is too small: the smallest model (d_model 32, 1 layer")
    scaling.plan(base, [smallest], per_budget=3)  # the budget it names works
    with pytest.raises(UserError):
        scaling.plan(base, [smallest * 0.9], per_budget=3)
    with pytest.raises(UserError, match="more than the size ladder holds"):  # was an IndexError
        scaling.plan(base, [3e13], per_budget=scaling.MAX_SIZE + 1)


def test_a_study_with_no_resamples_is_refused_before_training(tmp_path, corpus_dir, capsys):
    from lmjax.cli import main

    exp = write_experiment(tmp_path / "exp.py", corpus_dir)
    argv = ["study", str(exp), "--budgets", "3e10", "--per-budget", "3", "--bootstrap", "0"]
    assert main([*argv, "--out", str(tmp_path / "study")]) == 2  # was a KeyError after all the training
    assert capsys.readouterr().err.strip() == (
        "lmjax: error: --bootstrap must be at least 1 (resamples for the 95% intervals), got 0"
    )
    assert not (tmp_path / "study").exists()


def test_a_directory_of_another_experiment_is_refused_naming_the_keys(tmp_path, corpus_dir):
    base = tiny_config(corpus_dir)
    points = grid.expand(grid.parse_grid(["optim.lr=1e-3"], base), base)
    sweep.open_spec(tmp_path, "a.py", base, "study", points, ["optim.lr"], {})
    other = tiny_config(corpus_dir, **{"data.seq_len": 64, "model.n_layers": 3, "train.log_every": 7})
    with pytest.raises(UserError) as e:
        sweep.open_spec(tmp_path, "b.py", other, "study", points, ["optim.lr"], {})
    assert "holds a study of a different experiment (data.seq_len: 32 -> 64; model.n_layers: 2 -> 3)" in str(e.value)
    with pytest.raises(UserError, match="holds a study, not a sweep"):
        sweep.open_spec(tmp_path, "a.py", base, "sweep", points, ["optim.lr"], {})
    sweep.open_spec(tmp_path, "a.py", tiny_config(corpus_dir, **{"train.log_every": 7}), "study", points, [], {})


@pytest.mark.slow
def test_a_study_trains_fits_plots_and_refuses_another_experiments_directory(tmp_path, corpus_dir):
    exp = write_experiment(
        tmp_path / "exp.py", corpus_dir, "c.train.steps = 100\nc.optim.warmup_steps = 5\nc.optim.lr = 3e-3"
    )
    out = tmp_path / "study"
    args = [
        "study",
        str(exp),
        "--budgets",
        "1.2e10,1.6e10",
        "--per-budget",
        "3",
        "--out",
        str(out),
        "--bootstrap",
        "20",
    ]
    r = run_cli(args)
    assert r.returncode == 0, r.stdout + r.stderr
    record = json.loads((out / "study.json").read_text())
    assert len(record["runs"]) == 6 and not record["unfinished"]
    assert {r["budget"] for r in record["runs"]} == {1.2e10, 1.6e10}
    for run in record["runs"]:
        assert run["loss"] == pytest.approx(
            json.loads((out / run["name"] / "metrics.jsonl").read_text().splitlines()[-1])["heldout_loss"]
        )
    assert set(record["fits"]) >= {"isoflop", "N_opt_law", "D_opt_law", "parametric"}
    assert all((out / name).stat().st_size > 0 for name in ("isoflop.png", "frontier.png", "predicted.png"))
    assert "N_opt ∝ C^a" in r.stdout and "L(N, D) = E + A/N^alpha + B/D^beta" in r.stdout

    again = run_cli(args)  # nothing to train: the fits are made again from the finished runs
    assert again.returncode == 0 and "6 finished (skipped), 0 to resume, 0 new" in again.stdout

    other = run_cli([*args, "--config.optim.lr=1e-2"])
    assert other.returncode == 2
    assert "holds a study of a different experiment (optim.lr: 0.003 -> 0.01)" in other.stderr
