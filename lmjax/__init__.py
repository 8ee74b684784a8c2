"""lmjax: train, resume, evaluate and sample language models in JAX.

The package in the order data flows through it:

    config.py          experiments/*.py → a checked, locked ConfigDict
    data/              sources → tokenizer → packed token cache → batches(step)
    models/            the Transformer (GPT-2 / LLaMA options) and the LSTM; attention kernels
    train/loss.py      the one token-weighted loss
    train/step.py      train_step(state, batch) → (state, metrics): pure, jitted once
    train/parallel.py  how the step meets the devices: a mesh with named shardings, or pmap
    train/loop.py      the train loop: restore or init, step, log, evaluate, save
    checkpoint.py      Orbax checkpoints; metrics.py: logs while training
    run.py             a run directory's shared life: build, load, restore
    evaluate.py        perplexity and bits per byte · sample.py: generation
    runs.py            tables and plots of finished runs · interop/: Hugging Face weights
    cli.py             `lmjax train | eval | sample | ...` on top of all of it
"""

import os
from pathlib import Path

__version__ = "0.1.0"


def default_cache_dir(configured: str | os.PathLike = "") -> Path:
    """Where lmjax keeps what it builds once (data caches, the CPU peak, native code): `configured`
    (the config's data.cache_dir) when set, else $LMJAX_CACHE, else ~/.cache/lmjax."""
    return Path(configured or os.environ.get("LMJAX_CACHE") or Path.home() / ".cache" / "lmjax")
