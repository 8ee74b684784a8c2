"""A compute-optimal scaling study on the Python standard library, small enough for 2 CPU cores.

What it is for: the base config of `lmjax study`: the default experiment's data and training
settings (byte-level, stdlib .py files, 128-byte context, 16 sequences per step, AdamW at 3e-3
with a cosine schedule) with a held-out subset large enough to rank runs (16 batches: 32,768
held-out tokens, the same for every run). The study sets each run's shape (lmjax/study/scaling.py:
n_layers = s, d_model = 32 s, n_heads = s), steps and warmup (5% of its steps); train.steps here
only sets that fraction.

    lmjax study experiments/study_stdlib.py --budgets 1e12,3e12,1e13 --per-budget 4 --out runs/study_stdlib

12 runs, budgets spanning 10x (5.6e13 FLOPs in all), from 20k to 1.6M matmul parameters; the
smallest ones see the 11.7M training tokens up to 1.7 times (3e12 with s = 1).
What it can tell: where the loss-optimal size sits for these budgets on this corpus and
schedule, and roughly how fast it moves. What it cannot: exponents to two digits (three
budgets, four sizes each, one seed, one learning rate for every size), or anything about
budgets far beyond 1e13. What it reaches (2 CPU cores, 2026-12-02): 24 min of training; the
fitted exponents and their intervals are in the README, "Studies". Its finding moved the
default experiment from s = 4 to s = 2.
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "stdlib"
    c.data.seq_len = 128
    c.tokenizer.kind = "byte"

    c.model.d_model = 128  # the study overrides the shape of each run
    c.model.n_layers = 4
    c.model.n_heads = 4

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20  # with train.steps: warmup is 5% of each run's steps
    c.optim.weight_decay = 0.1

    c.train.steps = 400
    c.train.batch_size = 16
    c.train.eval_batches = 16
    c.train.tensorboard = False
    return c
