"""Which runs a scaling study trains: model sizes from one size parameter, steps from a FLOP budget.

The size rule. One integer s sets the shape: n_layers = s, d_model = 32·s, n_heads = s (heads of
32 dimensions): a fixed aspect ratio d_model / n_layers = 32, so the parameter count grows as s³
and neighbouring sizes differ by 1.3-3.4x in N. Every other model key (MLP kind and ratio,
norms, positions, vocabulary) is the experiment's; s = 2 is the default experiment's shape.

N is the count of weights used in matmuls (flops.py: flops_per_token at seq_len 0, over 6),
D the tokens trained on, C = flops_per_token(model, seq_len) · D as in flops.py (6·N·D plus
attention's scores). A budget C gives each size steps = round(C / (flops_per_token · batch · seq_len)).

Which sizes per budget: the K sizes of the ladder nearest (in log N) to Chinchilla's rule of
thumb N ≈ sqrt(C / 120) (20 tokens per parameter at C = 6·N·D), among those with at least
MIN_STEPS steps. Each run keeps the experiment's batch, learning rate and schedule, with its
warmup the same fraction of its steps as in the experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmjax.errors import UserError
from lmjax.plan import vocab_size_without_data
from lmjax.study.grid import Point

WIDTH_PER_LAYER = 32  # d_model / n_layers
HEAD_DIM = 32
MIN_STEPS = 20  # fewer steps measure the warmup, not the model
MAX_SIZE = 64  # the ladder's top: n_layers 64, d_model 2048


@dataclass(frozen=True)
class Size:
    s: int
    n_layers: int
    d_model: int
    n_heads: int

    def overrides(self) -> list[str]:
        return [f"model.n_layers={self.n_layers}", f"model.d_model={self.d_model}", f"model.n_heads={self.n_heads}"]


def size(s: int) -> Size:
    """The shape of size parameter s ≥ 1."""
    return Size(s, s, WIDTH_PER_LAYER * s, WIDTH_PER_LAYER * s // HEAD_DIM)


def counts(cfg, sz: Size) -> tuple[float, float]:
    """(N: matmul weights, FLOPs per trained token) of size `sz` in the experiment `cfg`."""
    from lmjax.flops import flops_per_token
    from lmjax.models.transformer import TransformerConfig

    m = cfg.model.to_dict()
    m.update(n_layers=sz.n_layers, d_model=sz.d_model, n_heads=sz.n_heads)
    model = TransformerConfig.from_config(_Section(m), vocab_size_without_data(cfg)[0], cfg.data.seq_len)
    return flops_per_token(model, 0) / 6, flops_per_token(model, cfg.data.seq_len)


class _Section(dict):
    """A dict read as a config section (attribute access)."""

    __getattr__ = dict.__getitem__


def _format_budget(c: float) -> str:
    return f"{c:.3g}".replace("+", "")


def plan(cfg, budgets: list[float], per_budget: int) -> list[tuple[Point, dict]]:
    """The study's runs: (point, facts: budget, s, N, D, C) for each budget's `per_budget` sizes."""
    if cfg.model.kind != "transformer":
        raise UserError("a scaling study needs model.kind='transformer' (flops.py counts FLOPs of Transformers only)")
    if not budgets:
        raise UserError("--budgets needs at least one FLOP budget, e.g. --budgets 1e12,3e12,1e13")
    if per_budget < 3:
        raise UserError(f"--per-budget {per_budget} is too few: an IsoFLOP parabola needs at least 3 sizes per budget")
    if per_budget > MAX_SIZE:
        raise UserError(f"--per-budget {per_budget} is more than the size ladder holds ({MAX_SIZE}); use at most that")
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    ladder = [(size(s), *counts(cfg, size(s))) for s in range(1, MAX_SIZE + 1)]
    smallest_ok = MIN_STEPS * ladder[per_budget - 1][2] * tokens_per_step
    warmup_fraction = cfg.optim.warmup_steps / cfg.train.steps
    runs = []
    for budget in sorted(set(budgets)):
        feasible = [r for r in ladder if round(budget / (r[2] * tokens_per_step)) >= MIN_STEPS]
        if len(feasible) < per_budget:
            small = ladder[0]
            steps = round(budget / (small[2] * tokens_per_step))
            raise UserError(
                f"budget {budget:.3g} FLOPs is too small: the smallest model (d_model {small[0].d_model}, 1 layer, "
                f"{small[2]:,.0f} FLOPs per token) gets {steps} steps of {tokens_per_step:,} tokens, and "
                f"{per_budget} sizes need at least {MIN_STEPS} steps each; the smallest budget that works is "
                f"{smallest_ok:.3g}"
            )
        guess = math.sqrt(budget / 120)
        centre = min(range(len(feasible)), key=lambda i: abs(math.log(feasible[i][1] / guess)))
        first = max(0, min(centre - (per_budget - 1) // 2, len(feasible) - per_budget))  # even K: one more above
        for sz, n, fpt in feasible[first : first + per_budget]:
            steps = round(budget / (fpt * tokens_per_step))
            warmup = max(1, round(warmup_fraction * steps)) if cfg.optim.warmup_steps else 0
            overrides = [
                *sz.overrides(),
                f"train.steps={steps}",
                f"optim.warmup_steps={warmup}",
                f"train.save_every={-(-steps // 4)}",
                f"train.eval_every={steps}",
                f"train.log_every={max(1, steps // 10)}",
            ]
            name = f"C={_format_budget(budget)}__d_model={sz.d_model}__n_layers={sz.n_layers}"
            d = steps * tokens_per_step
            values = {"budget": budget, "model.d_model": sz.d_model, "model.n_layers": sz.n_layers, "N": n, "D": d}
            runs.append(
                (Point(name, tuple(overrides), values), {"budget": budget, "s": sz.s, "N": n, "D": d, "C": fpt * d})
            )
    return runs
