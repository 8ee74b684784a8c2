"""The packed token cache: each split tokenized once into one flat, memory-mapped array.

Layout of a split (documents joined by end-of-text):  doc0 EOT doc1 EOT ...
  tokens.npy      uint16 (vocab ≤ 65536) or uint32 [N]
  doc_starts.npy  int64 [D + 1]: document i is tokens[doc_starts[i] : doc_starts[i+1]],
                  its last token being the EOT that ends it (empty documents are dropped)
  doc_bytes.npy   int64 [D]: UTF-8 bytes of each document's text
  meta.json       what was tokenized with what; written last

A split's directory is named by a hash of (cache version, the split's text fingerprint, the
tokenizer's fingerprint). The text fingerprint hashes the split's documents in order, so
whatever changes the text (an edited file, another format, text field, held-out carving or
max_documents) or the tokenizer gives a new entry and anything else reuses one.
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
from lmjax.data.sources import text_fingerprint
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
        return self.tokens[self.doc_starts[i] : self.doc_starts[i + 1] - 1]


def cache_root(data_cfg) -> Path:
    return default_cache_dir(data_cfg.cache_dir)


def cache_key(dataset_fingerprint: str, tokenizer: Tokenizer) -> str:
    """The cache entry's name: a hash of the text's fingerprint, the tokenizer and the format version."""
    blob = json.dumps({"v": CACHE_VERSION, "dataset": dataset_fingerprint, "tokenizer": tokenizer.fingerprint()})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


BATCH_DOCUMENTS = 256  # documents encoded per call of the tokenizer's encode_batch


def _encode(tokenizer: Tokenizer, texts: list, threads: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """A batch of texts → (int32 ids of each, int64 UTF-8 bytes of each); None is an empty document."""
    texts = [t or "" for t in texts]
    return (
        [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(texts, threads)],
        np.array([len(t.encode("utf-8")) for t in texts], np.int64),
    )


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list):
    return _encode(_worker_tokenizer, texts)


def _tokenize(ds, tokenizer: Tokenizer, num_proc: int):
    """The encoded batches of `ds` in order, as `_encode` gives them.

    A tokenizer that encodes in native threads encodes in this process (tiktoken on num_proc
    threads, HF tokenizers on Rayon's pool): no worker start-up, no texts and ids copied
    between processes. Otherwise
    num_proc > 1 encodes in that many worker processes, started by spawn, not fork (a child
    forked from a process whose JAX runtime threads are running can deadlock), with at most
    two batches per worker in flight: memory stays bounded whatever the corpus size.
    """
    in_process = num_proc <= 1 or tokenizer.encodes_in_threads
    # Several workers need several batches each, or one of them does all the work.
    size = BATCH_DOCUMENTS if in_process else max(1, min(BATCH_DOCUMENTS, len(ds) // (8 * num_proc)))
    batches = (b["text"] for b in ds.iter(batch_size=size))
    if in_process:
        for texts in batches:
            yield _encode(tokenizer, texts, num_proc)
        return
    import collections
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(num_proc, _start_worker, (tokenizer,)) as pool:
        pending = collections.deque()
        for texts in batches:
            pending.append(pool.apply_async(_encode_in_worker, (texts,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _pack(batches, eot_id: int, vocab_size: int, out_dir: Path) -> int:
    """Append each encoded batch's documents, each followed by EOT, to tokens.npy (empty
    documents take no room); write doc_starts.npy and doc_bytes.npy; return the token count.

    One sequential pass: only the batch being written and 16 bytes per document are held.
    """
    from numpy.lib import format as npy

    dtype = token_dtype(vocab_size)
    lengths, n_bytes = [], []
    with open(out_dir / "tokens.npy", "wb") as f:
        # Written again at the end with the real length; numpy pads the header so that it keeps its size.
        npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": (0,)})
        header_size = f.tell()
        for ids, doc_bytes in batches:
            lens = np.array([len(x) for x in ids], np.int64)
            if lens.sum():
                flat = np.concatenate(ids)
                f.write(np.insert(flat, np.cumsum(lens)[lens > 0], eot_id).astype(dtype).tobytes())
            lengths.append(lens)
            n_bytes.append(doc_bytes)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        kept = lengths > 0
        total = int(lengths[kept].sum() + kept.sum())
        f.seek(0)
        npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": (total,)})
        if f.tell() != header_size:
            raise RuntimeError("the .npy header changed size when its length was written")
    starts = np.concatenate([[0], np.cumsum(lengths[kept] + 1)]).astype(np.int64)
    np.save(out_dir / "doc_starts.npy", starts)
    np.save(out_dir / "doc_bytes.npy", np.concatenate(n_bytes)[kept] if n_bytes else np.zeros(0, np.int64))
    return total


def load_split(directory: Path) -> TokenSplit:
    """A finished cache entry, memory-mapped."""
    return TokenSplit(
        tokens=np.load(directory / "tokens.npy", mmap_mode="r", allow_pickle=False),
        doc_starts=np.load(directory / "doc_starts.npy", allow_pickle=False),
        doc_bytes=np.load(directory / "doc_bytes.npy", allow_pickle=False),
    )


def is_complete(directory: Path) -> bool:
    """Whether a cache entry was finished (meta.json is written last)."""
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


def _build(directory: Path, name: str, ds, fingerprint: str, tokenizer: Tokenizer, data_cfg) -> int:
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        total = _pack(_tokenize(ds, tokenizer, data_cfg.num_proc), tokenizer.eot_id, tokenizer.vocab_size, tmp)
        if total == 0:
            raise UserError(
                f"the {SPLIT_NAMES.get(name, name)} split has no text: its {len(ds)} document(s) are all "
                "empty; check data.paths, data.heldout_paths and data.text_field"
            )
        meta = {
            "version": CACHE_VERSION,
            "split": name,
            "dataset": fingerprint,
            "documents": len(ds),
            "tokens": total,
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint()},
        }
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
        fingerprint = text_fingerprint(ds)
        directory = root / cache_key(fingerprint, tokenizer)
        if is_complete(directory):
            log(f"reusing token cache for {name}: {directory}")
        else:
            root.mkdir(parents=True, exist_ok=True)
            with _locked(root / f"{directory.name}.lock"):
                if is_complete(directory):  # built by another process while this one waited
                    log(f"reusing token cache for {name}: {directory}")
                else:
                    total = _build(directory, name, ds, fingerprint, tokenizer, data_cfg)
                    log(f"tokenized {name} ({len(ds):,} documents, {total:,} tokens) into cache {directory}")
        out[name] = load_split(directory)
    return out
