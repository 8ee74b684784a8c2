"""A scaling study's table and PNG plots: IsoFLOP curves with their minima, the compute-optimal
frontier with its power laws, and the parametric law's predicted against measured loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter

from lmjax.study.fit import predict


def _figure(width=8.0, height=5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _ci(ci) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "[-]"


def plot_isoflop(runs: list[dict], fits: dict, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    for i, m in enumerate(fits["isoflop"]):
        group = sorted((r["N"], r["loss"]) for r in runs if r["budget"] == m["budget"])
        ax.plot(*zip(*group), "o", color=f"C{i % 10}", label=f"C = {m['budget']:.3g}")
        if m.get("coeffs"):
            x = np.linspace(math.log(group[0][0]), math.log(group[-1][0]), 100)
            ax.plot(np.exp(x), np.polyval(m["coeffs"], x), "-", color=f"C{i % 10}", alpha=0.7)
        if m["N_opt"]:
            ax.plot([m["N_opt"]], [m["loss_opt"]], "*", ms=14, color=f"C{i % 10}", markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel("N (matmul parameters)")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title("IsoFLOP profiles: a parabola in log N per budget; stars: fitted minima")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_frontier(fits: dict, path: Path) -> Path:
    fig = _figure(10, 4.5)
    found = [m for m in fits["isoflop"] if m["N_opt"]]
    for j, (field, law_key, label) in enumerate(
        (("N_opt", "N_opt_law", "N_opt (parameters)"), ("D_opt", "D_opt_law", "D_opt (tokens)"))
    ):
        ax = fig.add_subplot(1, 2, j + 1)
        c = [m["budget"] for m in found]
        ax.plot(c, [m[field] for m in found], "o", color="C0", label="IsoFLOP minima")
        law = fits.get(law_key)
        if law:
            xs = np.geomspace(min(c), max(c), 50)
            ax.plot(
                xs,
                law["coefficient"] * xs ** law["exponent"],
                "-",
                color="C1",
                label=f"∝ C^{law['exponent']:.2f} {_ci(law.get('exponent_ci95'))}",
            )
        p = fits.get("parametric")
        if p:
            ax.plot([], [], " ", label=f"parametric: exponent {p['a' if j == 0 else 'b']:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ys = [m[field] for m in found]
        for axis in (ax.xaxis, ax.yaxis):  # ticks at the data: a range under 10x has no decade to label
            axis.set_minor_formatter(NullFormatter())
        ax.set_xticks(c, [f"{v:.3g}" for v in c])
        ax.set_yticks(ys, [f"{v:.3g}" for v in ys])
        ax.set_xlabel("C (training FLOPs)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("compute-optimal frontier")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_predicted(runs: list[dict], fits: dict, path: Path) -> Path:
    fig = _figure(5.5, 5.5)
    ax = fig.add_subplot()
    law = fits["parametric"]
    measured = [r["loss"] for r in runs]
    predicted = predict(law, [r["N"] for r in runs], [r["D"] for r in runs])
    budgets = sorted({r["budget"] for r in runs})
    for i, b in enumerate(budgets):
        idx = [k for k, r in enumerate(runs) if r["budget"] == b]
        ax.plot([measured[k] for k in idx], [predicted[k] for k in idx], "o", color=f"C{i % 10}", label=f"C = {b:.3g}")
    lo, hi = min(measured + list(predicted)), max(measured + list(predicted))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("measured held-out loss")
    ax.set_ylabel("L(N, D) fitted")
    ax.set_title(
        f"E={law['E']:.3g} + {law['A']:.3g}/N^{law['alpha']:.2f} + {law['B']:.3g}/D^{law['beta']:.2f}", fontsize=9
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_plots(out: Path, runs: list[dict], fits: dict) -> list[Path]:
    paths = [plot_isoflop(runs, fits, out / "isoflop.png")]
    if any(m["N_opt"] for m in fits["isoflop"]):
        paths.append(plot_frontier(fits, out / "frontier.png"))
    if "parametric" in fits:
        paths.append(plot_predicted(runs, fits, out / "predicted.png"))
    return paths


def format_study(runs: list[dict], fits: dict) -> str:
    """Every run, each budget's optimum, and the fitted laws with their 95% intervals."""
    lines = [
        f"{'budget C':>10} {'d_model':>7} {'layers':>6} {'N':>10} {'D tokens':>10} {'steps':>6} {'loss':>8} {'time':>6}"
    ]
    for r in sorted(runs, key=lambda r: (r["budget"], r["N"])):
        lines.append(
            f"{r['budget']:>10.3g} {r['d_model']:>7} {r['n_layers']:>6} {r['N']:>10,.0f} {r['D']:>10,.0f} "
            f"{r['steps']:>6} {r['loss']:>8.4f} {r.get('time') or 0:>5.0f}s"
        )
    lines.append("")
    lines.append(f"{'budget C':>10} {'N_opt':>10} {'95% CI':>22} {'D_opt':>10} {'loss there':>10}")
    for m in fits["isoflop"]:
        if not m["N_opt"]:
            lines.append(f"{m['budget']:>10.3g}   no minimum: the losses do not curve upwards at both ends")
            continue
        note = "" if m["inside"] else "  (outside the sizes tried: an extrapolation)"
        lines.append(
            f"{m['budget']:>10.3g} {m['N_opt']:>10,.0f} {_ci(m.get('N_opt_ci95')):>22} {m['D_opt']:>10,.0f} "
            f"{m['loss_opt']:>10.4f}{note}"
        )
    lines.append("")
    for key, what in (("N_opt_law", "N_opt ∝ C^a"), ("D_opt_law", "D_opt ∝ C^b")):
        law = fits.get(key)
        lines.append(
            f"{what}: "
            + (
                f"{law['exponent']:.3f}  95% CI {_ci(law.get('exponent_ci95'))}"
                if law
                else "needs minima at 2 budgets or more"
            )
        )
    p = fits.get("parametric")
    if p:
        lines.append(
            "L(N, D) = E + A/N^alpha + B/D^beta (Huber on log loss): "
            + ", ".join(f"{k} {p[k]:.3g} {_ci(p.get(k + '_ci95'))}" for k in ("E", "A", "B", "alpha", "beta"))
        )
        lines.append(
            f"  → a = beta/(alpha+beta) {p['a']:.3f} {_ci(p.get('a_ci95'))}, "
            f"b = alpha/(alpha+beta) {p['b']:.3f} {_ci(p.get('b_ci95'))}"
        )
    else:
        lines.append("parametric L(N, D): needs at least 5 runs")
    lines.append(f"(intervals: 95% bootstrap over runs, {fits.get('bootstrap_samples', 0)} resamples)")
    return "\n".join(lines)
