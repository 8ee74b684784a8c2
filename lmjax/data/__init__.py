"""Data: source → tokenizer → packed token cache → batches."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmjax.data.cache import TokenSplit, build_or_load
from lmjax.data.sources import load_corpus
from lmjax.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from lmjax.errors import UserError


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TokenSplit
    heldout: TokenSplit
    description: str


def tokenizer_for_run(cfg, run_dir: Path, corpus) -> Tokenizer:
    """The run's saved tokenizer if it has one, else a new one built (and saved) from config."""
    saved = run_dir / "tokenizer"
    if saved.is_dir():
        tok = load_tokenizer(saved)
        if tok.kind != cfg.tokenizer.kind:
            raise UserError(f"the run directory {run_dir} holds a '{tok.kind}' tokenizer but the config asks for tokenizer.kind='{cfg.tokenizer.kind}'; use a new --workdir or set tokenizer.kind='{tok.kind}'")
        return tok
    tok = build_tokenizer(cfg.tokenizer, (t for t in corpus.train["text"]))
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=run_dir))  # complete or absent, even after kill -9
    tok.save(tmp)
    os.replace(tmp, saved)
    return tok


def prepare(cfg, run_dir: Path, log=print) -> Data:
    corpus = load_corpus(cfg.data)
    tok = tokenizer_for_run(cfg, run_dir, corpus)
    if cfg.model.vocab_size and tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}; set model.vocab_size=0 to take the tokenizer's size")
    splits = build_or_load({"train": corpus.train, "heldout": corpus.heldout}, corpus.fingerprint, tok, cfg.data, log)
    return Data(tok, splits["train"], splits["heldout"], corpus.description)


def tokenize_source(data_cfg, tokenizer: Tokenizer, log=print) -> TokenSplit:
    """The held-out split of another source, tokenized with a run's tokenizer (for eval)."""
    corpus = load_corpus(data_cfg)
    return build_or_load({"heldout": corpus.heldout}, corpus.fingerprint, tokenizer, data_cfg, log)["heldout"]
