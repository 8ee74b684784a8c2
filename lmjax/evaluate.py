"""Held-out perplexity: every held-out token predicted exactly once, token-weighted.

Documents are evaluated independently (the first token of each has no prediction), unless
data.stream says the held-out set is one stream. A document longer than the context is
covered by windows `stride` apart; each window predicts only tokens no earlier window did,
each with up to `context - stride` tokens of extra left context. The last batch is padded
with weight-0 rows, never dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np

from lmjax.data.cache import TokenSplit
from lmjax.errors import UserError


@dataclass
class Window:
    doc: int
    start: int  # index of the first input token in the document
    first_new: int  # first target index (in the document) this window predicts


def plan_windows(length: int, context: int, stride: int, doc: int = 0) -> list[Window]:
    """Windows covering targets 1..length-1 of a document of `length` tokens."""
    out = []
    predicted = 0  # targets 1..predicted are done
    start = 0
    while predicted < length - 1:
        end = min(start + context, length - 1)  # last target index of this window
        out.append(Window(doc, start, predicted + 1))
        predicted = end
        start += stride
    return out


def window_arrays(tokens: np.ndarray, w: Window, context: int) -> tuple[np.ndarray, ...]:
    """inputs, targets int32[context] and weights float32[context] for one window."""
    inputs = np.zeros(context, np.int32)
    targets = np.zeros(context, np.int32)
    weights = np.zeros(context, np.float32)
    piece = np.asarray(tokens[w.start: w.start + context + 1], np.int32)
    n = len(piece) - 1
    inputs[:n], targets[:n] = piece[:-1], piece[1:]
    target_index = w.start + 1 + np.arange(n)
    weights[:n] = target_index >= w.first_new
    return inputs, targets, weights


def evaluate(row_nll_fn, params, split: TokenSplit, token_bytes: np.ndarray, context: int, stride: int,
             batch_size: int, stream: bool = False, put=lambda b: b, fetch=jax.device_get, progress=None) -> dict:
    """Perplexity report over a whole split (see the module docstring)."""
    if not 0 < stride <= context:
        raise UserError(f"--stride must be between 1 and the context ({context}), got {stride}")
    docs = [np.asarray(split.tokens)] if stream else [split.document(i) for i in range(split.n_docs)]
    windows = [w for d, toks in enumerate(docs) for w in plan_windows(len(toks), context, stride, d)]
    if not windows:
        raise UserError("the held-out split has no token to predict (every document is shorter than 2 tokens)")
    doc_nll = np.zeros(len(docs), np.float64)
    doc_tokens = np.zeros(len(docs), np.int64)
    doc_bytes = np.zeros(len(docs), np.int64)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        arrays = [window_arrays(docs[w.doc], w, context) for w in chunk]
        pad = batch_size - len(chunk)
        inputs, targets, weights = (np.stack([a[j] for a in arrays] + [np.zeros_like(arrays[0][j])] * pad) for j in range(3))
        nll, count = fetch(row_nll_fn(params, put({"inputs": inputs, "targets": targets, "weights": weights})))
        for r, w in enumerate(chunk):
            doc_nll[w.doc] += float(nll[r])
            doc_tokens[w.doc] += int(round(float(count[r])))
            doc_bytes[w.doc] += int((token_bytes[targets[r]] * weights[r]).sum())
        if progress:
            progress(min(i + batch_size, len(windows)), len(windows))
    return report(doc_nll, doc_tokens, doc_bytes)


def report(doc_nll: np.ndarray, doc_tokens: np.ndarray, doc_bytes: np.ndarray) -> dict:
    """Totals, perplexity, bits per token and byte, and a 95% interval over documents."""
    total_nll, total_tokens, total_bytes = doc_nll.sum(), int(doc_tokens.sum()), int(doc_bytes.sum())
    mean = total_nll / total_tokens
    keep = doc_tokens > 0
    n = int(keep.sum())
    # Ratio-estimator standard error of nats/token, treating documents as the sampled units.
    resid = doc_nll[keep] - mean * doc_tokens[keep]
    se = math.sqrt(n / max(n - 1, 1) * float((resid ** 2).sum())) / total_tokens if n > 1 else float("nan")
    lo, hi = mean - 1.96 * se, mean + 1.96 * se
    return {
        "documents": n, "tokens": total_tokens, "bytes": total_bytes,
        "nats_per_token": mean, "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else float("nan"),
        "nats_per_token_ci95": [lo, hi], "perplexity_ci95": [math.exp(lo), math.exp(hi)],
        "per_document": [{"nll": float(a), "tokens": int(b), "bytes": int(c)}
                         for a, b, c in zip(doc_nll, doc_tokens, doc_bytes)],
    }
