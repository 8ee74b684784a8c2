"""Default experiment: a small GPT-2-style Transformer on the Python standard library.

What it is for: the first run on a fresh machine. No download: it trains byte-level on the
.py source files of the running interpreter's standard library (held-out: ~5% of the files,
chosen by a hash of their path) and finishes on 2 CPU cores in about two minutes.

Its shape is the compute-optimal one that `lmjax study experiments/study_stdlib.py` found for
this budget (README, "Studies"): 2 layers, 64 wide (size s = 2 of the study's ladder), trained
for 2,000 steps. Until 2026-12-02 it was 4 layers, 128 wide, 400 steps (s = 4): at the same wall
time on the same 2 cores (111 s against 107 s) that shape reached 2.824 bits/byte on all 41
held-out files, this one 2.042; s = 1 (5,000 steps) and s = 3 (900 steps) reached held-out
subset losses of 1.785 and 1.827 nats against s = 2's 1.595.
What it reaches (2 CPU cores, 2026-12-02, a machine whose float32 matmul peak is 145 GFLOP/s):
2,000 steps (4.1M tokens) in ~100 s at ~45k tokens/s; held-out 1.416 nats/token = 2.042
bits/byte, perplexity 4.12 over all 41 held-out files.
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "stdlib"
    c.data.seq_len = 128
    c.tokenizer.kind = "byte"

    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 2
    c.model.dropout = 0.0

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1

    c.train.steps = 2000
    c.train.batch_size = 16
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.save_every = 1000
    c.train.eval_batches = 8
    return c
