"""The packed token cache: each split tokenized once into one flat, memory-mapped array.

Layout of a split (documents joined by end-of-text):  doc0 EOT doc1 EOT ...
  tokens.npy      uint16 (vocab ≤ 65536) or uint32 [N]
  doc_starts.npy  int64 [D + 1]: document i is tokens[doc_starts[i] : doc_starts[i+1]],
                  its last token being the EOT that ends it (empty documents are dropped)
  doc_bytes.npy   int64 [D]: UTF-8 bytes of each document's text
  meta.json       what was tokenized with what; written last

A split's directory is named by a hash of (cache version, the split's dataset fingerprint,
the tokenizer's fingerprint). The dataset fingerprint covers the source and its settings
(files and their modification times, format, text field, held-out carving, max_documents),
so a changed file or setting or tokenizer gives a new entry and anything else reuses one.
Entries are built in a temporary directory and renamed into place, under a lock file, so a
cache is either complete or absent even when several processes build the same one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmjax import default_cache_dir
from lmjax.data.tokenizers import Tokenizer
from lmjax.errors import UserError

CACHE_VERSION = 2
SPLIT_NAMES = {"train": "training", "heldout": "held-out"}  # for messages


@dataclass
class TokenSplit:
    tokens: np.ndarray  # [N], memory-mapped
    doc_starts: np.ndarray  # int64 [D + 1]
    doc_bytes: np.ndarray  # int64 [D]

    @property
    def n_docs(self) -> int:
        return len(self.doc_bytes)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i without its trailing end-of-text."""
        return self.tokens[self.doc_starts[i]: self.doc_starts[i + 1] - 1]


def cache_root(data_cfg) -> Path:
    return Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()


def cache_key(dataset_fingerprint: str, tokenizer: Tokenizer) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "dataset": dataset_fingerprint, "tokenizer": tokenizer.fingerprint()})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _tokenize(ds, tokenizer: Tokenizer, num_proc: int, arrow_file: Path, fingerprint: str):
    """Dataset with 'text' → Dataset with 'ids' (int32 lists) and 'n_bytes', written to `arrow_file`."""
    from datasets import Features, Sequence, Value

    def encode(batch):
        texts = [t or "" for t in batch["text"]]  # a missing field (None) is an empty document
        # int32 arrays: datasets writes them to Arrow ~8x faster than lists of Python ints.
        return {"ids": [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(texts)],
                "n_bytes": [len(t.encode("utf-8")) for t in texts]}

    features = Features({"ids": Sequence(Value("int32")), "n_bytes": Value("int64")})
    with _spawned_workers() if num_proc > 1 else contextlib.nullcontext():
        return ds.map(encode, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                      remove_columns=ds.column_names, features=features, cache_file_name=str(arrow_file),
                      new_fingerprint=fingerprint, desc=None)


@contextlib.contextmanager
def _spawned_workers():
    """Make datasets' worker pool start processes by spawn, not fork: a child forked from a
    process whose JAX runtime threads are running can deadlock."""
    import multiprocess

    previous = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocess.set_start_method(previous, force=True)


def _record_batches(tokenized):
    """The tokenized split's Arrow record batches in order, read from its cache files one at a
    time (not memory-mapped: pages of a mapped file would stay resident as the pass goes on)."""
    import pyarrow as pa

    files = [f["filename"] for f in tokenized.cache_files]
    if not files:  # an in-memory dataset
        yield from tokenized.data.table.to_batches()
        return
    for name in files:
        with pa.OSFile(name) as f, pa.ipc.open_stream(f) as reader:
            yield from reader


def _write_npy_header(f, dtype: np.dtype, length: int) -> None:
    from numpy.lib import format as npy

    npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)})


