"""GPT-2 small (124M) for one GPU: 12 layers, 12 heads, width 768, context 1024, learned
positions, LayerNorm and biases, GELU MLP (3072), tied embeddings, GPT-2 initialisation
(residual projections scaled by 1/sqrt(2 x 12)), bfloat16 compute with float32 parameters,
logits and loss. Optimiser as nanoGPT / GPT-3 small: AdamW, peak lr 6e-4, betas
(0.9, 0.95), weight decay 0.1, clip 1.0, warmup then cosine to 10%.

What it is for: a GPU run of the GPT-2 shape, and the template for larger runs. Not for a
CPU: a step is ~50 TFLOP (6 x 124M parameters x 65,536 tokens). 124,439,808 parameters,
as GPT-2 small, with the 50257-token vocabulary: here a byte-level BPE of that size
trained on the training split.
Data: by default the Python standard library (no download; ~12 MB, so it overfits
within a few epochs: a throughput and plumbing check, not a language model). For a real
run point it at a large corpus, e.g. a local copy in parquet/jsonl:
    lmjax train experiments/gpt2_small.py --config.data.source=files \
        --config.data.format=parquet --config.data.paths='/data/fineweb/*.parquet'
or use GPT-2's own encoding with tokenizer.kind='tiktoken', tokenizer.path=r50k_base.tiktoken.
Memory: micro-batches of 32 x 1024 (train.grad_accum=2). `lmjax plan`, compiled by XLA's GPU
compiler for an H100 without one (scripts/setup_gpu_compile.sh): peak 36.4 GiB per device on one
GPU with cuDNN's fused attention (model.attention=auto), 52.0 GiB with XLA's attention (the
T x T probabilities), 6.3 GiB on 8 GPUs (data=8); most of the rest is the 50257-wide logits
and 12 layers of activations. On a smaller GPU raise train.grad_accum or set
model.remat='dots_with_no_batch_dims_saveable'.
What it reaches: not yet run (no GPU in the session that wrote it). For scale, nanoGPT
reports about 2.85 held-out loss for this shape on OpenWebText after ~300B tokens.
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "stdlib"
    c.data.seq_len = 1024
    c.tokenizer.kind = "bpe"
    c.tokenizer.vocab_size = 50257

    c.model.kind = "transformer"
    c.model.d_model = 768
    c.model.n_layers = 12
    c.model.n_heads = 12
    c.model.d_ff = 3072
    c.model.positions = "learned"
    c.model.norm = "layernorm"
    c.model.mlp = "gelu"
    c.model.bias = True
    c.model.tie_embeddings = True
    c.model.dropout = 0.0
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True  # one compiled block: compile time independent of depth

    c.optim.name = "adamw"
    c.optim.lr = 6e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.clip_norm = 1.0

    c.train.steps = 5000
    c.train.batch_size = 64  # 64 x 1024 = 65,536 tokens per step
    c.train.grad_accum = 2
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.save_every = 500
    c.train.eval_batches = 16
    c.eval.batch_size = 16
    return c
