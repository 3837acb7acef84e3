"""Batched parallel tempering samples exp(-u) at the system temperature and counts its cost."""

import numpy as np
import pytest
import torch

from boltzflow.errors import ConfigError, InputError
from boltzflow.training.tempering import TemperingConfig, parallel_tempering

KT = 2.494  # kJ/mol at 300 K


def _double_well(x):
    """u in kT at 300 K: a double well along the first coordinate of atom 0 (barrier 8 kT, minima
    at +-0.1 nm, the + well 2 kT lower) plus a harmonic remainder."""
    a = x[:, 0, 0] / 0.1
    return 8.0 * (a * a - 1) ** 2 - 1.0 * a + (x[:, 1:] ** 2).sum((1, 2)) / (2 * 0.05 ** 2) + (x[:, 0, 1:] ** 2).sum(-1) / (2 * 0.05 ** 2)


def test_tempering_crosses_barrier_and_samples_boltzmann():
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    x0[0, 0] = -0.1  # start in the upper well
    cfg = TemperingConfig(ladders=64, replicas=6, t_max=1500.0, steps_per_swap=20, burnin_rounds=400, frames=60,
                          timestep_fs=2.0, friction_per_ps=10.0, minimize_steps=0, seed=1)
    res = parallel_tempering(_double_well, x0, np.array([12.0, 12.0]), KT, 300.0, cfg, dtype=torch.float64)
    assert res.positions.shape == (64 * 60, 2, 3)
    assert res.energy_evals == 64 * 6 * (1 + cfg.rounds * 20)
    assert np.all((res.swap_acceptance > 0.05) & (res.swap_acceptance < 1))
    assert res.temperatures[0] == pytest.approx(300.0) and res.temperatures[-1] == pytest.approx(1500.0)
    # exact population of the lower (+) well from 1D quadrature of exp(-u)
    a = np.linspace(-2.5, 2.5, 20001)
    w = np.exp(-(8.0 * (a * a - 1) ** 2 - a))
    exact = w[a > 0].sum() / w.sum()
    frac = float((res.positions[:, 0, 0] > 0).mean())
    assert abs(frac - exact) < 0.05, (frac, exact)  # without swaps the chains would stay in the - well
    # the harmonic atom has the 300 K variance
    assert res.positions[:, 1].astype(np.float64).var() == pytest.approx(0.05 ** 2, rel=0.1)


def test_keep_replicas_adds_the_next_temperature_frames():
    """keep_replicas = 2: every ladder also gives frames of its second temperature, ladder-major; the
    harmonic atom's variance there is T1 / T0 times the system temperature's."""
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    cfg = TemperingConfig(ladders=32, replicas=3, t_max=600.0, steps_per_swap=20, burnin_rounds=100, frames=40,
                          timestep_fs=2.0, friction_per_ps=10.0, minimize_steps=0, seed=2, keep_replicas=2)
    res = parallel_tempering(_double_well, x0, np.array([12.0, 12.0]), KT, 300.0, cfg, dtype=torch.float64)
    assert res.positions.shape == (32 * 2 * 40, 2, 3)
    pos = res.positions.reshape(32, 2, 40, 2, 3).astype(np.float64)  # ladder, kept replica, frame, atom, xyz
    ratio = pos[:, 1, :, 1].var() / pos[:, 0, :, 1].var()
    assert ratio == pytest.approx(res.temperatures[1] / 300.0, rel=0.15), ratio
    with pytest.raises(ConfigError, match="keep_replicas"):
        TemperingConfig(replicas=3, keep_replicas=4)


def test_tempering_bad_input():
    with pytest.raises(ConfigError):
        TemperingConfig(ladders=0)
    with pytest.raises(ConfigError):
        TemperingConfig(t_max=200.0).temperatures(300.0)
    with pytest.raises(InputError):
        parallel_tempering(_double_well, torch.zeros(2, 2), np.ones(2), KT, 300.0, TemperingConfig(frames=1))


def test_minimize_lowers_a_strained_start_and_counts_evaluations():
    from boltzflow.training.tempering import minimize

    x = torch.zeros(1, 2, 3, dtype=torch.float64)
    x[0, 0, 0] = 0.25  # high on the outer wall of the double well, harmonic atom displaced
    x[0, 1] = 0.1
    y, evals = minimize(_double_well, x, 100)
    assert float(_double_well(y)) < float(_double_well(x)) - 10 and evals > 2
    assert abs(abs(float(y[0, 0, 0])) - 0.1) < 0.01 and float(y[0, 1].abs().max()) < 1e-3
