"""The interface every tokenizer keeps: encode, decode, vocab_size, eot_id, token_bytes, save.

Every tokenizer saves to a directory (`lmjax_tokenizer.json` plus its own files) that eval
and sample load back (lmjax.data.tokenizers.load_tokenizer); nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

META = "lmjax_tokenizer.json"
EOT = "<|endoftext|>"


class Tokenizer:
    """Base class. Subclasses set `kind`, `vocab_size`, `eot_id` and implement the methods."""

    kind: str
    vocab_size: int
    eot_id: int
    # Whether encode_batch runs on several cores by itself (native threads that release the GIL):
    # then data.num_proc encodes in this process (tiktoken: that many threads; HF tokenizers:
    # Rayon's pool), not in worker processes.
    encodes_in_threads = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[Sequence[int]]:
        """The ids of each text, as lists or int32 arrays. `threads`: how many a tokenizer that
        encodes_in_threads may use (tiktoken does; HF's Rayon pool sizes itself)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_after(self, prefix_ids: Sequence[int], ids: Sequence[int]) -> str:
        """The text `ids` add after `prefix_ids`: decoded together, so a word tokenizer puts its
        space between them and a byte-level one completes a character split across them."""
        prefix = self.decode(prefix_ids)
        whole = self.decode([*prefix_ids, *ids])
        return whole[len(prefix) :] if whole.startswith(prefix) else self.decode(ids)

    def token_bytes(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 bytes of text each id stands for (0 for specials)."""
        raise NotImplementedError

    def state(self) -> dict:
        """JSON-able content that, with `kind`, rebuilds this tokenizer."""
        return {}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META).write_text(json.dumps({"kind": self.kind, **self.state()}))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({"kind": self.kind, **self.state()}, sort_keys=True).encode()).hexdigest()[:16]
