"""Toy targets: exact samplers agree with the energies; exact log Z and mode fractions check out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from boltzflow.errors import InputError
from boltzflow.systems.toy import (
    DW4,
    LJ13,
    TOY_NAMES,
    DoubleWell12D,
    Gaussian,
    GaussianMixture2D,
    ManyWell,
    toy_target,
)

SAMPLED = ["double-well-12d", "double-well-12d-fab", "many-well-16d", "many-well-32d", "gmm-2d", "gaussian-2d"]


def _grad_u(target, x):
    x = x.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(target.energy(x).sum(), x)
    return x.detach(), g


@pytest.mark.parametrize("name", SAMPLED)
def test_sampler_satisfies_stein_identities(name):
    """For x ~ exp(-u)/Z: E[x_i du/dx_i] = 1 and E[du/dx_i] = 0 for every i (integration by parts).
    Ties the exact sampler to the differentiable energy(); fails if either is wrong."""
    target = toy_target(name)
    x = target.sample(100_000, generator=torch.Generator().manual_seed(11))
    assert x.shape == (100_000, target.dim) and torch.isfinite(x).all()
    x, g = _grad_u(target, x)
    for stat, expected in ((x * g, 1.0), (g, 0.0)):
        mean = stat.mean(0)
        se = stat.std(0) / math.sqrt(stat.shape[0])
        z = ((mean - expected) / se).abs()
        assert float(z.max()) < 4.5, (name, mean, se)


def test_double_well_marginal_histogram_and_minor_fraction():
    t = DoubleWell12D()
    x = t.sample(200_000, generator=torch.Generator().manual_seed(3)).double()
    # exact bin probabilities of dim 0 by scipy quadrature of the torch energy (others at 0)
    def p0(v):
        return math.exp(-float(t.energy(torch.tensor([[v] + [0.0] * 11], dtype=torch.float64))))

    edges = np.linspace(-4.0, 4.0, 41)
    z1 = integrate.quad(p0, -12, 12, points=[-2.5, 0.0, 2.4], limit=200)[0]
    probs = np.array([integrate.quad(p0, a, b)[0] for a, b in zip(edges[:-1], edges[1:])]) / z1
    counts, _ = np.histogram(x[:, 0].numpy(), bins=edges)
    keep = probs * len(x) > 20
    chi2 = float(((counts[keep] - len(x) * probs[keep]) ** 2 / (len(x) * probs[keep])).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < stats.chi2.ppf(0.9999, dof), (chi2, dof)
    # exact log Z: 1D quadrature x 11 Gaussians of std 10
    assert abs(t.log_z - (math.log(z1) + 11 * math.log(10 * math.sqrt(2 * math.pi)))) < 1e-6
    # minor mode (x0 > 0): exact fraction vs quad vs samples
    assert t.modes.minor == "positive"
    exact = integrate.quad(p0, 0, 12)[0] / z1
    assert abs(t.exact_minor_fraction - exact) < 1e-6
    frac = t.modes.fractions(x)["positive"]
    se = math.sqrt(exact * (1 - exact) / len(x))
    assert abs(frac - exact) < 4.5 * se
    assert 0.005 < exact < 0.012  # documented ~0.83% for a=1, b=6, c=1
    # Gaussian dims have std 10
    assert torch.allclose(x[:, 1:].std(0), torch.full((11,), 10.0, dtype=torch.float64), rtol=0.02)


def test_double_well_fab_variant_is_the_many_well_pair():
    """``well="fab"`` is Midgley et al.'s x^4 - 6x^2 - 0.5x: same 1D marginal as a Many Well pair."""
    t = toy_target("double-well-12d-fab")
    assert t.name == "double-well-12d-fab" and t.modes.minor == "negative"
    mw = ManyWell(2)
    assert abs(t.exact_minor_fraction - mw.exact_minor_fraction) < 1e-9
    assert 0.15 < t.exact_minor_fraction < 0.16
    # log Z: same 1D factor; 11 Gaussians of std 10 instead of one of std 1
    expected = mw.log_z - 0.5 * math.log(2 * math.pi) + 11 * (math.log(10.0) + 0.5 * math.log(2 * math.pi))
    assert abs(t.log_z - expected) < 1e-6
    x = torch.tensor([[1.3, 2.0] + [0.0] * 10], dtype=torch.float64)
    assert float(t.energy(x)) == pytest.approx(1.3**4 - 6 * 1.3**2 - 0.5 * 1.3 + 0.5 * (2.0 / 10.0) ** 2)
    with pytest.raises(InputError):
        DoubleWell12D(well="nope")


