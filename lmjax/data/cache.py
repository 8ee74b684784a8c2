"""The packed token cache: each split tokenized once into one flat, memory-mapped array.

Layout of a split (documents joined by end-of-text):  doc0 EOT doc1 EOT ...
  tokens.npy      uint16 (vocab ≤ 65536) or uint32 [N]
  doc_starts.npy  int64 [D + 1]: document i is tokens[doc_starts[i] : doc_starts[i+1]],
                  its last token being the EOT that ends it
  doc_bytes.npy   int64 [D]: UTF-8 bytes of each document's text
Written to a temporary directory and renamed, so a cache is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmjax.data.tokenizers import Tokenizer

CACHE_VERSION = 1


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
    return Path(data_cfg.cache_dir or os.environ.get("LMJAX_CACHE") or Path.home() / ".cache" / "lmjax")


def cache_key(corpus_fingerprint: str, tokenizer: Tokenizer) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "corpus": corpus_fingerprint, "tokenizer": tokenizer.fingerprint()})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tokenize(ds, tokenizer: Tokenizer, num_proc: int):
    def encode(batch):
        return {"ids": tokenizer.encode_batch(batch["text"]),
                "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]]}

    return ds.map(encode, batched=True, batch_size=64, num_proc=num_proc if num_proc > 1 else None,
                  remove_columns=ds.column_names, desc=None, new_fingerprint=None)


def _pack(tokenized, eot_id: int, vocab_size: int, out_dir: Path) -> None:
    import pyarrow.compute as pc

    table = tokenized.data.table if hasattr(tokenized.data, "table") else tokenized.data
    ids_col = table.column("ids").combine_chunks()
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(ids_col).to_numpy(zero_copy_only=False)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    doc_starts = np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64)
    tokens = np.full(int(doc_starts[-1]), eot_id, dtype)
    # token j of document i lands at doc_starts[i] + j: shift each by its document index.
    tokens[np.arange(len(flat)) + np.repeat(np.arange(len(lengths)), lengths)] = flat
    np.save(out_dir / "tokens.npy", tokens)
    np.save(out_dir / "doc_starts.npy", doc_starts)
    np.save(out_dir / "doc_bytes.npy", np.asarray(table.column("n_bytes").to_numpy(), np.int64))


def load_split(directory: Path) -> TokenSplit:
    return TokenSplit(
        tokens=np.load(directory / "tokens.npy", mmap_mode="r", allow_pickle=False),
        doc_starts=np.load(directory / "doc_starts.npy", allow_pickle=False),
        doc_bytes=np.load(directory / "doc_bytes.npy", allow_pickle=False))


def build_or_load(splits: dict, corpus_fingerprint: str, tokenizer: Tokenizer, data_cfg, log=print) -> dict[str, TokenSplit]:
    """Tokenize each split of `splits` (name → Dataset with 'text') once; reuse the cache after.

    Each split has its own directory, so evaluating only the held-out split never leaves a
    cache that a training run would find incomplete.
    """
    root = cache_root(data_cfg)
    key = cache_key(corpus_fingerprint, tokenizer)
    out = {}
    for name, ds in splits.items():
        directory = root / f"{key}-{name}"
        if (directory / "meta.json").is_file():
            log(f"reusing token cache {directory}")
        else:
            _build(directory, ds, tokenizer, data_cfg, corpus_fingerprint)
            log(f"tokenized {name} split into cache {directory}")
        out[name] = load_split(directory)
    return out


def _build(directory: Path, ds, tokenizer: Tokenizer, data_cfg, corpus_fingerprint: str) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        _pack(_tokenize(ds, tokenizer, data_cfg.num_proc), tokenizer.eot_id, tokenizer.vocab_size, tmp)
        (tmp / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, "corpus": corpus_fingerprint,
                                                   "tokenizer": tokenizer.fingerprint()}))
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same cache first: keep theirs
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
