"""Benchmark the data layer on the standard library corpus (no download).

1. Tokenization throughput (MB of UTF-8 text per second, one process) of each tokenizer kind:
   byte, char, word, bpe (trained here on part of the corpus), and tiktoken with --tiktoken FILE.
   Also the token cache build (datasets.map + packing) for the byte tokenizer.
2. Training step time of the default experiment's model (experiments/default.py) fed by the
   real pipeline (TrainBatches + Prefetcher + put_batch) against one synthetic batch of the
   same shape already on the device, in alternating rounds within one run, and the ratio.
   Target: the real pipeline costs < 3% extra.

Usage: python scripts/bench_data.py [--rounds 8] [--steps 8] [--tokenize-mb 8] [--tiktoken r50k_base.tiktoken]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_stdlib(limit_mb: float) -> list[str]:
    from lmjax.data.sources import stdlib_files

    texts, size = [], 0
    for f in stdlib_files():
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= limit_mb * 2**20:
            break
    return texts


def bench_tokenizers(texts: list[str], bpe_train_mb: float, tiktoken_path: str) -> None:
    from ml_collections import ConfigDict

    from lmjax.data.tokenizers import build_tokenizer

    mb = sum(len(t.encode("utf-8")) for t in texts) / 2**20
    train_texts = read_stdlib(bpe_train_mb)
    kinds = [("byte", 0, ""), ("char", 0, ""), ("word", 50_000, ""), ("bpe", 4096, "")]
    if tiktoken_path:
        kinds.append(("tiktoken", 0, tiktoken_path))
    print(f"tokenization throughput, {mb:.1f} MB of standard library source, one process:")
    print(f"  {'kind':9}{'vocab':>8}{'build s':>9}{'MB/s':>9}{'tokens/byte':>13}")
    for kind, vocab, path in kinds:
        t0 = time.perf_counter()
        tok = build_tokenizer(ConfigDict({"kind": kind, "vocab_size": vocab, "path": path}),
                              train_texts if kind == "bpe" else texts)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_tokens = 0
        for i in range(0, len(texts), 256):  # the cache's datasets.map batch size
            n_tokens += sum(len(ids) for ids in tok.encode_batch(texts[i:i + 256]))
        seconds = time.perf_counter() - t0
        print(f"  {kind:9}{tok.vocab_size:>8}{built:>9.2f}{mb / seconds:>9.2f}{n_tokens / (mb * 2**20):>13.3f}")


def bench_cache(cfg) -> None:
    from lmjax.data.cache import build_or_load
    from lmjax.data.sources import load_corpus
    from lmjax.data.tokenizers import ByteTokenizer

    corpus = load_corpus(cfg.data)
    mb = sum(len((t or "").encode("utf-8")) for t in corpus.train["text"]) / 2**20
    t0 = time.perf_counter()
    build_or_load({"train": corpus.train}, ByteTokenizer(), cfg.data, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    print(f"token cache build (byte, datasets.map + pack, num_proc={cfg.data.num_proc}): {mb:.1f} MB in {seconds:.2f} s = {mb / seconds:.1f} MB/s")


def bench_training(cfg, run_dir: Path, rounds: int, steps: int) -> None:
    import jax

    from lmjax.data import prepare
    from lmjax.data.batches import Prefetcher, TrainBatches
    from lmjax.run import build_run
    from lmjax.train.parallel import build_parallel
    from lmjax.train.step import make_train_step

    data = prepare(cfg, run_dir, log=lambda *_: None)
    parallel = build_parallel(cfg.parallel)
    run = build_run(cfg, run_dir, data.tokenizer.vocab_size, parallel)
    state = parallel.init_state(run.init_state, run.shardings, jax.random.PRNGKey(cfg.seed))
    step_fn = parallel.compile_step(partial(make_train_step, run.model, run.tx, run.lr, cfg.train.grad_accum,
                                            on_nan=cfg.train.on_nan), run.shardings)
    batches = TrainBatches(data.train, cfg.data.seq_len, cfg.train.batch_size, cfg.data.seed,
                           parallel.process_block, cfg.data.document_mask)
    synthetic = parallel.put_batch(batches(10**6))  # same shape and dtypes, placed once

    def timed(stream) -> float:
        """Seconds per step, stepping as the train loop does: read step s's metrics after
        dispatching step s+1."""
        nonlocal state
        pending = None
        t0 = time.perf_counter()
        n = 0
        for _, batch in stream:
            state, metrics = step_fn(state, batch)
            if pending is not None:
                float(parallel.fetch(pending)["loss"])
            pending = metrics
            n += 1
        float(parallel.fetch(pending)["loss"])
        return (time.perf_counter() - t0) / n

    def real(start: int):
        pre = Prefetcher(batches, parallel.put_batch, start, start + steps)
        try:
            yield from pre
        finally:
            pre.close()

    timed(real(0))  # compile and warm up both paths
    timed((s, synthetic) for s in range(steps))
    synth_times, real_times = [], []
    for r in range(rounds):  # alternate, so drifts in machine load hit both alike
        synth_times.append(timed((s, synthetic) for s in range(steps)))
        real_times.append(timed(real((r + 1) * steps)))
    t0 = time.perf_counter()
    for s in range(50):
        jax.block_until_ready(parallel.put_batch(batches(s)))
    host = (time.perf_counter() - t0) / 50
    print(f"training step, {cfg.train.batch_size} x {cfg.data.seq_len} tokens, {parallel.describe()}, "
          f"{rounds} alternating rounds x {steps} steps:")
    for name, times in (("synthetic in-memory batch", synth_times), ("real pipeline", real_times)):
        print(f"  {name:27} median {statistics.median(times) * 1e3:8.2f} ms/step, best round {min(times) * 1e3:8.2f}"
              f"   (rounds: {', '.join(f'{t * 1e3:.1f}' for t in times)})")
    for name, pick in (("median", statistics.median), ("best round", min)):
        ratio = pick(real_times) / pick(synth_times)
        print(f"  ratio real / synthetic ({name:10}) {ratio:.4f}  ({(ratio - 1) * 100:+.2f}%; target < +3%)")
    print(f"  host time to build and place one batch (overlapped by the prefetcher in training): "
          f"{host * 1e3:.3f} ms = {host / statistics.median(synth_times) * 100:.2f}% of a step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tokenize-mb", type=float, default=8.0, help="MB of the corpus to time tokenizers on")
    p.add_argument("--bpe-train-mb", type=float, default=2.0, help="MB of the corpus to train BPE on")
    p.add_argument("--tiktoken", default="", help="a local .tiktoken file to time as well")
    args = p.parse_args()

    from lmjax import config as config_lib

    bench_tokenizers(read_stdlib(args.tokenize_mb), args.bpe_train_mb, args.tiktoken)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_lib.load(Path(__file__).resolve().parents[1] / "experiments" / "default.py",
                              [f"--config.data.cache_dir={tmp}/cache"])
        bench_cache(cfg)
        bench_training(cfg, Path(tmp) / "run", args.rounds, args.steps)


if __name__ == "__main__":
    main()
