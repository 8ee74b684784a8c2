"""Scaling-law fits of a study's runs, each with bootstrap intervals (Hoffmann et al. 2022).

- IsoFLOP profiles (approach 2): per budget C, a parabola of loss in log N; its vertex is N_opt(C),
  and D_opt(C) is read off the line log D(log N) of that budget's runs.
- Power laws N_opt ∝ C^a and D_opt ∝ C^b: least squares in log-log.
- The parametric law (approach 3) L(N, D) = E + A / N^alpha + B / D^beta: Huber loss (delta 1e-3)
  on log L, minimised by L-BFGS (scipy) from a grid of starting points; predicts
  a = beta / (alpha + beta) and b = alpha / (alpha + beta).
Intervals: 95% percentile bootstrap over runs, resampled within each budget.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
STARTS = list(
    itertools.product(
        (0.0, 5.0, 10.0, 20.0), (0.0, 5.0, 10.0, 20.0), (-1.0, 0.0, 1.0), (0.2, 0.5, 1.0), (0.2, 0.5, 1.0)
    )
)  # (log A, log B, log E, alpha, beta)


def isoflop_vertex(n, loss) -> dict | None:
    """The minimum of a parabola of `loss` in log `n`; None when it opens downwards or its vertex
    lies more than the sizes' own span (in log N) beyond them: a nearly straight profile (a
    bootstrap resample can draw one) has no minimum that the sizes tried can locate."""
    x = np.log(np.asarray(n, float))
    if len(set(x.tolist())) < 3:
        return None
    c2, c1, c0 = np.polyfit(x, np.asarray(loss, float), 2)
    if c2 <= 0:
        return None
    vertex = -c1 / (2 * c2)
    span = x.max() - x.min()
    if not x.min() - span <= vertex <= x.max() + span:
        return None
    return {
        "log_n_opt": float(vertex),
        "loss_opt": float(c0 - c1 * c1 / (4 * c2)),
        "coeffs": [c2, c1, c0],
        "inside": bool(x.min() <= vertex <= x.max()),
    }


def isoflop_minima(runs: list[dict]) -> list[dict]:
    """Per budget: N_opt, D_opt, the loss there, and whether the minimum lies among the sizes tried."""
    out = []
    for budget, group in _by_budget(runs).items():
        v = isoflop_vertex([r["N"] for r in group], [r["loss"] for r in group])
        if v is None:
            out.append({"budget": budget, "N_opt": None, "D_opt": None, "loss_opt": None, "inside": False})
            continue
        slope, intercept = np.polyfit(np.log([r["N"] for r in group]), np.log([r["D"] for r in group]), 1)
        out.append(
            {
                "budget": budget,
                "N_opt": math.exp(v["log_n_opt"]),
                "D_opt": math.exp(intercept + slope * v["log_n_opt"]),
                "loss_opt": v["loss_opt"],
                "inside": v["inside"],
                "coeffs": v["coeffs"],
            }
        )
    return out


def power_law(x, y) -> dict | None:
    """y = coefficient · x^exponent by least squares in log-log (None with fewer than 2 points)."""
    pts = [(a, b) for a, b in zip(x, y) if a and b and a > 0 and b > 0]
    if len({a for a, _ in pts}) < 2:
        return None
    exponent, log_coeff = np.polyfit(np.log([a for a, _ in pts]), np.log([b for _, b in pts]), 1)
    return {"exponent": float(exponent), "coefficient": float(math.exp(log_coeff))}


def _huber_objective(theta, log_n, log_d, log_l, delta):
    """Σ Huber(log L̂ − log L) / delta and its gradient; theta = (log A, log B, log E, alpha, beta)."""
    a, b, e, alpha, beta = theta
    z = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = z.max(axis=0)
    p = np.exp(z - top)
    total = p.sum(axis=0)
    pred = top + np.log(total)  # log(A/N^alpha + B/D^beta + E)
    r = pred - log_l
    small = np.abs(r) <= delta
    # Divided by delta: the same minimum, with gradients of order one for L-BFGS's stopping tests.
    value = np.where(small, 0.5 * r * r / delta, np.abs(r) - 0.5 * delta).sum()
    dr = np.where(small, r / delta, np.sign(r))
    w = p / total * dr
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * log_n).sum(), -(w[1] * log_d).sum()])
    return value, grad


def parametric_fit(n, d, loss, starts=STARTS, delta: float = HUBER_DELTA, refine: int = 8) -> dict:
    """E, A, B, alpha, beta of L(N, D) = E + A/N^alpha + B/D^beta: L-BFGS from the `refine` starts
    of lowest objective, the best result kept."""
    args = (np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(np.asarray(loss, float)), delta)
    if len(starts) > refine:
        starts = sorted(starts, key=lambda x0: _huber_objective(np.asarray(x0, float), *args)[0])[:refine]
    best = None
    for x0 in starts:
        res = optimize.minimize(_huber_objective, np.asarray(x0, float), args=args, jac=True, method="L-BFGS-B")
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return {
        "E": _exp(e),
        "A": _exp(a),
        "B": _exp(b),
        "alpha": float(alpha),
        "beta": float(beta),
        "a": float(beta / (alpha + beta)),
        "b": float(alpha / (alpha + beta)),
        "objective": float(best.fun),
        "theta": [float(t) for t in best.x],
    }


def _exp(x: float) -> float:
    """exp, with inf where a diverged fit's parameter overflows (written as null in study.json)."""
    return math.exp(x) if x < 709 else math.inf


