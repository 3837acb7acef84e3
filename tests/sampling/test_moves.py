"""Resample-move: HMC in a generator's coordinates (sampling/moves.py) leaves the Boltzmann distribution
invariant (the volume factor included), spreads the copies of a resampled frame, and, inside the pool,
is counted, reproducible on resume and refused without coordinates."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "losses"))
from loss_helpers import affine_flow  # noqa: E402

from boltzflow.errors import ConfigError, InputError  # noqa: E402
from boltzflow.sampling.moves import CoordinateMap, boltzmann_log_prob, hmc_move  # noqa: E402
from boltzflow.sampling.pool import PoolConfig, ReweightedPool  # noqa: E402

D = torch.float64
M_P, S_P = 1.5, 0.5


def u(x):
    """p = N(1.5, 0.5^2) per dimension (kT); x: (n, dim)."""
    return 0.5 * ((x - M_P) / S_P).pow(2).sum(-1)


class SinhMap:
    """x = sinh(q) elementwise: log|det dx/dq| = sum log cosh q varies with q, so a move that dropped (or
    flipped) the volume factor would sample the wrong distribution of x."""

    def __init__(self, dim: int):
        self.dim = dim
        self.circular = torch.zeros(dim, dtype=torch.bool)

    def pull(self, x):
        return torch.asinh(x)

    def push(self, q):
        return torch.sinh(q), torch.log(torch.cosh(q)).sum(-1)


def test_sinh_map_is_a_coordinate_map_and_log_pi_carries_the_volume():
    m = SinhMap(2)
    assert isinstance(m, CoordinateMap)
    q = torch.tensor([[0.3, -1.2]], dtype=D)
    expected = -float(u(torch.sinh(q))) + float(torch.log(torch.cosh(q)).sum())
    assert float(boltzmann_log_prob(m, u)(q)) == pytest.approx(expected, abs=1e-12)


def test_hmc_moves_keep_the_boltzmann_distribution_and_decorrelate():
    """Frames drawn exactly from p stay p-distributed after the moves (mean and std of x), and they move."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x0 = M_P + S_P * torch.randn(n, 2, generator=g, dtype=D)
    res = hmc_move(x0, SinhMap(2), u, steps=8, step_size=0.3, n_leapfrog=4, batch_size=5000, generator=g)
    assert res.x.shape == x0.shape
    assert float(res.x.mean()) == pytest.approx(M_P, abs=0.02)
    assert float(res.x.std()) == pytest.approx(S_P, abs=0.02)
    corr = torch.corrcoef(torch.stack([x0[:, 0], res.x[:, 0]]))[0, 1]
    assert float(corr) < 0.5
    assert 0.3 < res.accept_rate < 1.0
    assert res.energy_evals == n * 8 * (4 + 1) - n * 7  # the first transition also evaluates its start


def test_hmc_moves_wrap_circular_coordinates():
    """A von Mises density on a circular coordinate (identity map): states stay in [-pi, pi) and the
    circular mean is recovered."""

    class Circle:
        dim = 1
        circular = torch.ones(1, dtype=torch.bool)

        def pull(self, x):
            return x

        def push(self, q):
            return q, torch.zeros(q.shape[0], dtype=q.dtype)

    mu, kappa = 2.8, 2.0

    def vm(x):
        return -kappa * torch.cos(x[:, 0] - mu)

    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(8000, 1, generator=g, dtype=D) * 2 - 1) * math.pi
    res = hmc_move(x0, Circle(), vm, steps=30, step_size=0.5, n_leapfrog=5, batch_size=8000, generator=g)
    assert bool((res.x >= -math.pi).all() & (res.x < math.pi).all())
    mean_angle = math.atan2(float(torch.sin(res.x).mean()), float(torch.cos(res.x).mean()))
    assert mean_angle == pytest.approx(mu, abs=0.05)


def test_pool_moves_spread_duplicates_keep_p_and_count_evaluations():
    flow = affine_flow(1).double()
    g = torch.Generator().manual_seed(3)
    cfg = dict(size=50_000, resample=20_000, clip=0.0, refresh=5, batch_size=10_000)
    plain = ReweightedPool(PoolConfig(**cfg))
    plain.refresh(flow, u, torch.Generator().manual_seed(3))
    pool = ReweightedPool(PoolConfig(**cfg, move_fraction=1.0, move_steps=4, move_leapfrog=3, move_step_size=0.2),
                          mover=SinhMap(1))
    evals = pool.refresh(flow, u, g)
    assert evals == 50_000 + pool.move_evals and pool.move_evals > 0
    assert float(pool.x.mean()) == pytest.approx(M_P, abs=0.02) and float(pool.x.std()) == pytest.approx(S_P, abs=0.02)
    # q = N(0, 1) far from p: resampling alone repeats frames; moves make (almost) all of them distinct
    assert torch.unique(plain.x).numel() < 0.5 * 20_000
    assert torch.unique(pool.x).numel() > 0.95 * 20_000
    assert "move_accept" in pool.stats and pool.move_step == pool.stats["move_step"]


def test_pool_with_moves_redraws_the_same_frames_on_resume():
    flow = affine_flow(1).double()
    cfg = PoolConfig(size=4_000, resample=2_000, clip=0.0, refresh=3, batch_size=1000, move_fraction=0.5,
                     move_steps=3, move_leapfrog=2, move_step_size=0.1)
    a = ReweightedPool(cfg, mover=SinhMap(1))
    g = torch.Generator().manual_seed(4)
    a.refresh(flow, u, g)
    a.batch(4, g)
    state = a.state_dict()
    b = ReweightedPool(cfg, mover=SinhMap(1))
    b.load_state_dict(state, flow, u)
    assert torch.equal(a.x, b.x) and b.uses == 1 and b.move_step == a.move_step


def test_moves_need_coordinates_and_valid_settings():
    with pytest.raises(InputError, match="internal coordinates"):
        ReweightedPool(PoolConfig(move_fraction=0.5))
    for bad in (dict(move_fraction=1.5), dict(move_steps=0), dict(move_leapfrog=0), dict(move_step_size=0.0)):
        with pytest.raises(ConfigError, match="move"):
            PoolConfig(**bad)


def test_internal_map_round_trip_and_volume_factor():
    """The generator's internal coordinates: push(pull(x)) is x up to a rigid motion, and push's
    log|det dx/dq| is minus the inverse transform's at the same configuration."""
    from boltzflow.flows.generator import GeneratorConfig, build_generator
    from boltzflow.flows.latent import internal_map
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-dipeptide", route="psf")
    x = torch.tensor(system.positions, dtype=D)[None].repeat(4, 1, 1)
    x = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=D)
    gen = build_generator(system, GeneratorConfig(pipeline="internal-all", representation="internal", blocks=1,
                                                  hidden=16), x).double()
    m = internal_map(gen)
    assert isinstance(m, CoordinateMap) and m.dim == 60 and int(m.circular.sum()) > 0
    q = m.pull(x)
    y, ld = m.push(q)
    assert torch.allclose(torch.cdist(y, y), torch.cdist(x, x), atol=1e-9)
    assert torch.allclose(ld, -gen.all_ic.inverse(x)[1], atol=1e-9)
    hnet = build_generator(system, GeneratorConfig(pipeline="hnet", blocks=1, hidden=16), x)
    with pytest.raises(InputError, match="internal-all"):
        internal_map(hnet)
