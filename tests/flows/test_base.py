"""Base distributions: the tailed normal (exponential tails beyond |z| > a) is a normalised, continuous density
whose draws follow it; tail 0 is N(0, 1) draw for draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.errors import ConfigError, InputError
from boltzflow.flows.base import MixedBase, StandardNormal, tailed_normal_log_norm, tailed_normal_log_prob


@pytest.mark.parametrize("a", [1.5, 3.0])
def test_tailed_normal_is_normalised_and_continuous(a):
    z = torch.linspace(-60.0, 60.0, 1_200_001, dtype=torch.float64)
    p = tailed_normal_log_prob(z, a).exp()
    assert float(torch.trapezoid(p, z)) == pytest.approx(1.0, abs=1e-8)
    eps = 1e-7
    for s in (-1.0, 1.0):
        lo, hi = tailed_normal_log_prob(torch.tensor([s * (a - eps), s * (a + eps)], dtype=torch.float64), a)
        assert float(lo) == pytest.approx(float(hi), abs=1e-6)
    # the core is N(0, 1) less the constant log Z_a; the tails are heavier than N(0, 1)'s
    core = torch.tensor([0.0, 0.5 * a], dtype=torch.float64)
    gauss = -0.5 * core.pow(2) - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(tailed_normal_log_prob(core, a), gauss - tailed_normal_log_norm(a), atol=1e-12)
    far = torch.tensor([a + 2.0], dtype=torch.float64)
    assert float(tailed_normal_log_prob(far, a)) > float(-0.5 * far.pow(2) - 0.5 * math.log(2 * math.pi)) + 1.0


def test_tail_zero_is_the_normal_draw_for_draw():
    for base in (StandardNormal(4), MixedBase(4, circular=[1])):
        tailed = type(base)(4, **({"circular": [1]} if isinstance(base, MixedBase) else {}), tail=0.0)
        a = base.sample(50, generator=torch.Generator().manual_seed(5))
        b = tailed.sample(50, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and torch.equal(base.log_prob(a), tailed.log_prob(b))


@pytest.mark.parametrize("a", [2.0, 3.0])
def test_tailed_draws_follow_the_density(a):
    n = 400_000
    z = StandardNormal(1, tail=a).double().sample(n, generator=torch.Generator().manual_seed(0)).numpy()[:, 0]
    za = math.exp(tailed_normal_log_norm(a))
    p_tail = 2 * math.exp(-0.5 * a * a) / (a * math.sqrt(2 * math.pi)) / za
    inner = math.erf(1 / math.sqrt(2)) / za  # P(|z| < 1)
    for frac, p in ((np.mean(np.abs(z) > a), p_tail), (np.mean(np.abs(z) < 1), inner), (np.mean(z > 0), 0.5)):
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    beyond = np.abs(z[np.abs(z) > a]) - a  # exponential with rate a
    assert np.mean(beyond) == pytest.approx(1 / a, rel=5 / math.sqrt(len(beyond)))


def test_mixed_base_keeps_circular_dims_uniform_and_scores_its_draws():
    base = MixedBase(3, circular=[0], tail=2.0).double()
    z = base.sample(100_000, generator=torch.Generator().manual_seed(1))
    assert float(z[:, 0].abs().max()) <= math.pi and float(z[:, 1:].abs().max()) > 4.0
    lp = base.log_prob(z)
    want = -math.log(2 * math.pi) + tailed_normal_log_prob(z[:, 1:], 2.0).sum(-1)
    assert torch.allclose(lp, want)


def test_bad_tails_are_refused():
    with pytest.raises(InputError, match="base tail"):
        StandardNormal(2, tail=-1.0)
    with pytest.raises(InputError, match="base tail"):
        MixedBase(2, tail=float("nan"))
    from boltzflow.flows.generator import GeneratorConfig

    with pytest.raises(ConfigError, match="base_tail"):
        GeneratorConfig(base_tail=-3.0)
