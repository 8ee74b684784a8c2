"""Every experiments/*.py loads and validates; the model files have the shapes they claim;
the tiny ones build and run a forward pass."""

import ast
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.models import build_model
from lmjax.run import count_params

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))
BYTE_VOCAB = 257


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_loads_validates_and_documents_itself(path):
    cfg = config_lib.load(path)
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and "for" in doc.lower() and "reach" in doc.lower(), (
        f"{path.name}: say what it is for and what it reaches"
    )
    if cfg.model.kind == "transformer":
        cfg_vocab = BYTE_VOCAB if cfg.tokenizer.kind == "byte" else cfg.tokenizer.vocab_size or 1000
        model = build_model(cfg.model, cfg_vocab, cfg.data.seq_len)
        assert model.cfg.max_len >= cfg.data.seq_len


def n_params(name: str, vocab: int) -> int:
    cfg = config_lib.load(ROOT / "experiments" / f"{name}.py")
    model = build_model(cfg.model, vocab, cfg.data.seq_len)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    return count_params(nn.unbox(shapes)["params"])


def test_model_files_have_the_claimed_shapes():
    assert n_params("gpt2_small", 50257) == 124_439_808  # GPT-2 small, exactly
    assert 124e6 < n_params("llama_small", 32000) < 126e6
    assert 4.5e6 < n_params("lstm_ptb", 10002) < 4.8e6  # Zaremba small: 2 x 200 on a 10k vocabulary
    gpt2, llama = (
        config_lib.load(ROOT / "experiments/gpt2_small.py"),
        config_lib.load(ROOT / "experiments/llama_small.py"),
    )
    assert (gpt2.model.n_layers, gpt2.model.n_heads, gpt2.model.d_model, gpt2.data.seq_len) == (12, 12, 768, 1024)
    assert gpt2.model.dtype == llama.model.dtype == "bfloat16"
    m = llama.model
    assert (m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings) == ("rope", "rmsnorm", "swiglu", False, False)
    assert 1 < m.n_kv_heads < m.n_heads
    ptb = config_lib.load(ROOT / "experiments/lstm_ptb.py")
    assert (ptb.model.kind, ptb.model.n_layers, ptb.model.d_model, ptb.data.seq_len, ptb.train.batch_size) == (
        "lstm",
        2,
        200,
        35,
        20,
    )
    assert (ptb.optim.name, ptb.optim.lr, ptb.optim.decay_factor, ptb.optim.clip_norm, ptb.tokenizer.kind) == (
        "sgd",
        1.0,
        0.5,
        5.0,
        "word",
    )


@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2", "tiny_llama"])
def test_tiny_experiments_build_and_run_a_forward_pass(name):
    cfg = config_lib.load(ROOT / "experiments" / f"{name}.py")
    model = build_model(cfg.model, BYTE_VOCAB, cfg.data.seq_len)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, BYTE_VOCAB, (2, cfg.data.seq_len)), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
    logits = jax.jit(model.apply)({"params": params}, tokens)
    assert logits.shape == (2, cfg.data.seq_len, BYTE_VOCAB) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
