"""Faults, each really done: kill -9 at random moments (mid-save included), SIGTERM / SIGINT,
NaN, an unwritable or full run directory, unsafe resumes, a catalogue of bad input
(docs/errors.md), and no pickle on any load path.

Training runs are subprocesses sharing one JAX compilation cache, so a restart costs an
import and a cache read rather than a compile. The reference run trains the fault
experiment once, never interrupted; every interrupted run must end bit for bit equal to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_experiment

STEPS = 12
FAULT_BODY = f"""
c.train.steps = {STEPS}
c.train.save_every = 1
c.train.eval_every = 4
c.train.keep = 2
c.train.log_every = 1
c.model.dropout = 0.1
import pathlib
marker = pathlib.Path(__file__).with_suffix('.ran')
marker.write_text(marker.read_text() + 'x' if marker.exists() else 'x')
"""
# Normal lr for steps 0-2, then lr x 1e30 from step 3 on: the 4th update overflows the parameters.
NAN_BODY = """
c.train.steps = 6
c.train.save_every = 1
c.train.keep = 2
c.optim.warmup_steps = 0
c.optim.schedule = 'step'
c.optim.decay_start = 3
c.optim.decay_every = 1000
c.optim.decay_factor = 1e30
"""
# Messages the catalogue printed, for docs/errors.md (written when LMJAX_ERRORS_JSON is set).
CATALOGUE: list[dict] = []


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    base = tmp_path_factory.getbasetemp()
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LMJAX_CACHE": str(base / "lmjax_cache"),
        "JAX_COMPILATION_CACHE_DIR": str(base / "jax_compilation_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, corpus_dir) -> Path:
    return write_experiment(tmp_path_factory.mktemp("exp") / "faults.py", corpus_dir, FAULT_BODY)


class Training:
    """A `lmjax train` subprocess; a thread collects its output lines as they come."""

    def __init__(self, experiment: Path, workdir: Path, env: dict, *overrides: str, max_file_bytes: int = 0):
        self.checkpoints = workdir / "checkpoints"
        # max_file_bytes: RLIMIT_FSIZE, a disk that is full for any file larger than that.
        limit = (
            f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes},) * 2); "
            if max_file_bytes
            else ""
        )
        main = f"{limit}import runpy, sys; sys.argv[0] = 'lmjax'; runpy.run_module('lmjax.cli', run_name='__main__')"
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", main, "train", str(experiment), "--workdir", str(workdir), *overrides],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(
            target=lambda: self.lines.extend(line.rstrip("\n") for line in self.proc.stdout), daemon=True
        )
        self.reader.start()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def step(self) -> int:
        """The last step the progress lines reported (0 before the first)."""
        steps = [int(m.group(1)) for line in list(self.lines) if (m := re.match(r"step (\d+)/", line))]
        return max(steps, default=0)

    def saving(self) -> bool:
        """An async checkpoint is being written (its temporary directory exists)."""
        return self.checkpoints.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in self.checkpoints.iterdir())

    def wait_for(self, condition, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, (
                f"training exited ({self.proc.returncode}) too early:\n{self.output[-3000:]}"
            )
            assert time.monotonic() < deadline, f"timed out:\n{self.output[-3000:]}"
            time.sleep(0.002)

    def finish(self, timeout: float = 300) -> int:
        self.proc.wait(timeout)
        self.reader.join(timeout)
        return self.proc.returncode


def train_to_end(experiment: Path, workdir: Path, env: dict, *overrides: str) -> Training:
    t = Training(experiment, workdir, env, *overrides)
    assert t.finish() == 0, t.output[-3000:]
    return t


def finalized_steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []


def resumed_from(output: str) -> int | None:
    m = re.search(r"resuming from checkpoint at step (\d+)", output)
    return int(m.group(1)) if m else None


def restore_state(run_dir: Path, step: int | None = None) -> tuple[int, list[np.ndarray]]:
    """Every leaf of the saved TrainState (params, optimizer moments, rng, step) as numpy."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(
        run_dir / "checkpoints",
        item_names=("state",),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    ) as mgr:
        step = mgr.latest_step() if step is None else step
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_same_state(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, held-out records) of metrics.jsonl; every line must be whole JSON."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "heldout_loss" in r]


def assert_metrics_match(run_dir: Path, reference: Path) -> None:
    """Each step logged once, with the very losses of the uninterrupted run."""
    train, held = metrics(run_dir)
    ref_train, ref_held = metrics(reference)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in held] == [4, 8, 12]
    assert [r["loss"] for r in train] == [r["loss"] for r in ref_train]
    assert [r["heldout_loss"] for r in held] == [r["heldout_loss"] for r in ref_held]


