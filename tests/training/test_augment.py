"""Langevin data augmentation: samples the Boltzmann distribution of the energy it is given."""

import math

import numpy as np
import pytest
import torch

from boltzflow.errors import ConfigError, InputError
from boltzflow.training.augment import LangevinAugmentConfig, langevin_augment

KT = 2.5  # kJ/mol


def harmonic(sigma):
    """u(x) = |x - x_ref|^2 / (2 sigma^2) per coordinate, in kT (sigma: (n_atoms,) nm)."""
    sig = torch.as_tensor(sigma, dtype=torch.float64)[None, :, None]

    def u(x):
        return (x.pow(2) / (2 * sig.to(x.dtype) ** 2)).sum((1, 2))

    return u


def test_harmonic_variance_and_cost():
    # a light stiff atom and a heavy soft one, started off equilibrium: after burn-in the kept frames
    # have the Boltzmann variance sigma^2 per coordinate (BAOAB samples a harmonic u exactly in x)
    sigma = np.array([0.005, 0.05])
    masses = np.array([1.0, 12.0])
    x0 = torch.full((500, 2, 3), 0.02, dtype=torch.float64)
    cfg = LangevinAugmentConfig(frames_per_start=10, burnin=600, stride=30, timestep_fs=1.0, friction_per_ps=20.0, batch=200)
    g = torch.Generator().manual_seed(0)
    res = langevin_augment(harmonic(sigma), x0, masses, KT, cfg, generator=g, dtype=torch.float64)
    assert res.positions.shape == (500 * 10, 2, 3)
    assert res.energy_evals == 500 * (600 + 10 * 30 + 1) and res.dropped_chains == 0
    np.testing.assert_array_equal(res.start_index, np.repeat(np.arange(500), 10))
    var = res.positions.astype(np.float64).var(axis=(0, 2))
    np.testing.assert_allclose(var, sigma ** 2, rtol=0.08)
    assert abs(res.positions[:, 1].mean()) < 0.005  # relaxed away from the start at 0.02 nm
    # reduced energies of the kept frames: 3 dofs x 2 atoms x 1/2 kT on average
    assert res.reduced_energy.mean() == pytest.approx(3.0, rel=0.08)


def test_variance_independent_of_kt_units():
    # u is in units of kT: a run with another kT (forces -kT grad u, noise sqrt(kT/m)) samples the same exp(-u)
    sigma = np.array([0.05])
    x0 = torch.zeros(500, 1, 3, dtype=torch.float64)
    cfg = LangevinAugmentConfig(frames_per_start=10, burnin=800, stride=30, friction_per_ps=20.0)
    var = []
    for kt in (KT, 3 * KT):
        res = langevin_augment(harmonic(sigma), x0, np.array([12.0]), kt, cfg, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)
        var.append(res.positions.astype(np.float64).var())
    np.testing.assert_allclose(var, [sigma[0] ** 2] * 2, rtol=0.08)


def test_exploding_chains_are_dropped():
    sigma = np.array([0.05, 0.05])

    def u(x):
        base = harmonic(sigma)(x)
        bad = torch.zeros_like(base, dtype=torch.bool)
        bad[::3] = True  # every third chain turns invalid
        return torch.where(bad, torch.full_like(base, math.inf), base)

    cfg = LangevinAugmentConfig(frames_per_start=3, burnin=5, stride=2)
    res = langevin_augment(u, torch.zeros(9, 2, 3), np.array([1.0, 1.0]), KT, cfg, generator=torch.Generator().manual_seed(0))
    assert res.dropped_chains == 3 and res.positions.shape == (6 * 3, 2, 3)
    assert set(res.start_index.tolist()) == {1, 2, 4, 5, 7, 8}
    assert np.isfinite(res.positions).all()


def test_no_frames_and_bad_input():
    res = langevin_augment(harmonic([0.1]), torch.zeros(4, 1, 3), [1.0], KT, LangevinAugmentConfig(frames_per_start=0))
    assert res.positions.shape == (0, 1, 3) and res.energy_evals == 0
    with pytest.raises(ConfigError):
        LangevinAugmentConfig(frames_per_start=1, stride=0)
    with pytest.raises(InputError):
        langevin_augment(harmonic([0.1]), torch.zeros(4, 1, 3), [1.0, 2.0], KT, LangevinAugmentConfig(frames_per_start=1))


def test_run_config_defaults_match_the_augment_defaults():
    """DataConfig's flat ``md_*`` TOML keys repeat LangevinAugmentConfig's defaults: keep them equal."""
    from boltzflow.pipeline import DataConfig
    from boltzflow.training.augment import LangevinAugmentConfig

    assert DataConfig().augment_config() == LangevinAugmentConfig()


def test_nonfinite_rows_flags_exactly_the_rows_with_a_nonfinite_energy_or_force():
    from boltzflow.training.augment import _nonfinite_rows

    u = torch.zeros(5)
    f = torch.randn(5, 4, 3)
    assert not _nonfinite_rows(u, f).any()
    f[1, 2, 0] = float("nan")
    f[3, 0, 1], f[3, 1, 1] = float("inf"), float("-inf")  # cancel to nan in the screening sum
    u[4] = float("inf")
    assert _nonfinite_rows(u, f).tolist() == [False, True, False, True, True]
