"""The one loss behind training, held-out loss during training, and `lmjax eval`.

Every figure is token-weighted: the negative log-likelihood of each target times its weight
(0 where a target is padding), computed in float32 whatever the model's dtype. Callers sum
the per-token values over what they need: the whole batch (training), or each row (eval).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def model_inputs(batch: dict) -> dict:
    """The optional model arguments a batch carries (document masking), by the models' names."""
    return {"positions_BxT": batch.get("positions"), "segment_ids_BxT": batch.get("segment_ids")}


def weighted_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array | None = None):
    """float32[B, T] negative log-likelihood of each target times its weight, and the weights."""
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
    if weights_BxT is None:
        weights_BxT = jnp.ones_like(nll_BxT)
    return nll_BxT * weights_BxT, weights_BxT


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array | None = None):
    """Sum of negative log-likelihood over weighted targets, and the weight total (float32 scalars)."""
    nll_BxT, weights_BxT = weighted_nll(logits_BxTxV, targets_BxT, weights_BxT)
    return nll_BxT.sum(), weights_BxT.sum()


def batch_nll(model: nn.Module, params, batch: dict, *, deterministic: bool = True, rngs=None):
    """The model's weighted NLL of a batch of dict(inputs, targets[, weights, positions,
    segment_ids]) int32[B, T]: float32[B, T] NLL times weight, and the weights."""
    logits_BxTxV = model.apply(
        {"params": params}, batch["inputs"], **model_inputs(batch), deterministic=deterministic, rngs=rngs
    )
    return weighted_nll(logits_BxTxV, batch["targets"], batch.get("weights"))


def make_row_nll(model: nn.Module):
    """(params, batch) → per-row NLL sums and target counts, float32[B] each (for `lmjax eval`)."""

    def row_nll(params, batch):
        nll_BxT, weights_BxT = batch_nll(model, params, batch)
        return nll_BxT.sum(-1), weights_BxT.sum(-1)

    return row_nll