def tree_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        h.update(str(p.relative_to(directory)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reference(experiment, env, tmp_path_factory) -> Path:
    """The fault experiment trained once, never interrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train_to_end(experiment, run, env)
    return run


# ---------------------------------------------------------------- 1. kill -9

# Seeds of the kill moments; each seed kills at all three kinds of moment, in its own order.
# One by default (the suite's 20-minute budget on 2 cores); LMJAX_KILL_SEEDS=0,1,...,9 runs more.
KILL_SEEDS = [int(s) for s in os.environ.get("LMJAX_KILL_SEEDS", "0").split(",")]


@pytest.mark.slow
@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_kill9_at_random_moments_resumes_exactly(seed, experiment, env, reference, tmp_path):
    rng = random.Random(seed)
    run = tmp_path / "run"
    kills = ["mid_save", "after_step", "during_startup"]
    rng.shuffle(kills)
    hit_mid_save = 0
    expect_resume = None
    for kind in kills:
        t = Training(experiment, run, env)
        # Kills land in the first two thirds of the run, so that a fast machine still has steps
        # left to kill when the moment comes.
        if kind == "during_startup":  # restoring, compiling or on the first steps
            t.wait_for(lambda: any(line.startswith("run directory:") for line in t.lines))
            time.sleep(rng.uniform(0.0, 0.3))
        elif kind == "mid_save":  # while an async checkpoint is being written
            target = rng.randint(2, 7)
            t.wait_for(lambda: t.step() >= target and t.saving())
        else:
            target = rng.randint(2, 7)
            t.wait_for(lambda: t.step() >= target)
            time.sleep(rng.uniform(0.0, 0.05))
        assert t.proc.poll() is None, "the run ended before it could be killed"
        os.kill(t.proc.pid, signal.SIGKILL)
        assert t.finish() == -signal.SIGKILL
        hit_mid_save += t.saving()
        assert resumed_from(t.output) == expect_resume, t.output[-2000:]
        steps = finalized_steps(t.checkpoints)
        expect_resume = steps[-1] if steps else None  # the newest complete checkpoint
        print(
            f"seed {seed}: killed {kind} at step {t.step()}, complete checkpoints {steps}, save in flight: {t.saving()}"
        )
    last = train_to_end(experiment, run, env)
    assert resumed_from(last.output) == expect_resume
    step, state = restore_state(run)
    ref_step, ref_state = restore_state(reference)
    assert step == ref_step == STEPS
    assert_same_state(state, ref_state)
    assert_metrics_match(run, reference)
    assert hit_mid_save >= 1  # the mid_save kill left a half-written checkpoint behind


def test_old_checkpoints_leave_by_rename_never_half_deleted(tmp_path, monkeypatch):
    """Orbax removes an old checkpoint with rmtree in place: a kill midway would leave a half
    checkpoint that still looks complete. Ours are renamed into .deleted/ first (atomic)."""
    import jax.numpy as jnp

    from lmjax.checkpoint import TRASH, Checkpoints

    monkeypatch.setattr(Checkpoints, "purge_deleted", lambda self: None)  # keep what was renamed
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=1)
    for step in range(1, 5):
        ckpts.save(step, {"w": jnp.full((4,), float(step))}, {"step": step})
        ckpts.wait()
    ckpts.close()
    trash = tmp_path / "checkpoints" / TRASH
    assert finalized_steps(tmp_path / "checkpoints") == [4]
    assert sorted(int(p.name) for p in trash.iterdir()) == [1, 2, 3]
    assert all((p / "commit_success.txt").is_file() for p in trash.iterdir())  # moved whole
    # A kill while purging leaves a half-removed directory in .deleted/: invisible, gone at the next start.
    shutil.rmtree(trash / "2" / "state")
    monkeypatch.undo()
    reopened = Checkpoints(tmp_path / "checkpoints", keep=1)
    assert reopened.all_steps() == [4] and list(trash.iterdir()) == []
    reopened.close()


# ---------------------------------------------------------------- 2. SIGTERM / SIGINT


@pytest.mark.slow
def test_sigterm_and_sigint_save_and_resume_exactly(experiment, env, reference, tmp_path):
    run = tmp_path / "run"
    stopped_at = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        t = Training(experiment, run, env)
        target = (stopped_at or 0) + 3
        t.wait_for(lambda: t.step() >= target)
        os.kill(t.proc.pid, sig)
        assert t.finish() == 128 + sig, t.output[-2000:]
        assert resumed_from(t.output) == stopped_at
        m = re.search(
            rf"lmjax: received {sig.name}: finished step (\d+), saved it in \S+; "
            r"run the same command to resume from it",
            t.output,
        )
        assert m, t.output[-2000:]
        stopped_at = int(m.group(1))
        assert target <= stopped_at < STEPS
        assert "Traceback" not in t.output
        # The save finished before exit: the step is complete, nothing is half written.
        assert finalized_steps(t.checkpoints)[-1] == stopped_at and not t.saving()
        assert t.step() == stopped_at  # stopped right after the step it was in
    last = train_to_end(experiment, run, env)
    assert resumed_from(last.output) == stopped_at
    assert_same_state(restore_state(run)[1], restore_state(reference)[1])
    assert_metrics_match(run, reference)


# Moments to interrupt `lmjax train`: (name, the output line that starts the moment, or a delay in
# seconds after start when no line marks it). Before the loop the signal raises lmjax.interrupts.Interrupted;
# inside it the loop saves the step it is in. Either way: status 128 + N, one line, no crash.
SIGNAL_POINTS = [
    ("import", 0.1, signal.SIGINT),
    ("tokenization", "tokenized train", signal.SIGTERM),
    ("token cache loaded, before step 1", "run directory:", signal.SIGINT),
    ("token cache loaded, before step 1 (again)", "data:", signal.SIGINT),
    ("compilation", "CPU:", signal.SIGTERM),
    ("the first step", "step 1/", signal.SIGINT),
    ("mid-save", "saving", signal.SIGTERM),
]


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)


@pytest.mark.slow
@pytest.mark.parametrize("point, marker, sig", SIGNAL_POINTS, ids=[p[0] for p in SIGNAL_POINTS])
def test_signal_at_any_moment_exits_cleanly(point, marker, sig, experiment, env, tmp_path):
    run = tmp_path / "run"
    fresh = {**env, "LMJAX_CACHE": str(tmp_path / "cache")} if point == "tokenization" else env
    t = Training(experiment, run, fresh)
    if isinstance(marker, float):  # once lmjax's handler exists (Python's own catches SIGINT, not SIGTERM)
        t.wait_for(lambda: _catches(t.proc.pid, signal.SIGTERM))
        time.sleep(marker)
    elif marker == "saving":
        t.wait_for(lambda: t.step() >= 2 and t.saving())
    else:
        t.wait_for(lambda: any(line.startswith(marker) for line in list(t.lines)))
    os.kill(t.proc.pid, sig)
    code = t.finish()
    said = [line for line in t.lines if line.startswith("lmjax: received")]
    print(f"{point}: {sig.name} -> status {code}; {said}")
    assert code == 128 + sig, f"{point}: status {code}\n{t.output[-3000:]}"
    assert "Traceback" not in t.output and "Fatal Python error" not in t.output, t.output[-3000:]
    assert len(said) == 1 and sig.name in said[0], t.output[-3000:]
    steps = finalized_steps(run / "checkpoints")
    if "finished step" in said[0]:  # inside the loop: the step it was in is saved
        assert steps and said[0].startswith(f"lmjax: received {sig.name}: finished step {steps[-1]}, saved it")
    else:
        assert not steps and "nothing was saved" in said[0], said[0]
    assert not t.saving()


@pytest.mark.slow
@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 2.0), (signal.SIGTERM, 8.0)])
def test_signal_during_eval_exits_cleanly_and_writes_no_report(sig, delay, reference, env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = tree_hash(run)
    proc = subprocess.Popen(
        # Stride 1, one window a call: an eval that outlasts the delay on an idle machine too.
        [sys.executable, "-m", "lmjax.cli", "eval", str(run), "--stride", "1", "--batch-size", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(delay)  # importing JAX, restoring the checkpoint or evaluating
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out and f"lmjax: received {sig.name}: eval stopped; nothing was written" in out, out
    assert tree_hash(run) == before


def test_signal_lost_inside_a_callback_still_stops_the_command(tmp_path, monkeypatch, capsys):
    """A signal's Interrupted raised inside a callback Python runs for itself (JAX's gc callback)
    is printed and dropped; the command must still stop before it commits anything."""
    from lmjax import cli, interrupts

    report = tmp_path / "report.json"

    def command_whose_interrupt_was_swallowed(args, overrides):
        interrupts.received.append(signal.SIGTERM)  # what the handler records before its raise is lost
        from lmjax import checks

        checks.write_json_atomic(report, {"loss": 1.0})
        return 0

    monkeypatch.setitem(cli.COMMANDS, "runs", command_whose_interrupt_was_swallowed)
    assert cli.main(["runs", str(tmp_path)]) == 128 + signal.SIGTERM
    assert "lmjax: received SIGTERM: runs stopped" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the report nor its temporary file

    monkeypatch.setitem(cli.COMMANDS, "runs", lambda a, o: interrupts.received.append(signal.SIGINT) or 0)
    assert cli.main(["runs", str(tmp_path)]) == 128 + signal.SIGINT  # lost at the very end: still not status 0


TWO_HOSTS = r"""
import sys, time
import jax
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from lmjax.checkpoint import Checkpoints
from lmjax.train.preemption import StopSignals
ckpts = Checkpoints(directory)
with StopSignals(ckpts) as signals:
    print(f"synced {signals.synced}", flush=True)
    for step in range(1, 100000):
        time.sleep(0.005)  # a train step
        if step == 50:
            print("running", flush=True)
        if signals.stop_at(step):
            print(f"stop at {step}", flush=True)
            break
ckpts.close()
jax.distributed.shutdown()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_two_processes_agree_on_the_stop_step(sig, env, tmp_path):
    """A signal to one process of a jax.distributed job stops both after the same step (JAX's
    preemption service through Orbax's reached_preemption), so neither hangs in a collective."""
    port = str(random.Random(os.getpid() + sig).randint(20000, 40000))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_HOSTS, str(i), port, str(tmp_path / "ckpt")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i in range(2)
    ]
    target = procs[1] if sig == signal.SIGTERM else procs[0]  # SIGINT to the coordinator, SIGTERM to the other
    lines = [[], []]
    readers = [threading.Thread(target=lambda i=i: lines[i].extend(procs[i].stdout), daemon=True) for i in range(2)]
    for r in readers:
        r.start()
    deadline = time.monotonic() + 120
    while not all("running\n" in x for x in lines):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), lines
        time.sleep(0.01)
    os.kill(target.pid, sig)
    codes = [p.wait(60) for p in procs]
    for r in readers:
        r.join(10)
    assert codes == [0, 0] and all("synced True\n" in out for out in lines), lines
    stops = [[x for x in out if x.startswith("stop at")] for out in lines]
    assert len(stops[0]) == 1 and stops[0] == stops[1], lines


