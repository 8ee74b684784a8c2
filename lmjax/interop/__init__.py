"""Weights in and out of other frameworks: Hugging Face GPT-2 and LLaMA (see `lmjax.interop.hf`).

The public names, for `from lmjax import interop`: `interop.import_hf(...)`, `interop.load_hf(...)`.
"""

from lmjax.interop.hf import export_family, export_hf, import_hf, load_hf, model_keys_from_hf, run_config, write_run
from lmjax.interop.hf_tokenizer import resolve_tokenizer
from lmjax.interop.mapping import layer_params
from lmjax.interop.safetensors_io import find_weights, read_safetensors, read_weights, write_safetensors

__all__ = [
    "export_family",
    "export_hf",
    "find_weights",
    "import_hf",
    "layer_params",
    "load_hf",
    "model_keys_from_hf",
    "read_safetensors",
    "read_weights",
    "resolve_tokenizer",
    "run_config",
    "write_run",
    "write_safetensors",
]
