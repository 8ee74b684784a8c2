"""The tokenizer of an imported Hugging Face model, never guessed.

In this order: --tokenizer if given (a tokenizer.json, a directory holding one, an lmjax
tokenizer directory, or 'byte'); else the model directory's lmjax_tokenizer.json (what
export-hf writes, for any lmjax tokenizer kind); else its tokenizer.json (kind 'hf',
end-of-text = the model's eos token); else an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer

from lmjax.data.tokenizer_base import EOT, META, Tokenizer
from lmjax.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from lmjax.errors import UserError


def _eot_token(tok: RawTokenizer, directory: Path, hf: dict) -> str:
    """The tokenizer's end-of-sequence token: lmjax's '<|endoftext|>' if present, else the
    eos_token of tokenizer_config.json, else the token of config.json's eos_token_id."""
    if tok.token_to_id(EOT) is not None:
        return EOT
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        eos = json.loads(tc.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos and tok.token_to_id(eos) is not None:
            return eos
    eos_id = hf.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if isinstance(eos_id, int) and tok.id_to_token(eos_id) is not None:
        return tok.id_to_token(eos_id)
    return EOT  # none known: HFTokenizer adds lmjax's


def _hf_tokenizer(path: Path, hf: dict) -> HFTokenizer:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--tokenizer {path}: no tokenizer.json there (nor an lmjax tokenizer directory)")
    tok = RawTokenizer.from_file(str(file))
    return HFTokenizer(tok, "hf", _eot_token(tok, file.parent, hf))


def resolve_tokenizer(directory: Path, hf: dict, choice: str | None) -> Tokenizer:
    """The tokenizer of the model in `directory` (config.json `hf`), given --tokenizer `choice`."""
    if choice == "byte":
        return ByteTokenizer()
    if choice:
        path = Path(choice)
        return load_tokenizer(path) if (path / META).is_file() else _hf_tokenizer(path, hf)
    if (directory / META).is_file():
        return load_tokenizer(directory)
    if (directory / "tokenizer.json").is_file():
        return _hf_tokenizer(directory, hf)
    raise UserError(
        f"{directory} has no tokenizer.json; pass --tokenizer PATH (a tokenizer.json, a directory "
        "holding one, or an lmjax run's tokenizer/ directory), or --tokenizer byte for a model of "
        "lmjax byte ids"
    )
