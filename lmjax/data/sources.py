"""Text sources through Hugging Face `datasets`: the standard library default, local files,
a dataset saved with `save_to_disk`, or the hub. Each gives a train and a held-out split of
whole documents in a column named 'text'."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from lmjax.checks import reading_data
from lmjax.errors import UserError

if TYPE_CHECKING:  # datasets is slow to import: the functions that read a corpus import it
    import datasets

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class Corpus:
    train: datasets.Dataset
    heldout: datasets.Dataset
    description: str


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


def split_stdlib_files(files: list[str], root: str, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) files: held out by a hash of the path relative to `root`, so the split
    is the same on every machine and a file never moves when others are added."""
    held = [f for f in files if is_heldout(os.path.relpath(f, root), fraction, seed)]
    held_set = set(held)
    return [f for f in files if f not in held_set], held


def _load(builder: str, data_files, where: str, **kwargs):
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error log would repeat ours
    try:
        with reading_data(f"{where} as {builder}"):  # names the key (data.paths or data.heldout_paths)
            return datasets.load_dataset(builder, data_files=data_files, **kwargs)
    finally:
        datasets.logging.set_verbosity(verbosity)


@contextmanager
def _hub_errors_only():
    """huggingface_hub's public verbosity switch at errors while inside: offline, it warns once per
    retry (about 20 lines) before the error lmjax turns into one line."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def _resolve_files(spec: str, key: str) -> list[str]:
    if not spec.strip():
        raise UserError(f"data.source='files' needs {key}: comma-separated paths or globs")
    files = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not matches:
            raise UserError(f"{key}: '{part}' matches no file; check the path (globs like data/*.txt are allowed)")
        files += [m for m in matches if os.path.isfile(m)]
    if not files:
        raise UserError(f"{key}: '{spec}' matches only directories; give files or a glob like DIR/*.txt")
    return files


BUILDERS = {"text": "text", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}
SAMPLE_BY = {"file": "document", "line": "line", "blank_line": "paragraph"}


def _files_dataset(files: list[str], data, where: str):
    kwargs = {"sample_by": SAMPLE_BY[data.split_by], "encoding_errors": "replace"} if data.format == "text" else {}
    # The split is named 'train' because datasets reserves 'all'.
    return _load(BUILDERS[data.format], {"train": files}, where, **kwargs)["train"]


def _text_column(ds, field: str, where: str):
    """`ds` reduced to its text field, renamed 'text'."""
    if field not in ds.column_names:
        raise UserError(
            f"{where} has no field '{field}'; its fields are {', '.join(ds.column_names)}; set data.text_field"
        )
    dtype = getattr(ds.features[field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise UserError(
            f"field '{field}' of {where} holds {ds.features[field]}, not text; "
            f"set data.text_field to a text field (fields: {', '.join(ds.column_names)})"
        )
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds


def text_fingerprint(ds) -> str:
    """A hash of a split's documents in order (each one's UTF-8 bytes and length), for the token
    cache's key: equal text gives an equal fingerprint in any process, an edited file another."""
    h = hashlib.sha256()
    for batch in ds.with_format("arrow").iter(batch_size=10_000):
        for chunk in batch.column("text").chunks:
            if len(chunk) == 0:
                continue
            # Arrow's string layout: document i is values[offsets[i]:offsets[i + 1]]; a slice of an
            # array shares the whole buffers and starts at its `offset`.
            _, offsets_buffer, values = chunk.buffers()
            width = 8 if pa.types.is_large_string(chunk.type) else 4
            offsets = np.frombuffer(offsets_buffer, f"<i{width}")[chunk.offset : chunk.offset + len(chunk) + 1]
            h.update(np.array([len(chunk)], "<i8").tobytes() + np.diff(offsets).astype("<i8").tobytes())
            h.update(b"" if values is None else values[int(offsets[0]) : int(offsets[-1])])
    return h.hexdigest()[:32]


def carve(n_docs: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) document indices: round(fraction * n_docs) documents, at least one,
    chosen by a permutation seeded with `seed`; each index list is sorted."""
    if n_docs < 2:
        return np.arange(n_docs), np.arange(0)
    n_held = min(max(1, round(fraction * n_docs)), n_docs - 1)
    order = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _carve(ds, data):
    """Split a single dataset into (train, held-out) by whole documents, seeded."""
    train, held = carve(len(ds), data.heldout_fraction, data.split_seed)
    return ds.select(train), ds.select(held)


def load_corpus(data) -> Corpus:
    """Config section `data` → Corpus with 'text' columns (no network unless source='hub')."""
    import datasets

    source = data.source
    if source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        train, held = split_stdlib_files(stdlib_files(), root, data.heldout_fraction, data.split_seed)
        dd = _load(
            "text",
            {"train": train, "validation": held},
            f"the standard library at {root}",
            sample_by="document",
            encoding_errors="replace",
        )
        train_ds, held_ds = dd["train"], dd["validation"]
        desc = (
            f"Python {sysconfig.get_python_version()} standard library: {len(train)} train files, "
            f"{len(held)} held-out files"
        )
    elif source == "files":
        files = _resolve_files(data.paths, "data.paths")
        where = f"data.paths={data.paths!r}"
        train_ds = _text_column(_files_dataset(files, data, where), data.text_field, where)
        if data.heldout_paths:
            held_files = _resolve_files(data.heldout_paths, "data.heldout_paths")
            where = f"data.heldout_paths={data.heldout_paths!r}"
            held_ds = _text_column(_files_dataset(held_files, data, where), data.text_field, where)
        else:
            train_ds, held_ds = _carve(train_ds, data)
        desc = f"{len(files)} {data.format} file(s) from {data.paths}"
    elif source in ("saved", "hub"):
        if source == "saved":
            path = Path(data.paths)
            if not path.exists():
                raise UserError(
                    f"data.paths '{path}' does not exist; point it at a directory written by Dataset.save_to_disk"
                )
            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError:
                raise UserError(
                    f"data.paths '{path}' is not a dataset saved with save_to_disk (no dataset_info.json "
                    "/ dataset_dict.json); point it at the directory that Dataset.save_to_disk wrote"
                ) from None
            where = f"the saved dataset at {path}"
        else:
            if not data.hub_name:
                raise UserError(
                    "data.source='hub' needs data.hub_name (and data.hub_config if the dataset has configs)"
                )
            datasets.disable_progress_bars()
            try:
                with _hub_errors_only():
                    ds = datasets.load_dataset(data.hub_name, data.hub_config or None)
            except (ConnectionError, FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
                first_line = str(e).splitlines()[0][:200] if str(e) else ""
                raise UserError(
                    f"could not load hub dataset data.hub_name={data.hub_name!r} "
                    f"data.hub_config={data.hub_config!r} ({type(e).__name__}: {first_line}); "
                    "check the names, and that it is cached here when HF_DATASETS_OFFLINE=1"
                ) from None
            where = f"hub dataset {data.hub_name}"
        if isinstance(ds, datasets.DatasetDict):
            if data.train_split not in ds:
                raise UserError(
                    f"{where} has no split '{data.train_split}'; its splits are {', '.join(ds)}; set data.train_split"
                )
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
    return Corpus(train_ds, held_ds, desc)
