"""Perplexity equals a brute-force loop over every held-out token, last partial batch included."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import base_config
from lmjax.data.cache import TokenSplit
from lmjax.evaluate import evaluate, plan_windows
from lmjax.train.loss import make_row_nll
from lmjax.models import build_model

CONTEXT = 8


def _split(docs):
    eot = 256
    tokens = np.concatenate([np.append(d, eot) for d in docs]).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])]).astype(np.int64)
    return TokenSplit(tokens, starts, np.array([len(d) for d in docs], np.int64))


@pytest.fixture(scope="module")
def tiny():
    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads = 16, 1, 2
    model = build_model(c.model, 257, CONTEXT)
    params = nn.unbox(model.init(jax.random.PRNGKey(3), jnp.zeros((1, CONTEXT), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n) for n in (1, 2, 5, 8, 9, 13, 30)]
    return model, params, docs


def _brute(model, params, docs, max_context):
    """Each target t of each document predicted from tokens max(0, t - max_context)..t-1."""
    total, count = 0.0, 0
    for d in docs:
        for t in range(1, len(d)):
            ctx = d[max(0, t - max_context):t]
            logits = model.apply({"params": params}, jnp.asarray(ctx, jnp.int32)[None])
            total += float(-jax.nn.log_softmax(logits[0, -1])[d[t]])
            count += 1
    return total, count


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


@pytest.mark.parametrize("stride,batch", [(1, 3), (CONTEXT, 4), (3, 5)])
def test_perplexity_equals_brute_force(tiny, stride, batch):
    model, params, docs = tiny
    report = evaluate(jax.jit(make_row_nll(model)), params, _split(docs), np.ones(257, np.int32),
                      CONTEXT, stride, batch)
    # A target predicted by a window starting at s sees tokens s..t-1; with stride S its left
    # context beyond the stride is context - S. Brute force: stride 1 = full context (up to
    # CONTEXT tokens); non-overlapping = context restarts every CONTEXT targets.
    if stride == 1:
        total, count = _brute(model, params, docs, CONTEXT)
    else:
        total, count = 0.0, 0
        for d in docs:
            for w in plan_windows(len(d), CONTEXT, stride):
                for t in range(w.first_new, min(w.start + CONTEXT, len(d) - 1) + 1):
                    ctx = d[w.start:t]
                    logits = model.apply({"params": params}, jnp.asarray(ctx, jnp.int32)[None])
                    total += float(-jax.nn.log_softmax(logits[0, -1])[d[t]])
                    count += 1
    assert report["tokens"] == count == sum(len(d) - 1 for d in docs)
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(report["nats_per_token"] / math.log(2), rel=1e-9)


def test_result_does_not_depend_on_batch_size(tiny):
    model, params, docs = tiny
    fn = jax.jit(make_row_nll(model))
    a = evaluate(fn, params, _split(docs), np.ones(257, np.int32), CONTEXT, 4, 1)
    b = evaluate(fn, params, _split(docs), np.ones(257, np.int32), CONTEXT, 4, 7)
    assert a["tokens"] == b["tokens"]
    assert a["nats_per_token"] == pytest.approx(b["nats_per_token"], rel=1e-6)


def test_stream_mode_predicts_all_but_one_token(tiny):
    model, params, docs = tiny
    split = _split(docs)
    r = evaluate(jax.jit(make_row_nll(model)), params, split, np.ones(257, np.int32), CONTEXT, CONTEXT, 4, stream=True)
    assert r["tokens"] == len(split.tokens) - 1
