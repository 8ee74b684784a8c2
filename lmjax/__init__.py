"""lmjax: train, resume, evaluate and sample language models in JAX."""

import os
from pathlib import Path

__version__ = "0.1.0"


def default_cache_dir() -> Path:
    """Where lmjax keeps what it builds once (data caches, the CPU peak, native code): $LMJAX_CACHE, else ~/.cache/lmjax."""
    return Path(os.environ.get("LMJAX_CACHE") or Path.home() / ".cache" / "lmjax")
