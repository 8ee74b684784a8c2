"""Hugging Face model files: safetensors weights in and out, config.json, and the refusal of pickles.

Only safetensors are read and written: a pickle checkpoint (.bin, .pt) is refused by its name,
never opened, since unpickling can run arbitrary code. bfloat16 tensors are read through
safetensors' flax framework (jax's ml_dtypes bfloat16); every tensor comes back as float32 numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lmjax.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def _refuse_pickle(path: Path) -> UserError:
    return UserError(
        f"{path} is a pickle checkpoint, which lmjax never loads (unpickling can run arbitrary code); "
        "convert it once with transformers: `AutoModelForCausalLM.from_pretrained(DIR)"
        ".save_pretrained(OUT, safe_serialization=True)`, then import OUT"
    )


def find_weights(src: str | Path) -> tuple[Path, list[Path]]:
    """A model directory or a .safetensors file → (directory holding config.json, weight files)."""
    src = Path(src)
    if src.is_file():
        if src.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(src)
        if src.suffix != ".safetensors":
            raise UserError(f"{src} is neither a .safetensors file nor a Hugging Face model directory")
        return src.parent, [src]
    if not src.is_dir():
        raise UserError(
            f"{src} does not exist; pass a Hugging Face model directory (config.json + {WEIGHTS}) "
            "or a .safetensors file"
        )
    if (src / WEIGHTS).is_file():
        return src, [src / WEIGHTS]
    if (src / WEIGHTS_INDEX).is_file():
        shards = sorted(set(json.loads((src / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        return src, [src / s for s in shards]
    pickles = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _refuse_pickle(pickles[0])
    raise UserError(
        f"{src} holds no {WEIGHTS} (nor {WEIGHTS_INDEX}); "
        "save the model with save_pretrained(DIR, safe_serialization=True)"
    )


def read_hf_config(directory: Path) -> dict:
    """DIRECTORY/config.json as a dict."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(
            f"{directory} has no config.json; the weights need the Hugging Face config saved next to "
            "them (model.config.save_pretrained(DIR))"
        )
    return json.loads(path.read_text())


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 numpy arrays (bfloat16 included, exactly)."""
    # The flax framework gives bfloat16 as a jax array; one tensor at a time bounds the copies held.
    with safe_open(str(path), framework="flax") as f:
        return {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}


def read_weights(files: list[Path]) -> dict[str, np.ndarray]:
    """The tensors of all weight files (the shards of one model), by name."""
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return tensors


def write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """`tensors` as one float32 safetensors file that transformers' from_pretrained reads."""
    # transformers reads only files whose metadata names a framework it knows.
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata={"format": "pt"}
    )
