"""Benchmark the data layer on the standard library corpus (no download).

1. Tokenization throughput (MB of UTF-8 text per second, one process) of each tokenizer kind:
   byte, char, word, bpe (trained here on part of the corpus), and tiktoken with --tiktoken FILE.
2. Tokenize-and-pack: lmjax's token cache build (build_or_load) against the libraries' own
   batch encoding (HF tokenizers encode_batch_fast, tiktoken encode_ordinary_batch) on the same
   text and vocabulary, on one core and on two (data.num_proc=2: lmjax gives these tokenizers
   two threads in one process, as the library gets; RAYON_NUM_THREADS for HF's),
   with the build's peak RSS; then the peak RSS of a larger build (byte tokenizer).
3. Training step time of the default experiment's model (experiments/default.py) fed by the
   real pipeline (TrainBatches + Prefetcher + put_batch) against one synthetic batch of the
   same shape already on the device, in alternating rounds within one run, and the ratio.
   Target: the real pipeline costs < 3% extra.

Usage: python scripts/bench_data.py [--only tokenizers|pack|training] [--rounds 8] [--steps 8] [--tokenize-mb 8]
       [--tiktoken r50k_base.tiktoken] [--pack-mb 4] [--pack-rounds 2] [--rss-mb 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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
        tok = build_tokenizer(
            ConfigDict({"kind": kind, "vocab_size": vocab, "path": path}), train_texts if kind == "bpe" else texts
        )
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_tokens = 0
        for i in range(0, len(texts), 256):  # the cache's datasets.map batch size
            n_tokens += sum(len(ids) for ids in tok.encode_batch(texts[i : i + 256]))
        seconds = time.perf_counter() - t0
        print(f"  {kind:9}{tok.vocab_size:>8}{built:>9.2f}{mb / seconds:>9.2f}{n_tokens / (mb * 2**20):>13.3f}")


# ---------------------------------------------------------------------------------------
# Tokenize-and-pack (lmjax's token cache build) against the libraries' own batch encoding.
# Each measurement runs in a fresh process (its own thread settings and peak RSS), on the same
# memory-mapped dataset, read in batches of 256 documents by both sides.


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """The byte → character table of byte-level BPE (GPT-2's; HF's ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def write_tiktoken_like(bpe, path: Path) -> Path:
    """The merges of a byte-level HF BPE as a .tiktoken file: rank = id (merge order), so
    tiktoken encodes the same vocabulary (the bench counts documents whose ids differ)."""
    import base64

    to_byte = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    vocab = bpe.tok.get_vocab(with_added_tokens=False)
    ranked = sorted((i, bytes(to_byte[c] for c in token)) for token, i in vocab.items())
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, (_, t) in enumerate(ranked)))
    return path


def worker(spec: dict) -> dict:
    """One measurement (in its own process): 'library' encodes batches with the tokenizer
    library itself; 'lmjax' builds the token cache (build_or_load) with data.num_proc."""
    import datasets

    from lmjax.data.tokenizers import load_tokenizer

    ds = datasets.load_from_disk(spec["dataset"])
    tok = load_tokenizer(spec["tokenizer"])
    with PeakRSS() as memory:
        t0 = time.perf_counter()
        tokens = encode_or_build(spec, ds, tok)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "rss_before": memory.before, "rss_peak": memory.peak}


def encode_or_build(spec: dict, ds, tok) -> int:
    """The token count of `ds`, encoded by the library alone or built into lmjax's cache."""
    from ml_collections import ConfigDict

    if spec["side"] == "library":

        def encode(texts):  # HF's threads: RAYON_NUM_THREADS, set by the caller
            if tok.kind == "tiktoken":
                return tok.enc.encode_ordinary_batch(texts, num_threads=spec["procs"])
            return [e.ids for e in tok.tok.encode_batch_fast(texts)]

        return sum(len(ids) for batch in ds.iter(batch_size=256) for ids in encode(batch["text"]))
    from lmjax.data.cache import build_or_load

    cfg = ConfigDict({"cache_dir": spec["cache_dir"], "num_proc": spec["procs"]})
    return len(build_or_load({"train": ds}, tok, cfg, log=lambda *_: None)["train"].tokens)


