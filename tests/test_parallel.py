"""Parallelism: the same experiment on one device, pmap, meshes, several processes, and a
checkpoint restored onto fewer devices, all giving the same losses.

Multi-device cases run in subprocesses (tests/parallel_worker.py) with a simulated device
count, since XLA fixes it when JAX starts. Each subprocess prints its figures as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, write_experiment
from ml_collections import ConfigDict

from lmjax.errors import UserError
from lmjax.metrics import read_jsonl
from lmjax.train.distributed import distributed_args

WORKER = ROOT / "tests" / "parallel_worker.py"
# Cheaper CPU compiles (the programs are tiny; the compile is most of each case's time).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TOL = 1e-5

# The loop runs (reference, restore, multi-host): constant learning rate, so a run that
# stops at step 3 and one that continues to 6 follow the same schedule; vocabulary 264
# (the byte tokenizer's 257, padded) so it divides the tensor axis.
LOOP = {
    "optim.schedule": "constant",
    "model.vocab_size": 264,
    "train.steps": 6,
    "train.eval_every": 3,
    "train.save_every": 3,
    "parallel.data": 2,
    "parallel.fsdp": 4,
}


def device_env(devices: int, cache: Path) -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        "LMJAX_CACHE": str(cache),
    }


def run_worker(case: str, args: dict, devices: int, cache: Path, timeout: int = 900) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER), case, json.dumps(args)],
        env=device_env(devices, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker {case} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def losses_by_step(run_dir: Path) -> dict:
    """{(step, 'loss' | 'heldout_loss'): value} from a run's metrics.jsonl."""
    out = {}
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        for key in ("loss", "heldout_loss"):
            if key in record:
                assert (record["step"], key) not in out, f"step {record['step']} written twice"
                out[(record["step"], key)] = record[key]
    return out


def max_difference(a: dict, b: dict, from_step: int = 0) -> float:
    keys = sorted(k for k in a if k[0] > from_step)
    assert keys and keys == sorted(k for k in b if k[0] > from_step), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in keys)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "lmjax_cache"


# ---------------------------------------------------------------------------------------
# Layouts on 8 simulated devices, driven step by step (no files)


@pytest.fixture(scope="module")
def layouts(cache):
    return run_worker("layouts", {}, 8, cache, timeout=1800)  # about 15 step programs to compile


STATE_TOL = 1e-5  # relative (norm of the difference / norm) for gradients, parameters and moments


