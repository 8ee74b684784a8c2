"""Tokenizers with an explicit vocabulary: characters, words, and tiktoken BPE files.

  char      one id per character seen in the training split (the most frequent ones if
            tokenizer.vocab_size caps it), then <|endoftext|> and <unk> for unseen characters.
  word      words split on whitespace, one id per word of the training split (the most
            frequent tokenizer.vocab_size, counting <unk> and <eos>), <eos> where a line
            ends: the Penn Treebank / WikiText-2 word-level setup.
  tiktoken  a BPE encoding read from a local .tiktoken file (tokenizer.path), e.g. GPT-2's
            r50k_base.tiktoken; <|endoftext|> follows the file's last rank. Never downloads.

All are saved as JSON (plus the .tiktoken file, copied) and reload to the same ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmjax.data.tokenizer_base import EOT, META, Tokenizer
from lmjax.errors import UserError

UNK = "<unk>"
EOS = "<eos>"
# GPT-2's pre-tokenization pattern (tiktoken's r50k_base / gpt2 encodings).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
TIKTOKEN_FILE = "encoding.tiktoken"


class CharTokenizer(Tokenizer):
    """Characters of the training split, then <|endoftext|>, then <unk> (decoded as U+FFFD)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.eot_id = len(self.chars)
        self.unk_id = self.eot_id + 1
        self.vocab_size = self.unk_id + 1
        # Encoding maps code points through a sorted table: vectorised, no Python loop per char.
        points = np.array([ord(c) for c in self.chars], np.int64)
        order = np.argsort(points)
        self._sorted_points, self._sorted_ids = points[order], order.astype(np.int32)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 0) -> CharTokenizer:
        counts: Counter = Counter()
        for t in texts:
            counts.update(t)
        if vocab_size:
            if vocab_size < 3:
                raise UserError(
                    f"tokenizer.vocab_size={vocab_size} is too small for a char tokenizer; use 0 (every character) or "
                    "at least 3"
                )
            kept = [c for c, _ in counts.most_common(vocab_size - 2)]
        else:
            kept = list(counts)
        return cls(sorted(kept))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        if not len(self._sorted_points):
            return np.full(len(points), self.unk_id, np.int32)
        at = np.minimum(np.searchsorted(self._sorted_points, points), len(self._sorted_points) - 1)
        return np.where(self._sorted_points[at] == points, self._sorted_ids[at], self.unk_id).astype(np.int32)

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else "\ufffd" for i in ids if i != self.eot_id)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 length of each character; 0 for <|endoftext|>; 1 for <unk> (its character is
        unknown, so bits per byte is approximate on text with unseen characters)."""
        return np.array([len(c.encode("utf-8")) for c in self.chars] + [0, 1], np.int32)

    def state(self) -> dict:
        return {"chars": self.chars}


class WordTokenizer(Tokenizer):
    """Whitespace-separated words, <eos> at each line end, <unk> outside the vocabulary.

    decode joins a line's words with single spaces and turns <eos> into a newline, so text
    whose lines are single-space separated words round-trips exactly.
    """

    kind = "word"

    def __init__(self, words: Sequence[str]):
        self.words = list(words)  # ids: words..., then <|endoftext|>
        self.index = {w: i for i, w in enumerate(self.words)}
        self.unk_id, self.eos_id = self.index[UNK], self.index[EOS]
        self.eot_id = len(self.words)
        self.vocab_size = self.eot_id + 1

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 0) -> WordTokenizer:
        counts: Counter = Counter()
        for t in texts:
            counts.update(t.split())
        counts.pop(UNK, None)
        counts.pop(EOS, None)
        if vocab_size:
            if vocab_size < 4:
                raise UserError(
                    f"tokenizer.vocab_size={vocab_size} is too small for a word tokenizer; use 0 (every word) or at "
                    "least 4"
                )
            kept = [w for w, _ in counts.most_common(vocab_size - 3)]  # room for <unk>, <eos>, EOT
        else:
            kept = list(counts)
        return cls([UNK, EOS] + sorted(kept))

    def encode(self, text: str) -> list[int]:
        index, unk, eos = self.index, self.unk_id, self.eos_id
        lines = text.split("\n")
        ids: list[int] = []
        for i, line in enumerate(lines):
            ids += [index.get(w, unk) for w in line.split()]
            if i < len(lines) - 1:  # the text after the last newline has no line end
                ids.append(eos)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, line = [], []
        for i in ids:
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            elif i != self.eot_id:
                line.append(self.words[i])
        return "".join(out) + " ".join(line)

    def token_bytes(self) -> np.ndarray:
        """Each word's UTF-8 length + 1 for the separator after it; 0 for <eos> and <|endoftext|>.

        The newline ending a line is counted as the last word's separator, so this is exact for
        lines of single-space separated words; blank lines and runs of whitespace are missed,
        and <unk> counts as the 5 bytes of '<unk>' plus a space whatever word it replaced.
        """
        out = np.array([len(w.encode("utf-8")) + 1 for w in self.words] + [0], np.int32)
        out[self.eos_id] = 0
        return out

    def state(self) -> dict:
        return {"words": self.words}


def read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """Ranks of a .tiktoken file: one 'BASE64_TOKEN RANK' per line."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(
                f"tokenizer.path '{path}' line {n} is not 'BASE64_TOKEN RANK'; point it at a .tiktoken BPE file such "
                "as r50k_base.tiktoken"
            ) from None
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE encoding from a local file, with GPT-2's pre-tokenization pattern."""

    kind = "tiktoken"
    encodes_in_threads = True  # encode_ordinary_batch's threads release the GIL

    def __init__(self, path: str | Path, pattern: str = GPT2_PATTERN):
        import tiktoken

        self.path = Path(path)
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.pattern = pattern
        ranks = read_tiktoken_file(self.path)
        if not ranks:
            raise UserError(
                f"tokenizer.path '{path}' holds no tokens; point it at a .tiktoken BPE file such as r50k_base.tiktoken"
            )
        self.eot_id = max(ranks.values()) + 1
        self.vocab_size = self.eot_id + 1
        self.enc = tiktoken.Encoding(
            f"lmjax-{self.sha256[:12]}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: self.eot_id}
        )

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)  # '<|endoftext|>' in a text is text, not the token

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([i for i in ids if i != self.eot_id])

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.eot_id):
            try:
                out[i] = len(self.enc.decode_single_token_bytes(i))
            except KeyError:  # a gap in the file's ranks
                pass
        return out

    def state(self) -> dict:
        return {"file": TIKTOKEN_FILE, "sha256": self.sha256, "pattern": self.pattern}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / TIKTOKEN_FILE).is_file() or (directory / TIKTOKEN_FILE).resolve() != self.path.resolve():
            shutil.copyfile(self.path, directory / TIKTOKEN_FILE)
        (directory / META).write_text(json.dumps({"kind": self.kind, **self.state()}))


