"""The Kish ESS, plain and with the largest log weights clipped (the way TA-BG reports it)."""

from __future__ import annotations

import numpy as np
import pytest

from boltzflow.core.weights import kish_ess
from boltzflow.errors import InputError


def test_kish_of_equal_and_of_one_heavy_weight():
    assert kish_ess(np.zeros(10)) == pytest.approx(10.0)
    lw = np.zeros(10_000)
    lw[0] = np.log(10_000.0)  # one weight as large as all the others together
    assert kish_ess(lw) == pytest.approx(19_999.0**2 / (10_000.0**2 + 9_999.0), rel=1e-12)  # (2n-1)^2 / (n^2 + n-1)
    # clipping the top 1e-4 (one weight of 1e4) lowers it to the rest's value: all equal again
    assert kish_ess(lw, clip_top=1e-4) == pytest.approx(10_000.0)
    assert kish_ess(lw, clip_top=1e-5) == kish_ess(lw)  # floor(0.1) = 0 weights clipped


def test_clipping_log_normal_weights_raises_the_ess_by_a_known_amount():
    rng = np.random.default_rng(0)
    lw = rng.normal(0.0, 1.5, 1_000_000)
    # plain Kish of log-normal weights: exp(-sigma^2) = 0.105 (with sampling noise from the tail)
    assert kish_ess(lw) / lw.size == pytest.approx(np.exp(-1.5**2), rel=0.15)
    clipped = kish_ess(lw, clip_top=1e-4) / lw.size
    t = np.sort(lw)[-101]
    manual = np.minimum(lw, t)
    w = np.exp(manual - manual.max())
    assert clipped == pytest.approx(w.sum() ** 2 / (w * w).sum() / lw.size, rel=1e-12)
    assert clipped > kish_ess(lw) / lw.size


def test_clip_fraction_out_of_range_is_refused():
    with pytest.raises(InputError, match="clip_top"):
        kish_ess(np.zeros(3), clip_top=1.0)
