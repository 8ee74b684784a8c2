"""Weights in and out of other frameworks: `lmjax.interop.hf` for Hugging Face GPT-2 and LLaMA."""
