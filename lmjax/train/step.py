"""The train step: one pure function (state, batch) → (state, metrics), jitted or pmapped.

A batch is a dict of int32[B, T] arrays: 'inputs', 'targets', and optionally 'weights'
(float32, 0 where a target is padding), 'positions' and 'segment_ids' (document masking).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from lmjax.train.loss import batch_nll


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # base dropout key; each step folds in its step number
    skipped: jax.Array  # int32 scalar: updates skipped for NaN/Inf (train.on_nan='skip')


def create_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=rng,
        skipped=jnp.zeros((), jnp.int32),
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    lr_schedule: Callable,
    grad_accum: int = 1,
    axis_name: str | None = None,
    on_nan: str = "halt",
):
    """Build `train_step(state, batch) -> (state, metrics)`.

    The loss is token-weighted over the whole global batch: gradients of the summed NLL are
    summed over micro-batches (a `lax.scan` inside the step when grad_accum > 1) and over
    devices (`psum` when `axis_name` names a pmap axis), then divided by the total number of
    targets.
    """

    def nll_sum(params, micro, rng):
        nll_BxT, weights_BxT = batch_nll(model, params, micro, deterministic=False, rngs={"dropout": rng})
        return nll_BxT.sum(), weights_BxT.sum()

    grad_fn = jax.value_and_grad(nll_sum, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

        if grad_accum == 1:  # no loop: XLA fuses across it and keeps no gradient accumulator
            (nll, count), grads = grad_fn(state.params, batch, jax.random.fold_in(rng, 0))
        else:

            def accumulate(carry, xs):
                i, mb = xs
                (nll, count), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                total_nll, total_count, total_g = carry
                return (total_nll + nll, total_count + count, jax.tree.map(jnp.add, total_g, g)), None

            # Micro-batch i takes rows i, i + accum, ...: each device's block of rows feeds every
            # micro-batch, so accumulation moves no data between devices.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch
            )
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (nll, count, grads), _ = jax.lax.scan(
                accumulate,
                (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros),
                (jnp.arange(grad_accum), micro),
            )
        if axis_name is not None:
            nll, count, grads = jax.lax.psum((nll, count, grads), axis_name)
        loss = nll / count
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Finite loss and gradients can still overflow the parameters (a huge lr): check them too,
        # so a checkpoint never holds an Inf/NaN state.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        if on_nan == "skip":  # keep the previous parameters and moments for a bad update

            def keep(new, old):
                return jnp.where(finite, new, old)

            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, skipped=state.skipped + (~finite).astype(jnp.int32)
        )
        metrics = {
            "loss": loss,
            "tokens": count,
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(params),
            "lr": lr_schedule(state.step),
            "finite": finite,
            "skipped": new_state.skipped,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, axis_name: str | None = None):
    """`eval_step(params, batch) -> {'nll': sum, 'tokens': count}` over weighted targets."""

    def eval_step(params, batch: dict):
        nll_BxT, weights_BxT = batch_nll(model, params, batch)
        out = {"nll": nll_BxT.sum(), "tokens": weights_BxT.sum()}
        return jax.lax.psum(out, axis_name) if axis_name else out

    return eval_step
