"""Sampling throughput: the KV cache against recomputing the whole context for each token.

    PYTHONPATH=. python scripts/bench_sample.py [--new 256 1024] [--batch 1]

Both decode greedily from the same randomly initialised model (throughput does not depend
on the weights) and the same prompt, in one run:
  cached     lmjax.sample.generate: one compiled lax.while_loop, one token per step
             through the key/value cache.
  no cache   lmjax.sample.greedy_without_cache: a jitted loop of full forward passes over
             the whole prompt + new-token buffer, one pass per new token.
Compilation is excluded (a warm-up call, or ahead-of-time compilation for the slow loop);
each figure is the best of --repeats timed runs. The two must produce the same tokens.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import base_config
from lmjax.models import build_model
from lmjax.sample import generate, greedy_without_cache

VOCAB = 257  # bytes + end-of-text


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new", type=int, nargs="+", default=[256, 1024], help="new tokens per run")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=1152)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cache-repeats", type=int, default=1, help="repeats of the slow no-cache loop")
    args = p.parse_args()
    if args.prompt_len + max(args.new) > args.context:
        p.error(f"--prompt-len + max(--new) = {args.prompt_len + max(args.new)} exceeds --context {args.context}")

    c = base_config()
    c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.max_len = (
        args.layers,
        args.width,
        args.heads,
        args.context,
    )
    model = build_model(c.model, VOCAB, args.context)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    prompts = np.random.default_rng(0).integers(0, 256, (args.batch, args.prompt_len)).astype(np.int32)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); model: {args.layers} layers, "
        f"width {args.width}, {args.heads} heads, context {args.context}, {n_params / 1e6:.2f}M parameters; "
        f"batch {args.batch}, prompt {args.prompt_len} tokens, greedy"
    )
    print(f"{'new tokens':>10} {'cached tok/s':>14} {'no-cache tok/s':>15} {'speed-up':>9}")
    for new in args.new:
        total = args.prompt_len + new
        cached = lambda: generate(model, params, prompts.tolist(), new, greedy=True, max_len=args.context)  # noqa: E731
        cached()  # compile
        t_cached, out_cached = best_time(cached, args.repeats)

        buffer = jnp.zeros((args.batch, total), jnp.int32).at[:, : args.prompt_len].set(prompts)
        lens = jnp.full((args.batch,), args.prompt_len, jnp.int32)
        compiled = greedy_without_cache.lower(model, params, buffer, lens).compile()
        t_full, out_full = best_time(lambda: compiled(params, buffer, lens), args.no_cache_repeats)

        same = np.array_equal(np.asarray(out_full)[:, args.prompt_len :], np.asarray(out_cached))
        n_tokens = args.batch * new
        print(
            f"{new:>10} {n_tokens / t_cached:>14.1f} {n_tokens / t_full:>15.1f} {t_full / t_cached:>8.1f}x"
            f"   (same tokens: {same})",
            flush=True,
        )


if __name__ == "__main__":
    main()
