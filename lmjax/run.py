"""A run's shared life: what train, eval, sample, HF interop and the scripts build from a
config, and how they find, check and restore a run directory.

    RUN_DIR/config.json      the resolved config (`write_config`)
    RUN_DIR/tokenizer/       the run's tokenizer
    RUN_DIR/checkpoints/N/   Orbax checkpoints (lmjax.checkpoint)
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import config as config_lib
from lmjax.checkpoint import Checkpoints
from lmjax.checks import read_json_object, write_text_atomic
from lmjax.data.batches import TrainBatches
from lmjax.data.cache import TokenSplit
from lmjax.data.tokenizers import Tokenizer, load_tokenizer
from lmjax.errors import UserError
from lmjax.models import build_model
from lmjax.train.optimizer import build_optimizer, schedule_on_resume
from lmjax.train.parallel import MeshParallel, Parallel, build_parallel, mesh_config
from lmjax.train.step import TrainState, create_state, make_train_step


@dataclass
class Run:
    """Everything built from a config that train, eval and sample share."""

    cfg: Any
    run_dir: Path
    model: nn.Module
    tx: optax.GradientTransformation
    lr: Callable  # step → learning rate
    parallel: Parallel
    shardings: TrainState  # of the global state
    init_state: Callable  # rng → a new global TrainState

    def abstract_state(self) -> TrainState:
        """Shapes and dtypes of the TrainState, without computing it."""
        return jax.eval_shape(self.init_state, jax.random.PRNGKey(0))

    def new_state(self):
        """The step's state at step 0, from the config's seed."""
        return self.parallel.init_state(self.init_state, self.shardings, jax.random.PRNGKey(self.cfg.seed))

    def restore(self, ckpts: Checkpoints, step: int):
        """The step's state at checkpoint `step`, laid out for this run's devices."""
        return self.parallel.restore(
            lambda target: ckpts.restore_state(step, target), self.abstract_state(), self.shardings
        )

    def compile_train_step(self) -> Callable:
        """train_step(state, batch) → (state, metrics) of this config, compiled for the run's layout."""
        t = self.cfg.train
        make = partial(make_train_step, self.model, self.tx, self.lr, t.grad_accum, on_nan=t.on_nan)
        return self.parallel.compile_step(make, self.shardings)

    def train_batches(self, split: TokenSplit) -> TrainBatches:
        """batches(step) → this process's rows of the global batch of `step`, from `split`."""
        c = self.cfg
        return TrainBatches(
            split, c.data.seq_len, c.train.batch_size, c.data.seed, self.parallel.process_block, c.data.document_mask
        )

    def restore_params(self, ckpts: Checkpoints, step: int):
        """Only the parameters at `step`, laid out as in training (for eval and sample)."""
        return self.parallel.restore(
            lambda target: ckpts.restore_params(step, target), self.abstract_state().params, self.shardings.params
        )


def build_run(cfg, run_dir: Path, vocab_size: int, parallel: Parallel | None = None) -> Run:
    """Model, optimizer and layout for `cfg` with a vocabulary of `vocab_size` ids."""
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
    return Run(cfg, Path(run_dir), model, tx, lr, parallel, shardings, init_state)


def count_params(params) -> int:
    """Number of parameters (array elements) in a pytree."""
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
            raise UserError(
                f"the run directory {run_dir} has no room to write ({e.strerror}); free disk space or "
                "choose another --workdir"
            ) from None
        if e.errno in (errno.EEXIST, errno.ENOTDIR):
            blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir)
            raise UserError(
                f"the run directory {run_dir} is not a directory (a file is in the way: {blocker}); "
                "choose another --workdir"
            ) from None
        raise UserError(
            f"the run directory {run_dir} is not writable ({e.strerror}); choose another --workdir "
            "or fix its permissions"
        ) from None


def write_config(cfg, run_dir: Path) -> None:
    """RUN_DIR/config.json, written whole or not at all: eval and sample read it."""
    write_text_atomic(run_dir / "config.json", config_lib.to_json(cfg))


