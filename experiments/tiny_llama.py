"""Tiny LLaMA on the CPU: the LLaMA architecture (rotary positions, RMSNorm, SwiGLU MLP,
no biases, untied output head, grouped-query attention) shrunk to train in seconds.

What it is for: checking the LLaMA code path end to end on a laptop before a GPU run of
experiments/llama_small.py. No download: byte-level on the first 300 files of the Python
standard library, like experiments/tiny_gpt2.py, so the two can be compared directly.
What it reaches: 300 steps (307k tokens) in 35-55 s on 2 busy CPU cores, compilation
included (the first run also tokenizes the data). `lmjax eval` on all 41 held-out files:
2.30 nats/token, 3.32 bits/byte (measured before data.max_documents capped the library).
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
    c.model.n_kv_heads = 2  # grouped-query: two query heads share each key/value head
    c.model.d_ff = 192  # SwiGLU has three matrices: 3 x 64 x 192 ~ GELU's 2 x 64 x 256
    c.model.positions = "rope"
    c.model.norm = "rmsnorm"
    c.model.mlp = "swiglu"
    c.model.bias = False
    c.model.tie_embeddings = False

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
