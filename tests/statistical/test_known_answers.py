"""Estimators against known answers (seeded numpy Generators, no OpenMM)."""

import math

import numpy as np
import pytest

from boltzflow.estimators import (
    bar_free_energy,
    block_average,
    conformational_free_energy,
    exp_free_energy,
    expectation,
    free_energy_surface,
    histogram_kl,
    kish_ess,
    log_weights,
    log_z,
    log_z_difference,
    population,
    population_free_energy,
    statistical_inefficiency,
    to_kj_per_mol,
)


def gaussian_logq(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma * np.sqrt(2 * np.pi))


def test_log_z_of_unnormalised_gaussian():
    # target exp(-(x-1)^2 / (2 * 0.7^2)) in 3-D: log Z = 3 log(0.7 sqrt(2 pi))
    rng = np.random.default_rng(1)
    n, d = 20000, 3
    x = rng.normal(0.8, 1.0, size=(n, d))
    u = np.sum((x - 1.0) ** 2, axis=1) / (2 * 0.7 ** 2)
    lq = np.sum(gaussian_logq(x, 0.8, 1.0), axis=1)
    est = log_z(log_weights(u, lq), seed=2)
    exact = d * np.log(0.7 * np.sqrt(2 * np.pi))
    assert abs(est.value - exact) < 4 * est.stderr
    assert est.ci_low < exact < est.ci_high
    assert 0 < est.ess < n
    # exact proposal: every weight equal, ESS = n, zero error
    lw = log_weights(np.sum((x - 0.8) ** 2, axis=1) / 2, np.sum(gaussian_logq(x, 0.8, 1.0), axis=1))
    assert kish_ess(lw).extra["fraction"] == pytest.approx(1.0)
    assert log_z(lw, n_bootstrap=0).value == pytest.approx(3 * np.log(np.sqrt(2 * np.pi)))


def test_biased_proposal_reweighted_to_known_mean():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 2.0, 40000)  # proposal N(2, 2^2); target N(-0.5, 1): mean -0.5, E[x^2] = 1.25
    lw = log_weights(0.5 * (x + 0.5) ** 2, gaussian_logq(x, 2.0, 2.0))
    m = expectation(x, lw, name="mean", seed=4)
    m2 = expectation(x ** 2, lw, name="x2", seed=4)
    assert abs(m.value + 0.5) < 4 * m.stderr and m.ci_low < -0.5 < m.ci_high
    assert abs(m2.value - 1.25) < 4 * m2.stderr
    unweighted = expectation(x, None)
    assert abs(unweighted.value - (-0.5)) > 20 * unweighted.stderr  # the bias is real
    p = population(x > 0, lw, seed=5)
    exact = 0.5 * math.erfc(0.5 / math.sqrt(2))
    assert abs(p.value - exact) < 4 * p.stderr
    dF = conformational_free_energy(x <= 0, x > 0, lw, temperature_k=300.0, seed=5)
    assert abs(dF.value + math.log(exact / (1 - exact))) < 4 * dF.stderr
    assert dF.extra["value_kj_mol"] == pytest.approx(dF.value * 2.494339, rel=1e-5)
    pf = population_free_energy(p)
    assert pf.value == pytest.approx(-math.log(p.value / (1 - p.value)))


@pytest.mark.parametrize("t1,t2", [(300.0, 350.0), (300.0, 450.0), (400.0, 320.0)])
def test_harmonic_free_energy_between_temperatures(t1, t2):
    # d-dim harmonic oscillator, U = x^2/2 (kJ/mol); f2 - f1 = -(d/2) log(T2/T1) exactly
    d = 4
    rng = np.random.default_rng(int(t1 + t2))
    kt1, kt2 = 0.008314462618 * t1, 0.008314462618 * t2
    xa = rng.normal(0, np.sqrt(kt1), (4000, d))
    xb = rng.normal(0, np.sqrt(kt2), (4000, d))
    ua = 0.5 * np.sum(xa ** 2, 1)
    ub = 0.5 * np.sum(xb ** 2, 1)
    w_f = ua / kt2 - ua / kt1
    w_r = ub / kt1 - ub / kt2
    exact = -0.5 * d * np.log(t2 / t1)
    exp = exp_free_energy(w_f, seed=1)
    bar = bar_free_energy(w_f, w_r)
    assert abs(exp.value - exact) < 4 * exp.stderr + 1e-3
    assert abs(bar.value - exact) < 4 * bar.stderr + 1e-3
    assert bar.stderr < exp.stderr * 1.5
    # weighted EXP: proposal samples of a wider Gaussian with log weights towards state 1
    xq = rng.normal(0, 1.5 * np.sqrt(kt1), (20000, d))
    uq = 0.5 * np.sum(xq ** 2, 1)
    lw = -uq / kt1 - np.sum(gaussian_logq(xq, 0, 1.5 * np.sqrt(kt1)), 1)
    wexp = exp_free_energy(uq / kt2 - uq / kt1, lw, seed=2)
    assert abs(wexp.value - exact) < 4 * wexp.stderr + 1e-3
    # two generators' log Z difference: Z_k = (2 pi kT_k)^(d/2)
    lw2 = -uq / kt2 - np.sum(gaussian_logq(xq, 0, 1.5 * np.sqrt(kt1)), 1)
    dz = log_z_difference(lw, lw2)
    assert abs(-dz.value - exact) < 4 * dz.stderr + 1e-3
    assert to_kj_per_mol(bar, t1).unit == "kJ/mol"


