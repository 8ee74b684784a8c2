"""Tokenizers behind one interface: encode, decode, vocab_size, eot_id, token_bytes, save/load.

Every tokenizer saves to a directory (`lmjax_tokenizer.json` plus its own files) that eval
and sample load back; nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmjax.data import vocab_tokenizers
from lmjax.data.tokenizer_base import EOT, META, Tokenizer
from lmjax.errors import UserError

DEFAULT_BPE_VOCAB = 4096  # tokenizer.kind=bpe with tokenizer.vocab_size=0

__all__ = ["EOT", "META", "ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer", "load_tokenizer"]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then <|endoftext|> = 256. Round-trips any text."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, np.int32)
        out[self.eot_id] = 0
        return out


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer: one trained here (bpe) or a saved one (hf)."""

    # A batch is encoded on Rayon's threads: every core, or RAYON_NUM_THREADS (read at first use).
    encodes_in_threads = True

    def __init__(self, tok, kind: str, eot_token: str = EOT):
        self.tok = tok
        self.kind = kind
        # A pretrained tokenizer keeps its own end-of-sequence token (e.g. LLaMA's '</s>').
        self.eot_token = eot_token
        eot = tok.token_to_id(eot_token)
        if eot is None:  # a saved tokenizer without our end-of-text token: add it
            tok.add_special_tokens([eot_token])
            eot = tok.token_to_id(eot_token)
        self.eot_id = eot
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        tok.encode_special_tokens = True  # '<|endoftext|>' inside a text is text, not the token

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        # encode_batch_fast: the same ids without the character offsets, which cost about a third.
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in fast(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([i for i in ids if i != self.eot_id], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Bytes per id. Byte-level BPE maps each byte to one character of a token's string,
        so its length is exact; other tokenizers count the UTF-8 of the id decoded alone."""
        byte_level = type(self.tok.decoder).__name__ == "ByteLevel"
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if i != self.eot_id and i not in special:
                out[i] = len(self.tok.id_to_token(i)) if byte_level else len(self.tok.decode([i]).encode("utf-8"))
        return out

    def state(self) -> dict:
        eot = {} if self.eot_token == EOT else {"eot": self.eot_token}
        return {"tokenizer_json": self.tok.to_str(), **eot}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        eot = {} if self.eot_token == EOT else {"eot": self.eot_token}
        (directory / META).write_text(json.dumps({"kind": self.kind, "file": "tokenizer.json", **eot}))


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE trained on `texts`; any text round-trips."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise UserError(
            f"tokenizer.vocab_size={vocab_size} is too small for byte-level BPE; use at least 258 (256 bytes + "
            "end-of-text + merges)"
        )
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, "bpe")


def load_hf(path: str | Path) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            f"tokenizer.path '{path}' has no tokenizer.json; save one with tokenizer.save_pretrained(DIR) or "
            "tokenizers' Tokenizer.save(FILE)"
        )
    return HFTokenizer(HFTok.from_file(str(file)), "hf")


def build_tokenizer(cfg, train_texts: Iterable[str]) -> Tokenizer:
    """The tokenizer of config section `tokenizer`, trained on `train_texts` where it learns."""
    kind = cfg.kind
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(train_texts, cfg.vocab_size or DEFAULT_BPE_VOCAB)
    if kind == "hf":
        if not cfg.path:
            raise UserError(
                "tokenizer.kind='hf' needs tokenizer.path: a tokenizer.json file or a directory holding one"
            )
        return load_hf(cfg.path)
    return vocab_tokenizers.build(cfg, train_texts)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what `Tokenizer.save` wrote."""
    directory = Path(directory)
    meta_file = directory / META
    if not meta_file.is_file():
        raise UserError(f"no saved tokenizer in '{directory}' (expected {META}); is this an lmjax run directory?")
    meta = json.loads(meta_file.read_text())
    kind = meta["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "hf"):
        from tokenizers import Tokenizer as HFTok

        return HFTokenizer(HFTok.from_file(str(directory / meta["file"])), kind, meta.get("eot", EOT))
    return vocab_tokenizers.from_state(meta, directory)
