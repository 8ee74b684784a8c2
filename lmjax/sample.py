"""Generation: one compiled loop (`lax.while_loop`) over positions with the model's decode
state (key/value cache or recurrent state), batched prompts of different lengths.

Row b's tokens 0..len_b-1 are its prompt; positions past it are sampled. The common prefix
of all prompts is fed in one chunk; after that, each iteration feeds one token per row and
keeps the prompt's own next token while a row is still inside its prompt.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError


def check_sampling(temperature: float, top_k: int, top_p: float, vocab_size: int | None = None) -> None:
    if not temperature > 0:
        raise UserError(f"--temperature must be positive, got {temperature}; use --greedy for argmax decoding")
    if top_k < 0:
        raise UserError(f"--top-k must be 0 (off) or positive, got {top_k}")
    if vocab_size is not None and top_k > vocab_size:
        raise UserError(
            f"--top-k={top_k} is larger than the vocabulary ({vocab_size} tokens); use at most {vocab_size}, or 0 for "
            "off"
        )
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Mask to -inf all but the top-k tokens and the smallest set with probability ≥ top_p."""
    neg = jnp.finfo(logits_BxV.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, neg, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_BxV, -1), -1)
        # Keep a token if the mass of the tokens strictly above it is < top_p.
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_BxV, -1) < top_p, -1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_BxV, cutoff_idx, -1)
        logits_BxV = jnp.where(logits_BxV < cutoff, neg, logits_BxV)
    return logits_BxV


def init_cache(model, params, batch: int):
    """Zeroed decode state for `batch` rows (shapes from an abstract init, no compute)."""
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, jnp.zeros((batch, 1), jnp.int32), decode=True, mutable=["cache"])[1][
            "cache"
        ]
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@partial(jax.jit, static_argnames=("model", "total", "prefix", "greedy", "top_k", "top_p"))
def _generate(
    model,
    params,
    tokens_BxL,
    prompt_lens_B,
    rng,
    temperature,
    eot_id,
    *,
    total: int,
    prefix: int,
    greedy: bool,
    top_k: int,
    top_p: float,
):
    b = tokens_BxL.shape[0]

    def forward(cache, chunk_BxT, start):
        positions = start + jnp.broadcast_to(jnp.arange(chunk_BxT.shape[1]), chunk_BxT.shape)
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, chunk_BxT, positions_BxT=positions, decode=True, mutable=["cache"]
        )
        return logits[:, -1], mutated["cache"]

    cache = init_cache(model, params, b)
    logits_BxV, cache = forward(cache, tokens_BxL[:, :prefix], 0)

    def body(carry):
        t, tokens, cache, logits, done, key = carry  # logits predict position t
        key, sub = jax.random.split(key)
        if greedy:
            sampled = jnp.argmax(logits, -1)
        else:
            sampled = jax.random.categorical(sub, filter_logits(logits / temperature, top_k, top_p), -1)
        in_prompt = t < prompt_lens_B
        nxt = jnp.where(in_prompt, tokens[:, t], jnp.where(done, eot_id, sampled)).astype(jnp.int32)
        done = done | (~in_prompt & (nxt == eot_id))
        tokens = tokens.at[:, t].set(nxt)
        logits, cache = forward(cache, nxt[:, None], t)
        return t + 1, tokens, cache, logits, done, key

    def cond(carry):
        t, done = carry[0], carry[4]
        return (t < total) & ~jnp.all(done)

    init = (jnp.asarray(prefix), tokens_BxL, cache, logits_BxV, jnp.zeros(b, bool), rng)
    t, tokens, *_ = jax.lax.while_loop(cond, body, init)
    return tokens, t


def generate(
    model,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    eot_id: int = -1,
    max_len: int | None = None,
) -> list[list[int]]:
    """Continue each prompt; return the new tokens of each row (stopping at end-of-text).

    max_len (default: the model's context, for models with a KV cache) caps prompt + new
    tokens: a row may get fewer than max_new_tokens.
    """
    if not greedy:
        check_sampling(temperature, top_k, top_p, getattr(model.cfg, "vocab_size", None))
    max_len = max_len or getattr(model.cfg, "max_len", None)  # the KV cache holds this many
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if not prompts:
        raise UserError("no prompt given; pass at least one --prompt")
    lens = np.array([len(p) for p in prompts])
    if lens.min() < 1:
        raise UserError("each prompt needs at least one token")
    if max_len is not None and lens.max() >= max_len:
        raise UserError(f"the prompt is {lens.max()} tokens, but the model's context is {max_len}; shorten the prompt")
    total = int(lens.max()) + max_new_tokens
    if max_len is not None:
        total = min(total, max_len)
    tokens = np.zeros((len(prompts), total), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    out, _ = _generate(
        model,
        params,
        jnp.asarray(tokens),
        jnp.asarray(lens),
        jax.random.PRNGKey(seed),
        jnp.float32(temperature),
        jnp.int32(eot_id),
        total=total,
        prefix=int(lens.min()),
        greedy=greedy,
        top_k=top_k,
        top_p=top_p,
    )
    out = np.asarray(out)
    result = []
    for i, n in enumerate(lens):
        new = out[i, n : n + max_new_tokens].tolist()
        if eot_id in new:
            new = new[: new.index(eot_id)]
        result.append(new)
    return result


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


@partial(jax.jit, static_argnames=("model",))
def greedy_without_cache(model, params, tokens_BxL, prompt_lens_B):
    """Reference greedy decoding with no decode state: row b keeps its first prompt_lens_B[b]
    tokens and fills the rest of the L positions by argmax, each new token costing a full
    forward pass over all L (causal, so the unwritten tail is ignored). O(L²); for tests
    and benchmarks. Returns tokens int32[B, L]."""

    def body(t, tokens_BxL):
        logits_BxV = model.apply({"params": params}, tokens_BxL)[:, t - 1]
        nxt_B = jnp.where(t < prompt_lens_B, tokens_BxL[:, t], jnp.argmax(logits_BxV, -1))
        return tokens_BxL.at[:, t].set(nxt_B.astype(jnp.int32))

    return jax.lax.fori_loop(jnp.min(prompt_lens_B), tokens_BxL.shape[1], body, tokens_BxL)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids; the end-of-text id for an empty one (generation needs a first token)."""
    return tokenizer.encode(prompt) or [tokenizer.eot_id]


def context_length(model) -> int | None:
    """The most tokens the model attends to (a Transformer's max_len); None for the LSTM."""
    return getattr(getattr(model, "cfg", None), "max_len", None)


def sample_text(model, params, tokenizer, sample_cfg, max_new_tokens: int = 100) -> str:
    """A short sample (prompt + continuation) for the logs, with the config's `sample` settings."""
    prompt = sample_cfg.prompt or "\n"
    ids = prompt_ids(tokenizer, prompt)
    max_len = context_length(model)
    try:
        new = generate(
            model,
            params,
            [ids],
            max_new_tokens,
            temperature=sample_cfg.temperature,
            top_k=sample_cfg.top_k,
            top_p=sample_cfg.top_p,
            seed=sample_cfg.seed,
            eot_id=tokenizer.eot_id,
            max_len=max_len,
        )[0]
    except UserError as e:  # e.g. a prompt longer than the context: the run itself is fine
        return f"(no sample: {e})"
    return prompt + tokenizer.decode_after(ids, new)  # as `lmjax sample` prints it
