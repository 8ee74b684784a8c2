"""Tiny experiment for tests and smoke runs: a 2-layer Transformer, seconds per run.

What it reaches: nothing worth comparing (20 steps); it is for checking that the
machinery runs. For a small model that learns, see tiny_gpt2.py and tiny_llama.py.
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "stdlib"
    c.data.seq_len = 32
    c.data.max_documents = 40
    c.model.d_model = 32
    c.model.n_layers = 2
    c.model.n_heads = 2
    c.train.steps = 20
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.save_every = 10
    c.train.eval_batches = 2
    c.optim.warmup_steps = 5
    c.train.tensorboard = False
    return c