def load_tiktoken(path: str) -> TiktokenTokenizer:
    if not path:
        raise UserError(
            "tokenizer.kind='tiktoken' needs tokenizer.path: a local .tiktoken BPE file (for GPT-2: r50k_base.tiktoken)"
        )
    if "://" in path:
        raise UserError(
            f"tokenizer.path '{path}' is a URL; lmjax never downloads tokenizers: download the .tiktoken file "
            "yourself and give its local path"
        )
    if not Path(path).expanduser().is_file():
        raise UserError(
            f"tokenizer.path '{path}' does not exist; point it at a local .tiktoken BPE file (for GPT-2: "
            "r50k_base.tiktoken)"
        )
    return TiktokenTokenizer(Path(path).expanduser())


def build(cfg, train_texts: Iterable[str]) -> Tokenizer:
    """Config section `tokenizer` (kind char | word | tiktoken) → tokenizer."""
    if cfg.kind == "char":
        return CharTokenizer.train(train_texts, cfg.vocab_size)
    if cfg.kind == "word":
        return WordTokenizer.train(train_texts, cfg.vocab_size)
    if cfg.kind == "tiktoken":
        return load_tiktoken(cfg.path)
    raise UserError(f"unknown tokenizer.kind '{cfg.kind}'; choose one of byte, char, word, bpe, hf, tiktoken")


def from_state(meta: dict, directory: Path) -> Tokenizer:
    """Rebuild what `save` wrote to `directory` (its lmjax_tokenizer.json is `meta`)."""
    kind = meta["kind"]
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "word":
        return WordTokenizer(meta["words"])
    if kind == "tiktoken":
        tok = TiktokenTokenizer(Path(directory) / meta["file"], meta["pattern"])
        if tok.sha256 != meta["sha256"]:
            raise UserError(
                f"{directory / meta['file']} changed since the tokenizer was saved (sha256 differs); restore it or "
                "use a new run directory"
            )
        return tok
    raise UserError(f"the saved tokenizer in '{directory}' has unknown kind '{kind}'")
