"""LLaMA (LlamaForCausalLM) ↔ lmjax: config keys and weights.

LLaMA is lmjax's Transformer with rotary positions (rotate-half), RMSNorm, SwiGLU, no biases
and grouped-query attention. Its torch Linear weights are [out, in], the transpose of lmjax's
Dense kernels; heads are in the order of its [N*H] axis.
"""

from __future__ import annotations

import numpy as np

from lmjax.errors import UserError
from lmjax.interop.mapping import Tensors, f32, layer_params, model_params, required, unmet
from lmjax.models.transformer import TransformerConfig

NAME = "LLaMA"
NEEDS = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}  # the model keys LLaMA fixes
QKV = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))
MLP = (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj"))


def _rope(hf: dict) -> tuple[float, str]:
    """(theta, rope type) from a transformers 5 `rope_parameters` or a 4.x `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type", "default"))


def model_keys(hf: dict) -> dict:
    """A LLaMA config.json (dict) → lmjax `model.*` keys and values."""
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"LLaMA hidden_act='{hf['hidden_act']}' is not supported: lmjax's SwiGLU uses silu")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(
            "LLaMA with attention_bias or mlp_bias is not supported: lmjax's model.bias would also add norm biases"
        )
    theta, rope_type = _rope(hf)
    if rope_type != "default":
        raise UserError(
            f"LLaMA rope type '{rope_type}' (rope scaling) is not supported; lmjax implements plain rotary embeddings"
        )
    d, n = required(hf, "hidden_size"), required(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or d // n
    if head_dim * n != d:
        raise UserError(
            f"LLaMA head_dim={head_dim} x num_attention_heads={n} != hidden_size={d}; "
            "lmjax needs head size = d_model / n_heads"
        )
    return {
        "d_model": d,
        "n_layers": required(hf, "num_hidden_layers"),
        "n_heads": n,
        "n_kv_heads": hf.get("num_key_value_heads") or n,
        "d_ff": required(hf, "intermediate_size"),
        "vocab_size": required(hf, "vocab_size"),
        "max_len": hf.get("max_position_embeddings", 2048),
        "positions": "rope",
        "rope_base": theta,
        "norm": "rmsnorm",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "mlp": "swiglu",
        "bias": False,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def misfits(c: TransformerConfig) -> list[str]:
    """What keeps the model `c` from being a LLaMA (nothing: it is one)."""
    return unmet(c, NEEDS)


def hf_config(c: TransformerConfig, eot: int | None) -> dict:
    """The config.json transformers' from_pretrained reads for this model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_len,
        "rms_norm_eps": c.norm_eps,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": c.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": eot,
        "dtype": "float32",
    }


def params_from_hf(tensors: dict[str, np.ndarray], c: TransformerConfig) -> dict:
    """LLaMA tensors (by name) → lmjax params for the model `c`; every tensor is used."""
    t = Tensors(tensors)
    D, N, K, H, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff

    def linear(name, out, inp):  # torch [out, in] → lmjax [in, out]
        return t.take(name + ".weight", (out, inp)).T

    blocks = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        blocks.append(
            {
                "norm1": {"scale": t.take(p + "input_layernorm.weight", (D,))},
                "attn": {
                    "query": {"kernel": linear(p + "self_attn.q_proj", N * H, D).reshape(D, N, H)},
                    "key": {"kernel": linear(p + "self_attn.k_proj", K * H, D).reshape(D, K, H)},
                    "value": {"kernel": linear(p + "self_attn.v_proj", K * H, D).reshape(D, K, H)},
                    "out": {"kernel": linear(p + "self_attn.o_proj", D, N * H).reshape(N, H, D)},
                },
                "norm2": {"scale": t.take(p + "post_attention_layernorm.weight", (D,))},
                "mlp": {
                    "gate": {"kernel": linear(p + "mlp.gate_proj", F, D)},
                    "up": {"kernel": linear(p + "mlp.up_proj", F, D)},
                    "proj": {"kernel": linear(p + "mlp.down_proj", D, F)},
                },
            }
        )
    top = {
        "wte": t.take("model.embed_tokens.weight", (c.vocab_size, D)),
        "norm_f": {"scale": t.take("model.norm.weight", (D,))},
    }
    return model_params(t, top, blocks, c)


def hf_from_params(params: dict, c: TransformerConfig) -> dict[str, np.ndarray]:
    """lmjax params (host arrays) → LLaMA tensors (by name), float32."""
    D, N, H = c.d_model, c.n_heads, c.head_dim

    out = {}
    for i, block in enumerate(layer_params(params, c)):
        p, at, mlp = f"model.layers.{i}.", block["attn"], block["mlp"]
        out[p + "input_layernorm.weight"] = f32(block["norm1"]["scale"])
        for name, hf_name in QKV:
            out[p + f"self_attn.{hf_name}.weight"] = f32(at[name]["kernel"]).reshape(D, -1).T
        out[p + "self_attn.o_proj.weight"] = f32(at["out"]["kernel"]).reshape(N * H, D).T
        out[p + "post_attention_layernorm.weight"] = f32(block["norm2"]["scale"])
        for name, hf_name in MLP:
            out[p + f"mlp.{hf_name}.weight"] = f32(mlp[name]["kernel"]).T
    out["model.embed_tokens.weight"] = f32(params["wte"])
    out["model.norm.weight"] = f32(params["norm_f"]["scale"])
    if not c.tie_embeddings:
        out["lm_head.weight"] = f32(params["lm_head"]).T
    return out
