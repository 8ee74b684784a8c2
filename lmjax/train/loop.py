"""The train loop, top to bottom: set up, restore or init, step, log, evaluate, save."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import config as config_lib
from lmjax import scratch_cache
from lmjax.checkpoint import Checkpoints
from lmjax.data import Data, prepare
from lmjax.data.batches import Prefetcher, TrainBatches, heldout_subset
from lmjax.errors import UserError
from lmjax.flops import Utilisation
from lmjax.metrics import MetricsWriter, Progress, StepTrace, sample_text, truncate_after
from lmjax.models import build_model
from lmjax.train.optimizer import build_optimizer
from lmjax.train.parallel import build_parallel, check_batch
from lmjax.train.step import TrainState, create_state, make_eval_step, make_train_step


class TrainingHalted(Exception):
    """Training stopped on a non-finite loss (train.on_nan='halt'); checkpoints are kept."""


class Preempted(Exception):
    """SIGTERM or SIGINT: the state was saved; `signum` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class Run:
    """Everything built from a config that train, eval and sample share."""

    cfg: Any
    run_dir: Path
    model: nn.Module
    tx: Any
    lr: Callable
    parallel: Any
    shardings: TrainState
    init_state: Callable

    def abstract_state(self):
        return jax.eval_shape(self.init_state, jax.random.PRNGKey(0))

    def restore(self, ckpts: Checkpoints, step: int) -> TrainState:
        target = self.parallel.restore_target(self.abstract_state(), self.shardings)
        return self.parallel.from_restored(ckpts.restore_state(step, target))

    def restore_params(self, ckpts: Checkpoints, step: int):
        """Only the parameters at `step`, laid out as in training (for eval and sample)."""
        target = self.parallel.restore_target(self.abstract_state().params, self.shardings.params)
        return self.parallel.from_restored(ckpts.restore_params(step, target))


def build_run(cfg, run_dir: Path, vocab_size: int, parallel=None) -> Run:
    parallel = parallel or build_parallel(cfg.parallel)
    model = build_model(cfg.model, vocab_size, cfg.data.seq_len)
    tx, lr = build_optimizer(cfg.optim, cfg.train.steps)

    def init_state(rng):
        param_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, 0))
        dummy = jnp.zeros((1, min(cfg.data.seq_len, 8)), jnp.int32)
        params = nn.unbox(model.init({"params": param_rng}, dummy)["params"])
        return create_state(params, tx, dropout_rng)

    key = jax.random.PRNGKey(cfg.seed)
    shardings = parallel.state_shardings(model, tx, init_state, key)
    return Run(cfg, run_dir, model, tx, lr, parallel, shardings, init_state)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def probe_writable(run_dir: Path) -> None:
    """Fail at start-up, not after an hour, if the run directory cannot be written."""
    probe = run_dir / f".write_probe{jax.process_index()}"  # one per process: hosts share the directory
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))  # 1 MiB: a nearly full disk fails here
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            probe.unlink(missing_ok=True)
            raise UserError(f"the run directory {run_dir} has no room to write ({e.strerror}); free disk space or "
                            "choose another --workdir") from None
        if e.errno in (errno.EEXIST, errno.ENOTDIR):
            blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir)
            raise UserError(f"the run directory {run_dir} is not a directory (a file is in the way: {blocker}); "
                            "choose another --workdir") from None
        raise UserError(f"the run directory {run_dir} is not writable ({e.strerror}); choose another --workdir "
                        "or fix its permissions") from None


def local_rows(batch: dict, parallel) -> dict:
    """This process's rows of a global batch: the block its devices hold."""
    i, n = parallel.process_block
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}


