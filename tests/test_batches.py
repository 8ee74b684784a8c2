"""Batches: the global batch of step s is a pure function of (seed, s); document masking;
the background prefetcher."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lmjax.data.batches import Prefetcher, TrainBatches, document_positions, heldout_subset
from lmjax.data.cache import TokenSplit
from lmjax.errors import UserError

EOT = 0


def make_split(doc_lengths, seed=0) -> TokenSplit:
    """Documents of random tokens 1..99, each closed by EOT=0."""
    rng = np.random.default_rng(seed)
    pieces = [np.append(rng.integers(1, 100, n), EOT) for n in doc_lengths]
    starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return TokenSplit(np.concatenate(pieces).astype(np.uint16), starts, np.asarray(doc_lengths, np.int64))


SPLIT = make_split([37, 5, 80, 12, 64, 3, 90, 41] * 3)  # 1,024 tokens


def reference_window_ids(b: TrainBatches, step: int) -> np.ndarray:
    """The original per-row loop that the vectorised window_ids must reproduce."""
    flat = np.arange(step * b.global_batch, (step + 1) * b.global_batch, dtype=np.int64)
    epochs, positions = np.divmod(flat, b.n_windows)
    return np.array(
        [np.random.default_rng([b.seed, int(e)]).permutation(b.n_windows)[p] for e, p in zip(epochs, positions)],
        np.int64,
    )


@pytest.mark.parametrize("seq_len,batch", [(16, 8), (32, 12), (300, 8)])  # (300, 8): 3 windows, a step spans epochs
def test_vectorised_window_ids_match_the_reference(seq_len, batch):
    b = TrainBatches(SPLIT, seq_len, batch, seed=7)
    for step in list(range(25)) + [1000, 12345]:
        np.testing.assert_array_equal(b.window_ids(step), reference_window_ids(b, step))


@pytest.mark.parametrize("document_mask", [False, True])
def test_global_batch_is_the_same_for_1_2_and_4_processes(document_mask):
    single = TrainBatches(SPLIT, 16, 8, seed=3, document_mask=document_mask)
    for step in (0, 1, 7, 8, 63, 64, 200):  # 63 windows: steps 7-8 cross an epoch
        whole = single(step)
        for count in (2, 4):
            parts = [
                TrainBatches(SPLIT, 16, 8, seed=3, block=(i, count), document_mask=document_mask)(step)
                for i in range(count)
            ]
            assert all(len(p["inputs"]) == 8 // count for p in parts)
            for key in whole:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_a_fresh_instance_resumes_the_same_stream():
    first = TrainBatches(SPLIT, 16, 8, seed=5)
    stream = [first(s) for s in range(20)]
    resumed = TrainBatches(SPLIT, 16, 8, seed=5)
    for s in (19, 11, 12, 0):  # any order: a batch depends on the step alone
        for key in stream[s]:
            np.testing.assert_array_equal(resumed(s)[key], stream[s][key])
    other_seed = TrainBatches(SPLIT, 16, 8, seed=6)
    assert not np.array_equal(other_seed(0)["inputs"], stream[0]["inputs"])


def test_each_epoch_draws_every_window_once():
    b = TrainBatches(SPLIT, 16, 7, seed=1)  # 63 windows, 7 rows: epochs end inside steps
    flat = np.concatenate([b.window_ids(s) for s in range(27)])  # 189 rows = 3 epochs
    epochs = flat.reshape(3, b.n_windows)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(b.n_windows))
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch


def test_windows_are_shifted_slices_of_the_stream():
    b = TrainBatches(SPLIT, 16, 4, seed=0)
    batch = b(3)
    for row, w in enumerate(b.window_ids(3)):
        chunk = SPLIT.tokens[w * 16 : w * 16 + 17].astype(np.int32)
        np.testing.assert_array_equal(batch["inputs"][row], chunk[:-1])
        np.testing.assert_array_equal(batch["targets"][row], chunk[1:])
    assert batch["inputs"].dtype == np.int32 and set(batch) == {"inputs", "targets"}


def test_document_positions_restart_at_each_document():
    doc_starts = np.array([0, 4, 6, 20])  # documents of 4, 2 and 14 tokens (EOT included)
    out = document_positions(doc_starts, np.array([[2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]]))
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1]])
    # A row that starts inside a document counts positions from the row's start.
    np.testing.assert_array_equal(out["positions"], [[0, 1, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5]])


def test_heldout_subset_is_fixed_padded_and_masked():
    batches = heldout_subset(SPLIT, 16, 5, 3, document_mask=True)
    assert len(batches) == 3 and all(b["inputs"].shape == (5, 16) for b in batches)
    assert {"segment_ids", "positions", "weights"} <= set(batches[0])
    np.testing.assert_array_equal(batches[0]["inputs"][1], SPLIT.tokens[16:32])
    small = heldout_subset(make_split([20, 10]), 8, 4, 2, document_mask=False)  # 3 windows for 8 rows
    weights = np.concatenate([b["weights"] for b in small])
    assert weights.sum() == 3 * 8 and (weights[3:] == 0).all()
    with pytest.raises(UserError, match="held-out split has 33 tokens, fewer than data.seq_len \\+ 1 = 65"):
        heldout_subset(make_split([20, 11]), 64, 4, 1, document_mask=False)


def test_too_short_training_split_and_indivisible_batch():
    with pytest.raises(UserError, match="training split has 33 tokens, fewer than data.seq_len \\+ 1 = 65"):
        TrainBatches(make_split([20, 11]), 64, 4, 0)
    with pytest.raises(UserError, match="train.batch_size=6 does not divide over 4 processes"):
        TrainBatches(SPLIT, 16, 6, 0, block=(0, 4))


def test_document_mask_hides_the_previous_document():
    """With segment ids and positions from TrainBatches, a token's logits do not depend on the
    tokens of the previous document in its row; without them they do."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lmjax.config import base_config
    from lmjax.models import build_model
    from lmjax.train.loss import model_inputs

    split = make_split([9, 30, 30, 30])
    batch = TrainBatches(split, 24, 4, seed=0, document_mask=True)(0)
    row = int(np.flatnonzero(batch["segment_ids"].max(1) > 1)[0])  # a row holding a document boundary
    seg = batch["segment_ids"][row]
    before, after = seg == seg[-1] - 1, seg == seg[-1]
    assert before.any() and after.any()
    cfg = base_config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 2
    model = build_model(cfg.model, 100, 24)
    one = {k: v[row : row + 1] for k, v in batch.items()}
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(one["inputs"]))["params"])
    changed = dict(one, inputs=np.where(before, (one["inputs"] + 17) % 100, one["inputs"]))

    apply = jax.jit(lambda inputs, extra: model.apply({"params": params}, inputs, **extra))

    def logits(b, masked):
        return np.asarray(apply(b["inputs"], model_inputs(b) if masked else {}))[0]

    np.testing.assert_allclose(logits(one, True)[after], logits(changed, True)[after], rtol=1e-5, atol=1e-5)
    assert np.abs(logits(one, False)[after] - logits(changed, False)[after]).max() > 1e-3


def test_prefetcher_yields_every_step_in_order():
    seen = []
    pre = Prefetcher(lambda s: {"step": s}, lambda b: {**b, "placed": True}, start=3, end=40, depth=2)
    for step, item in pre:
        seen.append(step)
        assert item == {"step": step, "placed": True}
    pre.close()
    assert seen == list(range(3, 40))


def test_prefetcher_surfaces_producer_errors():
    def make(step):
        if step == 5:
            raise ValueError("broken batch 5")
        return {"step": step}

    pre = Prefetcher(make, lambda b: b, start=0, end=10)
    seen = []
    with pytest.raises(ValueError, match="broken batch 5"):
        for step, _ in pre:
            seen.append(step)
    pre.close()
    assert seen == [0, 1, 2, 3, 4]


def test_prefetcher_close_stops_the_producer():
    made = []
    pre = Prefetcher(lambda s: made.append(s) or {}, lambda b: b, start=0, end=10**9, depth=2)
    next(iter(pre))
    pre.close()
    time.sleep(0.5)
    n = len(made)
    time.sleep(0.3)
    assert len(made) == n < 10  # stopped a few batches ahead, not running on
    assert not any(t.name == pre._thread.name and t.is_alive() for t in threading.enumerate())