def _pack(tokenized, eot_id: int, vocab_size: int, out_dir: Path) -> int:
    """Write the packed arrays of a tokenized split; return its token count.

    One pass over the ragged ids, one Arrow record batch at a time, appending each batch's
    documents (each followed by EOT) to tokens.npy: memory stays bounded by a batch, whatever
    the size of the corpus.
    """
    import pyarrow.compute as pc

    table = tokenized.data.table
    lengths = pc.list_value_length(table.column("ids")).to_numpy().astype(np.int64)  # reads only the offsets
    kept = lengths > 0
    # Document i starts at starts[i]; an empty document takes no room (not even an EOT).
    starts = np.concatenate([[0], np.cumsum(np.where(kept, lengths + 1, 0))])
    total = int(starts[-1])
    dtype = token_dtype(vocab_size)
    written = 0
    with open(out_dir / "tokens.npy", "wb") as f:
        _write_npy_header(f, dtype, total)
        for batch in _record_batches(tokenized):
            ids = batch.column(batch.schema.get_field_index("ids"))
            lens = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
            flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
            out = np.insert(flat, np.cumsum(lens)[lens > 0], eot_id).astype(dtype)  # an EOT after each document
            f.write(out.tobytes())
            written += len(out)
    if written != total:
        raise RuntimeError(f"packed {written} tokens where the offsets promised {total}")
    np.save(out_dir / "doc_starts.npy", np.append(starts[:-1][kept], total).astype(np.int64))
    np.save(out_dir / "doc_bytes.npy", table.column("n_bytes").to_numpy()[kept].astype(np.int64))
    return total


def load_split(directory: Path) -> TokenSplit:
    return TokenSplit(
        tokens=np.load(directory / "tokens.npy", mmap_mode="r", allow_pickle=False),
        doc_starts=np.load(directory / "doc_starts.npy", allow_pickle=False),
        doc_bytes=np.load(directory / "doc_bytes.npy", allow_pickle=False))


def is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


@contextlib.contextmanager
def _locked(lock_file: Path):
    """Hold an exclusive lock on `lock_file` (where the platform has fcntl)."""
    try:
        import fcntl
    except ImportError:  # no fcntl: the atomic rename in _publish still keeps the cache whole
        yield
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(tmp: Path, directory: Path, marker: str = "meta.json") -> None:
    """Move a finished directory (complete when it holds `marker`) into place atomically; if
    another process got there first, keep theirs."""
    try:
        os.rename(tmp, directory)
        return
    except OSError:
        if not directory.exists():
            raise
    if (directory / marker).is_file():  # the same content from another process: drop ours
        shutil.rmtree(tmp)
    else:  # a stale, incomplete directory (not written by this code): replace it
        shutil.rmtree(directory)
        os.rename(tmp, directory)


def _build(directory: Path, name: str, ds, tokenizer: Tokenizer, data_cfg) -> int:
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenized = _tokenize(ds, tokenizer, data_cfg.num_proc, tmp / "ids.arrow", directory.name)
        total = _pack(tokenized, tokenizer.eot_id, tokenizer.vocab_size, tmp)
        del tokenized
        for f in tmp.glob("*.arrow"):  # the intermediate ragged ids (one file per process)
            f.unlink()
        if total == 0:
            raise UserError(f"the {SPLIT_NAMES.get(name, name)} split has no text: its {len(ds)} document(s) are all empty; "
                            "check data.paths, data.heldout_paths and data.text_field")
        meta = {"version": CACHE_VERSION, "split": name, "dataset": ds._fingerprint, "documents": len(ds),
                "tokens": total, "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint()}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        publish(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return total


def build_or_load(splits: dict, tokenizer: Tokenizer, data_cfg, log=print) -> dict[str, TokenSplit]:
    """Tokenize each split of `splits` (name → Dataset with 'text') once; reuse the cache after."""
    root = cache_root(data_cfg)
    out = {}
    for name, ds in splits.items():
        directory = root / cache_key(ds._fingerprint, tokenizer)
        if is_complete(directory):
            log(f"reusing token cache for {name}: {directory}")
        else:
            root.mkdir(parents=True, exist_ok=True)
            with _locked(root / f"{directory.name}.lock"):
                if is_complete(directory):  # built by another process while this one waited
                    log(f"reusing token cache for {name}: {directory}")
                else:
                    total = _build(directory, name, ds, tokenizer, data_cfg)
                    log(f"tokenized {name} ({len(ds):,} documents, {total:,} tokens) into cache {directory}")
        out[name] = load_split(directory)
    return out
