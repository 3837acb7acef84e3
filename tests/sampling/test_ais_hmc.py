"""HMC and AIS against exact Gaussian answers; the prioritised replay buffer."""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.losses.base import kish_ess
from boltzflow.sampling.ais import AISConfig, AnnealedImportanceSampler
from boltzflow.sampling.hmc import hmc_sample, hmc_step
from boltzflow.sampling.replay import PrioritisedReplayBuffer

MEAN = torch.tensor([1.5, -1.0], dtype=torch.float64)
STD = torch.tensor([0.7, 1.3], dtype=torch.float64)
LOG_Z = float(torch.log(STD).sum() + math.log(2 * math.pi))  # log of int exp(-u), d = 2


def target_u(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Gaussian: u = sum ((x - m) / s)^2 / 2 (flat (batch, 2) or (batch, 1, 2))."""
    x = x.reshape(x.shape[0], -1)
    return 0.5 * ((x - MEAN) / STD).pow(2).sum(-1)


Q_STD = 2.0  # proposal N(0, 2^2 I): wider than the target, so plain importance weights have finite variance


def std_normal_logq(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1) / Q_STD
    return -0.5 * x.pow(2).sum(-1) - x.shape[1] * (0.5 * math.log(2 * math.pi) + math.log(Q_STD))


def test_hmc_leaves_gaussian_invariant():
    g = torch.Generator().manual_seed(0)
    x0 = MEAN + STD * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x, acc, _ = hmc_sample(x0, lambda x: -target_u(x), n_steps=10, step_size=0.4, n_leapfrog=5, generator=g)
    assert 0.5 < acc < 1.0
    assert torch.allclose(x.mean(0), MEAN, atol=0.06)
    assert torch.allclose(x.std(0), STD, rtol=0.05)
    assert (x != x0).any(1).double().mean() > 0.5  # chains actually moved


def test_hmc_molecular_shape_rejects_invalid_and_tiny_steps_accept():
    g = torch.Generator().manual_seed(1)
    x = 0.5 * torch.randn(64, 3, 3, generator=g, dtype=torch.float64)  # inside the support

    def lp(y):  # standard normal restricted to a ball of radius 3
        r = y.reshape(y.shape[0], -1).norm(dim=1)
        return torch.where(r < 3.0, -0.5 * y.pow(2).sum((1, 2)), torch.full_like(r, -math.inf))

    res = hmc_step(x, lp, 1e-4, 3, g)
    assert res.x.shape == x.shape and res.accept.all()
    res = hmc_step(x, lp, 5.0, 3, g)  # huge steps leave the support: rejected, state kept
    moved = (res.x != x).flatten(1).any(1)
    assert torch.equal(moved, res.accept)
    assert (res.x.reshape(64, -1).norm(dim=1)[~res.accept] == x.reshape(64, -1).norm(dim=1)[~res.accept]).all()
    assert torch.isfinite(res.log_prob[res.accept]).all()


@pytest.mark.parametrize("n_intermediate", [0, 2, 8])
def test_ais_log_z_on_gaussian_to_gaussian(n_intermediate):
    g = torch.Generator().manual_seed(2)
    n = 20000
    x0 = Q_STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    ais = AnnealedImportanceSampler(AISConfig(n_intermediate=n_intermediate, step_size=0.5, adapt_step_size=False))
    res = ais.run(x0, std_normal_logq(x0), std_normal_logq, target_u, generator=g)
    assert res.log_z() == pytest.approx(LOG_Z, abs=0.05)
    # weighted samples reproduce the target mean
    w = torch.softmax(res.log_w, 0)
    assert torch.allclose((w[:, None] * res.x).sum(0), MEAN, atol=0.08)
    assert res.energy_evals == n * (1 + n_intermediate * 7)
    if n_intermediate == 8:  # annealing improves on plain importance sampling
        assert kish_ess(res.log_w) > kish_ess(res.log_w_is) + 0.1


def test_ais_exact_when_proposal_is_target():
    g = torch.Generator().manual_seed(3)
    x0 = MEAN + STD * torch.randn(500, 2, generator=g, dtype=torch.float64)

    def logq(x):
        return -target_u(x) - LOG_Z

    res = AnnealedImportanceSampler(AISConfig(step_size=0.3)).run(x0, logq(x0), logq, target_u, generator=g)
    assert torch.allclose(res.log_w, torch.full_like(res.log_w, LOG_Z), atol=1e-9)


def test_ais_step_size_adapts_and_roundtrips():
    g = torch.Generator().manual_seed(4)
    ais = AnnealedImportanceSampler(AISConfig(step_size=5.0, target_accept=0.65))
    x0 = Q_STD * torch.randn(256, 2, generator=g, dtype=torch.float64)
    for _ in range(5):
        ais.run(x0, std_normal_logq(x0), std_normal_logq, target_u, generator=g)
    assert all(s < 5.0 for s in ais.step_sizes)
    other = AnnealedImportanceSampler(AISConfig(step_size=5.0))
    other.load_state_dict(ais.state_dict())
    assert other.step_sizes == ais.step_sizes


def test_replay_buffer_samples_by_weight_and_adjusts():
    buf = PrioritisedReplayBuffer(capacity=4, min_length=2)
    x = torch.arange(6, dtype=torch.float64)[:, None]
    lw = torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, float("nan")], dtype=torch.float64))
    buf.add(x, lw, torch.zeros(6, dtype=torch.float64))
    assert len(buf) == 4 and buf.ready  # 5 finite entries, capacity 4: oldest overwritten
    g = torch.Generator().manual_seed(0)
    idx, xb, _ = buf.sample(20000, g)
    frac4 = float((xb[:, 0] == 4).double().mean())
    assert frac4 == pytest.approx(3 / 6, abs=0.02)  # entries 1, 2, 3 (w=1) and 4 (w=3)
    one = idx[xb[:, 0] == 4][:1]
    buf.adjust(one, torch.log(torch.tensor([3.0], dtype=torch.float64)))  # q grew 3x: weight / 3
    _, xb, _ = buf.sample(20000, g)
    assert float((xb[:, 0] == 4).double().mean()) == pytest.approx(1 / 4, abs=0.02)