def test_bootstrap_ci_coverage_near_nominal():
    """95% bootstrap CIs and +-1.96 stderr intervals of a reweighted mean cover the truth ~95% of the time."""
    rng = np.random.default_rng(11)
    cover_ci = cover_se = 0
    reps = 150
    for r in range(reps):
        x = rng.normal(0.5, 1.5, 400)
        lw = -0.5 * x ** 2 - gaussian_logq(x, 0.5, 1.5)
        e = expectation(x, lw, n_bootstrap=200, seed=r)
        cover_ci += e.ci_low <= 0.0 <= e.ci_high
        cover_se += abs(e.value) <= 1.96 * e.stderr
    assert 0.86 <= cover_ci / reps <= 0.995, cover_ci / reps
    assert 0.86 <= cover_se / reps <= 0.995, cover_se / reps


def ar1(rng, n, phi, mean=0.0):
    e = rng.normal(0, 1, n)
    x = np.empty(n)
    x[0] = e[0] / np.sqrt(1 - phi ** 2)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x + mean


def test_block_errors_match_spread_of_independent_repeats():
    """Correlated series (AR(1), rho=0.95, g ~ 39): block and bootstrap-over-blocks errors agree with the
    spread between independent repeats; the naive error understates it several-fold."""
    rng = np.random.default_rng(5)
    phi = 0.95
    means, block, boot, naive = [], [], [], []
    for r in range(40):
        x = ar1(rng, 4000, phi) > 1.0  # a ~16% 'rare state' indicator
        e = block_average(x.astype(float), n_blocks=20, n_bootstrap=200, seed=r)
        means.append(e.value)
        block.append(e.stderr)
        boot.append(e.extra["stderr_bootstrap_blocks"])
        naive.append(e.extra["stderr_naive"])
    spread = np.std(means, ddof=1)
    assert 0.6 < np.mean(block) / spread < 1.5, (np.mean(block), spread)
    assert 0.6 < np.mean(boot) / spread < 1.5
    assert np.mean(naive) / spread < 0.4
    g = statistical_inefficiency(ar1(rng, 20000, phi))
    assert 25 < g < 55  # (1 + phi) / (1 - phi) = 39


def test_free_energy_surface_reweighting_recovers_gaussian():
    rng = np.random.default_rng(8)
    n = 200000
    x = rng.uniform(-180, 180, n)
    y = rng.uniform(-180, 180, n)
    u = 0.5 * ((x - 30) / 40) ** 2 + 0.5 * ((y + 60) / 50) ** 2
    fes = free_energy_surface(x, y, -u, bins=36)
    assert fes.probability.sum() == pytest.approx(1.0)
    cx = 0.5 * (fes.edges_x[1:] + fes.edges_x[:-1])
    cy = 0.5 * (fes.edges_y[1:] + fes.edges_y[:-1])
    exact = 0.5 * ((cx[:, None] - 30) / 40) ** 2 + 0.5 * ((cy[None, :] + 60) / 50) ** 2
    exact -= exact.min()
    mask = exact < 3.0
    assert np.max(np.abs(fes.free_energy[mask] - exact[mask])) < 0.35
    assert np.all(fes.free_energy >= 0)


def test_histogram_kl_known_values():
    p = np.array([0.5, 0.5])
    q = np.array([0.9, 0.1])
    assert histogram_kl(p, p) == pytest.approx(0.0)
    assert histogram_kl(p, q) == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))