def rss() -> dict[str, int]:
    """This process's resident memory in bytes: 'anon' (heap: what it holds itself) and 'file'
    (pages of memory-mapped files, such as the dataset being read: the kernel drops them when
    memory is short)."""
    fields = {"RssAnon:": "anon", "RssFile:": "file"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0] + ":"
        if key in fields:
            out[fields[key]] = int(line.split()[1]) * 1024
    return out


class PeakRSS:
    """The peaks of `rss()` while the `with` block runs, sampled every 10 ms in a thread."""

    def __enter__(self):
        import threading

        self.before, self.peak = rss(), rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            now = rss()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(spec: dict) -> dict:
    import json
    import os
    import subprocess

    env = {
        **os.environ,
        "RAYON_NUM_THREADS": str(spec["procs"]),  # HF tokenizers' threads, on both sides
        "TOKENIZERS_PARALLELISM": "true",
        "HF_DATASETS_OFFLINE": "1",
    }
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_pack(texts: list[str], bpe_train_mb: float, rounds: int, rss_mb: float, tmp: Path) -> None:
    import datasets

    from lmjax.data.tokenizers import ByteTokenizer, train_bpe
    from lmjax.data.vocab_tokenizers import TiktokenTokenizer

    mb = sum(len(t.encode("utf-8")) for t in texts) / 2**20
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp / "corpus"))
    bpe = train_bpe(read_stdlib(bpe_train_mb), 4096)
    bpe.save(tmp / "bpe")
    tik = TiktokenTokenizer(write_tiktoken_like(bpe, tmp / "bpe.tiktoken"))
    tik.save(tmp / "tiktoken")
    same = sum(list(a) == list(b) for a, b in zip(tik.encode_batch(texts), bpe.encode_batch(texts), strict=True))
    print(
        f"tokenize-and-pack against the libraries' batch encoding, {mb:.1f} MB of standard library source, "
        f"BPE of 4096 ids (HF tokenizers) and the same merges in tiktoken (ids identical in {same} of "
        f"{len(texts)} documents); MB/s, best of {rounds} alternating rounds:"
    )
    print(
        f"  {'tokenizer':10}{'cores':>6}{'library':>10}{'lmjax':>9}{'library/lmjax':>15}"
        f"{'lmjax peak heap (+ build)':>27}"
    )  # the main process; workers hold a batch each
    rates = {}
    for procs in (1, 2):
        for kind in ("bpe", "tiktoken"):
            best = {"library": 0.0, "lmjax": 0.0}
            rss = ""
            for r in range(rounds):
                for side in ("library", "lmjax"):
                    got = measure(
                        {
                            "side": side,
                            "procs": procs,
                            "dataset": str(tmp / "corpus"),
                            "tokenizer": str(tmp / kind),
                            "cache_dir": str(tmp / f"cache{kind}{procs}{r}"),
                        }
                    )
                    best[side] = max(best[side], mb / got["seconds"])
                    if side == "lmjax":
                        rss = f"{got['rss_peak']['anon'] / 2**20:.0f} MiB (+{held(got):.0f})"
            rates[kind, procs] = best
            print(
                f"  {kind:10}{procs:>6}{best['library']:>10.2f}{best['lmjax']:>9.2f}"
                f"{best['library'] / best['lmjax']:>15.2f}{rss:>27}"
            )
    for procs in (1, 2):
        fastest = max(rates["bpe", procs]["library"], rates["tiktoken", procs]["library"])
        ratios = ", ".join(f"{k} {fastest / rates[k, procs]['lmjax']:.2f}x" for k in ("bpe", "tiktoken"))
        print(f"  {procs} core(s): the fastest library encoding / lmjax: {ratios}")

    copies = max(1, round(rss_mb / mb))
    big = datasets.Dataset.from_dict({"text": texts * copies})
    big.save_to_disk(str(tmp / "big"))
    del big
    ByteTokenizer().save(tmp / "byte")
    got = measure(
        {
            "side": "lmjax",
            "procs": 1,
            "dataset": str(tmp / "big"),
            "tokenizer": str(tmp / "byte"),
            "cache_dir": str(tmp / "cachebig"),
        }
    )
    print(
        f"  memory: byte tokenizer on {mb * copies:.0f} MB ({copies} copies), {got['tokens'] * 2 / 2**20:.0f} MiB of "
        f"tokens written, {mb * copies / got['seconds']:.1f} MB/s: peak heap (anonymous RSS) "
        f"{got['rss_peak']['anon'] / 2**20:.0f} MiB, of which the build added {held(got):.0f} MiB; peak file-backed "
        f"RSS {got['rss_peak']['file'] / 2**20:.0f} MiB (pages of the memory-mapped dataset read, dropped by the "
        "kernel when memory is short)"
    )


