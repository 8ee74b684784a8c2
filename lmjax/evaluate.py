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
    piece = np.asarray(tokens[w.start : w.start + context + 1], np.int32)
    n = len(piece) - 1
    inputs[:n], targets[:n] = piece[:-1], piece[1:]
    target_index = w.start + 1 + np.arange(n)
    weights[:n] = target_index >= w.first_new
    return inputs, targets, weights


def evaluate(
    row_nll_fn,
    params,
    split: TokenSplit,
    token_bytes: np.ndarray,
    context: int,
    stride: int,
    batch_size: int,
    stream: bool = False,
    put=lambda b: b,
    fetch=jax.device_get,
    progress=None,
) -> dict:
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
    window_nll, window_tokens = np.zeros(len(windows), np.float64), np.zeros(len(windows), np.int64)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        arrays = [window_arrays(docs[w.doc], w, context) for w in chunk]
        pad = batch_size - len(chunk)
        inputs, targets, weights = (
            np.stack([a[j] for a in arrays] + [np.zeros_like(arrays[0][j])] * pad) for j in range(3)
        )
        nll, count = fetch(row_nll_fn(params, put({"inputs": inputs, "targets": targets, "weights": weights})))
        for r, w in enumerate(chunk):
            window_nll[i + r], window_tokens[i + r] = float(nll[r]), int(round(float(count[r])))
            doc_nll[w.doc] += window_nll[i + r]
            doc_tokens[w.doc] += window_tokens[i + r]
            doc_bytes[w.doc] += int((token_bytes[targets[r]] * weights[r]).sum())
        if progress:
            progress(min(i + batch_size, len(windows)), len(windows))
    return report(doc_nll, doc_tokens, doc_bytes, window_nll, window_tokens)


# Fewer documents than this: the interval is taken over contiguous blocks of windows instead.
MIN_DOCUMENTS_FOR_INTERVAL = 20
INTERVAL_BLOCKS = 20


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom: a table for 1-4, the
    Cornish-Fisher expansion from 5 on (within 0.003 of the exact value)."""
    if dof <= 4:
        return (12.706204736174698, 4.302652729749464, 3.182446305284263, 2.7764451051977987)[dof - 1]
    z, v = 1.959963984540054, float(dof)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


def ratio_interval(unit_nll: np.ndarray, unit_tokens: np.ndarray) -> tuple[float, float]:
    """95% interval of total NLL / total tokens with the units (documents or blocks, float[U]
    each) as the sampled items: the ratio estimator's standard error and Student's t with U - 1
    degrees of freedom. (nan, nan) with fewer than 2 units."""
    keep = unit_tokens > 0
    nll, tokens = unit_nll[keep], unit_tokens[keep]
    n = len(tokens)
    if n < 2:
        return float("nan"), float("nan")
    mean = nll.sum() / tokens.sum()
    se = math.sqrt(n / (n - 1) * float(((nll - mean * tokens) ** 2).sum())) / tokens.sum()
    half = t_quantile_975(n - 1) * se
    return mean - half, mean + half


def window_blocks(window_nll: np.ndarray, window_tokens: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-window NLL and counts (in reading order) summed over `blocks` contiguous blocks of
    about equal numbers of windows."""
    edges = np.linspace(0, len(window_nll), min(blocks, len(window_nll)) + 1).round().astype(int)
    return np.add.reduceat(window_nll, edges[:-1]), np.add.reduceat(window_tokens, edges[:-1])


def report(
    doc_nll: np.ndarray,
    doc_tokens: np.ndarray,
    doc_bytes: np.ndarray,
    window_nll: np.ndarray | None = None,
    window_tokens: np.ndarray | None = None,
) -> dict:
    """Totals, perplexity, bits per token and byte, and a 95% interval of nats/token.

    The interval treats documents as the sampled units when there are at least
    MIN_DOCUMENTS_FOR_INTERVAL of them; with fewer (a held-out set that is one document, such as
    a WikiText or PTB test file) it treats INTERVAL_BLOCKS contiguous blocks of windows as the
    units (batch means), given the per-window figures float[W] in reading order. `ci95_method`
    says which, in words.
    """
    total_nll, total_tokens, total_bytes = doc_nll.sum(), int(doc_tokens.sum()), int(doc_bytes.sum())
    mean = total_nll / total_tokens
    n = int((doc_tokens > 0).sum())
    if n >= MIN_DOCUMENTS_FOR_INTERVAL or window_nll is None:
        unit_nll, unit_tokens, units = doc_nll, doc_tokens, "documents"
    else:
        unit_nll, unit_tokens = window_blocks(window_nll, window_tokens, INTERVAL_BLOCKS)
        units = "contiguous blocks of windows"
    lo, hi = ratio_interval(unit_nll, unit_tokens)
    over = f"over {int((unit_tokens > 0).sum())} {units}"
    return {
        "documents": n,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "nats_per_token": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else float("nan"),
        "nats_per_token_ci95": [lo, hi],
        "perplexity_ci95": [math.exp(lo), math.exp(hi)],
        "ci95_over": over,
        "ci95_method": f"95% interval {over} ({n} documents): ratio estimator of nats/token with the {units} as "
        "sampled units, Student's t with (units - 1) degrees of freedom",
        "per_document": [
            {"nll": float(a), "tokens": int(b), "bytes": int(c)} for a, b, c in zip(doc_nll, doc_tokens, doc_bytes)
        ],
    }