def predict(law: dict, n, d):
    """L(N, D) of a parametric fit."""
    return law["E"] + law["A"] / np.asarray(n, float) ** law["alpha"] + law["B"] / np.asarray(d, float) ** law["beta"]


def _by_budget(runs: list[dict]) -> dict:
    groups: dict = {}
    for r in sorted(runs, key=lambda r: (r["budget"], r["N"])):
        groups.setdefault(r["budget"], []).append(r)
    return groups


def fit_all(runs: list[dict]) -> dict:
    """Every fit of one set of runs (dicts with budget, N, D, C, loss), without intervals."""
    minima = isoflop_minima(runs)
    found = [m for m in minima if m["N_opt"]]
    out = {
        "isoflop": minima,
        "N_opt_law": power_law([m["budget"] for m in found], [m["N_opt"] for m in found]),
        "D_opt_law": power_law([m["budget"] for m in found], [m["D_opt"] for m in found]),
    }
    if len(runs) >= 5:  # five parameters
        out["parametric"] = parametric_fit([r["N"] for r in runs], [r["D"] for r in runs], [r["loss"] for r in runs])
    return out


def _resample(runs: list[dict], rng) -> list[dict]:
    return [g[i] for g in _by_budget(runs).values() for i in rng.integers(0, len(g), len(g))]


def _interval(values) -> list[float] | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 10:
        return None
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def fit_with_intervals(runs: list[dict], samples: int = 200, seed: int = 0) -> dict:
    """`fit_all` plus 95% bootstrap intervals of the exponents, N_opt per budget and the law's parameters."""
    # Vectors of a few dozen numbers: BLAS threads only spin (15x slower on a busy machine).
    with threadpool_limits(1):
        return _fit_with_intervals(runs, samples, seed)


def _fit_with_intervals(runs: list[dict], samples: int, seed: int) -> dict:
    fits = fit_all(runs)
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {}
    start = [tuple(fits["parametric"]["theta"])] if "parametric" in fits else None
    for _ in range(samples):
        sample = _resample(runs, rng)
        minima = isoflop_minima(sample)
        found = [m for m in minima if m["N_opt"]]
        for key, field in (("N_opt_law", "N_opt"), ("D_opt_law", "D_opt")):
            law = power_law([m["budget"] for m in found], [m[field] for m in found])
            draws.setdefault(key, []).append(law["exponent"] if law else None)
        for m in minima:
            draws.setdefault(f"N_opt@{m['budget']}", []).append(m["N_opt"])
        if start:
            law = parametric_fit(
                [r["N"] for r in sample], [r["D"] for r in sample], [r["loss"] for r in sample], starts=start
            )
            for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
                draws.setdefault(f"parametric.{k}", []).append(law[k])
    for key in ("N_opt_law", "D_opt_law"):
        if fits[key]:
            fits[key]["exponent_ci95"] = _interval(draws[key])
    for m in fits["isoflop"]:
        m["N_opt_ci95"] = _interval(draws.get(f"N_opt@{m['budget']}", []))
    if start:
        for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
            fits["parametric"][f"{k}_ci95"] = _interval(draws[f"parametric.{k}"])
    fits["bootstrap_samples"] = samples
    return fits
