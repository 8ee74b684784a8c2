"""Model registry: config section `model` → a Flax module with one calling convention.

Every model maps (tokens int32[B, T], positions, segment_ids, deterministic, decode) to
float32 logits[B, T, V]; in decode mode it keeps its state (key/value cache or recurrent
state) in the 'cache' collection.
"""

from __future__ import annotations

import flax.linen as nn

from lmjax.models.lstm import LSTMConfig, LSTMLanguageModel
from lmjax.models.transformer import Transformer, TransformerConfig


def build_model(model_cfg, vocab_size: int, seq_len: int) -> nn.Module:
    """The module for config section `model`, sized for the tokenizer's vocabulary."""
    if model_cfg.kind == "lstm":
        return LSTMLanguageModel(LSTMConfig.from_config(model_cfg, vocab_size))
    return Transformer(TransformerConfig.from_config(model_cfg, vocab_size, seq_len))
