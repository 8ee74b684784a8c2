"""Optax optimizer and learning-rate schedule from config section `optim`."""

from __future__ import annotations

import jax
import optax

from lmjax.errors import UserError

NO_DECAY_NAMES = ("bias", "scale", "wte", "wpe", "embedding")


def schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup over optim.warmup_steps, then cosine to lr * min_lr_ratio at step
    `total_steps`, constant, or step decay: lr * decay_factor ** (k + 1) from step
    decay_start + k * decay_every on (absolute steps, warmup included). Steps are counted from 0."""
    warm = max(optim.warmup_steps, 0)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if warm else optim.lr, optim.lr, warm, max(total_steps, warm + 1), optim.lr * optim.min_lr_ratio
        )
    phases = [optax.linear_schedule(0.0, optim.lr, warm)] if warm else []
    boundaries = [warm] if warm else []
    phases.append(optax.constant_schedule(optim.lr))
    if optim.schedule == "step":
        if optim.decay_start < warm:
            raise UserError(
                f"optim.decay_start={optim.decay_start} falls inside the warmup "
                f"(optim.warmup_steps={warm}); set optim.decay_start >= {warm} or lower optim.warmup_steps"
            )
        if optim.decay_every < 1:
            raise UserError(f"optim.decay_every={optim.decay_every} must be at least 1")
        # join_schedules hands each phase the steps since its boundary: the decay counts from decay_start.
        phases.append(
            optax.exponential_decay(
                optim.lr * optim.decay_factor, optim.decay_every, optim.decay_factor, staircase=True
            )
        )
        boundaries.append(optim.decay_start)
    return phases[0] if len(phases) == 1 else optax.join_schedules(phases, boundaries)


def schedule_on_resume(saved_optim, saved_steps: int, optim, steps: int, step: int) -> list[str]:
    """What resuming at `step` with train.steps changed from `saved_steps` to `steps` does to the
    learning rate, as [one line] ([] when train.steps is unchanged).

    The rule: the schedule is always the one the current config defines, so the cosine decay
    moves its end to the new train.steps (the lr at `step` may jump); constant and step
    schedules do not depend on train.steps and are unchanged.
    """
    if saved_steps == steps:
        return []
    before = float(schedule(saved_optim, saved_steps)(step))
    after = float(schedule(optim, steps)(step))
    if optim.schedule == "cosine":
        return [
            f"train.steps {saved_steps} -> {steps}: the cosine decay now ends at step {steps} "
            f"(the schedule follows the current train.steps); lr at step {step}: {before:.4g} -> {after:.4g}"
        ]
    return [
        f"train.steps {saved_steps} -> {steps}: the {optim.schedule} schedule does not depend on train.steps; "
        f"lr at step {step}: {before:.4g} -> {after:.4g}"
    ]


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
        parts.append(
            optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)
        )
    else:
        parts.append(optax.sgd(lr, momentum=optim.momentum or None))
    return optax.chain(*parts), lr
