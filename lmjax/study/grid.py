"""`--grid KEY=V1,V2,...` → points: the Cartesian product of the values (or a seeded random sample
of it), each a list of `KEY=VALUE` overrides with a run name made from them.

Keys and values are checked by lmjax.config (the nearest key for a typo, the expected type for a
bad value), and every point's whole config is validated before any run starts.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field

from lmjax import config as config_lib
from lmjax.errors import UserError


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its directory name and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]  # ("optim.lr=0.001", ...), applied to the sweep's base config
    values: dict = field(default_factory=dict, compare=False)  # key → typed value, for tables and plots


def parse_grid(specs: list[str], base) -> dict[str, list[str]]:
    """['optim.lr=1e-3,3e-3', ...] → {'optim.lr': ['1e-3', '3e-3']}, each value checked against `base`."""
    if not specs:
        raise UserError("a sweep needs at least one --grid KEY=V1,V2,... (e.g. --grid optim.lr=1e-3,3e-3)")
    valid = set(config_lib.leaf_keys(base))
    grid: dict[str, list[str]] = {}
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"--grid '{spec}' needs the form KEY=V1,V2,... (e.g. --grid optim.lr=1e-3,3e-3)")
        key, text = spec.split("=", 1)
        key = key.strip().removeprefix("--config.").removeprefix("config.")
        if key not in valid:
            raise config_lib.unknown_key_error(key, f"--grid {spec}")
        if key in grid:
            raise UserError(f"--grid names '{key}' twice; give all its values in one --grid {key}=V1,V2,...")
        if not text.strip():
            raise UserError(f"--grid {key}= has no values; give at least one: --grid {key}=V1,V2,...")
        default = config_lib.get(base, key)
        seen, texts = set(), []
        for t in (t.strip() for t in text.split(",")):
            value = config_lib._parse_value(key, t, default)  # raises the one-line type error
            if repr(value) not in seen:  # '1e-3' and '0.001' are one point
                seen.add(repr(value))
                texts.append(t)
        grid[key] = texts
    return grid


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each key ('lr' for 'optim.lr'), or the whole key where two share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def format_value(value) -> str:
    """A value as it appears in a run name: shortest exact float ('0.001'), safe characters only."""
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text) or "_"


def run_name(values: dict) -> str:
    """{'optim.lr': 0.001, 'model.d_model': 64} → 'lr=0.001__d_model=64' (in the order given)."""
    short = _short_keys(list(values))
    return "__".join(f"{short[k]}={format_value(v)}" for k, v in values.items())


def expand(grid: dict[str, list[str]], base, random_points: int = 0, seed: int = 0) -> list[Point]:
    """The points of `grid` (first key varies slowest); `random_points` > 0 samples that many of them."""
    keys = list(grid)
    combos = list(itertools.product(*grid.values()))
    if random_points < 0:
        raise UserError(f"--random must be positive, got {random_points}")
    if random_points:
        chosen = sorted(random.Random(seed).sample(range(len(combos)), min(random_points, len(combos))))
        combos = [combos[i] for i in chosen]
    points, names = [], set()
    for combo in combos:
        values = {k: config_lib._parse_value(k, t, config_lib.get(base, k)) for k, t in zip(keys, combo)}
        name = run_name(values)
        if name in names:  # two values that differ only in characters a name cannot hold
            name = f"{name}__{len(points)}"
        names.add(name)
        points.append(Point(name, tuple(f"{k}={t}" for k, t in zip(keys, combo)), values))
    return points


def point_config(base, point: Point):
    """The validated, locked config of one point: a copy of `base` with its overrides."""
    cfg = config_lib.apply_overrides(config_lib.from_json(config_lib.to_json(base)), point.overrides)
    try:
        config_lib.validate(cfg)
    except UserError as e:
        raise UserError(f"sweep point {point.name}: {e}") from None
    return cfg
