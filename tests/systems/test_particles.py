"""Reference MCMC of the particle systems: exact answers on a 2-particle cluster, autocorrelation time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.systems.particles import (
    MCMCConfig,
    integrated_autocorrelation,
    metropolis_chains,
    metropolis_reference,
    particle_target,
)
from boltzflow.systems.toy import LJ13


def test_ar1_integrated_autocorrelation_time():
    """AR(1) with coefficient phi has tau_int = (1 + phi) / (1 - phi) (= 9 for phi = 0.8)."""
    rng = np.random.default_rng(0)
    phi, steps, chains = 0.8, 20000, 8
    y = np.zeros((steps, chains))
    for t in range(1, steps):
        y[t] = phi * y[t - 1] + rng.normal(size=chains)
    assert abs(integrated_autocorrelation(y) - 9.0) < 1.0


def test_two_particle_lj_distance_matches_quadrature():
    """Two LJ particles with the CoM restraint: x = +-r/2, so u = LJ(r) + r^2/4 and the distance has
    density ~ r^2 exp(-u(r)) in 3D. The MCMC's mean distance must match 1D quadrature."""
    t = LJ13(n_particles=2)
    r = np.linspace(0.5, 8.0, 200001)
    u = (1 / r) ** 12 - 2 * (1 / r) ** 6 + r**2 / 4
    w = r**2 * np.exp(-(u - u.min()))
    exact = float((w * r).sum() / w.sum())
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]], dtype=torch.float64).repeat(400, 1, 1)
    cfg = MCMCConfig(chains=400, burnin=400, frames_per_chain=20, thin=10, step=0.3)
    x, info = metropolis_chains(t, x0, cfg, g, log=lambda _m: None)
    assert x.shape == (8000, 2, 3)
    assert np.abs(x.mean(1)).max() < 1e-12
    d = np.linalg.norm(x[:, 0] - x[:, 1], axis=-1)
    se = d.std() / math.sqrt(len(d) / 2)  # frames 10 steps apart are mildly correlated
    assert abs(d.mean() - exact) < 4 * se + 1e-3, (d.mean(), exact, se)
    assert 0.15 < info["acceptance"] < 0.6


@pytest.mark.parametrize("name,n,d", [("dw4", 4, 2), ("lj13", 13, 3), ("lj55", 55, 3)])
def test_particle_targets_have_the_benchmark_shapes(name, n, d):
    t = particle_target(name)
    assert (t.n_particles, t.n_spatial, t.dim) == (n, d, n * d)


def test_dw4_reference_is_com_free_and_in_the_wells():
    """Short DW4 run: pair distances concentrate near the two minima d0 +- sqrt(-b / 2c) = 4 -+ 1.49."""
    x, info = metropolis_reference("dw4", MCMCConfig(chains=64, burnin=500, frames_per_chain=10, thin=20, seed=1),
                                   log=lambda _m: None)
    assert x.shape == (640, 4, 2) and np.abs(x.mean(1)).max() < 1e-12
    i, j = np.triu_indices(4, 1)
    dist = np.linalg.norm(x[:, i] - x[:, j], axis=-1).reshape(-1)
    near = np.minimum(np.abs(dist - 2.51), np.abs(dist - 5.49))
    assert np.mean(near < 0.6) > 0.8
    assert info["energy_evals"] == 64 * (500 + 200)
