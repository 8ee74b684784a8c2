"""Perplexity and bits per byte equal a brute force written without lmjax.evaluate's planning.

The brute force predicts each target of each document on its own, from the exact left
context the windowing promises (module docstring of lmjax.evaluate): target t is predicted by
the first window, of those starting at 0, S, 2S, ..., whose `context` inputs reach it, so its
context is the tokens from that window's start up to t - 1. Bytes are counted from the text,
not from the tokenizer's per-id table. The tokenizer is a real byte-level BPE on text with
2-, 3- and 4-byte characters, so bits/byte differs from bits/token / 1.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import base_config
from lmjax.data.cache import TokenSplit
from lmjax.data.tokenizers import train_bpe
from lmjax.evaluate import evaluate, plan_windows
from lmjax.models import build_model
from lmjax.train.loss import make_row_nll

CONTEXT = 8
WORDS = ["naïve", "café", "Größe", "π≈3.14", "—", "日本語", "emoji🙂", "the", "of", "and", "über", "ζ", "data", "x"]


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    # Every document starts with an ASCII word, so the one unpredicted token's bytes are plain text.
    texts = ["A"] + [" ".join(["Doc"] + list(rng.choice(WORDS, n))) for n in (1, 2, 3, 5, 9, 20)]
    tok = train_bpe([" ".join(WORDS)] * 20 + texts, 300)
    docs = [np.asarray(tok.encode(t), np.int64) for t in texts]
    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads = 16, 1, 2
    model = build_model(c.model, tok.vocab_size, CONTEXT)
    params = nn.unbox(model.init(jax.random.PRNGKey(3), jnp.zeros((1, CONTEXT), jnp.int32))["params"])
    # Predicted bytes of a document: its UTF-8 minus its first token (ASCII, one char per byte).
    predicted_bytes = sum(len(t.encode("utf-8")) - len(tok.decode([d[0]])) for t, d in zip(texts, docs))
    return model, params, tok, docs, predicted_bytes


def _split(docs, eot):
    tokens = np.concatenate([np.append(d, eot) for d in docs]).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])]).astype(np.int64)
    return TokenSplit(tokens, starts, np.array([len(d) for d in docs], np.int64))


_BRUTE = {}


def _brute_nll(model, params, docs, stride):
    """Sum of NLL (float64) and count over targets 1..n-1 of every document, each target on its
    own row: its context, right-padded to CONTEXT (causal: the padding is never seen)."""
    key = (id(params), tuple(map(len, docs)), stride)
    if key not in _BRUTE:
        rows, last, targets = [], [], []
        for d in docs:
            for t in range(1, len(d)):
                start = max(0, math.ceil((t - CONTEXT) / stride)) * stride  # first window whose inputs reach t
                rows.append(np.pad(d[start:t], (0, CONTEXT - (t - start))))
                last.append(t - start - 1)
                targets.append(d[t])
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
        padded = rows + [rows[0]] * (-len(rows) % 64)  # whole chunks of 64 rows: one compilation
        logits = np.concatenate(
            [
                np.asarray(forward(params, jnp.asarray(np.stack(padded[i : i + 64]), jnp.int32)))
                for i in range(0, len(padded), 64)
            ]
        )[np.arange(len(rows)), last].astype(np.float64)
        top = logits.max(-1)
        nll = np.log(np.exp(logits - top[:, None]).sum(-1)) + top - logits[np.arange(len(rows)), targets]
        _BRUTE[key] = float(nll.sum()), len(rows)
    return _BRUTE[key]


def test_windows_predict_each_target_once():
    for n in range(0, 40):
        for stride in (1, 3, CONTEXT):
            ws = plan_windows(n, CONTEXT, stride)
            covered = []
            for w in ws:
                last = min(w.start + CONTEXT, n - 1)
                covered += list(range(w.first_new, last + 1))
                assert w.first_new - 1 - w.start >= 0
            assert covered == list(range(1, n))


@pytest.mark.parametrize("stride,batch", [(1, 3), (3, 5), (5, 2), (CONTEXT, 4)])
def test_perplexity_and_bits_per_byte_equal_brute_force(tiny, stride, batch):
    # Mutations of lmjax/evaluate.py caught (each tried once by hand): windows advance by the
    # context instead of the stride (plan_windows); the last partial batch dropped; bytes summed
    # over every target of a window, not only the weighted (new) ones.
    model, params, tok, docs, predicted_bytes = tiny
    assert max(len(d) for d in docs) > 3 * CONTEXT and min(len(d) for d in docs) == 1
    assert tok.token_bytes()[np.concatenate(docs)].max() >= 3  # multi-byte tokens are really there
    report = evaluate(
        jax.jit(make_row_nll(model)), params, _split(docs, tok.eot_id), tok.token_bytes(), CONTEXT, stride, batch
    )
    total, count = _brute_nll(model, params, docs, stride)
    assert report["tokens"] == count == sum(len(d) - 1 for d in docs)
    assert report["bytes"] == predicted_bytes
    assert report["nats_per_token"] == pytest.approx(total / count, rel=1e-6, abs=0)
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6, abs=0)
    assert report["bits_per_byte"] == pytest.approx(total / math.log(2) / predicted_bytes, rel=1e-6, abs=0)
    assert predicted_bytes > 1.5 * count  # bits/byte is not bits/token in disguise


def test_strides_give_different_numbers(tiny):
    """The comparison above can tell the strides apart: more left context, another loss."""
    model, params, _, docs, _ = tiny
    a, _ = _brute_nll(model, params, docs, 1)
    b, _ = _brute_nll(model, params, docs, CONTEXT)
    assert abs(a - b) / abs(a) > 1e-4


def test_result_does_not_depend_on_batch_size(tiny):
    model, params, tok, docs, _ = tiny
    fn = jax.jit(make_row_nll(model))
    a = evaluate(fn, params, _split(docs, tok.eot_id), tok.token_bytes(), CONTEXT, 4, 1)
    b = evaluate(fn, params, _split(docs, tok.eot_id), tok.token_bytes(), CONTEXT, 4, 7)
    assert a["tokens"] == b["tokens"] and a["bytes"] == b["bytes"]
    assert a["nats_per_token"] == pytest.approx(b["nats_per_token"], rel=1e-6, abs=0)


def test_stream_mode_equals_brute_force_over_the_stream(tiny):
    model, params, tok, docs, _ = tiny
    split = _split(docs, tok.eot_id)
    r = evaluate(jax.jit(make_row_nll(model)), params, split, tok.token_bytes(), CONTEXT, 3, 4, stream=True)
    total, count = _brute_nll(model, params, [np.asarray(split.tokens, np.int64)], 3)
    assert r["tokens"] == count == len(split.tokens) - 1
    assert r["nats_per_token"] == pytest.approx(total / count, rel=1e-6, abs=0)