def held(measured: dict) -> float:
    """MiB of heap a build added to what the process held before it."""
    return (measured["rss_peak"]["anon"] - measured["rss_before"]["anon"]) / 2**20


def bench_training(cfg, run_dir: Path, rounds: int, steps: int) -> None:
    import jax

    from lmjax.data import prepare
    from lmjax.data.batches import Prefetcher
    from lmjax.run import build_run
    from lmjax.train.parallel import build_parallel

    data = prepare(cfg, run_dir, log=lambda *_: None)
    parallel = build_parallel(cfg.parallel)
    run = build_run(cfg, run_dir, data.tokenizer.vocab_size, parallel)
    state = parallel.init_state(run.init_state, run.shardings, jax.random.PRNGKey(cfg.seed))
    step_fn = run.compile_train_step()
    batches = run.train_batches(data.train)
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
    print(
        f"training step, {cfg.train.batch_size} x {cfg.data.seq_len} tokens, {parallel.describe()}, "
        f"{rounds} alternating rounds x {steps} steps:"
    )
    for name, times in (("synthetic in-memory batch", synth_times), ("real pipeline", real_times)):
        print(
            f"  {name:27} median {statistics.median(times) * 1e3:8.2f} ms/step, best round {min(times) * 1e3:8.2f}"
            f"   (rounds: {', '.join(f'{t * 1e3:.1f}' for t in times)})"
        )
    for name, pick in (("median", statistics.median), ("best round", min)):
        ratio = pick(real_times) / pick(synth_times)
        print(f"  ratio real / synthetic ({name:10}) {ratio:.4f}  ({(ratio - 1) * 100:+.2f}%; target < +3%)")
    print(
        f"  host time to build and place one batch (overlapped by the prefetcher in training): "
        f"{host * 1e3:.3f} ms = {host / statistics.median(synth_times) * 100:.2f}% of a step"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tokenize-mb", type=float, default=8.0, help="MB of the corpus to time tokenizers on")
    p.add_argument("--bpe-train-mb", type=float, default=2.0, help="MB of the corpus to train BPE on")
    p.add_argument("--tiktoken", default="", help="a local .tiktoken file to time as well")
    p.add_argument("--pack-mb", type=float, default=4.0, help="MB of the corpus for tokenize-and-pack")
    p.add_argument("--pack-rounds", type=int, default=2)
    p.add_argument("--rss-mb", type=float, default=64.0, help="MB of corpus for the peak-memory measurement")
    p.add_argument("--only", choices=("tokenizers", "pack", "training"), help="run one section")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import json

        print(json.dumps(worker(json.loads(args.worker))))
        return

    from lmjax import config as config_lib

    if args.only in (None, "tokenizers"):
        bench_tokenizers(read_stdlib(args.tokenize_mb), args.bpe_train_mb, args.tiktoken)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "pack"):
            bench_pack(read_stdlib(args.pack_mb), args.bpe_train_mb, args.pack_rounds, args.rss_mb, Path(tmp))
        if args.only in (None, "training"):
            cfg = config_lib.load(
                Path(__file__).resolve().parents[1] / "experiments" / "default.py",
                [f"--config.data.cache_dir={tmp}/cache"],
            )
            bench_training(cfg, Path(tmp) / "run", args.rounds, args.steps)


if __name__ == "__main__":
    main()