# ---------------------------------------------------------------- 3. metrics.jsonl


def test_metrics_truncation_drops_later_steps_and_torn_lines(tmp_path):
    from lmjax.metrics import MetricsWriter, read_jsonl, truncate_after

    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"loss": 1.0 / step})
    writer.write(4, {"heldout_loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # kill -9 mid-line
    assert truncate_after(tmp_path / "metrics.jsonl", 3) == 4
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


# ---------------------------------------------------------------- 4. NaN / Inf


def test_nan_halt_keeps_last_good_checkpoint(corpus_dir, env, tmp_path):
    exp = write_experiment(tmp_path / "nan.py", corpus_dir, NAN_BODY)
    t = Training(exp, tmp_path / "run", env)
    assert t.finish() == 1, t.output[-2000:]
    assert "Traceback" not in t.output
    line = [x for x in t.lines if x.startswith("lmjax: training halted:")]
    assert len(line) == 1 and "at step 4;" in line[0] and "Last good checkpoint: step 3" in line[0], t.output[-2000:]
    assert finalized_steps(t.checkpoints) == [2, 3]
    _, state = restore_state(tmp_path / "run", 3)
    assert all(np.isfinite(x).all() for x in state if x.dtype.kind == "f")
    CATALOGUE.append(
        {"case": "NaN / Inf loss, train.on_nan='halt' (lr x 1e30 from step 3)", "status": 1, "message": line[0]}
    )


def test_nan_skip_keeps_params_and_counts(corpus_dir, env, tmp_path):
    exp = write_experiment(tmp_path / "nan.py", corpus_dir, NAN_BODY + "c.train.on_nan = 'skip'\nc.train.keep = 6")
    run = tmp_path / "run"
    train_to_end(exp, run, env)
    train, _ = metrics(run)
    assert [r["skipped"] for r in train] == [0, 0, 0, 1, 2, 3]
    states = {s: restore_state(run, s)[1] for s in (2, 3, 4, 6)}
    n_params = len(states[3]) // 3  # params, then Adam's mu and nu, per leaf
    assert any(a.tobytes() != b.tobytes() for a, b in zip(states[2], states[3]))  # step 3 updated
    for s in (4, 6):  # steps 4-6 skipped: every float leaf (params and moments) as after step 3
        for a, b in zip(states[3], states[s]):
            if a.dtype.kind == "f":
                assert a.tobytes() == b.tobytes()
    assert n_params > 0


# ---------------------------------------------------------------- 5. unwritable run directory


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from lmjax.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _user_error(code: int, err: str, *fragments: str, case: str = "") -> str:
    """Exit status 2, one 'lmjax: error:' line naming the problem, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmjax: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if case:
        CATALOGUE.append({"case": case, "status": code, "message": lines[0]})
    return lines[0]


def test_read_only_run_directory_is_refused_at_start(experiment, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    # Root writes through chmod; an immutable directory or sysfs it cannot write.
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0:
        target = locked
    else:
        target = Path("/sys")
    try:
        with pytest.raises(OSError):
            (target / "x").write_text("x")
        code, _, err = _cli(["train", experiment, "--workdir", target], capsys)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
    _user_error(
        code,
        err,
        f"the run directory {target} is not writable",
        "choose another --workdir",
        case="read-only run directory (chattr +i)",
    )


def test_file_in_place_of_run_directory(experiment, tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    code, _, err = _cli(["train", experiment, "--workdir", blocker / "run"], capsys)
    _user_error(code, err, "is not a directory", "choose another --workdir", case="--workdir under a file")


def test_full_disk_is_refused_at_start(experiment, env, tmp_path):
    t = Training(experiment, tmp_path / "run", env, max_file_bytes=256 << 10)  # the 1 MiB probe cannot fit
    assert t.finish() == 2
    lines = [x for x in t.lines if x.strip()]
    assert len(lines) == 1 and "has no room to write (File too large)" in lines[0], t.output
    assert not (tmp_path / "run" / ".write_probe").exists()
    CATALOGUE.append({"case": "full disk (RLIMIT_FSIZE 256 KiB)", "status": 2, "message": lines[0]})


@pytest.mark.slow
def test_disk_full_mid_run_stops_cleanly_and_resumes_exactly(experiment, env, reference, tmp_path):
    run = tmp_path / "run"
    t = Training(experiment, run, env)
    t.wait_for(lambda: t.step() >= 3)
    # The disk fills: no file may grow past 64 KiB (a checkpoint's data file is ~330 KiB).
    resource.prlimit(t.proc.pid, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    assert t.finish() == 2, t.output[-3000:]
    assert "Traceback" not in t.output and "ERROR" not in t.output, t.output[-3000:]
    m = re.search(
        r"lmjax: error: could not write a checkpoint in \S+: File too large writing \S+; "
        r"the last complete checkpoint is step (\d+)\. Free disk space",
        t.output,
    )
    assert m and t.lines[-1].startswith("lmjax: error:"), t.output[-3000:]
    kept = int(m.group(1))
    assert finalized_steps(t.checkpoints)[-1] == kept
    CATALOGUE.append(
        {
            "case": "disk fills mid-run (RLIMIT_FSIZE 64 KiB set on the running process)",
            "status": 2,
            "message": t.lines[-1],
        }
    )
    last = train_to_end(experiment, run, env)  # space freed: the same command resumes
    assert resumed_from(last.output) == kept
    assert_same_state(restore_state(run)[1], restore_state(reference)[1])
    assert_metrics_match(run, reference)


# ---------------------------------------------------------------- 6. resume safety


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.d_model=64", "model.d_model: 32 -> 64"),
        ("data.seq_len=16", "data.seq_len: 32 -> 16"),
        ("data.seed=1", "data.seed: 0 -> 1"),
        ("tokenizer.kind=bpe", "tokenizer.kind: 'byte' -> 'bpe'"),
    ],
)
def test_resume_refuses_model_or_data_change(override, key, experiment, reference, capsys):
    before = tree_hash(reference / "checkpoints")
    code, _, err = _cli(
        ["train", experiment, "--workdir", reference, f"--config.{override}", "--config.train.log_every=2"], capsys
    )
    line = _user_error(
        code,
        err,
        f"cannot resume from step {STEPS}",
        key,
        "undo these changes",
        case=f"resume with --config.{override}",
    )
    assert "train.log_every" not in line  # a safe change is not listed among the refused
    assert tree_hash(reference / "checkpoints") == before


def test_resume_allows_safe_change_and_logs_it(experiment, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    code, out, err = _cli(
        [
            "train",
            experiment,
            "--workdir",
            run,
            f"--config.train.steps={STEPS + 1}",
            "--config.train.save_every=5",
            "--config.train.eval_every=7",
        ],
        capsys,
    )
    assert code == 0, err
    for change in (f"train.steps: {STEPS} -> {STEPS + 1}", "train.save_every: 1 -> 5", "train.eval_every: 4 -> 7"):
        assert f"resume: config change allowed: {change}" in out
    assert resumed_from(out) == STEPS and finalized_steps(run / "checkpoints")[-1] == STEPS + 1


def test_resume_false_on_existing_checkpoints_deletes_nothing(experiment, reference, capsys):
    before = tree_hash(reference / "checkpoints")
    code, _, err = _cli(["train", experiment, "--workdir", reference, "--config.train.resume=false"], capsys)
    _user_error(
        code,
        err,
        "train.resume=False",
        f"latest step {STEPS}",
        "choose a new --workdir",
        case="--config.train.resume=false on a run with checkpoints",
    )
    assert tree_hash(reference / "checkpoints") == before


# ---------------------------------------------------------------- 7. bad input catalogue


def test_unknown_config_key(experiment, capsys):
    code, _, err = _cli(["train", experiment, "--config.train.step=5"], capsys)
    _user_error(
        code,
        err,
        "unknown config key 'train.step'",
        "did you mean 'train.steps'",
        case="unknown key: --config.train.step=5",
    )


def test_wrong_type_for_key(experiment, capsys):
    code, _, err = _cli(["train", experiment, "--config.train.steps=many"], capsys)
    _user_error(code, err, "'train.steps' expects an int", "got 'many'", case="wrong type: --config.train.steps=many")


@pytest.mark.parametrize(
    "text, fragment, case",
    [
        ("x = 1\n", "defines no get_config()", "experiment file without get_config"),
        ("def get_config(:\n", "has a syntax error at line 1", "experiment file with a syntax error"),
        ("def get_config():\n    return 1 / 0\n", "failed at line 2: ZeroDivisionError", "experiment file that raises"),
    ],
)
def test_broken_experiment_file(text, fragment, case, tmp_path, capsys):
    exp = tmp_path / "broken.py"
    exp.write_text(text)
    code, _, err = _cli(["train", exp, "--workdir", tmp_path / "run"], capsys)
    _user_error(code, err, fragment, case=case)


def test_missing_experiment_file(tmp_path, capsys):
    code, _, err = _cli(["train", tmp_path / "nope.py"], capsys)
    _user_error(code, err, "does not exist", case="experiment file that does not exist")


def test_missing_data_path(experiment, tmp_path, capsys):
    code, _, err = _cli(
        ["train", experiment, "--workdir", tmp_path / "run", f"--config.data.paths={tmp_path}/none/*.txt"], capsys
    )
    _user_error(code, err, "data.paths:", "matches no file", case="data.paths that matches no file")


def test_empty_heldout_split(experiment, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = _cli(
        ["train", experiment, "--workdir", tmp_path / "run", f"--config.data.heldout_paths={empty}"], capsys
    )
    _user_error(code, err, "held-out split", case="data.heldout_paths: an empty file")


EIGHT_DEVICES = r"""
import contextlib, io, json, sys
from lmjax.cli import main
out = {}
for name, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    out[name] = [code, err.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_device_errors(experiment, env, tmp_path_factory) -> dict:
    """Cases that need 8 devices, run in one subprocess with 8 simulated CPU devices."""
    work = tmp_path_factory.mktemp("eight")
    cases = {
        "batch": ["train", str(experiment), "--workdir", str(work / "a"), "--config.train.batch_size=12"],
        "mesh": [
            "train",
            str(experiment),
            "--workdir",
            str(work / "b"),
            "--config.parallel.strategy=mesh",
            "--config.parallel.data=3",
            "--config.parallel.fsdp=2",
        ],
    }
    proc = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_batch_that_does_not_divide_devices(eight_device_errors):
    code, err = eight_device_errors["batch"]
    _user_error(
        code,
        err,
        "train.batch_size=12",
        "does not divide over 8 data-parallel devices",
        "use a multiple of 8",
        case="train.batch_size=12 on 8 devices",
    )


def test_mesh_that_is_not_the_device_count(eight_device_errors):
    code, err = eight_device_errors["mesh"]
    _user_error(code, err, "= 6 devices, but there are 8", case="parallel.data=3, parallel.fsdp=2 on 8 devices")


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_no_checkpoint(command, reference, tmp_path, capsys):
    code, _, err = _cli([command, tmp_path], capsys)
    _user_error(code, err, "is not an lmjax run directory", case=f"`lmjax {command}` on a directory that is no run")
    run = tmp_path / "untrained"
    run.mkdir()
    shutil.copy(reference / "config.json", run)
    shutil.copytree(reference / "tokenizer", run / "tokenizer")
    (run / "checkpoints").mkdir()
    code, _, err = _cli([command, run], capsys)
    _user_error(code, err, "no checkpoint in", "train first", case=f"`lmjax {command}` on a run with no checkpoint")


def test_checkpoint_step_that_does_not_exist(reference, capsys):
    code, _, err = _cli(["eval", reference, "--checkpoint", "999"], capsys)
    _user_error(
        code, err, "no checkpoint at step 999", f"available steps: {STEPS - 1}, {STEPS}", case="--checkpoint 999"
    )
    code, _, err = _cli(["sample", reference, "--checkpoint", "last"], capsys)
    _user_error(code, err, "--checkpoint must be latest, best or a step number", case="--checkpoint last")


def test_prompt_longer_than_context(reference, capsys):
    code, _, err = _cli(["sample", reference, "--prompt", "x" * 40], capsys)
    _user_error(
        code, err, "the prompt is 40 tokens, but the model's context is 32", case="a 40-token prompt, context 32"
    )


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--temperature", "0", "--temperature must be positive"),
        ("--temperature", "-1", "--temperature must be positive"),
        ("--top-k", "-1", "--top-k must be 0 (off) or positive"),
        ("--top-p", "0", "--top-p must be in (0, 1]"),
        ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ],
)
def test_bad_sampling_flags(flag, value, fragment, reference, capsys):
    code, _, err = _cli(["sample", reference, flag, value], capsys)
    _user_error(code, err, fragment, case=f"sample {flag} {value}")


def _copy_run(reference: Path, to: Path) -> Path:
    shutil.copytree(reference, to)
    return to


def test_tokenizer_that_does_not_match_checkpoint(reference, tmp_path, capsys):
    from lmjax.data.tokenizers import train_bpe

    run = _copy_run(reference, tmp_path / "run")
    shutil.rmtree(run / "tokenizer")
    train_bpe(["a small corpus for another tokenizer"] * 20, 300).save(run / "tokenizer")
    before = tree_hash(run / "checkpoints")
    for command in ("eval", "sample"):
        code, _, err = _cli([command, run], capsys)
        _user_error(
            code,
            err,
            f"the tokenizer in {run / 'tokenizer'} (bpe, ",
            f"checkpoint step {STEPS} was trained with (byte, 257 ids)",
            case=f"`lmjax {command}` with another run's tokenizer in tokenizer/",
        )
    assert tree_hash(run / "checkpoints") == before


def _corrupt_data_files(step_dir: Path) -> None:
    """Flip bytes in every OCDBT data file of the state: which file holds the parameters varies
    from run to run, and eval reads the parameters alone."""
    targets = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert targets, f"no OCDBT data files under {step_dir / 'state'}"
    for target in targets:
        data = bytearray(target.read_bytes())
        for i in range(100, len(data), 97):
            data[i] ^= 0xFF
        target.write_bytes(bytes(data))


# In-process, main() leaves sys.unraisablehook alone: TensorStore reads that Orbax abandoned report to its closed loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_checkpoint_is_named_and_previous_offered(experiment, reference, tmp_path, capsys):
    run = _copy_run(reference, tmp_path / "run")
    _corrupt_data_files(run / "checkpoints" / str(STEPS))
    before = tree_hash(run / "checkpoints")
    code, _, err = _cli(["eval", run], capsys)
    _user_error(
        code,
        err,
        f"checkpoint {run / 'checkpoints' / str(STEPS)} is corrupted or incomplete: cannot read ",
        f"the previous checkpoint is step {STEPS - 1}: pass --checkpoint {STEPS - 1}",
        case="`lmjax eval` on a checkpoint with a corrupted data file",
    )
    code, _, err = _cli(["train", experiment, "--workdir", run, f"--config.train.steps={STEPS + 2}"], capsys)
    _user_error(
        code,
        err,
        "is corrupted or incomplete",
        f"move {run / 'checkpoints' / str(STEPS)} out of checkpoints/",
        case="`lmjax train` resuming from that checkpoint",
    )
    assert tree_hash(run / "checkpoints") == before


# In-process, main() leaves sys.unraisablehook alone: TensorStore reads that Orbax abandoned report to its closed loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_checkpoint_config_is_named(reference, tmp_path, capsys):
    run = _copy_run(reference, tmp_path / "run")
    config_file = run / "checkpoints" / str(STEPS) / "config" / "metadata"
    config_file.write_text('{"model": {"d_mod')
    code, _, err = _cli(["sample", run], capsys)
    _user_error(
        code,
        err,
        f"cannot read {config_file} (JSONDecodeError)",
        f"the previous checkpoint is step {STEPS - 1}",
        case="a checkpoint whose config file is cut short",
    )


# ---------------------------------------------------------------- 8. security

LOAD_PATH_PATTERNS = {
    r"\bimport\s+(pickle|dill|cloudpickle|joblib)\b|\bfrom\s+(pickle|dill|cloudpickle|joblib)\b": "a pickle module",
    r"allow_pickle\s*=\s*True": "np.load(..., allow_pickle=True)",
    r"torch\.load\((?![^)]*weights_only\s*=\s*True)": "torch.load without weights_only=True",
    r"\bpickle\.loads?\(|\bmarshal\.loads?\(": "pickle / marshal loads",
}


def test_no_pickle_on_any_load_path():
    found = []
    for path in sorted((ROOT / "lmjax").rglob("*.py")):
        text = path.read_text()
        for pattern, what in LOAD_PATH_PATTERNS.items():
            for m in re.finditer(pattern, text):
                line = text[: m.start()].count("\n") + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not found, "unsafe deserialization on a load path:\n" + "\n".join(found)


def test_no_pickle_check_catches_an_offender(tmp_path):
    """The patterns above do match what they forbid (a test that cannot fail is no test)."""
    bad = ["import pickle", "x = np.load(f, allow_pickle=True)", "sd = torch.load(path)", "pickle.loads(b)"]
    good = ["x = np.load(f, allow_pickle=False)", "sd = torch.load(path, weights_only=True)"]
    hits = lambda line: any(re.search(p, line) for p in LOAD_PATH_PATTERNS)  # noqa: E731
    assert all(hits(line) for line in bad) and not any(hits(line) for line in good)


def test_eval_and_sample_never_execute_the_experiment_file(experiment, reference, tmp_path, capsys):
    marker = experiment.with_suffix(".ran")
    assert marker.exists()  # training ran get_config
    marker.unlink()
    code, out, err = _cli(["eval", reference, "--json", tmp_path / "eval.json"], capsys)
    assert code == 0, err
    code, out, err = _cli(["sample", reference, "--prompt", "def", "--max-new-tokens", "4"], capsys)
    assert code == 0 and "--- sample from" in out, err
    assert not marker.exists()


def teardown_module(module):
    dest = os.environ.get("LMJAX_ERRORS_JSON")
    if dest and CATALOGUE:
        Path(dest).write_text(json.dumps(CATALOGUE, indent=1))


def test_lmjax_as_a_library_leaves_logging_and_unraisable_hook_alone(tmp_path):
    """Quieting Orbax (absl's level, dropping a closed loop's errors) is process-wide, so only the
    `lmjax` program does it; importing lmjax or using Checkpoints changes neither."""
    code = f"""
import logging, sys
hook, absl = sys.unraisablehook, logging.getLogger("absl")
level = absl.level
import lmjax.checkpoint, lmjax.cli, lmjax.train.loop
assert sys.unraisablehook is hook and absl.level == level and not absl.filters, "changed on import"
lmjax.checkpoint.Checkpoints({str(tmp_path / "ckpt")!r}).close()
assert sys.unraisablehook is hook and absl.level == level and not absl.filters, "changed by Checkpoints"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_write_error_names_the_reason_of_tensorstore_status_only_failures():
    """A file-size limit hit while OCDBT flushed metadata came back as an absl status with no
    OS error text (seen in CI); absl maps EFBIG to OUT_OF_RANGE."""
    from lmjax.checkpoint import write_error

    seen = (
        'OUT_OF_RANGE: Error opening "zarr" driver: Error writing "opt_state.1.0.mu.block_1.mlp.fc.kernel/.zarray" '
        'in OCDBT database at local file "/run/checkpoints/2.orbax-checkpoint-tmp/state/ocdbt.process_0/": '
        "Failed writin"
    )
    assert write_error(ValueError(seen)) == "File too large writing opt_state.1.0.mu.block_1.mlp.fc.kernel/.zarray"
    inner = ValueError('UNKNOWN: Error writing local file "/c/d/x": File too large [os_error_code=27]')
    try:  # the reason in a cause down the chain
        raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        assert write_error(e) == "File too large"
    assert write_error(OSError(28, "No space left on device", "/c/f")) == "No space left on device (/c/f)"
