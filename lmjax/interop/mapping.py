"""What each family's mapping (lmjax.interop.gpt2, lmjax.interop.llama) is built from: a required
config.json key, named tensors taken one by one with their shapes checked, and lmjax's two
layouts of the blocks (the model's own `stack_layers` / `unstack_layers`)."""

from __future__ import annotations

import numpy as np

from lmjax.errors import UserError
from lmjax.models.transformer import TransformerConfig, stack_layers, unstack_layers

# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def required(hf: dict, key: str):
    """config.json's `key`, which the mapping cannot do without."""
    if hf.get(key) is None:
        raise UserError(f"the Hugging Face config.json lacks '{key}'")
    return hf[key]


class Tensors:
    """Named tensors taken one by one, each checked against the shape the config implies."""

    def __init__(self, tensors: dict[str, np.ndarray], strip_prefix: str = ""):
        self.left = {k.removeprefix(strip_prefix): v for k, v in tensors.items()}

    def take(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.left:
            raise UserError(f"the checkpoint has no tensor '{name}'; is it a complete model saved by save_pretrained?")
        x = self.left.pop(name)
        if tuple(x.shape) != tuple(shape):
            raise UserError(f"tensor '{name}' has shape {tuple(x.shape)} but config.json implies {tuple(shape)}")
        return x

    def drop(self, name: str) -> None:
        self.left.pop(name, None)

    def finish(self) -> None:
        """Refuse tensors no `take` used: a config that does not describe the weights."""
        extra = sorted(k for k in self.left if not k.endswith(IGNORED_SUFFIXES))
        if extra:
            raise UserError(
                f"the checkpoint has {len(extra)} tensors config.json does not account for, e.g. {', '.join(extra[:4])}"
            )


def unmet(c: TransformerConfig, needs: dict) -> list[str]:
    """The model keys of `c` that differ from `needs`, each as 'model.KEY=VALUE (needs V)'."""
    return [f"model.{k}={getattr(c, k)!r} (needs {v!r})" for k, v in needs.items() if getattr(c, k) != v]


def model_params(t: Tensors, top: dict, blocks: list[dict], c: TransformerConfig) -> dict:
    """The non-block params and each block's params → lmjax params in `c`'s layout, with the
    output head from `t`'s 'lm_head.weight' [V, D]; every tensor of `t` must have been used."""
    if c.tie_embeddings:
        t.drop("lm_head.weight")  # a tied copy, when saved at all
    else:
        top = {**top, "lm_head": t.take("lm_head.weight", (c.vocab_size, c.d_model)).T}
    t.finish()
    params = {**top, **{f"block_{i}": block for i, block in enumerate(blocks)}}
    return stack_layers(params, c.n_layers) if c.scan_layers else params


def f32(x) -> np.ndarray:
    """A host float32 copy of `x`, as transformers loads it."""
    return np.asarray(x, np.float32)


def layer_params(params: dict, c: TransformerConfig) -> list[dict]:
    """Each block's params (a list of n_layers dicts), from either of lmjax's layouts."""
    blocks = unstack_layers(params, c.n_layers) if c.scan_layers else params
    return [blocks[f"block_{i}"] for i in range(c.n_layers)]
