"""Hugging Face GPT-2 and LLaMA weights in and out of lmjax's Transformer, as safetensors.

    import_hf(HF_DIR, RUN_DIR)   config.json + model.safetensors → an lmjax run at step 0
    export_hf(RUN_DIR, HF_DIR)   an lmjax checkpoint → config.json + model.safetensors

Both families are options of one lmjax model (see lmjax/models/transformer.py):
  GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, tanh-GELU MLP, biases everywhere.
  LLaMA (LlamaForCausalLM): rotary positions (rotate-half), RMSNorm, SwiGLU, no biases, GQA.

Layouts: lmjax Dense kernels are [in, out], like GPT-2's Conv1D weights; torch Linear weights
(LLaMA) are [out, in]. lmjax attention kernels are query/key/value [D, N, H] and out
[N, H, D], heads in the order Hugging Face splits its [N*H] axis. Only safetensors are read
and written (numpy, no torch): a pickle checkpoint (.bin, .pt) is refused, never unpickled.

The tokenizer of an imported run is never guessed: --tokenizer if given (a tokenizer.json,
a directory holding one, an lmjax tokenizer directory, or 'byte'), else the model
directory's lmjax_tokenizer.json (what export-hf writes, for any lmjax tokenizer kind),
else its tokenizer.json (kind 'hf', end-of-text = the model's eos token); else an error.
An imported run's data.seq_len (the eval context) is min(model context, 1024); the
`--config.KEY=VALUE` arguments of import-hf set it and the data, eval and train keys.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lmjax.errors import UserError
from lmjax.models.transformer import TransformerConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
IMPORT_SEQ_LEN = 1024  # data.seq_len of an imported run, unless the model's context is shorter

# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------- files


def _refuse_pickle(path: Path) -> UserError:
    return UserError(
        f"{path} is a pickle checkpoint, which lmjax never loads (unpickling can run arbitrary code); "
        "convert it once with transformers: `AutoModelForCausalLM.from_pretrained(DIR)"
        ".save_pretrained(OUT, safe_serialization=True)`, then import OUT")


def find_weights(src: str | Path) -> tuple[Path, list[Path]]:
    """A model directory or a .safetensors file → (directory holding config.json, weight files)."""
    src = Path(src)
    if src.is_file():
        if src.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(src)
        if src.suffix != ".safetensors":
            raise UserError(f"{src} is neither a .safetensors file nor a Hugging Face model directory")
        return src.parent, [src]
    if not src.is_dir():
        raise UserError(f"{src} does not exist; pass a Hugging Face model directory (config.json + {WEIGHTS}) or a .safetensors file")
    if (src / WEIGHTS).is_file():
        return src, [src / WEIGHTS]
    if (src / WEIGHTS_INDEX).is_file():
        shards = sorted(set(json.loads((src / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        return src, [src / s for s in shards]
    pickles = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _refuse_pickle(pickles[0])
    raise UserError(f"{src} holds no {WEIGHTS} (nor {WEIGHTS_INDEX}); save the model with save_pretrained(DIR, safe_serialization=True)")


def read_hf_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} has no config.json; the weights need the Hugging Face config saved next to them (model.config.save_pretrained(DIR))")
    return json.loads(path.read_text())


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 numpy arrays (bfloat16 included)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() == "BF16":  # numpy has no bfloat16: read the raw bytes
                out[name] = _read_bf16(path, name)
            else:
                out[name] = f.get_tensor(name)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _read_bf16(path: Path, name: str) -> np.ndarray:
    import ml_dtypes

    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        entry = json.loads(fh.read(header_len))[name]
        start, end = entry["data_offsets"]
        fh.seek(8 + header_len + start)
        raw = fh.read(end - start)
    return np.frombuffer(raw, ml_dtypes.bfloat16).reshape(entry["shape"])


def write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    # transformers reads only files whose metadata names a framework it knows.
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------- configs


def _need(hf: dict, key: str):
    if hf.get(key) is None:
        raise UserError(f"the Hugging Face config.json lacks '{key}'")
    return hf[key]


def _rope(hf: dict) -> tuple[float, str]:
    """(theta, rope type) from a transformers 5 `rope_parameters` or a 4.x `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type", "default"))


def model_keys_from_hf(hf: dict) -> tuple[str, dict]:
    """A Hugging Face config.json (dict) → (family, lmjax `model.*` keys and values)."""
    family = hf.get("model_type")
    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation_function='{act}' is not supported: lmjax's MLP uses tanh-approximated GELU ('gelu_new')")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise UserError("GPT-2 attention must be scaled by 1/sqrt(head size) only (scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)")
        d = _need(hf, "n_embd")
        return family, {
            "d_model": d, "n_layers": _need(hf, "n_layer"), "n_heads": _need(hf, "n_head"),
            "n_kv_heads": _need(hf, "n_head"), "d_ff": hf.get("n_inner") or 4 * d,
            "vocab_size": _need(hf, "vocab_size"), "max_len": _need(hf, "n_positions"),
            "positions": "learned", "norm": "layernorm", "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "mlp": "gelu", "bias": True, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        }
    if family == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"LLaMA hidden_act='{hf['hidden_act']}' is not supported: lmjax's SwiGLU uses silu")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise UserError("LLaMA with attention_bias or mlp_bias is not supported: lmjax's model.bias would also add norm biases")
        theta, rope_type = _rope(hf)
        if rope_type != "default":
            raise UserError(f"LLaMA rope type '{rope_type}' (rope scaling) is not supported; lmjax implements plain rotary embeddings")
        d, n = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
        head_dim = hf.get("head_dim") or d // n
        if head_dim * n != d:
            raise UserError(f"LLaMA head_dim={head_dim} x num_attention_heads={n} != hidden_size={d}; lmjax needs head size = d_model / n_heads")
        return family, {
            "d_model": d, "n_layers": _need(hf, "num_hidden_layers"), "n_heads": n,
            "n_kv_heads": hf.get("num_key_value_heads") or n, "d_ff": _need(hf, "intermediate_size"),
            "vocab_size": _need(hf, "vocab_size"), "max_len": hf.get("max_position_embeddings", 2048),
            "positions": "rope", "rope_base": theta, "norm": "rmsnorm", "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "mlp": "swiglu", "bias": False, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        }
    raise UserError(f"Hugging Face model_type '{family}' is not supported; lmjax imports 'gpt2' (GPT2LMHeadModel) and 'llama' (LlamaForCausalLM)")


FAMILY_NEEDS = {
    "gpt2": {"positions": "learned", "norm": "layernorm", "mlp": "gelu"},
    "llama": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
}


def export_family(c: TransformerConfig) -> str:
    """Which Hugging Face family holds this model exactly: 'gpt2' or 'llama' (else a UserError)."""
    misfits = {}
    for family, needs in FAMILY_NEEDS.items():
        misfits[family] = [f"model.{k}={getattr(c, k)!r} (needs {v!r})" for k, v in needs.items() if getattr(c, k) != v]
    if c.n_kv_heads != c.n_heads:  # GPT-2 has no grouped-query attention
        misfits["gpt2"].append(f"model.n_kv_heads={c.n_kv_heads} (needs n_heads={c.n_heads})")
    for family, misfit in misfits.items():
        if not misfit:
            return family
    raise UserError("this model fits neither Hugging Face family: as GPT-2 it has " + ", ".join(misfits["gpt2"])
                    + "; as LLaMA it has " + ", ".join(misfits["llama"]))


def hf_config(family: str, c: TransformerConfig, eot_id: int | None) -> dict:
    """The config.json transformers' from_pretrained reads for this model."""
    eot = eot_id if eot_id is not None and eot_id < c.vocab_size else None
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.max_len, "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads,
            "n_inner": c.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
            # lmjax drops out embeddings and residuals, never attention weights.
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": eot, "eos_token_id": eot, "dtype": "float32",
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "max_position_embeddings": c.max_len, "rms_norm_eps": c.norm_eps,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": c.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": None, "eos_token_id": eot, "dtype": "float32",
    }


# ---------------------------------------------------------------- tensors


class _Tensors:
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
        extra = sorted(k for k in self.left if not k.endswith(IGNORED_SUFFIXES))
        if extra:
            raise UserError(f"the checkpoint has {len(extra)} tensors config.json does not account for, e.g. {', '.join(extra[:4])}")


def _stack_layers(top: dict, layers: list[dict], scan: bool) -> dict:
    """Per-layer block params → lmjax's layout ('block_i', or 'layers' with a leading axis)."""
    import jax

    if scan:
        top["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        top.update({f"block_{i}": layer for i, layer in enumerate(layers)})
    return top


def layer_params(params: dict, c: TransformerConfig) -> list[dict]:
    """Each block's params (a list of n_layers dicts), from either layout."""
    import jax

    if c.scan_layers:
        return [jax.tree.map(lambda x: np.asarray(x[i]), params["layers"]) for i in range(c.n_layers)]
    return [params[f"block_{i}"] for i in range(c.n_layers)]


def _gpt2_to_lmjax(t: _Tensors, c: TransformerConfig) -> dict:
    D, N, H, F = c.d_model, c.n_heads, c.head_dim, c.d_ff
    norm = lambda p: {"scale": t.take(p + ".weight", (D,)), "bias": t.take(p + ".bias", (D,))}  # noqa: E731
    layers = []
    for i in range(c.n_layers):
        p = f"h.{i}."
        q, k, v = np.split(t.take(p + "attn.c_attn.weight", (D, 3 * D)), 3, axis=1)
        qb, kb, vb = np.split(t.take(p + "attn.c_attn.bias", (3 * D,)), 3)
        layers.append({
            "norm1": norm(p + "ln_1"),
            "attn": {
                "query": {"kernel": q.reshape(D, N, H), "bias": qb.reshape(N, H)},
                "key": {"kernel": k.reshape(D, N, H), "bias": kb.reshape(N, H)},
                "value": {"kernel": v.reshape(D, N, H), "bias": vb.reshape(N, H)},
                "out": {"kernel": t.take(p + "attn.c_proj.weight", (D, D)).reshape(N, H, D),
                        "bias": t.take(p + "attn.c_proj.bias", (D,))},
            },
            "norm2": norm(p + "ln_2"),
            "mlp": {
                "fc": {"kernel": t.take(p + "mlp.c_fc.weight", (D, F)), "bias": t.take(p + "mlp.c_fc.bias", (F,))},
                "proj": {"kernel": t.take(p + "mlp.c_proj.weight", (F, D)), "bias": t.take(p + "mlp.c_proj.bias", (D,))},
            },
        })
    top = {"wte": t.take("wte.weight", (c.vocab_size, D)), "wpe": t.take("wpe.weight", (c.max_len, D)),
           "norm_f": norm("ln_f")}
    if c.tie_embeddings:
        t.drop("lm_head.weight")  # a tied copy, when saved at all
    else:
        top["lm_head"] = t.take("lm_head.weight", (c.vocab_size, D)).T
    return _stack_layers(top, layers, c.scan_layers)


def _llama_to_lmjax(t: _Tensors, c: TransformerConfig) -> dict:
    D, N, K, H, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        linear = lambda name, out, inp: t.take(p + name + ".weight", (out, inp)).T  # noqa: E731  torch [out, in]
        layers.append({
            "norm1": {"scale": t.take(p + "input_layernorm.weight", (D,))},
            "attn": {
                "query": {"kernel": linear("self_attn.q_proj", N * H, D).reshape(D, N, H)},
                "key": {"kernel": linear("self_attn.k_proj", K * H, D).reshape(D, K, H)},
                "value": {"kernel": linear("self_attn.v_proj", K * H, D).reshape(D, K, H)},
                "out": {"kernel": linear("self_attn.o_proj", D, N * H).reshape(N, H, D)},
            },
            "norm2": {"scale": t.take(p + "post_attention_layernorm.weight", (D,))},
            "mlp": {
                "gate": {"kernel": linear("mlp.gate_proj", F, D)},
                "up": {"kernel": linear("mlp.up_proj", F, D)},
                "proj": {"kernel": linear("mlp.down_proj", D, F)},
            },
        })
    top = {"wte": t.take("model.embed_tokens.weight", (c.vocab_size, D)),
           "norm_f": {"scale": t.take("model.norm.weight", (D,))}}
    if c.tie_embeddings:
        t.drop("lm_head.weight")
    else:
        top["lm_head"] = t.take("lm_head.weight", (c.vocab_size, D)).T
    return _stack_layers(top, layers, c.scan_layers)


def params_from_hf(family: str, tensors: dict[str, np.ndarray], c: TransformerConfig) -> dict:
    """Hugging Face tensors (by name) → lmjax params for the model `c`; every tensor is used."""
    if family == "gpt2":
        t = _Tensors(tensors, strip_prefix="transformer.")  # OpenAI's original files have no prefix
        params = _gpt2_to_lmjax(t, c)
    else:
        t = _Tensors(tensors)
        params = _llama_to_lmjax(t, c)
    t.finish()
    return params


def hf_from_params(family: str, params: dict, c: TransformerConfig) -> dict[str, np.ndarray]:
    """lmjax params → Hugging Face tensors (by name) for `family` (see `export_family`)."""
    D, N, H = c.d_model, c.n_heads, c.head_dim
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {}
    if family == "gpt2":
        # A model without biases is GPT-2 with zero biases (LayerNorm included).
        bias = lambda d, n: a(d["bias"]) if "bias" in d else np.zeros(n, np.float32)  # noqa: E731
        for i, layer in enumerate(layer_params(params, c)):
            p, at, mlp = f"transformer.h.{i}.", layer["attn"], layer["mlp"]
            qkv = ("query", "key", "value")
            out[p + "ln_1.weight"], out[p + "ln_1.bias"] = a(layer["norm1"]["scale"]), bias(layer["norm1"], D)
            out[p + "attn.c_attn.weight"] = np.concatenate([a(at[n]["kernel"]).reshape(D, D) for n in qkv], 1)
            out[p + "attn.c_attn.bias"] = np.concatenate([bias(at[n], (N, H)).reshape(D) for n in qkv])
            out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = a(at["out"]["kernel"]).reshape(D, D), bias(at["out"], D)
            out[p + "ln_2.weight"], out[p + "ln_2.bias"] = a(layer["norm2"]["scale"]), bias(layer["norm2"], D)
            out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = a(mlp["fc"]["kernel"]), bias(mlp["fc"], c.d_ff)
            out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = a(mlp["proj"]["kernel"]), bias(mlp["proj"], D)
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = a(params["wte"]), a(params["wpe"])
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = a(params["norm_f"]["scale"]), bias(params["norm_f"], D)
    else:
        for i, layer in enumerate(layer_params(params, c)):
            p, at, mlp = f"model.layers.{i}.", layer["attn"], layer["mlp"]
            out[p + "input_layernorm.weight"] = a(layer["norm1"]["scale"])
            for name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                out[p + f"self_attn.{hf_name}.weight"] = a(at[name]["kernel"]).reshape(D, -1).T
            out[p + "self_attn.o_proj.weight"] = a(at["out"]["kernel"]).reshape(N * H, D).T
            out[p + "post_attention_layernorm.weight"] = a(layer["norm2"]["scale"])
            for name, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
                out[p + f"mlp.{hf_name}.weight"] = a(mlp[name]["kernel"]).T
        out["model.embed_tokens.weight"] = a(params["wte"])
        out["model.norm.weight"] = a(params["norm_f"]["scale"])
    if not c.tie_embeddings:
        out["lm_head.weight"] = a(params["lm_head"]).T
    return out


# ---------------------------------------------------------------- tokenizers


def _eot_token(tok, directory: Path, hf: dict) -> str:
    """The tokenizer's end-of-sequence token: lmjax's '<|endoftext|>' if present, else the
    eos_token of tokenizer_config.json, else the token of config.json's eos_token_id."""
    from lmjax.data.tokenizers import EOT

    if tok.token_to_id(EOT) is not None:
        return EOT
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        eos = json.loads(tc.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos and tok.token_to_id(eos) is not None:
            return eos
    eos_id = hf.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if isinstance(eos_id, int) and tok.id_to_token(eos_id) is not None:
        return tok.id_to_token(eos_id)
    return EOT  # none known: HFTokenizer adds lmjax's


def _hf_tokenizer(path: Path, hf: dict):
    from tokenizers import Tokenizer as HFTok

    from lmjax.data.tokenizers import HFTokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--tokenizer {path}: no tokenizer.json there (nor an lmjax tokenizer directory)")
    tok = HFTok.from_file(str(file))
    return HFTokenizer(tok, "hf", _eot_token(tok, file.parent, hf))


def resolve_tokenizer(directory: Path, hf: dict, choice: str | None):
    """The tokenizer of an imported model, in this order: --tokenizer (a tokenizer.json, a
    directory holding one, an lmjax tokenizer directory, or 'byte'); the model directory's
    lmjax_tokenizer.json (written by export-hf); its tokenizer.json. Never guessed."""
    from lmjax.data.tokenizers import META, ByteTokenizer, load_tokenizer

    if choice == "byte":
        return ByteTokenizer()
    if choice:
        path = Path(choice)
        return load_tokenizer(path) if (path / META).is_file() else _hf_tokenizer(path, hf)
    if (directory / META).is_file():
        return load_tokenizer(directory)
    if (directory / "tokenizer.json").is_file():
        return _hf_tokenizer(directory, hf)
    raise UserError(f"{directory} has no tokenizer.json; pass --tokenizer PATH (a tokenizer.json, a directory holding one, "
                    "or an lmjax run's tokenizer/ directory), or --tokenizer byte for a model of lmjax byte ids")


# ---------------------------------------------------------------- run directories


def run_config(model_keys: dict, tokenizer, overrides: Iterable[str] = ()):
    """The lmjax config of an imported model: defaults, the mapped model keys, then overrides
    (data, eval, train settings; model keys the weights fix cannot change)."""
    from lmjax import config as config_lib

    cfg = config_lib.base_config()
    for key, value in model_keys.items():
        cfg.model[key] = value
    cfg.tokenizer.kind = tokenizer.kind
    cfg.tokenizer.vocab_size = tokenizer.vocab_size if tokenizer.kind in ("bpe", "word") else 0
    cfg.data.seq_len = min(model_keys["max_len"], IMPORT_SEQ_LEN)
    cfg = config_lib.apply_overrides(cfg, overrides)
    for key, value in model_keys.items():
        free = key == "max_len" and model_keys["positions"] != "learned"  # rotary: only the decode cache size
        if cfg.model[key] != value and not free:
            raise UserError(f"--config.model.{key} cannot change on import: the weights fix it to {value!r}")
    config_lib.validate(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is {cfg.model.vocab_size}; pass the model's own tokenizer with --tokenizer")
    return cfg


def _check_params(params, abstract) -> None:
    import jax

    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise UserError(f"converted parameters do not match the lmjax model (e.g. {diff[:3]}); the config mapping is incomplete")


def write_run(cfg, run_dir: str | Path, tokenizer, params) -> Path:
    """A run directory at step 0 holding `params` (lmjax layout): config.json, tokenizer/, and
    an Orbax checkpoint of the TrainState `build_run` makes (optimizer state fresh)."""
    import jax
    from ml_collections import ConfigDict

    from lmjax import config as config_lib
    from lmjax.checkpoint import Checkpoints
    from lmjax.run import build_run, probe_writable
    from lmjax.train.parallel import build_parallel

    run_dir = Path(run_dir).absolute()
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise UserError(f"{run_dir} already holds checkpoints; choose a new --out directory")
    probe_writable(run_dir)
    run = build_run(cfg, run_dir, tokenizer.vocab_size, build_parallel(ConfigDict({"strategy": "single"})))
    _check_params(params, run.abstract_state().params)

    def fill(rng, params):  # init_state's step, rng and optimizer structure; its random params are dead code
        state = run.init_state(rng)
        return state.replace(params=params, opt_state=run.tx.init(params))

    state = jax.jit(fill, out_shardings=run.shardings)(jax.random.PRNGKey(cfg.seed), params)
    tokenizer.save(run_dir / "tokenizer")
    (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    ckpts = Checkpoints(ckpt_dir, keep=cfg.train.keep)
    ckpts.save(0, state, cfg.to_dict(), force=True)
    ckpts.wait()
    ckpts.close()
    return run_dir


def read_weights(files: list[Path]) -> dict[str, np.ndarray]:
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return tensors


def load_hf(src: str | Path, scan_layers: bool = False) -> tuple[str, TransformerConfig, dict]:
    """A Hugging Face model directory or .safetensors file → (family, lmjax model config, params)."""
    directory, files = find_weights(src)
    family, model_keys = model_keys_from_hf(read_hf_config(directory))
    c = TransformerConfig(**model_keys, scan_layers=scan_layers)
    return family, c, params_from_hf(family, read_weights(files), c)


def import_hf(src: str | Path, out: str | Path, tokenizer: str | None = None, overrides: Iterable[str] = (),
              log: Callable[[str], None] = print) -> Path:
    """`lmjax import-hf`: a Hugging Face GPT-2 / LLaMA (safetensors) → an lmjax run directory."""
    import jax

    directory, files = find_weights(src)
    hf = read_hf_config(directory)
    family, model_keys = model_keys_from_hf(hf)
    tok = resolve_tokenizer(directory, hf, tokenizer)
    cfg = run_config(model_keys, tok, overrides)
    c = TransformerConfig.from_config(cfg.model, tok.vocab_size, cfg.data.seq_len)
    params = params_from_hf(family, read_weights(files), c)
    run_dir = write_run(cfg, out, tok, params)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log(f"imported {family} ({n / 1e6:.2f}M parameters, vocabulary {c.vocab_size}, tokenizer {tok.kind}) "
        f"from {src} into {run_dir} as step 0; try `lmjax eval {run_dir}` or `lmjax sample {run_dir}`")
    return run_dir


def export_hf(run_dir: str | Path, out: str | Path, which: str = "latest", log: Callable[[str], None] = print) -> Path:
    """`lmjax export-hf`: a run's checkpoint → config.json + model.safetensors (+ tokenizer) that
    transformers' from_pretrained loads (GPT2LMHeadModel or LlamaForCausalLM)."""
    import jax

    from lmjax.run import load_run
    from lmjax.data.tokenizers import HFTokenizer

    cfg, run, params, tok, step = load_run(run_dir, which)
    if cfg.model.kind != "transformer":
        raise UserError(f"only Transformer runs can be exported to Hugging Face; this run's model.kind is '{cfg.model.kind}'")
    c = run.model.cfg
    family = export_family(c)
    tensors = hf_from_params(family, jax.device_get(params), c)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / WEIGHTS)
    (out / "config.json").write_text(json.dumps(hf_config(family, c, tok.eot_id), indent=2))
    tok.save(out)  # lmjax_tokenizer.json, plus tokenizer.json for BPE / HF tokenizers
    if isinstance(tok, HFTokenizer):
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eot_token, "model_max_length": c.max_len}, indent=2))
    log(f"exported {run_dir} at step {step} as Hugging Face {family} to {out}")
    return out
