"""Optax optimizer and learning-rate schedule from config section `optim`."""

from __future__ import annotations

import jax
import optax

NO_DECAY_NAMES = ("bias", "scale", "wte", "wpe", "embedding")


def schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine to lr * min_lr_ratio, constant, or step decay."""
    warm = max(optim.warmup_steps, 0)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if warm else optim.lr, optim.lr, warm, max(total_steps, warm + 1), optim.lr * optim.min_lr_ratio)
    if optim.schedule == "constant":
        main = optax.constant_schedule(optim.lr)
    else:  # step: multiply by decay_factor every decay_every steps from decay_start on
        main = lambda s: optim.lr * optim.decay_factor ** (  # noqa: E731
            jax.numpy.maximum(s - optim.decay_start + optim.decay_every, 0) // optim.decay_every)
    if not warm:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warm), main], [warm])


def decay_mask(params):
    """True for weights that get weight decay: matrices, not biases, norms or embeddings."""
    def keep(path, leaf):
        names = [getattr(p, "key", str(p)) for p in path]
        return leaf.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(optim, total_steps)
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    if optim.name == "adamw":
        parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                 weight_decay=optim.weight_decay, mask=decay_mask))
    else:
        parts.append(optax.sgd(lr, momentum=optim.momentum or None))
    return optax.chain(*parts), lr