def assert_same_run(name: str, rel: dict, adam_tol: float = STATE_TOL) -> None:
    """Gradient and Adam's second moment after step 1, parameters after steps 1 and 3, both
    moments after step 3, dropout RNG, counters and the losses of one layout against one device:
    float32 reductions in another order, nothing more. `adam_tol` bounds what Adam's update moved."""
    print(f"layout {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in rel.items() if k != "counters_equal"))
    assert rel["counters_equal"], name
    assert rel["rng"] == 0, name
    assert rel["losses"] < TOL, (name, rel)
    for key in ("grad", "nu1"):
        assert rel[key] < STATE_TOL, (name, key, rel)
    for key in ("params1", "params", "mu", "nu"):
        assert rel[key] < adam_tol, (name, key, rel)


@pytest.mark.slow
def test_every_layout_gives_the_same_gradients_state_and_losses(layouts):
    # Clipping off and no biases (see case_layouts). Mutations caught, each tried once by hand in
    # lmjax/train/step.py: the gradients averaged (pmean) instead of summed (psum) over the pmap
    # axis, which Adam's scale invariance hid from the losses (pmap's gradient off by 8x); the
    # division of the gradients by the token count dropped (the gradient of one device against
    # plain jax.grad of the mean loss, below).
    losses, state_rel = layouts["losses"], layouts["state_rel"]
    assert layouts["devices"] == 8
    assert set(losses) == set(state_rel) == {"single", "pmap", "data8", "fsdp8", "data2_fsdp2_tensor2"}
    assert len(losses["single"]) == 3 and losses["single"][2] < losses["single"][0]
    print(f"one device against plain jax.grad of the mean loss: {layouts['grad_vs_plain_jax']:.1e}")
    assert layouts["grad_vs_plain_jax"] < STATE_TOL
    for name, rel in state_rel.items():
        assert_same_run(name, rel)


@pytest.mark.slow
def test_dropout_is_the_same_on_every_mesh_layout(layouts):
    """With dropout 0.1 the mesh layouts draw the masks one device draws (JAX's partitionable
    threefry: random bits do not depend on the sharding). pmap folds each device's index into
    the key (lmjax.train.step), so its masks, and so its losses, differ: a documented property."""
    rel = layouts["dropout_rel"]
    for name in ("data8", "data2_fsdp2_tensor2"):
        # Gradient and second moment after step 1 agree to 2e-7, as without dropout (the same
        # masks; other masks move them by 3e-1, pmap below); the parameters after step 1 by up to
        # 2.1e-5 (data8). Adam's first update is lr * g / (|g| + eps), about lr * sign(g): entries
        # that are zero in exact arithmetic (more of them behind dropped activations) hold float
        # noise whose sign the reduction order sets, and move by +-lr. Bound 1e-4 on what Adam moved.
        assert_same_run(f"{name} dropout 0.1", rel[name], adam_tol=1e-4)
    print(f"pmap dropout 0.1: max loss difference from one device {rel['pmap']['losses']:.2e}")
    assert rel["pmap"]["losses"] > 1e-3 and rel["pmap"]["rng"] == 0


@pytest.mark.slow
def test_params_are_sharded_as_the_layout_says(layouts):
    specs, shapes = layouts["specs"], layouts["shard_shapes"]
    assert specs["data8"] == specs["single"]  # data parallel: every device holds everything
    assert all(axis is None for spec in specs["data8"].values() for axis in spec)
    assert specs["fsdp8"] == {
        "wte": [None, "fsdp"],
        "fc": ["fsdp", None],
        "query": ["fsdp", None, None],
        "proj": [None, "fsdp"],
        "adam_mu_fc": ["fsdp", None],
    }
    assert specs["data2_fsdp2_tensor2"] == {
        "wte": ["tensor", "fsdp"],
        "fc": ["fsdp", "tensor"],
        "query": ["fsdp", "tensor", None],
        "proj": ["tensor", "fsdp"],
        "adam_mu_fc": ["fsdp", "tensor"],
    }
    # What device 0 actually holds: vocabulary 256 x width 32, MLP 128, 4 heads of 8.
    assert shapes["single"]["wte"] == [256, 32]
    assert shapes["fsdp8"] == {"wte": [256, 4], "fc": [4, 128], "query": [4, 4, 8], "proj": [128, 4]}
    assert shapes["data2_fsdp2_tensor2"] == {"wte": [128, 16], "fc": [16, 64], "query": [16, 2, 8], "proj": [64, 16]}


@pytest.mark.slow
def test_tensor_parallelism_gathers_no_matrix_or_activation(layouts):
    # Each device computes its heads' queries, keys and values and its slice of the MLP from its
    # own kernel columns; only vectors (biases, norm scales) may be gathered.
    gathers = layouts["tensor8_gathers"]  # the dimensions of each gathered array, e.g. "256" or "32,96"
    print(f"tensor=8 all-gathers: {gathers}")
    assert gathers and all("," not in dims for dims in gathers), gathers


@pytest.mark.slow
def test_fsdp8_keeps_an_eighth_of_the_state_per_device(layouts):
    m = layouts["memory"]
    print(f"fsdp=8 bytes per device: {m}")
    for part in ("params", "opt"):
        ratio = m[f"{part}_dev0"] / m[f"{part}_total"]
        # Matrices are split 8 ways; biases and norm scales (1.6% of this tiny model, 0.1%
        # of GPT-2 small) stay whole on every device.
        assert 1 / 8 <= ratio < 0.15, (part, ratio, m)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(layouts):
    # One SGD step without clipping: the update is -lr x the gradient, so it is compared with
    # plain jax.grad of the mean loss as well as with the full batch. Mutations caught, each tried
    # once by hand in lmjax/train/step.py: the micro-batch gradients averaged instead of summed
    # before the division by the count (4x too small), and only the last micro-batch's gradient kept.
    acc = layouts["accum"]
    print(f"accumulation: {acc}")
    assert acc["params_rel"] < 1e-6 and acc["update_rel"] < 1e-5, acc
    assert acc["full_grad_vs_plain_jax"] < STATE_TOL and acc["accum_grad_vs_plain_jax"] < STATE_TOL, acc
    assert abs(acc["loss_full"] - acc["loss_accum"]) < 1e-6


@pytest.mark.slow
def test_bfloat16_keeps_float32_state_logits_and_loss(layouts):
    bf16 = layouts["bf16"]
    assert bf16["param_dtypes"] == ["float32"] and bf16["opt_dtypes"] == ["float32"]
    assert bf16["logits_dtype"] == "float32" and bf16["loss_dtype"] == "float32"
    assert bf16["bf16_dot_generals"], "the model's matrix products should run in bfloat16"
    losses = bf16["losses"]
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------------------------------
# The train loop on 8 devices: compilations, and the reference for restore and multi-host


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir, cache):
    """Three loop runs on 8 devices: a warm-up, the reference (mesh fsdp=4 x data=2, 6 steps,
    eval and save every 3), and the same under pmap; compilations counted per run."""
    root = tmp_path_factory.mktemp("reference")
    runs = [
        {
            "workdir": str(root / "warmup"),
            "overrides": {**LOOP, "train.steps": 2, "train.eval_every": 1, "train.save_every": 1},
        },
        {"workdir": str(root / "mesh"), "overrides": LOOP},
        {
            "workdir": str(root / "pmap"),
            "overrides": {**LOOP, "parallel.strategy": "pmap", "parallel.data": -1, "parallel.fsdp": 1},
        },
    ]
    out = run_worker("loop", {"corpus": str(corpus_dir), "count_compiles": True, "runs": runs}, 8, cache)
    out["dirs"] = {name: root / name for name in ("warmup", "mesh", "pmap")}
    return out


