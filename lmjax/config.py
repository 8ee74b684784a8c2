"""Experiment configs: `experiments/*.py` files whose `get_config()` returns a locked ConfigDict.

Every experiment starts from `base_config()`, the one schema of valid keys. The schema is
locked, so a typo (in the file or in a `--config.KEY=VALUE` override) is an error that names
the nearest valid key instead of a silently ignored setting.
"""

from __future__ import annotations

import ast
import dataclasses
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
from lmjax.models.attention import IMPLEMENTATIONS
from lmjax.models.transformer import TransformerConfig

# The allowed values of every key that takes a name: validation and `lmjax train --help` read them here.
CHOICES = {
    "data.source": ("stdlib", "files", "hub", "saved"),
    "data.format": ("text", "jsonl", "csv", "parquet", "arrow"),
    "data.split_by": ("file", "line", "blank_line"),
    "tokenizer.kind": ("byte", "char", "word", "bpe", "hf", "tiktoken"),
    "model.kind": ("transformer", "lstm"),
    "model.positions": ("learned", "rope", "none"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "swiglu"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"),
    "model.attention": IMPLEMENTATIONS,
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "constant", "step"),
    "train.on_nan": ("halt", "skip"),
    "train.dispatch_ahead": ("auto", "on", "off"),
    "parallel.strategy": ("auto", "single", "pmap", "mesh"),
}


def model_defaults() -> dict:
    """The `model` section's keys and defaults, as TransformerConfig declares them."""
    return {f.name: f.default for f in dataclasses.fields(TransformerConfig)}


def base_config() -> ConfigDict:
    """All valid keys with their defaults. 0 or '' means "derive it" where a comment says so."""
    c = ConfigDict()
    c.seed = 0  # parameter init and dropout

    c.data = ConfigDict()
    c.data.source = "stdlib"
    c.data.paths = ""  # files: comma-separated paths or globs; saved: a save_to_disk dir
    c.data.format = "text"  # files: the file format
    c.data.text_field = "text"
    c.data.split_by = "file"  # text files: one document per file, line or blank_line
    c.data.hub_name = ""
    c.data.hub_config = ""
    c.data.train_split = "train"
    c.data.heldout_split = "validation"  # used when the source has it; else carved
    c.data.heldout_paths = ""  # files: an explicit held-out set instead of carving one
    c.data.heldout_fraction = 0.05  # share of whole documents held out when carving
    c.data.split_seed = 0  # which documents are held out
    c.data.seed = 0  # batch order: the batch of step s is a pure function of (seed, s)
    c.data.seq_len = 128
    c.data.document_mask = False  # attention and positions restart at document boundaries
    c.data.stream = False  # eval: treat the held-out set as one stream, not documents
    c.data.cache_dir = ""  # '' = $LMJAX_CACHE or ~/.cache/lmjax
    c.data.num_proc = 1  # tokenization processes
    c.data.max_documents = 0  # 0 = all; caps each split (for quick experiments)

    c.tokenizer = ConfigDict()
    c.tokenizer.kind = "byte"
    c.tokenizer.vocab_size = 0  # char / word: cap (0 = every one seen); bpe: target size (0 = 4096)
    c.tokenizer.path = ""  # hf: tokenizer.json or directory; tiktoken: a local .tiktoken file (never downloaded)

    # The model's keys are TransformerConfig's fields (the LSTM reads d_model, n_layers,
    # dropout, tie_embeddings and dtype of them), plus the kind of model.
    c.model = ConfigDict({"kind": "transformer", **model_defaults()})

    c.optim = ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.1  # cosine: final lr = lr * min_lr_ratio
    c.optim.decay_factor = 0.5  # step: lr *= decay_factor every decay_every steps ...
    c.optim.decay_start = 0  # ... starting at this step
    c.optim.decay_every = 1000
    c.optim.weight_decay = 0.1  # never on biases, norms or embeddings
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.momentum = 0.0  # sgd
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 = off

    c.train = ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16  # global batch, in sequences, over all devices and hosts
    c.train.grad_accum = 1  # micro-batches per step, accumulated inside the jitted step
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_batches = 4  # held-out batches (the same ones every time) during training
    c.train.save_every = 200
    c.train.keep = 3  # last N checkpoints kept, plus the best by held-out loss
    c.train.on_nan = "halt"
    c.train.resume = True  # resume from the latest checkpoint in the workdir
    c.train.peak_flops = 0.0  # per device, for MFU; 0 = table or a measured probe
    c.train.profile_steps = 0  # >0: trace this many steps with jax.profiler
    # Queue step k+1 before step k ends. auto = on, except on CPU with
    # lmjax.scratch_cache loaded: one step at a time lets XLA reuse its scratch memory.
    c.train.dispatch_ahead = "auto"
    c.train.tensorboard = True
    c.train.wandb = False

    c.parallel = ConfigDict()
    c.parallel.strategy = "auto"
    c.parallel.data = -1  # mesh axis sizes; -1 = the rest of the devices
    c.parallel.fsdp = 1
    c.parallel.tensor = 1
    c.parallel.distributed = False  # call jax.distributed.initialize (implied by the keys below or a launcher)
    c.parallel.coordinator = ""  # host:port of process 0; '' = JAX_COORDINATOR_ADDRESS or the launcher's
    c.parallel.num_processes = 0  # 0 = JAX_NUM_PROCESSES or the launcher's (SLURM, Open MPI, TPU pod)
    c.parallel.process_id = -1  # -1 = JAX_PROCESS_ID or the launcher's

    c.eval = ConfigDict()
    c.eval.stride = 0  # 0 = seq_len (non-overlapping windows)
    c.eval.batch_size = 32

    c.sample = ConfigDict()
    c.sample.prompt = ""
    c.sample.max_new_tokens = 200
    c.sample.temperature = 0.8
    c.sample.top_k = 0
    c.sample.top_p = 1.0
    c.sample.seed = 0

    c.lock()
    return c


# Keys whose change on resume alters neither the model nor the data stream.
RESUME_SAFE_PREFIXES = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.keep",
    "train.on_nan",
    "train.resume",
    "train.peak_flops",
    "train.profile_steps",
    "train.dispatch_ahead",
    "train.tensorboard",
    "train.wandb",
    "parallel.",
    "eval.",
    "sample.",
    "data.num_proc",
    "data.cache_dir",
    "model.attention",
    "model.cpu_kernels",  # how the same function is computed, not which
)


def leaf_keys(cfg: ConfigDict, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf, e.g. ['seed', 'data.source', ...]."""
    out = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if isinstance(v, ConfigDict):
            out += leaf_keys(v, path + ".")
        else:
            out.append(path)
    return out


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


def get(cfg: ConfigDict, key: str) -> Any:
    """The value at a dotted key, e.g. get(cfg, 'train.steps')."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def set_value(cfg: ConfigDict, key: str, value: Any) -> None:
    """Set the value at a dotted key (an existing one: the schema stays locked)."""
    *parents, leaf = key.split(".")
    with cfg.unlocked():
        node = get(cfg, ".".join(parents)) if parents else cfg
        node[leaf] = value


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


def get_dict(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d
