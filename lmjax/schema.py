"""The config's schema: every valid key with its default, the allowed names, and dotted-key
access. `lmjax.config` loads, checks and saves configs built from it."""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict

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
    c.data.num_proc = 1  # cores for tokenizing: tiktoken's threads, else processes (HF: Rayon's own threads)
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


def get_dict(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d