@pytest.mark.slow
def test_no_recompilation_after_the_first_step(reference):
    warmup, mesh, pmap = reference["results"]
    # The warm-up run also compiles one-off helpers (PRNG seeding, Orbax's shard slicing).
    assert warmup["compiles"].count("jit(train_step)") == 1, warmup["compiles"]
    assert warmup["compiles"].count("jit(eval_step)") == 1, warmup["compiles"]
    # A later run of 6 steps with 2 evaluations and 2 saves compiles each function once (and the
    # MFU peak probe at start: the quick one, one matrix size, once the machine's peak is cached).
    assert sorted(mesh["compiles"]) == ["jit(eval_step)", "jit(init_state)", "jit(matmul_probe)", "jit(train_step)"], (
        mesh["compiles"]
    )
    # pmap compiles its step and eval as 'jit(_fun)'; Orbax slices replicated arrays once.
    assert pmap["compiles"].count("jit(_fun)") == 2, pmap["compiles"]
    assert set(pmap["compiles"]) <= {"jit(_fun)", "jit(init_state)", "jit(slice)", "jit(matmul_probe)"}, pmap[
        "compiles"
    ]


@pytest.mark.slow
def test_pmap_loop_matches_mesh_loop(reference):
    dirs = reference["dirs"]
    diff = max_difference(losses_by_step(dirs["mesh"]), losses_by_step(dirs["pmap"]))
    print(f"loop pmap vs mesh: max difference {diff:.2e}")
    assert diff < TOL


