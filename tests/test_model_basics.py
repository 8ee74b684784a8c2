import math

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import base_config
from lmjax.models import build_model
from lmjax.train.loss import token_nll
from lmjax.train.optimizer import build_optimizer
from lmjax.train.step import create_state, make_train_step


def _model(vocab=257, **model):
    c = base_config()
    for k, v in model.items():
        c.model[k] = v
    return build_model(c.model, vocab, 64)


def test_loss_at_init_is_log_vocab():
    model = _model(d_model=128, n_layers=4, n_heads=4)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 65), 0, 257)
    params = model.init(jax.random.PRNGKey(0), tokens[:, :-1])["params"]
    import flax.linen as nn

    logits = model.apply({"params": nn.unbox(params)}, tokens[:, :-1])
    nll, count = token_nll(logits, tokens[:, 1:])
    loss = float(nll / count)
    assert abs(loss - math.log(257)) / math.log(257) < 0.02, loss


def test_tiny_model_overfits_one_batch():
    import flax.linen as nn

    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads = 64, 2, 2
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 3e-3, 0, 0.0
    model = build_model(c.model, 257, 32)
    tx, lr = build_optimizer(c.optim, 300)
    tokens = np.random.default_rng(0).integers(0, 257, (4, 33)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = nn.unbox(model.init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    state = create_state(params, tx, jax.random.PRNGKey(1))
    step = jax.jit(make_train_step(model, tx, lr))
    for _ in range(300):
        state, m = step(state, batch)
    assert float(m["loss"]) < 0.1, float(m["loss"])


def test_weight_decay_skips_biases_norms_embeddings():
    import flax.linen as nn

    from lmjax.train.optimizer import decay_mask

    model = _model(d_model=32, n_layers=1, n_heads=2)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))
    }
    assert flat["wte"] is False and flat["wpe"] is False
    assert flat["block_0/mlp/fc/kernel"] is True and flat["block_0/mlp/fc/bias"] is False
    assert flat["block_0/norm1/scale"] is False
