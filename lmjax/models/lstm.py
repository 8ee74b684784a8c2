"""LSTM language model (Zaremba et al. 2014): embedding → stacked LSTM layers → softmax.

The Transformer's calling convention: tokens int32[B, T] → float32 logits[B, T, V]. Dropout
is applied to the non-recurrent connections only (embedding output, between layers, before
the softmax); every parameter starts uniform in [-init_scale, init_scale]. Reads the config
keys model.d_model (embedding and hidden size), n_layers, dropout, tie_embeddings, dtype.

Tensor names carry shapes: B batch, T time, D hidden size, G = 4·D gate pre-activations.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int
    d_model: int = 200
    n_layers: int = 2
    dropout: float = 0.0
    tie_embeddings: bool = False
    init_scale: float = 0.1  # Zaremba's small model; 0.05 medium, 0.04 large
    dtype: str = "float32"  # matmul inputs; the cell state and logits stay float32

    @classmethod
    def from_config(cls, m, vocab_size: int) -> LSTMConfig:
        """Resolve the `model` config section into an LSTM config."""
        return cls(
            vocab_size=m.vocab_size or vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            dropout=m.dropout,
            tie_embeddings=m.tie_embeddings,
            dtype=m.dtype,
        )


def _uniform(scale: float, names: tuple):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return nn.with_logical_partitioning(init, names)


class LSTMLayer(nn.Module):
    """One LSTM layer run over time with `lax.scan`: x[B, T, D] → h[B, T, D].

    The state starts at zero, or (decode=True) at the state left in the 'cache' collection
    by the previous chunk; it is reset to zero where `reset_BxT` is True (a new document).
    """

    cfg: LSTMConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: Array, reset_BxT: Array) -> Array:
        c = self.cfg
        d, dtype = c.d_model, jnp.dtype(c.dtype)
        w_in_DxG = self.param("input_kernel", _uniform(c.init_scale, ("embed", "mlp")), (d, 4 * d), jnp.float32)
        w_rec_DxG = self.param("recurrent_kernel", _uniform(c.init_scale, ("embed", "mlp")), (d, 4 * d), jnp.float32)
        bias_G = self.param("bias", _uniform(c.init_scale, ("mlp",)), (4 * d,), jnp.float32)

        def matmul(a, w):
            return jnp.dot(a.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)

        # The input projection does not depend on the state: one matmul for all steps.
        gates_in_BxTxG = matmul(x_BxTxD, w_in_DxG) + bias_G

        b = x_BxTxD.shape[0]
        zeros_BxD = jnp.zeros((b, d), jnp.float32)
        if self.decode:
            cell_var = self.variable("cache", "cell", lambda: zeros_BxD)
            hidden_var = self.variable("cache", "hidden", lambda: zeros_BxD)
            state = (cell_var.value, hidden_var.value)
        else:
            state = (zeros_BxD, zeros_BxD)

        def step(state, inputs):
            cell_BxD, h_BxD = state
            gates_in_BxG, reset_B = inputs
            cell_BxD = jnp.where(reset_B[:, None], 0.0, cell_BxD)
            h_BxD = jnp.where(reset_B[:, None], 0.0, h_BxD)
            gates_BxG = gates_in_BxG + matmul(h_BxD, w_rec_DxG)
            i, f, g, o = jnp.split(gates_BxG, 4, axis=-1)
            cell_BxD = nn.sigmoid(f) * cell_BxD + nn.sigmoid(i) * jnp.tanh(g)
            h_BxD = nn.sigmoid(o) * jnp.tanh(cell_BxD)
            return (cell_BxD, h_BxD), h_BxD

        state, h_TxBxD = jax.lax.scan(step, state, (gates_in_BxTxG.swapaxes(0, 1), reset_BxT.swapaxes(0, 1)))
        if self.decode:
            cell_var.value, hidden_var.value = state
        return h_TxBxD.swapaxes(0, 1)


class LSTMLanguageModel(nn.Module):
    """tokens int32[B, T] → logits float32[B, T, V].

    positions_BxT is accepted for the common calling convention and unused (an LSTM knows
    order from the recurrence). segment_ids_BxT (packed documents) resets the state where
    the id changes. decode=True continues from, and updates, the state in 'cache'.
    """

    cfg: LSTMConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxT: Array,
        positions_BxT: Array | None = None,
        segment_ids_BxT: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        c = self.cfg
        drop = nn.Dropout(c.dropout, deterministic=deterministic)
        wte = self.param("wte", _uniform(c.init_scale, ("vocab", "embed")), (c.vocab_size, c.d_model), jnp.float32)
        x_BxTxD = drop(jnp.take(wte, tokens_BxT, axis=0))

        reset_BxT = jnp.zeros(tokens_BxT.shape, bool)
        if segment_ids_BxT is not None:
            reset_BxT = reset_BxT.at[:, 1:].set(segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1])
        for i in range(c.n_layers):
            x_BxTxD = drop(LSTMLayer(c, decode, name=f"lstm_{i}")(x_BxTxD, reset_BxT))

        if c.tie_embeddings:
            head_DxV = wte.T
        else:
            head_DxV = self.param(
                "lm_head", _uniform(c.init_scale, ("embed", "vocab")), (c.d_model, c.vocab_size), jnp.float32
            )
        out_bias_V = self.param("output_bias", _uniform(c.init_scale, ("vocab",)), (c.vocab_size,), jnp.float32)
        return jnp.dot(x_BxTxD, head_DxV) + out_bias_V
