"""Experiment configs: `experiments/*.py` files whose `get_config()` returns a locked ConfigDict.

Every experiment starts from `base_config()`, the one schema of valid keys. The schema is
locked, so a typo (in the file or in a `--config.KEY=VALUE` override) is an error that names
the nearest valid key instead of a silently ignored setting.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from lmjax.errors import UserError

# The schema, re-exported: experiment files import base_config from here.
from lmjax.schema import (  # noqa: F401
    CHOICES,
    RESUME_SAFE_PREFIXES,
    base_config,
    get,
    get_dict,
    leaf_keys,
    model_defaults,
    set_value,
)


def _nearest(key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    last = key.split(".")[-1]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # match on the last component alone (typo inside a sub-dict)
        by_leaf = {v.split(".")[-1]: v for v in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(last, list(by_leaf), n=1, cutoff=0.5)]
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_key_error(key: str, where: str) -> UserError:
    valid = leaf_keys(base_config())
    return UserError(f"unknown config key '{key}' in {where}{_nearest(key, valid)}")


def _check_schema(cfg: ConfigDict, where: str) -> None:
    valid = set(leaf_keys(base_config()))
    for key in leaf_keys(cfg):
        if key not in valid:
            raise unknown_key_error(key, where)


def load_experiment(path: str | Path) -> ConfigDict:
    """Run `get_config()` of an experiment file and check its keys against the schema."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file '{path}' does not exist; pass a path like experiments/default.py")
    spec = importlib.util.spec_from_file_location(f"lmjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise UserError(
                f"experiment file '{path}' defines no get_config(); add `def get_config(): ...` returning "
                "lmjax.config.base_config() with your changes"
            )
        cfg = module.get_config()
    except (AttributeError, KeyError) as e:
        m = re.search(r"""Key ["']?([\w.]+)["']? does not exist""", str(e))
        if m:
            raise unknown_key_error(m.group(1), str(path)) from None
        raise _experiment_error(path, e) from None
    except SyntaxError as e:
        raise UserError(
            f"experiment file '{path}' has a syntax error at line {e.lineno}: {e.msg}; fix the file"
        ) from None
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise _experiment_error(path, e) from None
    if not isinstance(cfg, ConfigDict):
        raise UserError(
            f"get_config() in '{path}' returned {type(cfg).__name__}; return an ml_collections.ConfigDict from "
            "lmjax.config.base_config()"
        )
    _check_schema(cfg, str(path))
    cfg.lock()
    return cfg


def _experiment_error(path: Path, error: Exception) -> UserError:
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).absolute() == path.absolute()]
    where = f" at line {frames[-1].lineno}" if frames else ""
    return UserError(f"experiment file '{path}' failed{where}: {type(error).__name__}: {error}; fix the file")