def _resume_dir(reference, tmp_path: Path) -> Path:
    """The reference run as it was after step 3: checkpoint 6 removed (resume truncates the
    metrics past the restored step)."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(reference["dirs"]["mesh"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    return run_dir


@pytest.mark.slow
def test_restore_onto_fewer_devices_continues_the_same_run(reference, tmp_path, corpus_dir, cache):
    """Saved under mesh fsdp=4 x data=2 on 8 devices at step 3; continued to 6 in a process
    with 2 devices, once as fsdp=2 and once on one device."""
    layouts = {"fsdp2": {"parallel.data": 1, "parallel.fsdp": 2}, "single": {"parallel.strategy": "single"}}
    runs = [
        {"workdir": str(_resume_dir(reference, tmp_path / name)), "overrides": {**LOOP, **overrides}}
        for name, overrides in layouts.items()
    ]
    out = run_worker("loop", {"corpus": str(corpus_dir), "runs": runs}, 2, cache)
    assert out["devices"] == 2
    for run, result in zip(runs, out["results"]):
        assert result["start_step"] == 3
        run_dir = Path(run["workdir"])
        diff = max_difference(losses_by_step(reference["dirs"]["mesh"]), losses_by_step(run_dir), from_step=3)
        print(f"restore {run['overrides']}: steps 4-6 max difference from the 8-device run {diff:.2e}")
        assert diff < TOL, (run["overrides"], diff)
        assert (run_dir / "checkpoints" / "6").is_dir()


# ---------------------------------------------------------------------------------------
# Two processes x 4 devices on 127.0.0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def experiment_body(overrides: dict) -> str:
    return "\n".join(f"c.{key} = {value!r}" for key, value in overrides.items())


def launch_two_processes(exp: Path, run_dir: Path, cache: Path, extra: list[str]) -> list[subprocess.Popen]:
    """`lmjax train` as processes 0 and 1 of one run, 4 CPU devices each, on 127.0.0.1.
    Process 0 is configured by flags, process 1 by the environment: both paths are used."""
    port = free_port()
    layout = ["--config.parallel.data=2", "--config.parallel.fsdp=2", "--config.parallel.tensor=2"]
    base = [sys.executable, "-m", "lmjax.cli", "train", str(exp), "--workdir", str(run_dir), *layout, *extra]
    commands = [
        (
            base
            + [
                f"--config.parallel.coordinator=127.0.0.1:{port}",
                "--config.parallel.num_processes=2",
                "--config.parallel.process_id=0",
            ],
            {},
        ),
        (base, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}),
    ]
    return [
        subprocess.Popen(
            cmd,
            env={**device_env(4, cache), **env},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd, env in commands
    ]


def wait_all(procs: list[subprocess.Popen], timeout: int = 600) -> list[tuple[int, str, str]]:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step for r in read_jsonl(run_dir / "metrics.jsonl")):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process ended before step {step}: {[p.poll() for p in procs]}")
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.slow
def test_two_processes_match_one_process_and_stop_together(reference, tmp_path, corpus_dir, cache):
    """2 processes x 4 devices: SIGTERM to process 1 alone makes both save at one step and
    exit 143; both resume from it; the losses of steps 1-6 match one process with 8 devices."""
    exp = write_experiment(tmp_path / "exp.py", corpus_dir, experiment_body(LOOP))
    run_dir = tmp_path / "run"
    procs = launch_two_processes(exp, run_dir, cache, ["--config.train.steps=300", "--config.train.save_every=1000"])
    try:
        wait_for_step(run_dir, 3, procs)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        first = wait_all(procs)
    for code, out, err in first:
        assert code == 128 + signal.SIGTERM, f"exit {code}\n{out[-2000:]}\n{err[-4000:]}"
    assert "mesh data=2 fsdp=2 tensor=2 over 8 cpu devices in 2 processes" in first[0][1]
    assert "step 3" not in first[1][1], "only process 0 reports progress"
    (stopped,) = [int(p.name) for p in (run_dir / "checkpoints").iterdir()]
    assert all(f"finished step {stopped}, saved it in" in out for _, out, _ in first)

    end = max(6, stopped + 2)
    second = wait_all(launch_two_processes(exp, run_dir, cache, [f"--config.train.steps={end}"]))
    for code, out, err in second:
        assert code == 0, f"exit {code}\n{out[-2000:]}\n{err[-4000:]}"
    assert f"resuming from checkpoint at step {stopped}" in second[0][1]
    assert (run_dir / "config.json").is_file() and (run_dir / "checkpoints" / str(end)).is_dir()
    upto6 = lambda d: {k: v for k, v in d.items() if k[0] <= 6}  # noqa: E731
    diff = max_difference(upto6(losses_by_step(reference["dirs"]["mesh"])), upto6(losses_by_step(run_dir)))
    print(f"two processes: stopped at step {stopped}, steps 1-6 max difference from one process {diff:.2e}")
    assert diff < TOL, diff


def hold_lock_as_another_job(run_dir: Path) -> int:
    """An open flock on RUN_DIR/.lock, as lmjax.runlock takes it, with a holder record."""
    import fcntl

    run_dir.mkdir(parents=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": "gpu-node-7", "started": 0}).encode())
    return fd


@pytest.mark.parametrize("mistake", ["held lock", "bad data"])
def test_a_mistake_process_0_finds_stops_both_processes(mistake, tmp_path, corpus_dir, cache):
    """Process 0 alone takes the lock and prepares the data: when it refuses, process 1 must
    stop with one line too, not wait at the next collective."""
    exp = write_experiment(tmp_path / "exp.py", corpus_dir, experiment_body(LOOP))
    run_dir, extra, fd = tmp_path / "run", [], None
    if mistake == "held lock":
        fd = hold_lock_as_another_job(run_dir)
        words, where = "PID 4242 on host gpu-node-7", "taking the lock on"
    else:
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
        extra = ["--config.data.source=files", f"--config.data.paths={tmp_path / 'bad.parquet'}"]
        extra += ["--config.data.format=parquet"]
        words, where = "could not read data.paths=", "preparing the data"
    try:
        (zero, one) = wait_all(launch_two_processes(exp, run_dir, cache, extra), timeout=240)
    finally:
        if fd is not None:
            os.close(fd)
    for code, out, err in (zero, one):
        assert code == 2 and "Traceback" not in err, f"exit {code}\n{out[-2000:]}\n{err[-3000:]}"
    assert words in zero[2], zero[2]
    assert f"lmjax: error: process 0 stopped while {where}" in one[2], one[2]


# ---------------------------------------------------------------------------------------
# Errors a person can fix, and how the multi-process settings are read


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.train.batch_size=12", "train.batch_size=12"),
        ("--config.parallel.data=3", "parallel.data"),
    ],
)
def test_layout_mistakes_are_one_line_errors(tmp_path, corpus_dir, cache, override, words):
    exp = write_experiment(tmp_path / "exp.py", corpus_dir)
    env = device_env(8, cache)
    proc = run_cli(["train", str(exp), "--workdir", str(tmp_path / "run"), override], env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmjax: error:") and words in lines[0], proc.stderr
    assert "8" in lines[0]  # names the device count to fit


def _parallel(**kw) -> ConfigDict:
    from lmjax.config import base_config

    c = base_config().parallel
    for k, v in kw.items():
        c[k] = v
    return c


def test_distributed_args_from_config_environment_and_launchers():
    assert distributed_args(_parallel(), {}) is None
    assert distributed_args(_parallel(coordinator="10.0.0.1:1234", num_processes=4, process_id=3), {}) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
    }
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed_args(_parallel(), env) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
    # Config wins over the environment.
    assert distributed_args(_parallel(process_id=1), env)["process_id"] == 1
    # Launchers JAX reads by itself: initialize() with nothing filled in.
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    assert distributed_args(_parallel(), slurm) == {}
    assert distributed_args(_parallel(), {**slurm, "SLURM_NTASKS": "1"}) is None  # one task: one process
    assert distributed_args(_parallel(), {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
    assert distributed_args(_parallel(), {"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed_args(_parallel(distributed=True), {}) == {}  # JAX tries its own detection
    assert distributed_args(_parallel(num_processes=1), {}) is None


@pytest.mark.parametrize(
    "kw, env, words",
    [
        ({"coordinator": "10.0.0.1:1234"}, {}, "parallel.num_processes"),
        ({"coordinator": "10.0.0.1", "num_processes": 2, "process_id": 0}, {}, "host:port"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "parallel.process_id=2"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES"),
    ],
)
def test_incomplete_multiprocess_settings_are_user_errors(kw, env, words):
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        distributed_args(_parallel(**kw), env)
