"""GPT-2 (GPT2LMHeadModel) ↔ lmjax: config keys and weights.

GPT-2 is lmjax's Transformer with learned positions, LayerNorm, a tanh-GELU MLP and biases
everywhere. Its Conv1D weights are [in, out], like lmjax's Dense kernels; its fused c_attn
splits into query, key and value, heads in the order of its [N*H] axis.
"""

from __future__ import annotations

import numpy as np

from lmjax.errors import UserError
from lmjax.interop.mapping import Tensors, f32, layer_params, model_params, required, unmet
from lmjax.models.transformer import TransformerConfig

NAME = "GPT-2"
NEEDS = {"positions": "learned", "norm": "layernorm", "mlp": "gelu"}  # the model keys GPT-2 fixes


def model_keys(hf: dict) -> dict:
    """A GPT-2 config.json (dict) → lmjax `model.*` keys and values."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(
            f"GPT-2 activation_function='{act}' is not supported: lmjax's MLP uses tanh-approximated GELU ('gelu_new')"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise UserError(
            "GPT-2 attention must be scaled by 1/sqrt(head size) only "
            "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)"
        )
    d = required(hf, "n_embd")
    return {
        "d_model": d,
        "n_layers": required(hf, "n_layer"),
        "n_heads": required(hf, "n_head"),
        "n_kv_heads": required(hf, "n_head"),
        "d_ff": hf.get("n_inner") or 4 * d,
        "vocab_size": required(hf, "vocab_size"),
        "max_len": required(hf, "n_positions"),
        "positions": "learned",
        "norm": "layernorm",
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "mlp": "gelu",
        "bias": True,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def misfits(c: TransformerConfig) -> list[str]:
    """What keeps the model `c` from being a GPT-2 (nothing: it is one)."""
    out = unmet(c, NEEDS)
    if c.n_kv_heads != c.n_heads:  # GPT-2 has no grouped-query attention
        out.append(f"model.n_kv_heads={c.n_kv_heads} (needs n_heads={c.n_heads})")
    return out


def hf_config(c: TransformerConfig, eot: int | None) -> dict:
    """The config.json transformers' from_pretrained reads for this model."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.max_len,
        "n_embd": c.d_model,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": c.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.norm_eps,
        # lmjax drops out embeddings and residuals, never attention weights.
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": "float32",
    }


def params_from_hf(tensors: dict[str, np.ndarray], c: TransformerConfig) -> dict:
    """GPT-2 tensors (by name) → lmjax params for the model `c`; every tensor is used."""
    t = Tensors(tensors, strip_prefix="transformer.")  # OpenAI's original files have no prefix
    D, N, H, F = c.d_model, c.n_heads, c.head_dim, c.d_ff

    def norm(name):
        return {"scale": t.take(name + ".weight", (D,)), "bias": t.take(name + ".bias", (D,))}

    blocks = []
    for i in range(c.n_layers):
        p = f"h.{i}."
        q, k, v = np.split(t.take(p + "attn.c_attn.weight", (D, 3 * D)), 3, axis=1)
        qb, kb, vb = np.split(t.take(p + "attn.c_attn.bias", (3 * D,)), 3)
        blocks.append(
            {
                "norm1": norm(p + "ln_1"),
                "attn": {
                    "query": {"kernel": q.reshape(D, N, H), "bias": qb.reshape(N, H)},
                    "key": {"kernel": k.reshape(D, N, H), "bias": kb.reshape(N, H)},
                    "value": {"kernel": v.reshape(D, N, H), "bias": vb.reshape(N, H)},
                    "out": {
                        "kernel": t.take(p + "attn.c_proj.weight", (D, D)).reshape(N, H, D),
                        "bias": t.take(p + "attn.c_proj.bias", (D,)),
                    },
                },
                "norm2": norm(p + "ln_2"),
                "mlp": {
                    "fc": {"kernel": t.take(p + "mlp.c_fc.weight", (D, F)), "bias": t.take(p + "mlp.c_fc.bias", (F,))},
                    "proj": {
                        "kernel": t.take(p + "mlp.c_proj.weight", (F, D)),
                        "bias": t.take(p + "mlp.c_proj.bias", (D,)),
                    },
                },
            }
        )
    top = {
        "wte": t.take("wte.weight", (c.vocab_size, D)),
        "wpe": t.take("wpe.weight", (c.max_len, D)),
        "norm_f": norm("ln_f"),
    }
    return model_params(t, top, blocks, c)


def hf_from_params(params: dict, c: TransformerConfig) -> dict[str, np.ndarray]:
    """lmjax params (host arrays) → GPT-2 tensors (by name), float32."""
    D, N, H = c.d_model, c.n_heads, c.head_dim

    def bias(d, shape):  # a model without biases is GPT-2 with zero biases (LayerNorm included)
        return f32(d["bias"]) if "bias" in d else np.zeros(shape, np.float32)

    out = {}
    for i, block in enumerate(layer_params(params, c)):
        p, at, mlp = f"transformer.h.{i}.", block["attn"], block["mlp"]
        qkv = ("query", "key", "value")
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = f32(block["norm1"]["scale"]), bias(block["norm1"], D)
        out[p + "attn.c_attn.weight"] = np.concatenate([f32(at[n]["kernel"]).reshape(D, D) for n in qkv], 1)
        out[p + "attn.c_attn.bias"] = np.concatenate([bias(at[n], (N, H)).reshape(D) for n in qkv])
        out[p + "attn.c_proj.weight"] = f32(at["out"]["kernel"]).reshape(D, D)
        out[p + "attn.c_proj.bias"] = bias(at["out"], D)
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = f32(block["norm2"]["scale"]), bias(block["norm2"], D)
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = f32(mlp["fc"]["kernel"]), bias(mlp["fc"], c.d_ff)
        out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = f32(mlp["proj"]["kernel"]), bias(mlp["proj"], D)
    out["transformer.wte.weight"], out["transformer.wpe.weight"] = f32(params["wte"]), f32(params["wpe"])
    out["transformer.ln_f.weight"] = f32(params["norm_f"]["scale"])
    out["transformer.ln_f.bias"] = bias(params["norm_f"], D)
    if not c.tie_embeddings:
        out["lm_head.weight"] = f32(params["lm_head"]).T
    return out
