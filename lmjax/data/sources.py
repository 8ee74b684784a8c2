"""Text sources through Hugging Face `datasets`: the standard library default, local files,
a dataset saved with `save_to_disk`, or the hub. Each gives a train and a held-out split of
whole documents in a column named 'text'."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmjax.errors import UserError

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class Corpus:
    train: "datasets.Dataset"  # noqa: F821
    heldout: "datasets.Dataset"  # noqa: F821
    description: str
    fingerprint: str


def stdlib_files() -> list[str]:
    """The interpreter's standard library .py files, without site-packages and test folders."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def is_heldout(key: str, fraction: float, seed: int) -> bool:
    """Deterministic membership of a document (by a stable key) in the held-out split."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _load(builder: str, data_files, **kwargs):
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(builder, data_files=data_files, **kwargs)


def _resolve_files(spec: str, key: str) -> list[str]:
    if not spec.strip():
        raise UserError(f"data.source='files' needs {key}: comma-separated paths or globs")
    files = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not matches:
            raise UserError(f"{key}: '{part}' matches no file; check the path (globs like data/*.txt are allowed)")
        files += [m for m in matches if os.path.isfile(m)]
    return files


BUILDERS = {"text": "text", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}
SAMPLE_BY = {"file": "document", "line": "line", "blank_line": "paragraph"}


def _files_dataset(files: list[str], data):
    kwargs = {"sample_by": SAMPLE_BY[data.split_by], "encoding_errors": "replace"} if data.format == "text" else {}
    # The split is named 'train' because datasets reserves 'all'.
    return _load(BUILDERS[data.format], {"train": files}, **kwargs)["train"]


def _text_column(ds, field: str, where: str):
    if field not in ds.column_names:
        raise UserError(f"{where} has no field '{field}'; its fields are {', '.join(ds.column_names)}; set data.text_field")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds


def _carve(ds, data):
    """Split a single dataset into (train, held-out) by whole documents, seeded."""
    rng = np.random.default_rng(data.split_seed)
    held = rng.random(len(ds)) < data.heldout_fraction
    return ds.select(np.flatnonzero(~held)), ds.select(np.flatnonzero(held))


def load_corpus(data) -> Corpus:
    """Config section `data` → Corpus with 'text' columns (no network unless source='hub')."""
    import datasets

    source = data.source
    if source == "stdlib":
        files = stdlib_files()
        root = sysconfig.get_paths()["stdlib"]
        held = [f for f in files if is_heldout(os.path.relpath(f, root), data.heldout_fraction, data.split_seed)]
        train = [f for f in files if f not in set(held)]
        dd = _load("text", {"train": train, "validation": held}, sample_by="document", encoding_errors="replace")
        train_ds, held_ds = dd["train"], dd["validation"]
        desc = f"Python {sysconfig.get_python_version()} standard library: {len(train)} train files, {len(held)} held-out files"
    elif source == "files":
        files = _resolve_files(data.paths, "data.paths")
        if data.heldout_paths:
            train_ds = _text_column(_files_dataset(files, data), data.text_field, "data.paths")
            held_ds = _text_column(_files_dataset(_resolve_files(data.heldout_paths, "data.heldout_paths"), data),
                                   data.text_field, "data.heldout_paths")
        else:
            train_ds, held_ds = _carve(_text_column(_files_dataset(files, data), data.text_field, "data.paths"), data)
        desc = f"{len(files)} {data.format} file(s) from {data.paths}"
    elif source in ("saved", "hub"):
        if source == "saved":
            path = Path(data.paths)
            if not path.exists():
                raise UserError(f"data.paths '{path}' does not exist; point it at a directory written by Dataset.save_to_disk")
            ds = datasets.load_from_disk(str(path))
            where = f"the saved dataset at {path}"
        else:
            if not data.hub_name:
                raise UserError("data.source='hub' needs data.hub_name (and data.hub_config if the dataset has configs)")
            ds = datasets.load_dataset(data.hub_name, data.hub_config or None)
            where = f"hub dataset {data.hub_name}"
        if isinstance(ds, datasets.DatasetDict):
            if data.train_split not in ds:
                raise UserError(f"{where} has no split '{data.train_split}'; its splits are {', '.join(ds)}; set data.train_split")
            train_ds = _text_column(ds[data.train_split], data.text_field, where)
            if data.heldout_split in ds:
                held_ds = _text_column(ds[data.heldout_split], data.text_field, where)
            else:
                train_ds, held_ds = _carve(train_ds, data)
        else:
            train_ds, held_ds = _carve(_text_column(ds, data.text_field, where), data)
        desc = where
    else:
        raise UserError(f"unknown data.source '{source}'")

    if data.max_documents:
        train_ds = train_ds.select(range(min(data.max_documents, len(train_ds))))
        held_ds = held_ds.select(range(min(data.max_documents, len(held_ds))))
    if len(train_ds) == 0:
        raise UserError(f"the training split of {desc} is empty; check data.paths and data.heldout_fraction")
    if len(held_ds) == 0:
        raise UserError(f"the held-out split of {desc} is empty; raise data.heldout_fraction or set data.heldout_paths")
    fingerprint = hashlib.sha256(f"{train_ds._fingerprint}|{held_ds._fingerprint}".encode()).hexdigest()[:16]
    return Corpus(train_ds, held_ds, desc, fingerprint)
