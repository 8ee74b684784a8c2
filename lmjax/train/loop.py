"""The train loop, top to bottom: set up, restore or init, then step, with the periodic work
(log, evaluate, save, trace, stop on a signal) as small named pieces below."""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax

from lmjax import scratch_cache
from lmjax.backend import startup_lines
from lmjax.checkpoint import Checkpoints
from lmjax.data import Data, prepare
from lmjax.data.batches import Prefetcher, heldout_subset, local_rows
from lmjax.errors import UserError
from lmjax.flops import Utilisation
from lmjax.metrics import MetricsWriter, Progress, StepTrace, truncate_after
from lmjax.run import (
    Run,
    build_run,
    check_resume,
    check_tokenizer,
    count_params,
    main_process_first,
    on_process_0,
    probe_writable,
    tokenizer_record,
    write_config,
)
from lmjax.runlock import RunLock
from lmjax.sample import sample_text
from lmjax.train.parallel import build_parallel, check_batch
from lmjax.train.preemption import StopSignals
from lmjax.train.step import make_eval_step


class TrainingHalted(Exception):
    """Training stopped on a non-finite loss (train.on_nan='halt'); checkpoints are kept."""


class Preempted(Exception):
    """SIGTERM or SIGINT: the state was saved; `signum` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def evaluate_subset(eval_fn, params, batches: list[dict], parallel) -> float:
    """Token-weighted held-out loss over a fixed list of batches."""
    nll = count = 0.0
    for b in batches:
        out = parallel.fetch(eval_fn(params, parallel.put_batch(local_rows(b, parallel.process_block))))
        nll += float(out["nll"])
        count += float(out["tokens"])
    return nll / count


def dispatch_ahead(setting: str, backend: str, scratch_kept: bool) -> bool:
    """Whether to queue the next step before the current one ends (train.dispatch_ahead).

    On an accelerator the host then prepares step k+1 while the device runs step k. On CPU,
    XLA allocates a queued step's scratch memory while the running step still holds its own,
    so a kept block (lmjax.scratch_cache) is never free when asked for, and every page is
    faulted in and zeroed again at every step: "auto" runs one step at a time there.
    """
    return setting == "on" or (setting == "auto" and not (backend == "cpu" and scratch_kept))


class StepLog:
    """Reads a step's metrics, halts on a non-finite loss, and logs every `log_every` steps
    with the throughput since the last log (the first, compiling step left out)."""

    def __init__(
        self, cfg, writer: MetricsWriter, progress: Progress, utilisation: Utilisation, parallel, last_good: int | None
    ):
        self.cfg, self.writer, self.progress, self.utilisation = cfg, writer, progress, utilisation
        self.parallel = parallel
        self.last_good = last_good  # the last step saved
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.loss = self.heldout = float("nan")
        self.tokens_per_s = None
        self.compiled = False
        self.reset_clock()

    def reset_clock(self) -> None:
        """Keep what just ran (eval, save, a trace's sync) out of tokens/s."""
        self.t_log, self.steps_since_log = time.time(), 0

    def __call__(self, done: int, metrics) -> None:
        m = self.parallel.fetch(metrics)
        self.loss = float(m["loss"])
        if not bool(m["finite"]) and self.cfg.train.on_nan == "halt":
            kept = f"step {self.last_good}" if self.last_good is not None else "none written yet"
            raise TrainingHalted(
                f"non-finite loss ({self.loss}), gradient norm ({float(m['grad_norm'])}) or parameter norm "
                f"({float(m['param_norm'])}) at step {done}; stopped without saving it. Last good checkpoint: "
                f"{kept}. Lower optim.lr, raise optim.warmup_steps, or set train.on_nan='skip'"
            )
        first = not self.compiled
        if first:  # compilation: log the step, keep it out of throughput
            self.compiled = True
            self.reset_clock()
        else:
            self.steps_since_log += 1
        if done % self.cfg.train.log_every and done != self.cfg.train.steps:
            return
        record = {
            "loss": self.loss,
            "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]),
            "update_norm": float(m["update_norm"]),
            "param_norm": float(m["param_norm"]),
            "tokens_seen": done * self.tokens_per_step,
            "skipped": int(m["skipped"]),
        }
        shown = {"loss": self.loss, "heldout": self.heldout}
        if not first:
            elapsed = time.time() - self.t_log
            tps = self.tokens_per_step * self.steps_since_log / max(elapsed, 1e-9)
            record.update(
                tokens_per_s=tps, step_time=elapsed / max(self.steps_since_log, 1), **self.utilisation.fields(tps)
            )
            self.tokens_per_s = tps
            shown.update({"tok/s": round(tps), "mfu": self.utilisation.mfu(tps)})
        self.writer.write(done, record)
        self.progress.update(done, shown)
        self.reset_clock()

    def heldout_loss(self, done: int, loss: float) -> None:
        self.heldout = loss
        self.writer.write(done, {"heldout_loss": loss, "heldout_ppl": math.exp(min(loss, 50))})
        self.progress.log(f"step {done}: train loss {self.loss:.4f}, held-out loss {loss:.4f}")


class Pending:
    """The metrics of the last dispatched step, read only when needed: after the next step is
    dispatched (the host never waits for the device), or before work that needs them."""

    def __init__(self, read: Callable[[int, dict], None]):
        self.read = read
        self.item = None

    def push(self, done: int, metrics) -> None:
        previous, self.item = self.item, (done, metrics)
        if previous is not None:
            self.read(*previous)

    def flush(self) -> None:
        if self.item is not None:
            item, self.item = self.item, None
            self.read(*item)


def restore_or_init(run: Run, ckpts: Checkpoints, latest: int | None, say):
    """The step's state: the latest checkpoint's, or a new one from the config's seed."""
    if latest is None:
        return run.new_state()
    state = run.restore(ckpts, latest)
    say(f"resuming from checkpoint at step {latest} in {ckpts.directory}")
    return state


def describe_run(cfg, run: Run, data: Data, start: int, n_params: int, say) -> None:
    """The run's first lines: directory, model, data, steps and layout."""
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    say(f"run directory: {run.run_dir}")
    say(
        f"model: {cfg.model.kind}, {n_params / 1e6:.2f}M parameters, vocabulary {data.tokenizer.vocab_size} "
        f"({data.tokenizer.kind})"
    )
    say(
        f"data: {data.description}; train {len(data.train.tokens):,} tokens, "
        f"held-out {len(data.heldout.tokens):,} tokens"
    )
    say(
        f"steps {start} → {cfg.train.steps}, {batch} x {seq_len} = {batch * seq_len:,} tokens per step; "
        f"{run.parallel.describe()}"
    )


def cpu_dispatch(cfg, say) -> bool:
    """Whether to queue steps ahead (`dispatch_ahead`), said in one line on CPU."""
    scratch_kept, backend = scratch_cache.active(), jax.default_backend()
    ahead = dispatch_ahead(cfg.train.dispatch_ahead, backend, scratch_kept)
    if backend == "cpu":
        kept = (
            "kept mapped"
            if scratch_kept
            else "not kept (LMJAX_SCRATCH_CACHE=0, an LD_PRELOAD, or no glibc or C compiler)"
        )
        say(
            f"CPU: {'one step at a time' if not ahead else 'next step queued ahead'} (train.dispatch_ahead="
            f"{cfg.train.dispatch_ahead}); XLA scratch memory {kept} between steps"
        )
    return ahead


def open_checkpoints(cfg, run_dir: Path, say) -> tuple[Checkpoints, int | None]:
    """The run's checkpoints and the step to resume from (None: start), checked against `cfg`."""
    ckpts = Checkpoints(run_dir / "checkpoints", keep=cfg.train.keep)
    latest = ckpts.latest_step()
    if latest is not None and not cfg.train.resume:
        raise UserError(
            f"train.resume=False but {run_dir} already holds checkpoints (latest step {latest}); "
            "choose a new --workdir, or delete its checkpoints/ yourself to start over"
        )
    if latest is not None:
        check_resume(cfg, ckpts, latest, say)
    return ckpts, latest


def train(cfg, workdir: str | Path, log: Callable[[str], None] = print, stop_at: int | None = None) -> dict:
    """Train (or resume) the experiment `cfg` in `workdir`; return the final figures.

    `stop_at` ends this invocation after that step with a checkpoint, as a preemption would
    (for time-limited job slots); running again resumes towards train.steps. Process 0 holds
    the run directory's lock throughout (lmjax.runlock): two jobs never write one run.
    """
    run_dir = Path(workdir).absolute()
    created = not run_dir.exists()
    probe_writable(run_dir)
    is_main = jax.process_index() == 0
    try:
        with contextlib.ExitStack() as lock:  # process 0 holds it for all; the others wait for its answer
            on_process_0(lambda: lock.enter_context(RunLock(run_dir, log)), is_main, f"taking the lock on {run_dir}")
            return _train(cfg, run_dir, log, stop_at)
    except UserError:
        if created and is_main and not any(p.is_file() for p in run_dir.rglob("*")):
            # A mistake found at start leaves no empty run directory behind (checkpoints/ included).
            for d in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                d.rmdir()
            run_dir.rmdir()
        raise


def _train(cfg, run_dir: Path, log: Callable[[str], None], stop_at: int | None) -> dict:
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda *_: None)
    t_start = time.time()
    for line in startup_lines(cfg):  # backend, device, attention (one the device cannot run: UserError)
        say(line)

    # Set up: layout, checkpoints, data, model; restore or init.
    parallel = build_parallel(cfg.parallel)
    check_batch(cfg.train.batch_size, cfg.train.grad_accum, parallel)
    ckpts, latest = open_checkpoints(cfg, run_dir, say)
    end = min(cfg.train.steps, stop_at) if stop_at else cfg.train.steps
    if latest is not None and latest >= end:  # finished (or --stop-at already passed): no step to run
        ckpts.close()
        if end == cfg.train.steps:
            why, fix = f"train.steps={cfg.train.steps}", "raise --config.train.steps"
        else:
            why, fix = f"--stop-at {stop_at}", "raise --stop-at or drop it"
        say(f"nothing to train: {run_dir} is at step {latest}, which reaches {why}; {fix} to train further")
        return {"run_dir": str(run_dir), "start_step": latest, "step": latest}
    data: Data = main_process_first(lambda: prepare(cfg, run_dir, say), is_main)
    if latest is not None:
        check_tokenizer(ckpts, latest, data.tokenizer, run_dir / "tokenizer")
    run = build_run(cfg, run_dir, data.tokenizer.vocab_size, parallel)
    if is_main:
        write_config(cfg, run_dir)
    state = restore_or_init(run, ckpts, latest, say)
    start, total = latest or 0, cfg.train.steps
    if is_main:
        dropped = truncate_after(run_dir / "metrics.jsonl", start)
        if dropped:
            say(f"metrics.jsonl: dropped {dropped} entries past step {start}")
    n_params = count_params(run.abstract_state().params)
    describe_run(cfg, run, data, start, n_params, say)
    utilisation = Utilisation.for_run(cfg, run.model, parallel)
    say(utilisation.describe())
    ahead = cpu_dispatch(cfg, say)

    # The compiled step and evaluation, the batches, and the periodic work.
    batches = run.train_batches(data.train)
    eval_batches = heldout_subset(
        data.heldout,
        cfg.data.seq_len,
        cfg.train.batch_size // cfg.train.grad_accum,
        cfg.train.eval_batches,
        cfg.data.document_mask,
    )
    step_fn = run.compile_train_step()
    eval_fn = parallel.compile_eval(partial(make_eval_step, run.model), run.shardings)
    writer = MetricsWriter(
        run_dir,
        is_main,
        cfg.train.tensorboard and is_main,
        cfg.to_dict(),
        wandb=cfg.train.wandb,
        started=t_start,
        resumed_step=start,
    )
    trace = StepTrace(run_dir / "profile", cfg.train.profile_steps, start + 1, is_main)
    progress = Progress(total, start, cfg.train.log_every, is_main)
    steplog = StepLog(cfg, writer, progress, utilisation, parallel, latest)
    pending = Pending(steplog)
    tokenizer_info = tokenizer_record(data.tokenizer)

    def save(done: int, heldout: float | None) -> None:
        ckpts.save(done, parallel.to_global(state), cfg.to_dict(), heldout, force=True, tokenizer=tokenizer_info)
        steplog.last_good = done

    prefetch = Prefetcher(batches, parallel.put_batch, start, end)
    try:
        with StopSignals(ckpts) as signals:
            for step, device_batch in prefetch:
                trace.before(step)
                if not ahead:
                    pending.flush()
                state, metrics = step_fn(state, device_batch)
                done = step + 1
                pending.push(done, metrics)
                do_eval = done % cfg.train.eval_every == 0 or done == total
                do_save = done % cfg.train.save_every == 0 or done == end
                stop = signals.stop_at(done) and done < total
                if do_eval or do_save or stop:
                    pending.flush()
                    heldout = evaluate_subset(eval_fn, state.params, eval_batches, parallel) if do_eval else None
                    if heldout is not None:
                        steplog.heldout_loss(done, heldout)
                    if do_save or stop:
                        save(done, heldout)
                    steplog.reset_clock()
                    if stop:
                        ckpts.wait()
                        name = signal.Signals(signals.received).name
                        raise Preempted(
                            f"received {name}: finished step {done}, saved it in "
                            f"{ckpts.directory / str(done)}; run the same command to resume from it",
                            signals.received,
                        )
                if trace.after(step, metrics):  # the trace's one device sync: keep it out of tokens/s
                    pending.flush()
                    steplog.reset_clock()
                    progress.log(f"profiler: traced {cfg.train.profile_steps} steps into {trace.directory}")
            pending.flush()
            if writer.tb is not None and jax.process_count() == 1:  # what the trained model writes, in TensorBoard
                text = sample_text(run.model, parallel.to_global(state).params, data.tokenizer, cfg.sample)
                writer.text("sample", "```\n" + text + "\n```", total)
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
    wall_s = time.time() - t_start
    say(
        f"{'done' if end == total else 'stopped'}: step {end}, train loss {steplog.loss:.4f}, held-out loss "
        f"(subset) {steplog.heldout:.4f}, {wall_s:.0f}s; checkpoints in {ckpts.directory}"
    )
    result = {
        "run_dir": str(run_dir),
        "start_step": start,
        "params": n_params,
        "step": end,
        "train_loss": steplog.loss,
        "heldout_loss": steplog.heldout,
        "wall_s": wall_s,
    }
    if steplog.tokens_per_s is not None:
        result["tokens_per_s"] = steplog.tokens_per_s
    return result
