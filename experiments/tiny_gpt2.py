"""Tiny GPT-2 on the CPU: the GPT-2 architecture (learned positions, LayerNorm with biases,
GELU MLP, tied embeddings, scaled residual init) shrunk to train in seconds.

What it is for: checking the GPT-2 code path end to end on a laptop before a GPU run of
experiments/gpt2_small.py (same options, smaller numbers). No download: byte-level on the
first 300 files of the Python standard library (held-out: files chosen by a hash of path).
What it reaches: 300 steps (307k tokens) in 35-55 s on 2 busy CPU cores, compilation
included (the first run also tokenizes the data). `lmjax eval` on all 41 held-out files:
2.41 nats/token, 3.48 bits/byte (measured before data.max_documents capped the library).
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "stdlib"
    c.data.max_documents = 300
    c.data.seq_len = 64
    c.tokenizer.kind = "byte"

    c.model.kind = "transformer"
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.positions = "learned"
    c.model.norm = "layernorm"
    c.model.mlp = "gelu"
    c.model.bias = True
    c.model.tie_embeddings = True

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.1

    c.train.steps = 300
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.eval_every = 150
    c.train.save_every = 150
    c.train.eval_batches = 4
    c.train.tensorboard = False
    return c
