"""Hugging Face GPT-2 and LLaMA weights in and out of lmjax's Transformer, as safetensors.

    import_hf(HF_DIR, RUN_DIR)   config.json + model.safetensors → an lmjax run at step 0
    export_hf(RUN_DIR, HF_DIR)   an lmjax checkpoint → config.json + model.safetensors

One job per module:
    safetensors_io   the files: safetensors in and out, config.json, pickle checkpoints refused
    gpt2, llama      one family each: config.json ↔ lmjax model keys, tensors ↔ params
    mapping          what both families' mappings are built from (shape checks, layer layouts)
    hf_tokenizer     the tokenizer of an imported model, never guessed
    hf (this one)    which family; an lmjax run directory written (import) or read (export)

An imported run's data.seq_len (the eval context) is min(model context, 1024); the
`--config.KEY=VALUE` arguments of import-hf set it and the data, eval and train keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
from ml_collections import ConfigDict

from lmjax import config as config_lib
from lmjax.checkpoint import Checkpoints
from lmjax.data.tokenizer_base import Tokenizer
from lmjax.data.tokenizers import HFTokenizer
from lmjax.errors import UserError
from lmjax.interop import gpt2, llama
from lmjax.interop.hf_tokenizer import resolve_tokenizer
from lmjax.interop.safetensors_io import WEIGHTS, find_weights, read_hf_config, read_weights, write_safetensors
from lmjax.models.transformer import TransformerConfig
from lmjax.run import build_run, count_params, load_run, probe_writable, write_config
from lmjax.train.parallel import build_parallel

FAMILIES = {"gpt2": gpt2, "llama": llama}  # Hugging Face model_type → its mapping
IMPORT_SEQ_LEN = 1024  # data.seq_len of an imported run, unless the model's context is shorter


def model_keys_from_hf(hf: dict) -> tuple[str, dict]:
    """A Hugging Face config.json (dict) → (family, lmjax `model.*` keys and values)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UserError(
            f"Hugging Face model_type '{family}' is not supported; lmjax imports 'gpt2' "
            "(GPT2LMHeadModel) and 'llama' (LlamaForCausalLM)"
        )
    return family, FAMILIES[family].model_keys(hf)


def export_family(c: TransformerConfig) -> str:
    """Which Hugging Face family holds this model exactly: 'gpt2' or 'llama' (else a UserError)."""
    misfits = {family: mapping.misfits(c) for family, mapping in FAMILIES.items()}
    for family, misfit in misfits.items():
        if not misfit:
            return family
    raise UserError(
        "this model fits neither Hugging Face family: "
        + "; ".join(f"as {FAMILIES[family].NAME} it has {', '.join(misfit)}" for family, misfit in misfits.items())
    )


def load_hf(src: str | Path, scan_layers: bool = False) -> tuple[str, TransformerConfig, dict]:
    """A Hugging Face model directory or .safetensors file → (family, lmjax model config, params)."""
    directory, files = find_weights(src)
    family, model_keys = model_keys_from_hf(read_hf_config(directory))
    c = TransformerConfig(**model_keys, scan_layers=scan_layers)
    return family, c, FAMILIES[family].params_from_hf(read_weights(files), c)


# ---------------------------------------------------------------- import: a run directory written


def run_config(model_keys: dict, tokenizer: Tokenizer, overrides: Iterable[str] = ()) -> ConfigDict:
    """The lmjax config of an imported model: defaults, the mapped model keys, then overrides
    (data, eval, train settings; model keys the weights fix cannot change)."""
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
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
            f"{cfg.model.vocab_size}; pass the model's own tokenizer with --tokenizer"
        )
    return cfg


def _check_params(params, abstract) -> None:
    def shapes(tree):
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    got, want = shapes(params), shapes(abstract)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise UserError(
            f"converted parameters do not match the lmjax model (e.g. {diff[:3]}); the config mapping is incomplete"
        )


def write_run(cfg, run_dir: str | Path, tokenizer: Tokenizer, params) -> Path:
    """A run directory at step 0 holding `params` (lmjax layout): config.json, tokenizer/, and
    an Orbax checkpoint of the TrainState `build_run` makes (optimizer state fresh)."""
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
    write_config(cfg, run_dir)
    ckpts = Checkpoints(ckpt_dir, keep=cfg.train.keep)
    ckpts.save(0, state, cfg.to_dict(), force=True)
    ckpts.wait()
    ckpts.close()
    return run_dir


def import_hf(
    src: str | Path,
    out: str | Path,
    tokenizer: str | None = None,
    overrides: Iterable[str] = (),
    log: Callable[[str], None] = print,
) -> Path:
    """`lmjax import-hf`: a Hugging Face GPT-2 / LLaMA (safetensors) → an lmjax run directory."""
    directory, files = find_weights(src)
    hf = read_hf_config(directory)
    family, model_keys = model_keys_from_hf(hf)
    tok = resolve_tokenizer(directory, hf, tokenizer)
    cfg = run_config(model_keys, tok, overrides)
    c = TransformerConfig.from_config(cfg.model, tok.vocab_size, cfg.data.seq_len)
    params = FAMILIES[family].params_from_hf(read_weights(files), c)
    run_dir = write_run(cfg, out, tok, params)
    log(
        f"imported {family} ({count_params(params) / 1e6:.2f}M parameters, vocabulary {c.vocab_size}, "
        f"tokenizer {tok.kind}) from {src} into {run_dir} as step 0; "
        f"try `lmjax eval {run_dir}` or `lmjax sample {run_dir}`"
    )
    return run_dir


# ---------------------------------------------------------------- export: a run directory read


def export_hf(run_dir: str | Path, out: str | Path, which: str = "latest", log: Callable[[str], None] = print) -> Path:
    """`lmjax export-hf`: a run's checkpoint → config.json + model.safetensors (+ tokenizer) that
    transformers' from_pretrained loads (GPT2LMHeadModel or LlamaForCausalLM)."""
    cfg, run, params, tok, step = load_run(run_dir, which)
    if cfg.model.kind != "transformer":
        raise UserError(
            f"only Transformer runs can be exported to Hugging Face; this run's model.kind is '{cfg.model.kind}'"
        )
    c = run.model.cfg
    family = export_family(c)
    mapping = FAMILIES[family]
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(mapping.hf_from_params(jax.device_get(params), c), out / WEIGHTS)
    eot = tok.eot_id if tok.eot_id is not None and tok.eot_id < c.vocab_size else None
    (out / "config.json").write_text(json.dumps(mapping.hf_config(c, eot), indent=2))
    tok.save(out)  # lmjax_tokenizer.json, plus tokenizer.json for BPE / HF tokenizers
    if isinstance(tok, HFTokenizer):
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": tok.eot_token,
                    "model_max_length": c.max_len,
                },
                indent=2,
            )
        )
    log(f"exported {run_dir} at step {step} as Hugging Face {family} to {out}")
    return out
