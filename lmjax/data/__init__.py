"""Data: source → tokenizer → packed token cache → batches."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmjax.data.cache import SPLIT_NAMES, TokenSplit, build_or_load, publish
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
    learned = cfg_tok.kind in ("char", "word", "bpe")
    if learned and "vocab_size" in saved_settings and saved_settings["vocab_size"] != cfg_tok.vocab_size:
        made = saved_settings["vocab_size"]
        return f"a tokenizer made with tokenizer.vocab_size={made} but the config has {cfg_tok.vocab_size}"
    # A file-based tokenizer is compared by content: the run keeps its own copy, so a moved file is fine.
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
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=run_dir))
    tok.save(tmp)
    (tmp / SETTINGS).write_text(json.dumps(cfg.tokenizer.to_dict()))
    publish(tmp, saved, SETTINGS)  # processes sharing the run directory all use the first one saved
    return load_tokenizer(saved)


def check_vocab(tokenizer: Tokenizer, model_cfg) -> None:
    """The model's embedding must have a row for every token id."""
    if model_cfg.vocab_size and tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but "
            f"model.vocab_size={model_cfg.vocab_size}; "
            f"set model.vocab_size=0 to take the tokenizer's size, or at least {tokenizer.vocab_size}"
        )


def prepare(cfg, run_dir: Path, log=print) -> Data:
    """Corpus, the run's tokenizer and both token splits for training, each long enough for a window."""
    corpus = load_corpus(cfg.data)
    tok = tokenizer_for_run(cfg, run_dir, corpus)
    check_vocab(tok, cfg.model)
    splits = build_or_load({"train": corpus.train, "heldout": corpus.heldout}, tok, cfg.data, log)
    for name, fix in (
        ("train", "add data"),
        ("heldout", "hold out more data (data.heldout_fraction or data.heldout_paths)"),
    ):
        n = len(splits[name].tokens)
        if n <= cfg.data.seq_len:  # a window needs seq_len inputs and one more target
            raise UserError(
                f"the {SPLIT_NAMES[name]} split of {corpus.description} has {n:,} tokens, fewer than data.seq_len + 1 "
                "= "
                f"{cfg.data.seq_len + 1}; lower data.seq_len or {fix}"
            )
    return Data(tok, splits["train"], splits["heldout"], corpus.description)


def tokenize_source(data_cfg, tokenizer: Tokenizer, log=print) -> TokenSplit:
    """The held-out split of a source, tokenized with a run's tokenizer (for eval)."""
    corpus = load_corpus(data_cfg)
    return build_or_load({"heldout": corpus.heldout}, tokenizer, data_cfg, log)["heldout"]
