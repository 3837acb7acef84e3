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


def test_pareto_smoothing_replaces_only_the_tail_in_order_and_caps_it():
    from boltzflow.core.weights import pareto_k, pareto_smooth, tail_length

    rng = np.random.default_rng(3)
    lw = rng.normal(0.0, 1.5, 20_000)
    lw[17] = np.nan  # an invalid sample: weight 0
    sm, k = pareto_smooth(lw)
    assert k == pareto_k(lw) and 0.1 < k < 0.7
    m = tail_length(lw.size - 1)
    top = np.argsort(np.where(np.isnan(lw), -np.inf, lw))[-m:]
    rest = np.setdiff1d(np.arange(lw.size), np.append(top, 17))
    assert np.array_equal(sm[rest], lw[rest]) and sm[17] == -np.inf
    assert np.all(np.diff(sm[top]) >= 0)  # the tail keeps its order
    assert sm[top].max() <= lw[top].max() and sm[top].min() >= np.sort(lw[rest])[-1]  # between the threshold and the cap
    assert not np.array_equal(sm[top], lw[top])
    # constant weights have no tail: returned unchanged
    flat, k0 = pareto_smooth(np.zeros(1000))
    assert k0 == -np.inf and np.array_equal(flat, np.zeros(1000))


def test_smoothed_kish_of_log_normal_weights_is_right_on_average_and_varies_less():
    # log-normal weights, sigma 1.5: Kish fraction exp(-sigma^2) = 0.105, Pareto k ~0.35 on 1e5 draws
    rng = np.random.default_rng(4)
    raw, smooth = [], []
    for _ in range(24):
        lw = rng.normal(0.0, 1.5, 100_000)
        raw.append(kish_ess(lw) / lw.size)
        smooth.append(kish_ess(lw, smooth=True) / lw.size)
    assert np.mean(smooth) == pytest.approx(np.exp(-1.5**2), rel=0.06)
    assert np.std(smooth) < 0.85 * np.std(raw)
    with pytest.raises(InputError, match="smooth and clip_top"):
        kish_ess(np.zeros(10), clip_top=0.1, smooth=True)
