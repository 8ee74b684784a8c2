"""Bad data input: one clear line through `lmjax train` (exit 2), never a stack trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_experiment

from lmjax import cli
from lmjax import config as config_lib
from lmjax.data import prepare
from lmjax.errors import UserError


def train_error(tmp_path: Path, capsys, body: str) -> str:
    """Run `lmjax train` on the tiny experiment + `body`; return its one error line."""
    exp = write_experiment(tmp_path / "exp.py", tmp_path / "corpus", body)
    assert cli.main(["train", str(exp), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmjax: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(10):
        (d / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    return d


def test_missing_file_or_empty_glob(tmp_path, capsys):
    err = train_error(tmp_path, capsys, f"c.data.paths = {str(tmp_path / 'nowhere' / '*.txt')!r}")
    assert "data.paths" in err and "matches no file" in err


def test_text_field_that_does_not_exist_names_the_fields(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"title": "a", "body": "text here"}\n' * 5)
    err = train_error(
        tmp_path,
        capsys,
        f"c.data.paths = {str(tmp_path / 'd.jsonl')!r}\nc.data.format = 'jsonl'\nc.data.text_field = 'content'",
    )
    assert "no field 'content'" in err and "title, body" in err and "data.text_field" in err


def test_non_text_field_is_refused(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"n": 1, "body": "text here"}\n' * 5)
    err = train_error(
        tmp_path,
        capsys,
        f"c.data.paths = {str(tmp_path / 'd.jsonl')!r}\nc.data.format = 'jsonl'\nc.data.text_field = 'n'",
    )
    assert "field 'n'" in err and "not text" in err


def test_malformed_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{not json\n')
    err = train_error(tmp_path, capsys, f"c.data.paths = {str(tmp_path / 'd.jsonl')!r}\nc.data.format = 'jsonl'")
    assert "could not read" in err and "data.format" in err


def test_empty_corpus(tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    for i in range(5):
        (d / f"e{i}.txt").write_text("")
    err = train_error(tmp_path, capsys, f"c.data.paths = {str(d / '*.txt')!r}")
    assert "training split" in err and ("no text" in err or "empty" in err)


def test_empty_heldout_split(tmp_path, corpus, capsys):
    (tmp_path / "held.txt").write_text("")
    err = train_error(
        tmp_path,
        capsys,
        f"c.data.paths = {str(corpus / '*.txt')!r}\nc.data.heldout_paths = {str(tmp_path / 'held.txt')!r}",
    )
    assert "held-out split has no text" in err


def test_seq_len_longer_than_heldout_data(tmp_path, corpus, capsys):
    (tmp_path / "held.txt").write_text("too short")
    err = train_error(
        tmp_path,
        capsys,
        f"c.data.paths = {str(corpus / '*.txt')!r}\nc.data.heldout_paths = {str(tmp_path / 'held.txt')!r}",
    )
    assert (
        "held-out split" in err
        and "has 10 tokens, fewer than data.seq_len + 1 = 33" in err
        and "lower data.seq_len" in err
    )


def test_vocabulary_larger_than_the_embedding(tmp_path, corpus, capsys):
    err = train_error(tmp_path, capsys, f"c.data.paths = {str(corpus / '*.txt')!r}\nc.model.vocab_size = 100")
    assert "257 ids but model.vocab_size=100" in err and "model.vocab_size=0" in err


def test_saved_tokenizer_differs_from_config(tmp_path, corpus, capsys):
    exp = write_experiment(tmp_path / "exp.py", corpus, "c.tokenizer.kind = 'word'\nc.tokenizer.vocab_size = 20")
    run_dir = tmp_path / "run"
    prepare(config_lib.load(exp), run_dir, log=lambda *_: None)  # the run's tokenizer is saved
    assert json.loads((run_dir / "tokenizer" / "lmjax_tokenizer_settings.json").read_text())["vocab_size"] == 20
    err = train_error(
        tmp_path,
        capsys,
        f"c.data.paths = {str(corpus / '*.txt')!r}\nc.tokenizer.kind = 'word'\nc.tokenizer.vocab_size = 30",
    )
    assert "holds a tokenizer made with tokenizer.vocab_size=20 but the config has 30" in err and "--workdir" in err
    err = train_error(tmp_path, capsys, f"c.data.paths = {str(corpus / '*.txt')!r}\nc.tokenizer.kind = 'char'")
    assert "holds a 'word' tokenizer but the config asks for tokenizer.kind='char'" in err


def test_changed_tiktoken_file_is_refused(tmp_path, corpus):
    from test_tokenizers import TEXTS, write_tiktoken_file

    enc = write_tiktoken_file(tmp_path / "enc.tiktoken", "".join(TEXTS), 270)
    exp = write_experiment(
        tmp_path / "exp.py", corpus, f"c.tokenizer.kind = 'tiktoken'\nc.tokenizer.path = {str(enc)!r}"
    )
    cfg = config_lib.load(exp)
    prepare(cfg, tmp_path / "run", log=lambda *_: None)
    prepare(cfg, tmp_path / "run", log=lambda *_: None)  # unchanged: reused
    write_tiktoken_file(enc, "".join(TEXTS), 280)
    with pytest.raises(UserError, match="different tokenizer from the one now at tokenizer.path"):
        prepare(cfg, tmp_path / "run", log=lambda *_: None)
