"""lmjax against PyTorch eager: the same GPT-2-style model's train step, timed in alternation.

The PyTorch side is a reference written here in plain PyTorch (not a dependency of lmjax; torch
comes with the dev extra): token + learned position embeddings, pre-norm blocks (LayerNorm,
causal multi-head attention through F.scaled_dot_product_attention, a 4x GELU-tanh MLP),
a final LayerNorm and the tied output head; AdamW (b1 0.9, b2 0.95, weight decay 0.1) with
global-norm clipping at 1.0, as lmjax's defaults. The lmjax side is scripts/bench_train.py's
worker: the real train step of `lmjax train`, with the scratch allocator as `lmjax train` runs.

Both sides count the same FLOPs (lmjax.flops.flops_per_token) and are set against the same
machine peak (lmjax.flops.measure_cpu_peak: the best of XLA's and numpy's BLAS matmuls).
Each (side, shape) runs in its own subprocess; the sides alternate round by round so that a
change in the machine's load falls on both.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_peer.py               # tiny, small, default; 3 rounds
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_peer.py --only small --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import REFERENCE, reference_config, run_worker


def torch_worker(name: str, steps: int) -> dict:
    """Time the PyTorch reference train step at config `name`'s shape."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    cfg, vocab = reference_config(name)
    m = cfg.model
    d, n_layers, n_heads, seq_len, batch = m.d_model, m.n_layers, m.n_heads, cfg.data.seq_len, cfg.train.batch_size
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, n_heads, d // n_heads).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
            return x + self.proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.norm = nn.LayerNorm(d, eps=1e-5)
            for p in self.parameters():
                nn.init.normal_(p, std=0.02) if p.dim() > 1 else None

        def forward(self, tokens):
            x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.norm(x) @ self.wte.weight.T  # tied head

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() > 1 and p is not model.wte.weight and p is not model.wpe.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq_len + 1), generator=gen) for _ in range(4)]

    def step(toks):
        logits = model(toks[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), toks[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()  # waits for the step, as block_until_ready does on the lmjax side

    first_loss = step(batches[0])  # first run: allocations, thread pools
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - t)
    return {
        "name": name,
        "side": "pytorch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "first_loss": first_loss,
        "step_ms": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(REFERENCE), choices=list(REFERENCE), help="shapes to time")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per worker (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per shape; medians are printed")
    ap.add_argument("--json", help="also write every worker's figures to this file")
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        print(json.dumps(torch_worker(a.torch_worker, a.steps)))
        return

    import jax

    from lmjax.flops import flops_per_token, measure_cpu_peak
    from lmjax.models.transformer import TransformerConfig

    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    peak, which = measure_cpu_peak()
    print(f"machine peak {peak / 1e9:.1f} GFLOP/s: {which}")
    print(
        f"{'shape':9} {'lmjax ms':>9} {'torch ms':>9} {'lmjax/torch':>11} {'per round':>20} "
        f"{'lmjax GF/s':>10} {'torch GF/s':>10} {'lmjax %pk':>9} {'torch %pk':>9}"
    )
    results = []
    for name in a.only:
        cfg, vocab = reference_config(name)
        fpt = flops_per_token(TransformerConfig.from_config(cfg.model, vocab, cfg.data.seq_len), cfg.data.seq_len)
        flop_per_step = fpt * cfg.train.batch_size * cfg.data.seq_len
        ours, theirs = [], []
        for _ in range(a.rounds):
            ours.append(run_worker([name, "--steps", str(a.steps)]))
            theirs.append(run_worker([name, "--steps", str(a.steps)], script="bench_peer.py", flag="--torch-worker"))
        ratios = [o["step_ms"] / t["step_ms"] for o, t in zip(ours, theirs)]
        lj, pt = statistics.median(o["step_ms"] for o in ours), statistics.median(t["step_ms"] for t in theirs)
        row = {
            "shape": name,
            "d_model": cfg.model.d_model,
            "n_layers": cfg.model.n_layers,
            "seq_len": cfg.data.seq_len,
            "batch": cfg.train.batch_size,
            "vocab": vocab,
            "lmjax_ms": lj,
            "torch_ms": pt,
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "lmjax_gflops": flop_per_step / lj / 1e6,
            "torch_gflops": flop_per_step / pt / 1e6,
            "peak_gflops": peak / 1e9,
            "first_loss": {
                "lmjax": ours[0]["first_loss"],
                "torch": theirs[0]["first_loss"],
                "log_vocab": math.log(vocab),
            },
            "workers": {"lmjax": ours, "torch": theirs},
        }
        results.append(row)
        print(
            f"{name:9} {lj:9.1f} {pt:9.1f} {row['ratio']:11.3f} {' '.join(f'{r:.2f}' for r in ratios):>20} "
            f"{row['lmjax_gflops']:10.1f} {row['torch_gflops']:10.1f} "
            f"{row['lmjax_gflops'] / row['peak_gflops']:9.1%} {row['torch_gflops'] / row['peak_gflops']:9.1%}",
            flush=True,
        )
    print("lmjax/torch < 1: lmjax's step is faster. Both sides' GFLOP/s count the same model FLOPs.")
    if a.json:
        Path(a.json).write_text(json.dumps({"peak": peak, "peak_source": which, "shapes": results}, indent=1))


if __name__ == "__main__":
    main()
