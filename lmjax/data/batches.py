"""Batches: the global batch of step s is a pure function of (data seed, s).

Training samples windows of seq_len + 1 tokens from the packed stream: window w starts at
token w * seq_len. Each epoch visits every window once in the order of a permutation
seeded by (seed, epoch); global row r of step s is window number s * batch + r of that
endless sequence. A process builds only its own rows, so the global batch is the same for
any number of devices or hosts, and resuming needs only the step.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from lmjax.data.cache import TokenSplit
from lmjax.errors import UserError


def process_rows(global_rows: int, block: tuple[int, int], what: str = "the batch size") -> slice:
    """The rows of a global batch that this process feeds: block `index` of `count` equal,
    contiguous blocks, for block = (index, count), the parallel strategy's `process_block`."""
    index, count = block
    if global_rows % count:
        raise UserError(f"{what}={global_rows} does not divide over {count} processes; use a multiple of {count}")
    rows = global_rows // count
    return slice(index * rows, (index + 1) * rows)


def local_rows(batch: dict, block: tuple[int, int]) -> dict:
    """This process's rows (`process_rows`) of every array of a global batch."""
    rows = process_rows(next(iter(batch.values())).shape[0], block)
    return {k: v[rows] for k, v in batch.items()}


class TrainBatches:
    def __init__(
        self,
        split: TokenSplit,
        seq_len: int,
        global_batch: int,
        seed: int,
        block: tuple[int, int] = (0, 1),
        document_mask: bool = False,
    ):
        self.split = split
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.document_mask = document_mask
        self.n_windows = (len(split.tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(
                f"the training split has {len(split.tokens)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
                "lower data.seq_len or add data"
            )
        self.rows = process_rows(global_batch, block, "train.batch_size")

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a TrainBatches lives as long as its run
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def window_ids(self, step: int) -> np.ndarray:
        """int64[global_batch]: the windows of step `step` (all processes)."""
        flat = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        epochs, positions = np.divmod(flat, self.n_windows)
        out = np.empty(self.global_batch, np.int64)
        for epoch in np.unique(epochs):  # a step spans one epoch, or two at an epoch's end
            rows = epochs == epoch
            out[rows] = self._permutation(int(epoch))[positions[rows]]
        return out

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step`: int32 inputs/targets [rows, seq_len] (+ masks)."""
        starts = self.window_ids(step)[self.rows] * self.seq_len
        return windows(self.split, starts, self.seq_len, self.document_mask)


def windows(split: TokenSplit, starts: np.ndarray, seq_len: int, document_mask: bool) -> dict[str, np.ndarray]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    tokens = np.asarray(split.tokens[idx.ravel()], np.int32).reshape(idx.shape)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if document_mask:
        batch.update(document_positions(split.doc_starts, idx[:, :-1]))
    return batch


def document_positions(doc_starts: np.ndarray, idx_BxT: np.ndarray) -> dict[str, np.ndarray]:
    """Segment ids (1, 2, ... per document inside a row) and positions restarting at each.

    A document's closing EOT belongs to it. Positions count from the document's first token
    in the row (a row that starts mid-document counts from its own start), so they stay
    below seq_len: a token can only attend to its document's part of the row anyway.
    """
    doc = np.searchsorted(doc_starts, idx_BxT, side="right") - 1
    first = np.maximum(doc_starts[doc], idx_BxT[:, :1])
    return {"segment_ids": (doc - doc[:, :1] + 1).astype(np.int32), "positions": (idx_BxT - first).astype(np.int32)}


def heldout_subset(
    split: TokenSplit, seq_len: int, batch_size: int, n_batches: int, document_mask: bool
) -> list[dict[str, np.ndarray]]:
    """The first n_batches x batch_size non-overlapping windows of the held-out stream: the
    same tokens at every evaluation during training."""
    n_windows = (len(split.tokens) - 1) // seq_len
    if n_windows < 1:
        raise UserError(
            f"the held-out split has {len(split.tokens)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; lower "
            "data.seq_len or hold out more data"
        )
    starts = np.arange(min(n_windows, batch_size * n_batches), dtype=np.int64) * seq_len
    out = []
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        batch = windows(split, chunk, seq_len, document_mask)
        batch["weights"] = np.ones(batch["targets"].shape, np.float32)
        pad = batch_size - len(chunk)
        if pad:  # pad the last batch with weight-0 rows so every batch has one shape
            batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        out.append(batch)
    return out


class Prefetcher:
    """Builds and places batches for steps start..end-1 in a background thread, a few ahead,
    so the host prepares step s+1 while the devices run step s."""

    def __init__(self, make: Callable[[int], dict], put: Callable[[dict], dict], start: int, end: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, put, start, end), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make, put, start, end):
        try:
            for step in range(start, end):
                if not self._put((step, put(make(step)))):
                    return
            self._put((None, None))  # end of the steps
        except BaseException as e:
            self._put((None, e))

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        while True:
            step, item = self._queue.get()
            if step is None:
                if item is not None:
                    raise item
                return
            yield step, item

    def close(self) -> None:
        """Stop and wait for the thread: one still inside JAX or numpy when the interpreter
        exits is killed mid-call, which aborts the process (SIGABRT, seen after a SIGTERM save)."""
        self._stop.set()
        self._thread.join(timeout=60)