def main_process_first(fn: Callable, is_main: bool):
    """Run `fn` on process 0, then on the others: files it writes (tokenizer, token cache)
    are made once and read by the rest."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    out = fn() if is_main else None
    multihost_utils.sync_global_devices("lmjax: process 0 prepared the data")
    return out if is_main else fn()


def evaluate_subset(eval_fn, params, batches: list[dict], parallel) -> float:
    """Token-weighted held-out loss over a fixed list of batches."""
    nll = count = 0.0
    for b in batches:
        out = parallel.fetch(eval_fn(params, parallel.put_batch(local_rows(b, parallel))))
        nll += float(out["nll"])
        count += float(out["tokens"])
    return nll / count


def _preemption_service() -> bool:
    """Whether JAX's preemption service runs (jax.distributed with several processes)."""
    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed
    except ImportError:  # moved in another JAX version: fall back to a local handler
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class _Signals:
    """SIGTERM / SIGINT → stop after the current step, save, exit.

    One process: a handler sets a flag the loop checks after each step. Several processes must
    all stop at the same step, or the others hang in a collective: JAX's preemption service
    (started by jax.distributed.initialize) owns SIGTERM and agrees on a step across processes,
    which Orbax's `reached_preemption` reports; SIGINT is forwarded to it as SIGTERM.
    """

    def __init__(self, ckpts: Checkpoints):
        self.ckpts = ckpts
        self.received = None
        self.synced = _preemption_service()
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum
        if self.synced and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_at(self, step: int) -> bool:
        """Call after every step (on every process): True where all should save and stop."""
        if self.synced:
            if self.ckpts.manager.reached_preemption(step):
                self.received = self.received or signal.SIGTERM
                return True
            return False
        return self.received is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint records of its tokenizer, to refuse another one on restore."""
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint()}


def check_tokenizer(ckpts: Checkpoints, step: int, tokenizer, tokenizer_dir: Path) -> None:
    saved = ckpts.restore_tokenizer(step)
    if saved is not None and saved.get("fingerprint") != tokenizer.fingerprint():
        raise UserError(f"the tokenizer in {tokenizer_dir} ({tokenizer.kind}, {tokenizer.vocab_size} ids) is not the one "
                        f"checkpoint step {step} was trained with ({saved.get('kind')}, {saved.get('vocab_size')} ids); "
                        f"put the run's own tokenizer back in {tokenizer_dir}, or train in a new --workdir")


def check_resume(cfg, ckpts: Checkpoints, step: int, log) -> None:
    saved = config_lib.from_json(json.dumps(ckpts.restore_config(step)))
    refused, allowed = config_lib.resume_differences(saved, cfg)
    if refused:
        raise UserError(f"cannot resume from step {step}: the config changes the model or data ({'; '.join(refused)}); "
                        "undo these changes or train in a new --workdir")
    for line in allowed:
        log(f"resume: config change allowed: {line}")


def dispatch_ahead(setting: str, backend: str, scratch_kept: bool) -> bool:
    """Whether to queue the next step before the current one ends (train.dispatch_ahead).

    On an accelerator the host then prepares step k+1 while the device runs step k. On CPU,
    XLA allocates a queued step's scratch memory while the running step still holds its own,
    so a kept block (lmjax.scratch_cache) is never free when asked for, and every page is
    faulted in and zeroed again at every step: "auto" runs one step at a time there.
    """
    return setting == "on" or (setting == "auto" and not (backend == "cpu" and scratch_kept))


def train(cfg, workdir: str | Path, log: Callable[[str], None] = print, stop_at: int | None = None) -> dict:
    """Train (or resume) the experiment `cfg` in `workdir`; return the final figures.

    `stop_at` ends this invocation after that step with a checkpoint, as a preemption would
    (for time-limited job slots); running again resumes towards train.steps.
    """
    run_dir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda *_: None)
    probe_writable(run_dir)
    t_start = time.time()

    parallel = build_parallel(cfg.parallel)
    check_batch(cfg.train.batch_size, cfg.train.grad_accum, parallel)
    ckpts = Checkpoints(run_dir / "checkpoints", keep=cfg.train.keep)
    latest = ckpts.latest_step()
    if latest is not None and not cfg.train.resume:
        raise UserError(f"train.resume=False but {run_dir} already holds checkpoints (latest step {latest}); "
                        "choose a new --workdir, or delete its checkpoints/ yourself to start over")
    if latest is not None:
        check_resume(cfg, ckpts, latest, say)

    data: Data = main_process_first(lambda: prepare(cfg, run_dir, say), is_main)
    if latest is not None:
        check_tokenizer(ckpts, latest, data.tokenizer, run_dir / "tokenizer")
    run = build_run(cfg, run_dir, data.tokenizer.vocab_size, parallel)
    if is_main:  # written whole or not at all: eval and sample read it
        tmp = run_dir / ".config.json.tmp"
        tmp.write_text(config_lib.to_json(cfg))
        os.replace(tmp, run_dir / "config.json")

    if latest is not None:
        state = run.restore(ckpts, latest)
        say(f"resuming from checkpoint at step {latest} in {ckpts.directory}")
    else:
        state = parallel.init_state(run.init_state, run.shardings, jax.random.PRNGKey(cfg.seed))
    start = latest or 0
    total = cfg.train.steps
    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        dropped = truncate_after(metrics_path, start)
        if dropped:
            say(f"metrics.jsonl: dropped {dropped} entries past step {start}")

    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    n_params = count_params(jax.eval_shape(run.init_state, jax.random.PRNGKey(0)).params)
    say(f"run directory: {run_dir}")
    say(f"model: {cfg.model.kind}, {n_params / 1e6:.2f}M parameters, vocabulary {data.tokenizer.vocab_size} ({data.tokenizer.kind})")
    say(f"data: {data.description}; train {len(data.train.tokens):,} tokens, held-out {len(data.heldout.tokens):,} tokens")
    say(f"steps {start} → {total}, {batch} x {seq_len} = {batch * seq_len:,} tokens per step; {parallel.describe()}")
    utilisation = Utilisation.for_run(cfg, run.model, parallel)
    say(utilisation.describe())
    scratch_kept, backend = scratch_cache.active(), jax.default_backend()
    ahead = dispatch_ahead(cfg.train.dispatch_ahead, backend, scratch_kept)
    if backend == "cpu":
        kept = "kept mapped" if scratch_kept else "not kept (LMJAX_SCRATCH_CACHE=0, an LD_PRELOAD, or no glibc or C compiler)"
        say(f"CPU: {'one step at a time' if not ahead else 'next step queued ahead'} (train.dispatch_ahead="
            f"{cfg.train.dispatch_ahead}); XLA scratch memory {kept} between steps")

    batches = TrainBatches(data.train, seq_len, batch, cfg.data.seed, *parallel.process_block, cfg.data.document_mask)
    eval_batches = heldout_subset(data.heldout, seq_len, batch // cfg.train.grad_accum, cfg.train.eval_batches,
                                  cfg.data.document_mask)
    step_fn = parallel.compile_step(partial(make_train_step, run.model, run.tx, run.lr, cfg.train.grad_accum,
                                            on_nan=cfg.train.on_nan), run.shardings)
    eval_fn = parallel.compile_eval(partial(make_eval_step, run.model), run.shardings)
    writer = MetricsWriter(run_dir, is_main, cfg.train.tensorboard and is_main, cfg.to_dict(),
                           wandb=cfg.train.wandb, started=t_start, resumed_step=start)
    trace = StepTrace(run_dir / "profile", cfg.train.profile_steps, start + 1, is_main)
    progress = Progress(total, start, cfg.train.log_every, is_main)
    result = {"run_dir": str(run_dir), "start_step": start, "params": n_params}

    tokenizer_info = tokenizer_record(data.tokenizer)

    def save(step: int, heldout: float | None, force: bool = False):
        ckpts.save(step, parallel.to_global(state), cfg.to_dict(), heldout, force=force, tokenizer=tokenizer_info)

    last_good = latest
    last_loss = heldout_loss = float("nan")
    tokens_per_step = batch * seq_len
    t_log, steps_since_log, t_first = time.time(), 0, None
    end = min(total, stop_at) if stop_at else total
    prefetch = Prefetcher(lambda s: batches(s), parallel.put_batch, start, end)
    try:
        with _Signals(ckpts) as signals:
            pending = None

            def finish(item):  # read a step's metrics (after the next step was dispatched)
                nonlocal last_loss, t_log, steps_since_log, t_first
                done, m = item
                m = parallel.fetch(m)
                last_loss = float(m["loss"])
                if not bool(m["finite"]) and cfg.train.on_nan == "halt":
                    kept = f"step {last_good}" if last_good is not None else "none written yet"
                    raise TrainingHalted(
                        f"non-finite loss ({last_loss}), gradient norm ({float(m['grad_norm'])}) or parameter norm "
                        f"({float(m['param_norm'])}) at step {done}; stopped without saving it. Last good checkpoint: "
                        f"{kept}. Lower optim.lr, raise optim.warmup_steps, or set train.on_nan='skip'")
                first = t_first is None
                if first:  # compilation: log the step, keep it out of throughput
                    t_first = t_log = time.time()
                    steps_since_log = 0
                else:
                    steps_since_log += 1
                if done % cfg.train.log_every == 0 or done == total:
                    record = {"loss": last_loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                              "update_norm": float(m["update_norm"]), "param_norm": float(m["param_norm"]),
                              "tokens_seen": done * tokens_per_step, "skipped": int(m["skipped"])}
                    shown = {"loss": last_loss, "heldout": heldout_loss}
                    if not first:
                        elapsed = time.time() - t_log
                        tps = tokens_per_step * steps_since_log / max(elapsed, 1e-9)
                        record.update(tokens_per_s=tps, step_time=elapsed / max(steps_since_log, 1),
                                      **utilisation.fields(tps))
                        result["tokens_per_s"] = tps
                        shown.update({"tok/s": round(tps), "mfu": utilisation.mfu(tps)})
                    writer.write(done, record)
                    progress.update(done, shown)
                    t_log, steps_since_log = time.time(), 0

            for step, device_batch in prefetch:
                trace.before(step)
                if not ahead and pending is not None:
                    finish(pending)
                    pending = None
                state, metrics = step_fn(state, device_batch)
                done = step + 1
                if pending is not None:
                    finish(pending)
                pending = (done, metrics)
                do_eval = done % cfg.train.eval_every == 0 or done == total
                do_save = done % cfg.train.save_every == 0 or done == end
                stop = signals.stop_at(done) and done < total
                if do_eval or do_save or stop:
                    finish(pending)
                    pending = None
                    measured = None
                    if do_eval:
                        heldout_loss = measured = evaluate_subset(eval_fn, parallel.params_of(state), eval_batches, parallel)
                        writer.write(done, {"heldout_loss": heldout_loss, "heldout_ppl": math.exp(min(heldout_loss, 50))})
                        progress.log(f"step {done}: train loss {last_loss:.4f}, held-out loss {heldout_loss:.4f}")
                    if do_save or stop:
                        save(done, measured, force=True)
                        last_good = done
                    t_log, steps_since_log = time.time(), 0  # keep eval and save out of tokens/s
                    if stop:
                        ckpts.wait()
                        name = signal.Signals(signals.received).name
                        raise Preempted(f"received {name}: finished step {done}, saved it in {ckpts.directory / str(done)}; "
                                        "run the same command to resume from it", signals.received)
                if trace.after(step, metrics):  # the trace's one device sync: keep it out of tokens/s
                    if pending is not None:
                        finish(pending)
                        pending = None
                    t_log, steps_since_log = time.time(), 0
                    progress.log(f"profiler: traced {cfg.train.profile_steps} steps into {trace.directory}")
            if pending is not None:
                finish(pending)
            if writer.tb is not None and jax.process_count() == 1:  # what the trained model writes, in TensorBoard
                writer.text("sample", "```\n" + sample_text(run.model, parallel.to_global(state).params,
                                                            data.tokenizer, cfg.sample) + "\n```", total)
    except OSError as e:  # the run directory filled up or went away mid-run (metrics, eval outputs)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO):
            raise
        verb = "write" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) else "access"
        raise ckpts.write_failed(f"could not {verb} {e.filename or run_dir}: {e.strerror}") from None
    finally:
        trace.stop()
        prefetch.close()
        progress.close()
        try:
            ckpts.wait()
        finally:
            ckpts.close()
            writer.close()
    result.update(step=end, train_loss=last_loss, heldout_loss=heldout_loss, wall_s=time.time() - t_start)
    say(f"{'done' if end == total else 'stopped'}: step {end}, train loss {last_loss:.4f}, held-out loss (subset) {heldout_loss:.4f}, "
        f"{result['wall_s']:.0f}s; checkpoints in {ckpts.directory}")
    return result
