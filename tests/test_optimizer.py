"""The learning-rate schedules as documented in lmjax.train.optimizer.schedule, and what a
resume with another train.steps says it does to them."""

import numpy as np
import pytest

from lmjax.config import base_config
from lmjax.errors import UserError
from lmjax.train.optimizer import schedule, schedule_on_resume


def _optim(**kw):
    o = base_config().optim
    for k, v in kw.items():
        o[k] = v
    return o


def _values(optim, total=20, n=13):
    return [float(schedule(optim, total)(s)) for s in range(n)]


def test_step_decay_starts_at_decay_start_with_warmup():
    # Warmup over steps 0-3, peak at 4-5, x0.5 at step 6 (decay_start), again at 9 and 12.
    # Mutation caught: the old join that counted decay_start from the end of warmup (first decay at 10).
    o = _optim(lr=1.0, schedule="step", warmup_steps=4, decay_start=6, decay_every=3, decay_factor=0.5)
    np.testing.assert_allclose(
        _values(o), [0, 0.25, 0.5, 0.75, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125], rtol=1e-6
    )


def test_step_decay_without_warmup_and_at_the_end_of_warmup():
    o = _optim(lr=2.0, schedule="step", warmup_steps=0, decay_start=3, decay_every=1000, decay_factor=0.1)
    np.testing.assert_allclose(_values(o, n=5), [2, 2, 2, 0.2, 0.2], rtol=1e-6)
    o = _optim(lr=1.0, schedule="step", warmup_steps=2, decay_start=2, decay_every=2, decay_factor=0.5)
    np.testing.assert_allclose(_values(o, n=6), [0, 0.5, 0.5, 0.5, 0.25, 0.25], rtol=1e-6)


def test_step_decay_inside_warmup_is_a_user_error():
    with pytest.raises(UserError, match=r"optim.decay_start=3 falls inside the warmup \(optim.warmup_steps=5\)"):
        schedule(_optim(schedule="step", warmup_steps=5, decay_start=3), 20)


def test_cosine_and_constant():
    o = _optim(lr=1.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    v = _values(o, total=10, n=11)
    np.testing.assert_allclose(v[:3], [0, 0.5, 1], rtol=1e-6)
    np.testing.assert_allclose(v[6], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 8)), rtol=1e-6)
    np.testing.assert_allclose(v[10], 0.1, rtol=1e-6)
    np.testing.assert_allclose(_values(_optim(lr=1.0, schedule="constant", warmup_steps=2), n=4), [0, 0.5, 1, 1])


def test_resume_with_new_steps_says_what_happens_to_the_schedule():
    cos = _optim(lr=1.0, schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert schedule_on_resume(cos, 10, cos, 10, 5) == []
    (line,) = schedule_on_resume(cos, 10, cos, 20, 10)
    # At step 10 the old cosine had reached its floor (0); the new one is halfway (0.5).
    assert (
        line == "train.steps 10 -> 20: the cosine decay now ends at step 20 (the schedule follows the current "
        "train.steps); lr at step 10: 0 -> 0.5"
    )
    step = _optim(lr=1.0, schedule="step", warmup_steps=0, decay_start=4, decay_every=4)
    (line,) = schedule_on_resume(step, 10, step, 20, 10)
    assert line == "train.steps 10 -> 20: the step schedule does not depend on train.steps; lr at step 10: 0.25 -> 0.25"