def on_process_0(fn: Callable, is_main: bool, what: str):
    """Run `fn` on process 0 alone; every process returns when it is done. A mistake process 0
    finds (a held lock, bad data) stops every process with one line, instead of leaving the
    others waiting at the next collective."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils  # only multi-process runs need it

    out, error = None, None
    if is_main:
        try:
            out = fn()
        except BaseException as e:  # any failure, a signal included: the others must hear of it too
            error = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))  # also the barrier
    if error is not None:
        raise error
    if not ok:
        raise UserError(f"process 0 stopped while {what}; its output says why")
    return out


def main_process_first(fn: Callable, is_main: bool):
    """Run `fn` on process 0, then on the others: files it writes (tokenizer, token cache)
    are made once and read by the rest."""
    out = on_process_0(fn, is_main, "preparing the data")
    return out if is_main else fn()


def tokenizer_record(tokenizer: Tokenizer) -> dict:
    """What a checkpoint records of its tokenizer, to refuse another one on restore."""
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint()}


def check_tokenizer(ckpts: Checkpoints, step: int, tokenizer: Tokenizer, tokenizer_dir: Path) -> None:
    """Refuse to resume with a tokenizer other than the one checkpoint `step` recorded."""
    saved = ckpts.restore_tokenizer(step)
    if saved is not None and saved.get("fingerprint") != tokenizer.fingerprint():
        raise UserError(
            f"the tokenizer in {tokenizer_dir} ({tokenizer.kind}, {tokenizer.vocab_size} ids) is not the "
            f"one checkpoint step {step} was trained with ({saved.get('kind')}, {saved.get('vocab_size')} "
            f"ids); put the run's own tokenizer back in {tokenizer_dir}, or train in a new --workdir"
        )


def check_resume(cfg, ckpts: Checkpoints, step: int, log: Callable[[str], None]) -> None:
    """Refuse a config that changes the model or data of checkpoint `step`; log allowed changes."""
    saved = config_lib.from_json(json.dumps(ckpts.restore_config(step)))
    refused, allowed = config_lib.resume_differences(saved, cfg)
    if refused:
        raise UserError(
            f"cannot resume from step {step}: the config changes the model or data "
            f"({'; '.join(refused)}); undo these changes or train in a new --workdir"
        )
    for line in allowed + schedule_on_resume(saved.optim, saved.train.steps, cfg.optim, cfg.train.steps, step):
        log(f"resume: config change allowed: {line}")


def read_tokenizer(directory: Path) -> Tokenizer:
    """load_tokenizer, with a cut-short or malformed tokenizer file named in one line."""
    try:
        return load_tokenizer(directory)
    except UserError:
        raise
    except Exception as e:  # JSON, KeyError, the tokenizers library's parse errors: one line
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        raise UserError(
            f"the tokenizer in {directory} is cut short or malformed ({reason}); put the run's own "
            "tokenizer back (the one it was trained with)"
        ) from None


def load_run(run_dir: str | Path, which: str = "latest"):
    """A run directory → (config, Run, params, tokenizer, step); reads JSON, runs no config file.

    The parameters are restored onto all local devices as data parallelism, whatever layout
    they were saved from."""
    run_dir = Path(run_dir).absolute()
    if not (run_dir / "config.json").is_file():
        raise UserError(
            f"{run_dir} is not an lmjax run directory (no config.json); pass the --workdir of a `lmjax train` run"
        )
    read_json_object(
        run_dir / "config.json",
        "the run's config",
        "restore it from a copy, or from the config saved in a checkpoint (checkpoints/N/config/metadata)",
    )
    tokenizer = read_tokenizer(run_dir / "tokenizer")
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True)
    try:
        step = ckpts.resolve(which)
        cfg = config_lib.from_json(json.dumps(ckpts.restore_config(step)))
        check_tokenizer(ckpts, step, tokenizer, run_dir / "tokenizer")
        run = build_run(cfg, run_dir, tokenizer.vocab_size, MeshParallel(mesh_config()))
        params = run.restore_params(ckpts, step)
    finally:
        ckpts.close()
    return cfg, run, params, tokenizer, step