def _parse_value(key: str, text: str, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        return type(default)(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        raise UserError(
            f"config key '{key}' expects {'an' if kind.__name__[0] in 'aeiou' else 'a'} {kind.__name__} (default "
            f"{default!r}), got '{text}'"
        ) from None


def apply_overrides(cfg: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
    """Apply `KEY=VALUE` strings (KEY dotted, e.g. 'train.steps=100'), typed by the default."""
    valid = leaf_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' needs the form --config.KEY=VALUE")
        key, text = item.split("=", 1)
        key = key.removeprefix("--config.").removeprefix("config.")
        if key not in valid:
            raise unknown_key_error(key, "the command line")
        set_value(cfg, key, _parse_value(key, text, get(cfg, key)))
    return cfg


def validate(cfg: ConfigDict) -> None:
    """Check choices and ranges that a type check cannot; raise UserError naming the key and its valid range."""
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            raise UserError(f"config key '{key}' is '{value}'; choose one of {', '.join(allowed)}")
    seed_max = 2**32 - 1  # jax.random.PRNGKey takes a 32-bit seed
    step_max = 2**31 - 1  # steps and sizes reach JAX as int32
    # key: (low, high, low_open, high_open); None = unbounded. Inclusive unless open.
    ranges = {
        "seed": (0, seed_max, False, False),
        "data.seed": (0, seed_max, False, False),
        "data.split_seed": (0, seed_max, False, False),
        "sample.seed": (0, seed_max, False, False),
        "data.seq_len": (0, 2**31 - 1, True, False),
        "data.num_proc": (1, 1024, False, False),
        "data.max_documents": (0, step_max, False, False),
        "tokenizer.vocab_size": (0, 2**31 - 1, False, False),
        "model.vocab_size": (0, 2**31 - 1, False, False),
        "model.d_model": (0, step_max, True, False),
        "model.n_layers": (0, step_max, True, False),
        "model.n_heads": (0, None, True, False),
        "model.n_kv_heads": (0, None, False, False),
        "model.d_ff": (0, None, False, False),
        "model.max_len": (0, 2**31 - 1, False, False),
        "model.rope_base": (0, None, True, False),
        "model.norm_eps": (0, None, True, False),
        "model.dropout": (0, 1, False, True),
        "optim.lr": (0, None, True, False),
        "optim.warmup_steps": (0, step_max, False, False),
        "optim.min_lr_ratio": (0, 1, False, False),
        "optim.decay_factor": (0, None, True, False),
        "optim.decay_start": (0, step_max, False, False),
        "optim.decay_every": (0, step_max, True, False),
        "optim.weight_decay": (0, None, False, False),
        "optim.b1": (0, 1, False, True),
        "optim.b2": (0, 1, False, True),
        "optim.eps": (0, None, True, False),
        "optim.momentum": (0, 1, False, True),
        "optim.clip_norm": (0, None, False, False),
        "train.steps": (0, step_max, True, False),
        "train.batch_size": (0, step_max, True, False),
        "train.grad_accum": (0, None, True, False),
        "train.log_every": (0, step_max, True, False),
        "train.eval_every": (0, step_max, True, False),
        "train.eval_batches": (0, None, True, False),
        "train.save_every": (0, step_max, True, False),
        "train.keep": (0, None, True, False),
        "train.peak_flops": (0, None, False, False),
        "train.profile_steps": (0, None, False, False),
        "parallel.num_processes": (0, None, False, False),
        "parallel.process_id": (-1, None, False, False),
        "eval.stride": (0, None, False, False),
        "eval.batch_size": (0, None, True, False),
        "sample.max_new_tokens": (0, None, True, False),
        "sample.temperature": (0, None, True, False),
        "sample.top_k": (0, None, False, False),
        "sample.top_p": (0, 1, True, False),
    }
    for key, bounds in ranges.items():
        _check_range(key, get(cfg, key), *bounds)
    for key in ("parallel.data", "parallel.fsdp", "parallel.tensor"):
        if get(cfg, key) == 0 or get(cfg, key) < -1:
            raise UserError(f"config key '{key}' must be -1 (the rest of the devices) or positive, got {get(cfg, key)}")
    m = cfg.model
    if m.kind == "transformer":
        if m.d_model % m.n_heads:
            raise UserError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads % kv:
            raise UserError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv}")
        if m.positions == "rope" and (m.d_model // m.n_heads) % 2:
            raise UserError("rotary positions need an even head size (model.d_model / model.n_heads)")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by train.grad_accum={cfg.train.grad_accum}"
        )
    if not 0.0 < cfg.data.heldout_fraction < 1.0:
        raise UserError(f"data.heldout_fraction must be in (0, 1), got {cfg.data.heldout_fraction}")
    if m.max_len and m.max_len < cfg.data.seq_len:
        raise UserError(
            f"model.max_len={m.max_len} is shorter than data.seq_len={cfg.data.seq_len}; raise model.max_len or set "
            "it to 0"
        )


def _check_range(key: str, value, low, high, low_open: bool, high_open: bool) -> None:
    """UserError unless `value` lies in the interval; the message states the interval."""
    finite = not isinstance(value, float) or math.isfinite(value)
    ok = (
        finite
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if ok:
        return
    if high is None:
        valid = f"{'>' if low_open else '>='} {low}"
    else:
        valid = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise UserError(f"config key '{key}' must be {valid}, got {value}")


def load(path: str | Path, overrides: Iterable[str] = ()) -> ConfigDict:
    """Experiment file + overrides → validated, locked config."""
    cfg = apply_overrides(load_experiment(path), overrides)
    validate(cfg)
    return cfg


def to_json(cfg: ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
    """A saved config.json → locked config (keys added to the schema later take defaults)."""
    cfg = base_config()
    saved = json.loads(text)
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(saved)
    valid = set(leaf_keys(cfg))
    for key, value in flat.items():
        if key in valid:
            set_value(cfg, key, value)
    return cfg


def resume_differences(saved: ConfigDict, current: ConfigDict) -> tuple[list[str], list[str]]:
    """Keys that differ, split into (refused: alter model or data, allowed: safe to change)."""
    a, b = saved.to_dict(), current.to_dict()
    refused, allowed = [], []
    for key in leaf_keys(current):
        va, vb = get_dict(a, key), get_dict(b, key)
        if va != vb:
            entry = f"{key}: {va!r} -> {vb!r}"
            (allowed if key.startswith(RESUME_SAFE_PREFIXES) else refused).append(entry)
    return refused, allowed
