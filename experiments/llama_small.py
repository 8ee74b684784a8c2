"""A small LLaMA-shaped model (~125M) for one GPU: 12 layers, width 768, 12 query heads
sharing 4 key/value heads (grouped-query attention), rotary positions (base 10000),
RMSNorm, SwiGLU MLP (2048 = 8/3 x 768 rounded up to 256), no biases, untied output head,
context 1024, bfloat16 compute with float32 parameters, logits and loss. AdamW, peak lr
6e-4, betas (0.9, 0.95), weight decay 0.1, clip 1.0, warmup then cosine to 10%.

What it is for: the LLaMA family at GPT-2-small scale, to compare with
experiments/gpt2_small.py on the same data and tokens (the same batch, steps and
schedule), and the template for larger LLaMA runs. Not for a CPU. Vocabulary: a 32000
byte-level BPE trained on the training split (LLaMA's vocabulary size); use
tokenizer.kind='hf' with tokenizer.path pointing at a LLaMA tokenizer.json to train with
theirs.
Data: the Python standard library by default (no download; small, so a plumbing and
throughput check); point data.* at a large corpus for a real run (see gpt2_small.py).
What it reaches: not yet run (no GPU in the session that wrote it).
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "stdlib"
    c.data.seq_len = 1024
    c.tokenizer.kind = "bpe"
    c.tokenizer.vocab_size = 32000

    c.model.kind = "transformer"
    c.model.d_model = 768
    c.model.n_layers = 12
    c.model.n_heads = 12
    c.model.n_kv_heads = 4
    c.model.d_ff = 0  # 0 = 8/3 x d_model rounded up to a multiple of 256 = 2048
    c.model.positions = "rope"
    c.model.rope_base = 10000.0
    c.model.norm = "rmsnorm"
    c.model.norm_eps = 1e-5
    c.model.mlp = "swiglu"
    c.model.bias = False
    c.model.tie_embeddings = False
    c.model.dropout = 0.0
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True

    c.optim.name = "adamw"
    c.optim.lr = 6e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.clip_norm = 1.0

    c.train.steps = 5000
    c.train.batch_size = 64
    c.train.grad_accum = 2
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.save_every = 500
    c.train.eval_batches = 16
    c.eval.batch_size = 16
    return c
