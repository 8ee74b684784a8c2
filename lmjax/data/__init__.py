"""Data: source → tokenizer → packed token cache → batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmjax.data.cache import SPLIT_NAMES, TokenSplit, build_or_load
from lmjax.data.sources import load_corpus
from lmjax.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from lmjax.errors import UserError


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TokenSplit
    heldout: TokenSplit
    description: str


SETTINGS = "lmjax_tokenizer_settings.json"  # the tokenizer config a run's tokenizer was made from


def _saved_tokenizer_mismatch(tok: Tokenizer, saved_settings: dict, cfg_tok) -> str | None:
    """Why the run's saved tokenizer is not the one config section `tokenizer` asks for (None if it is)."""
    if tok.kind != cfg_tok.kind:
        return f"a '{tok.kind}' tokenizer but the config asks for tokenizer.kind='{cfg_tok.kind}'"
    for key in ("vocab_size", "path"):
        if key in saved_settings and saved_settings[key] != cfg_tok[key]:
            return f"a tokenizer made with tokenizer.{key}={saved_settings[key]!r} but the config has {cfg_tok[key]!r}"
    if cfg_tok.kind in ("hf", "tiktoken") and cfg_tok.path and Path(cfg_tok.path).expanduser().exists():
        if build_tokenizer(cfg_tok, ()).fingerprint() != tok.fingerprint():
            return f"a different tokenizer from the one now at tokenizer.path='{cfg_tok.path}' (the file changed)"
    return None


def tokenizer_for_run(cfg, run_dir: Path, corpus) -> Tokenizer:
    """The run's saved tokenizer if it has one, else a new one built (and saved) from config."""
    saved = run_dir / "tokenizer"
    if saved.is_dir():
        tok = load_tokenizer(saved)
        settings = json.loads((saved / SETTINGS).read_text()) if (saved / SETTINGS).is_file() else {}
        why = _saved_tokenizer_mismatch(tok, settings, cfg.tokenizer)
        if why:
            raise UserError(f"the run directory {run_dir} holds {why}; use a new --workdir or restore the setting")
        return tok
    tok = build_tokenizer(cfg.tokenizer, (t or "" for t in corpus.train["text"]))
    tok.save(saved)
    (saved / SETTINGS).write_text(json.dumps(cfg.tokenizer.to_dict()))
    return tok


def check_vocab(tokenizer: Tokenizer, model_cfg) -> None:
    """The model's embedding must have a row for every token id."""
    if model_cfg.vocab_size and tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={model_cfg.vocab_size}; "
                        f"set model.vocab_size=0 to take the tokenizer's size, or at least {tokenizer.vocab_size}")


def prepare(cfg, run_dir: Path, log=print) -> Data:
    corpus = load_corpus(cfg.data)
    tok = tokenizer_for_run(cfg, run_dir, corpus)
    check_vocab(tok, cfg.model)
    splits = build_or_load({"train": corpus.train, "heldout": corpus.heldout}, tok, cfg.data, log)
    for name, fix in (("train", "add data"), ("heldout", "hold out more data (data.heldout_fraction or data.heldout_paths)")):
        n = len(splits[name].tokens)
        if n <= cfg.data.seq_len:  # a window needs seq_len inputs and one more target
            raise UserError(f"the {SPLIT_NAMES[name]} split of {corpus.description} has {n:,} tokens, fewer than data.seq_len + 1 = "
                            f"{cfg.data.seq_len + 1}; lower data.seq_len or {fix}")
    return Data(tok, splits["train"], splits["heldout"], corpus.description)


def tokenize_source(data_cfg, tokenizer: Tokenizer, log=print) -> TokenSplit:
    """The held-out split of a source, tokenized with a run's tokenizer (for eval)."""
    corpus = load_corpus(data_cfg)
    return build_or_load({"heldout": corpus.heldout}, tokenizer, data_cfg, log)["heldout"]
