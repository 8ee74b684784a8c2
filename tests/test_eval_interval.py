"""The 95% interval of held-out nats/token: finite for a single document, and covering the
true mean about 95% of the time, over documents or over contiguous blocks of windows."""

import numpy as np
import pytest

from lmjax.evaluate import report, t_quantile_975


def _single_document(rng, windows=300, per_window=16):
    """A one-document held-out set: per-window NLL sums of `per_window` tokens drawn with mean 3.0
    nats/token, the true value the interval should cover."""
    nll = rng.gamma(2.0, 1.5, (windows, per_window)).sum(1)
    return nll, np.full(windows, per_window)


def test_single_document_interval_is_finite_and_says_how_it_was_made():
    nll, tokens = _single_document(np.random.default_rng(0))
    r = report(np.array([nll.sum()]), np.array([tokens.sum()]), np.array([tokens.sum() * 2]), nll, tokens)
    lo, hi = r["nats_per_token_ci95"]
    assert np.isfinite([lo, hi]).all() and lo < r["nats_per_token"] < hi  # was nan - nan
    assert r["ci95_over"] == "over 20 contiguous blocks of windows"
    assert "ratio estimator" in r["ci95_method"] and "(1 documents)" in r["ci95_method"]


@pytest.mark.parametrize("layout", ["one document", "many documents"])
def test_interval_covers_the_true_mean_about_95_percent_of_the_time(layout):
    # Mutations caught (each tried once by hand): the standard error without the n/(n-1)
    # correction and with 1.96 instead of Student's t (one document: 0.915); the standard error
    # divided by sqrt(units) once more (0.37 and 0.24).
    rng = np.random.default_rng(1)
    covered = 0
    trials = 600
    for _ in range(trials):
        nll, tokens = _single_document(rng)
        if layout == "one document":
            r = report(np.array([nll.sum()]), np.array([tokens.sum()]), np.array([1]), nll, tokens)
        else:  # 40 documents of uneven length: the interval is over documents
            cuts = np.sort(rng.choice(np.arange(1, len(nll)), 39, replace=False))
            doc_nll, doc_tokens = np.add.reduceat(nll, np.r_[0, cuts]), np.add.reduceat(tokens, np.r_[0, cuts])
            r = report(doc_nll, doc_tokens, np.ones(40, np.int64), nll, tokens)
            assert r["ci95_over"] == "over 40 documents"
        lo, hi = r["nats_per_token_ci95"]
        covered += lo <= 3.0 <= hi
    assert 0.93 <= covered / trials <= 0.97, covered / trials


def test_t_quantile():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(19) == pytest.approx(2.0930, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-3)
