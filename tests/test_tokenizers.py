"""Tokenizers: round trips (hypothesis), save/load identity, vocabularies, byte counts, errors."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import ConfigDict

from lmjax.data.tokenizers import EOT, ByteTokenizer, build_tokenizer, load_tokenizer, train_bpe
from lmjax.data.vocab_tokenizers import EOS, GPT2_PATTERN, UNK, CharTokenizer, WordTokenizer
from lmjax.errors import UserError

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.\nIt was not amused.\n",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂 and math ∑x².\n",
] * 3
ANY_TEXT = st.text(max_size=200) | st.sampled_from(["", EOT, f"a{EOT}b", "\r\n\t ", "🙂" * 3])
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def tok_cfg(kind: str, vocab_size: int = 0, path: str = "") -> ConfigDict:
    return ConfigDict({"kind": kind, "vocab_size": vocab_size, "path": path})


def write_tiktoken_file(path: Path, text: str, vocab_size: int = 300) -> Path:
    """A small BPE encoding in the .tiktoken format (base64 token, rank), trained on `text`."""
    from tiktoken._educational import bpe_train

    ranks = bpe_train(text, vocab_size, GPT2_PATTERN, visualise=None)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1])))
    return path


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS, 300)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> Path:
    return write_tiktoken_file(tmp_path_factory.mktemp("tiktoken") / "small.tiktoken", "".join(TEXTS))


@pytest.fixture(scope="module")
def all_tokenizers(bpe, tiktoken_file):
    return {
        "byte": ByteTokenizer(),
        "char": build_tokenizer(tok_cfg("char"), TEXTS),
        "word": build_tokenizer(tok_cfg("word"), TEXTS),
        "bpe": bpe,
        "tiktoken": build_tokenizer(tok_cfg("tiktoken", path=str(tiktoken_file)), TEXTS),
    }


@PROPERTY
@given(text=ANY_TEXT)
def test_byte_round_trips_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


@PROPERTY
@given(text=ANY_TEXT)
def test_byte_level_bpe_round_trips_any_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.eot_id not in ids  # '<|endoftext|>' inside a text is text
    assert bpe.decode(ids) == text


@PROPERTY
@given(text=ANY_TEXT)
def test_tiktoken_round_trips_any_text(all_tokenizers, text):
    tok = all_tokenizers["tiktoken"]
    ids = tok.encode(text)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == tok.decode(tok.encode_batch([text])[0]) == text


@PROPERTY
@given(data=st.data())
def test_char_round_trips_text_of_its_vocabulary(all_tokenizers, data):
    tok = all_tokenizers["char"]
    text = data.draw(st.text(alphabet=st.sampled_from(tok.chars), max_size=200))
    ids = tok.encode(text)
    assert tok.unk_id not in ids and len(ids) == len(text)
    assert tok.decode(ids) == text


@PROPERTY
@given(data=st.data())
def test_word_round_trips_single_spaced_lines_of_its_vocabulary(all_tokenizers, data):
    tok = all_tokenizers["word"]
    lines = data.draw(st.lists(st.lists(st.sampled_from(tok.words[2:]), max_size=6), max_size=5))
    text = "".join(" ".join(words) + "\n" for words in lines)
    ids = tok.encode(text)
    assert ids.count(tok.eos_id) == len(lines)
    assert tok.decode(ids) == text


def test_char_vocabulary_and_unknown():
    tok = CharTokenizer.train(["abca", "cab\n"])
    assert tok.chars == ["\n", "a", "b", "c"]
    assert (tok.eot_id, tok.unk_id, tok.vocab_size) == (4, 5, 6)
    assert tok.encode("cz\n") == [3, 5, 0]
    assert tok.decode([3, 5, 4, 0]) == "c\ufffd\n"  # <unk> shows as U+FFFD, EOT as nothing
    capped = CharTokenizer.train(["aaaabbbc"], vocab_size=4)  # two characters + EOT + <unk>
    assert capped.chars == ["a", "b"] and capped.encode("c") == [capped.unk_id]


def test_word_vocabulary_cap_unknown_and_eos():
    tok = WordTokenizer.train(["the cat sat\nthe dog sat\n", "the end"], vocab_size=5)
    assert tok.words[:2] == [UNK, EOS] and set(tok.words[2:]) == {"the", "sat"}
    assert tok.vocab_size == 5 and tok.eot_id == 4
    ids = tok.encode("the cat\n  sat  \n")
    assert ids == [tok.index["the"], tok.unk_id, tok.eos_id, tok.index["sat"], tok.eos_id]
    assert tok.decode(ids + [tok.eot_id]) == "the <unk>\nsat\n"


def test_word_token_bytes_count_single_spaced_lines_exactly():
    tok = WordTokenizer.train(["one two three\nfour five\n"])
    text = "one two three\nfour five\n"
    assert int(tok.token_bytes()[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    assert tok.token_bytes()[tok.eot_id] == 0


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", "tiktoken"])
def test_token_bytes_sum_to_utf8_length(all_tokenizers, kind):
    tok = all_tokenizers[kind]
    text = TEXTS[2] + TEXTS[0]
    table = tok.token_bytes()
    assert table.shape == (tok.vocab_size,) and table[tok.eot_id] == 0
    assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe", "tiktoken"])
def test_saved_tokenizer_reloads_identically(all_tokenizers, kind, tmp_path):
    tok = all_tokenizers[kind]
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert (back.kind, back.vocab_size, back.eot_id, back.fingerprint()) == (
        tok.kind,
        tok.vocab_size,
        tok.eot_id,
        tok.fingerprint(),
    )
    text = "".join(TEXTS) + "zebra ✓ unseen\n"
    assert back.encode(text) == list(tok.encode(text))
    assert [list(x) for x in back.encode_batch(TEXTS)] == [list(x) for x in tok.encode_batch(TEXTS)]
    np.testing.assert_array_equal(back.token_bytes(), tok.token_bytes())


def test_saved_tiktoken_is_self_contained(all_tokenizers, tiktoken_file, tmp_path):
    """The run keeps its own copy of the encoding file: eval works after the original moves."""
    import shutil

    moved = tmp_path / "elsewhere.tiktoken"
    shutil.copy(tiktoken_file, moved)
    tok = build_tokenizer(tok_cfg("tiktoken", path=str(moved)), [])
    tok.save(tmp_path / "tok")
    moved.unlink()
    assert load_tokenizer(tmp_path / "tok").encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_fingerprints_differ_between_tokenizers(all_tokenizers):
    prints = [t.fingerprint() for t in all_tokenizers.values()]
    assert len(set(prints)) == len(prints)
    assert build_tokenizer(tok_cfg("word", 10), TEXTS).fingerprint() != all_tokenizers["word"].fingerprint()


def test_tiktoken_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer.path '.*nope.tiktoken' does not exist.*local .tiktoken"):
        build_tokenizer(tok_cfg("tiktoken", path=str(tmp_path / "nope.tiktoken")), [])
    with pytest.raises(UserError, match="needs tokenizer.path"):
        build_tokenizer(tok_cfg("tiktoken"), [])
    with pytest.raises(UserError, match="never downloads"):
        build_tokenizer(tok_cfg("tiktoken", path="https://example.invalid/r50k_base.tiktoken"), [])
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not a tiktoken file\n")
    with pytest.raises(UserError, match="line 1 is not 'BASE64_TOKEN RANK'"):
        build_tokenizer(tok_cfg("tiktoken", path=str(bad)), [])


def test_decode_after_joins_a_continuation_to_its_prompt(all_tokenizers):
    word = all_tokenizers["word"]
    prompt, more = word.encode("the quick"), word.encode("brown fox")
    assert word.decode_after(prompt, more) == " brown fox"  # the space a word tokenizer puts between
    byte = all_tokenizers["byte"]
    assert byte.decode_after(byte.encode("ab"), byte.encode("cd")) == "cd"