def test_many_well_log_z_matches_literature_and_quadrature():
    # FAB (Midgley et al.) quote log Z = 164.69568 for the 32D Many Well
    assert abs(ManyWell(32).log_z - 164.69568) < 1e-4
    t = ManyWell(16)

    def p_pair(a):
        v = torch.zeros(1, 16, dtype=torch.float64)
        v[0, 0] = a
        return math.exp(-float(t.energy(v)))

    z_a = integrate.quad(p_pair, -8, 8, points=[-1.7, 0.0, 1.7], limit=200)[0]
    assert abs(t.log_z - 8 * (math.log(z_a) + 0.5 * math.log(2 * math.pi))) < 1e-6
    exact_minor = integrate.quad(p_pair, -8, 0)[0] / z_a
    assert abs(t.exact_minor_fraction - exact_minor) < 1e-6
    x = t.sample(100_000, generator=torch.Generator().manual_seed(5))
    # every pair is an independent copy: minor fraction in each first coordinate
    frac = (x[:, 0::2] < 0).double().mean(0)
    se = math.sqrt(exact_minor * (1 - exact_minor) / len(x))
    assert float((frac - exact_minor).abs().max()) < 4.5 * se
    assert t.modes.fractions(x)["negative"] == pytest.approx(float(frac[0]))
    # 256 wells: the occupancy of well k is prod over pairs of P(sign); the all-positive well is the largest
    labels = t.mode_labels(x)
    assert t.n_modes == 256 and labels.min() >= 0 and labels.max() < 256
    p_all_pos = (1 - exact_minor) ** 8
    assert abs(float(np.mean(labels == 255)) - p_all_pos) < 4.5 * math.sqrt(p_all_pos * (1 - p_all_pos) / len(x))
    assert float(np.mean(labels == 0)) < 1e-3  # all-negative well: 0.156^8 ~ 3e-7


def _grid_log_z(target, lo, hi, n):
    h = (hi - lo) / n
    c = torch.linspace(lo + h / 2, hi - h / 2, n, dtype=torch.float64)
    xx = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        u = target.energy(xx)
    return float(torch.logsumexp(-u, 0) + 2 * math.log(h))


def test_gmm_is_normalised_and_sampler_covers_modes_evenly():
    t = GaussianMixture2D()
    assert t.means.shape == (40, 2) and np.abs(t.means).max() <= 40.0
    assert np.allclose(GaussianMixture2D().means, t.means)  # seeded
    assert not np.allclose(GaussianMixture2D(seed=1).means, t.means)
    assert abs(_grid_log_z(t, -50.0, 50.0, 500) - t.log_z) < 1e-6
    x = t.sample(80_000, generator=torch.Generator().manual_seed(2)).double()
    counts = np.bincount(t.mode_labels(x), minlength=40)
    assert t.n_modes == 40
    # nearest-mean counts ~ uniform (a few overlapping modes blur this only slightly)
    chi2 = float(((counts - 2000.0) ** 2 / 2000.0).sum())
    assert chi2 < stats.chi2.ppf(0.9999, 39) * 1.5


def test_gaussian_target_exact_everything():
    t = toy_target("gaussian-2d")
    assert abs(_grid_log_z(t, -15.0, 15.0, 600) - t.log_z) < 1e-6
    x = t.sample(200_000, generator=torch.Generator().manual_seed(4)).double()
    assert torch.allclose(x.mean(0), torch.tensor([1.0, -0.5], dtype=torch.float64), atol=0.015)
    assert torch.allclose(torch.cov(x.T), torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64), atol=0.03)
    se = math.sqrt(t.exact_minor_fraction * (1 - t.exact_minor_fraction) / len(x))
    assert abs(t.modes.fractions(x)["negative"] - t.exact_minor_fraction) < 4.5 * se
    lp = t.log_prob(x[:100])
    ref = stats.multivariate_normal([1.0, -0.5], [[1.0, 0.5], [0.5, 2.0]]).logpdf(x[:100].numpy())
    assert np.allclose(lp.numpy(), ref, atol=1e-10)


