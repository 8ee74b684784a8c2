"""Generation: the decode state (KV cache, LSTM state) reproduces the full forward pass, and
the sampling loop keeps its promises (greedy, batching, top-k/top-p, seeds, stops, errors)."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import base_config
from lmjax.errors import UserError
from lmjax.models import build_model
from lmjax.models.lstm import LSTMLanguageModel
from lmjax.sample import cut_at_stop, filter_logits, generate, greedy_without_cache, init_cache

VOCAB, MAX_LEN = 61, 40

MODELS = {
    "gpt2": {},
    "llama_gqa": {
        "positions": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "bias": False,
        "tie_embeddings": False,
        "n_kv_heads": 2,
        "d_ff": 64,
    },
    "mqa_scan": {"positions": "rope", "n_kv_heads": 1, "scan_layers": True},
    "lstm": {"kind": "lstm"},
}


def make(**opts):
    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads = 32, 2, 4
    for k, v in opts.items():
        c.model[k] = v
    return build_model(c.model, VOCAB, MAX_LEN)


def sharp_params(model):
    """Initial parameters scaled up (the Transformer's embedding, all of the LSTM's) so that
    logits are well separated, continuations vary, and an argmax never hinges on a float32
    rounding difference."""
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    if isinstance(model, LSTMLanguageModel):
        return jax.tree.map(lambda x: x * 10, params)
    return {**params, "wte": params["wte"] * 10}


def random_tokens(shape, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


@pytest.mark.parametrize("opts", MODELS.values(), ids=MODELS.keys())
def test_cached_decoding_equals_full_forward_at_every_position(opts):
    model = make(**opts)
    params = sharp_params(model)
    tokens = jnp.asarray(random_tokens((2, 24)))
    full = np.asarray(jax.jit(model.apply)({"params": params}, tokens))

    step = jax.jit(partial(model.apply, decode=True, mutable=["cache"]))
    cache = init_cache(model, params, 2)
    pieces, start = [], 0
    for size in [5] + [1] * 12 + [3, 4]:  # a prompt chunk, single tokens, more chunks
        chunk = tokens[:, start : start + size]
        positions = start + jnp.broadcast_to(jnp.arange(size), chunk.shape)
        logits, mutated = step({"params": params, "cache": cache}, chunk, positions)
        cache = mutated["cache"]
        pieces.append(np.asarray(logits))
        start += size
    assert start == tokens.shape[1]
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("opts", [MODELS["llama_gqa"], MODELS["lstm"]], ids=["llama_gqa", "lstm"])
def test_greedy_generation_equals_argmax_rollout_without_cache(opts):
    model = make(**opts)
    params = sharp_params(model)
    prompts = [random_tokens(6, seed=2).tolist(), random_tokens(3, seed=3).tolist()]
    new = 20
    got = generate(model, params, prompts, new, greedy=True, max_len=MAX_LEN)
    buffer = np.zeros((2, 6 + new), np.int32)
    for i, p in enumerate(prompts):
        buffer[i, : len(p)] = p
    ref = np.asarray(greedy_without_cache(model, params, jnp.asarray(buffer), jnp.asarray([6, 3])))
    assert got[0] == ref[0, 6 : 6 + new].tolist()
    assert got[1] == ref[1, 3 : 3 + new].tolist()
    assert len(set(got[0])) > 1, "a constant continuation proves little"


@pytest.mark.parametrize("opts", [MODELS["gpt2"], MODELS["lstm"]], ids=["gpt2", "lstm"])
def test_batched_prompts_of_different_lengths_continue_as_alone(opts):
    model = make(**opts)
    params = sharp_params(model)
    prompts = [random_tokens(n, seed=n).tolist() for n in (3, 9)]
    together = generate(model, params, prompts, 12, greedy=True, max_len=MAX_LEN)
    for p, out in zip(prompts, together):
        assert out == generate(model, params, [p], 12, greedy=True, max_len=MAX_LEN)[0]
        assert len(out) == 12


# The next two tests use the same shapes, so they share compiled loops (eot_id is traced).
PROMPTS = [random_tokens(4).tolist(), random_tokens(4, seed=9).tolist()]


def test_sampling_top_k_1_is_greedy_and_seeds_repeat():
    model = make()
    params = sharp_params(model)
    prompts = PROMPTS
    greedy = generate(model, params, prompts, 15, greedy=True)
    assert generate(model, params, prompts, 15, temperature=0.7, top_k=1, seed=5) == greedy
    a = generate(model, params, prompts, 15, temperature=1.5, seed=1)
    assert a == generate(model, params, prompts, 15, temperature=1.5, seed=1)
    assert a != generate(model, params, prompts, 15, temperature=1.5, seed=2)


def test_generation_stops_at_end_of_text():
    model = make()
    params = sharp_params(model)
    prompts = PROMPTS
    free = generate(model, params, prompts, 15, greedy=True)
    eot = free[0][3]
    stopped = generate(model, params, prompts, 15, greedy=True, eot_id=eot)
    assert stopped[0] == free[0][: free[0].index(eot)]
    assert stopped[1] == (free[1][: free[1].index(eot)] if eot in free[1] else free[1])


def test_top_p_keeps_exactly_the_nucleus():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda **kw: set(np.flatnonzero(np.asarray(filter_logits(logits, **kw))[0] > -1e30).tolist())  # noqa: E731
    # Smallest set, most probable first, whose mass reaches top_p.
    assert kept(top_k=0, top_p=0.45) == {1}
    assert kept(top_k=0, top_p=0.6) == {1, 3}
    assert kept(top_k=0, top_p=0.8) == {1, 3, 4}
    assert kept(top_k=0, top_p=0.9) == {1, 3, 4, 2}
    assert kept(top_k=0, top_p=1.0) == {0, 1, 2, 3, 4}
    assert kept(top_k=2, top_p=1.0) == {1, 3}
    assert kept(top_k=2, top_p=0.45) == {1}
    # Samples come from the renormalised nucleus.
    draws = np.asarray(jax.random.categorical(jax.random.PRNGKey(0), filter_logits(logits, 0, 0.8), shape=(4000,)))
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [0, 0.5 / 0.85, 0, 0.2 / 0.85, 0.15 / 0.85], atol=0.03)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"temperature": -1.0}, "temperature must be positive"),
        ({"top_k": -1}, "top-k must be 0"),
        ({"top_k": VOCAB + 1}, "larger than the vocabulary"),
        ({"top_p": 0.0}, "top-p must be in"),
        ({"top_p": 1.5}, "top-p must be in"),
        ({"max_new_tokens": 0}, "max-new-tokens must be positive"),
        ({"prompts": [[1] * MAX_LEN]}, "context is 40"),
        ({"prompts": [[1], []]}, "at least one token"),
    ],
)
def test_bad_sampling_arguments_are_user_errors(kwargs, match):
    model = make()
    args = {"prompts": [[1, 2]], "max_new_tokens": 4, "max_len": MAX_LEN, **kwargs}
    with pytest.raises(UserError, match=match):
        generate(model, None, args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_stop_strings_cut_at_the_first_one():
    assert cut_at_stop("abc\n\ndef END x", ["END", "\n\n"]) == "abc"
    assert cut_at_stop("abc", ["zz", ""]) == "abc"