def test_dw4_energy_values_and_invariances():
    t = DW4()
    assert t.dim == 8 and t.log_z is None and not t.has_exact_sampler
    sq = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0, 4.0, 4.0, 4.0]], dtype=torch.float64)
    e = 4 * math.sqrt(2) - 4  # the two diagonals; the 4 sides sit exactly at d0 = 4
    assert float(t.energy(sq)) == pytest.approx(2 * (-4 * e**2 + 0.9 * e**4), abs=1e-12)
    _check_invariances(t, 4, 2)
    with pytest.raises(NotImplementedError, match="no exact sampler"):
        t.sample(3)
    with pytest.raises(NotImplementedError, match="log Z"):
        t.log_prob(sq)


def test_lj_energy_values_and_invariances():
    two = LJ13(n_particles=2)
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    u = two.energy(x)
    # LJ minimum -eps at r = rm; harmonic term 0.5 * (0.5^2 + 0.5^2)
    assert float(u.detach()) == pytest.approx(-1.0 + 0.25, abs=1e-12)
    (g,) = torch.autograd.grad(u, x)
    # at r = rm only the harmonic restraint pulls the pair together: force = x - com
    assert torch.allclose(g, torch.tensor([[-0.5, 0, 0, 0.5, 0, 0]], dtype=torch.float64), atol=1e-12)
    t = LJ13()
    assert t.dim == 39 and t.log_z is None
    _check_invariances(t, 13, 3)


def _check_invariances(t, n, d):
    g = torch.Generator().manual_seed(0)
    # particles on a lattice of spacing 1.2 plus noise: no clashes, so finite differences are accurate
    lattice = torch.cartesian_prod(*[torch.arange(3.0, dtype=torch.float64)] * d)[:n] * 1.2
    x = (lattice + 0.15 * torch.randn(8, n, d, generator=g, dtype=torch.float64)).reshape(8, -1)
    u = t.energy(x)
    shift = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    assert torch.allclose(t.energy((x.reshape(8, n, d) + shift).reshape(8, -1)), u, rtol=1e-10)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    assert torch.allclose(t.energy((x.reshape(8, n, d) @ q).reshape(8, -1)), u, rtol=1e-10)
    perm = torch.randperm(n, generator=g)
    assert torch.allclose(t.energy(x.reshape(8, n, d)[:, perm].reshape(8, -1)), u, rtol=1e-10)
    # gradient vs central finite differences
    x0 = x[:1].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(t.energy(x0).sum(), x0)
    x0 = x0.detach()
    eps = 1e-6
    for i in range(0, n * d, 3):
        e = torch.zeros_like(x0)
        e[0, i] = eps
        fd = (t.energy(x0 + e) - t.energy(x0 - e)) / (2 * eps)
        assert abs(float(fd) - float(grad[0, i])) < 1e-5 * max(1.0, abs(float(grad[0, i])))


def test_factory_and_input_checks():
    for name in TOY_NAMES:
        t = toy_target(name)
        assert t.name == name and t.dim >= 2
        x = torch.zeros(3, t.dim) + 0.3 * torch.arange(t.dim)  # no coincident particles
        u = t(x)
        assert u.shape == (3,) and torch.isfinite(u).all()
        with pytest.raises(InputError, match="shape"):
            t.energy(torch.zeros(3, t.dim + 1))
    with pytest.raises(InputError, match="unknown toy target"):
        toy_target("many-well-7d")
    with pytest.raises(InputError, match="even"):
        ManyWell(7)
    with pytest.raises(InputError, match="positive definite"):
        Gaussian(2, cov=[[1.0, 2.0], [2.0, 1.0]])
