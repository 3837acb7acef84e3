"""Flow-MCMC and stochastic normalizing flows against targets with exact answers: a perfect proposal is
always accepted; IMH and latent MALA/HMC recover known means and double-well populations; SNF path
weights give unbiased Z and expectations (and zero variance where the theory says so)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.core.bijection import Bijection
from boltzflow.errors import ConfigError, InputError
from boltzflow.estimators import statistical_inefficiency
from boltzflow.flows.base import Flow, MixedBase, StandardNormal
from boltzflow.flows.latent import latent_map
from boltzflow.sampling.flow_mcmc import draw_proposals, run_flow_mcmc
from boltzflow.sampling.imh import imh_chains
from boltzflow.sampling.latent import latent_mcmc, pulled_back_log_prob
from boltzflow.sampling.mcmc_config import MCMCConfig
from boltzflow.sampling.snf import (
    Deterministic,
    LangevinBlock,
    MetropolisBlock,
    Stochastic,
    latent_snf,
    stochastic_path,
)

D = torch.float64


class Affine(Bijection):
    """x = shift + scale * z elementwise; (batch, dim)."""

    def __init__(self, shift, scale):
        super().__init__()
        self.shift = torch.as_tensor(shift, dtype=D)
        self.scale = torch.as_tensor(scale, dtype=D)

    def forward(self, z, context=None):
        return self.shift + self.scale * z, torch.log(self.scale.abs()).sum().expand(z.shape[0])

    def inverse(self, x, context=None):
        return (x - self.shift) / self.scale, -torch.log(self.scale.abs()).sum().expand(x.shape[0])


MEAN = torch.tensor([1.5, -1.0], dtype=D)
STD = torch.tensor([0.7, 1.3], dtype=D)
LOG_Z = float(torch.log(STD).sum() + math.log(2 * math.pi))  # log of the integral of exp(-u), dim 2


def gauss_u(x):
    return 0.5 * ((x - MEAN) / STD).pow(2).sum(-1)


def flow(shift, scale):
    return Flow(StandardNormal(2).double(), Affine(shift, scale))


def double_well_u(x):
    """Asymmetric 1-D double well u = 2 (x^2 - 1)^2 + 0.6 x (kT); x: (batch, 1)."""
    return (2.0 * (x[:, 0] ** 2 - 1) ** 2 + 0.6 * x[:, 0])


def double_well_right_population() -> float:
    """P(x > 0) by quadrature."""
    x = np.linspace(-4, 4, 400001)
    p = np.exp(-(2.0 * (x ** 2 - 1) ** 2 + 0.6 * x))
    return float(p[x > 0].sum() / p.sum())


# ---- independence Metropolis-Hastings --------------------------------------------------------------
def test_imh_perfect_proposal_always_accepts():
    res = imh_chains(np.full(4000, -3.7), chains=8, seed=0)
    assert res.accept_rate == 1.0 and res.steps == 500 and res.chains == 8
    # the flow equal to the target: log w = -u - log q is constant (= log Z), every move accepted
    lat = latent_map(flow(MEAN, STD))
    s = draw_proposals(lat, gauss_u, 2000, generator=torch.Generator().manual_seed(0))
    assert np.allclose(s.log_weights, LOG_Z, atol=1e-9)
    assert imh_chains(s.log_weights, chains=4).accept_rate == 1.0


def test_imh_chain_layout_and_invalid_proposals():
    lw = np.array([-np.inf, 0.0, np.nan, -np.inf, 0.5, 2.0])  # 2 chains x 3 steps
    res = imh_chains(lw, chains=2, seed=0)
    assert res.index[0].tolist() == [0, 1]
    assert res.index[1, 0] == 0  # NaN proposal is never accepted
    assert res.index[2, 0] == 4  # an invalid start leaves for the first valid proposal
    assert res.index[1, 1] == 1  # -inf proposal rejected
    assert res.index[2, 1] == 5  # a proposal with a higher weight is always accepted
    assert res.chain_major().tolist() == [res.index[t, c] for c in range(2) for t in range(3)]
    with pytest.raises(InputError):
        imh_chains(np.zeros(3), chains=4)
    with pytest.raises(InputError):
        imh_chains(np.array([0.0, np.inf]), chains=1)


def test_imh_recovers_double_well_population():
    g = torch.Generator().manual_seed(1)
    lat = latent_map(Flow(StandardNormal(1).double(), Affine([0.0], [1.2])))
    s = draw_proposals(lat, double_well_u, 60000, generator=g)
    chain = run_flow_mcmc(lat, double_well_u, MCMCConfig(method="imh", chains=8, burnin=10), 60000, proposals=s)
    assert chain.log_weights is None and chain.provenance["layout"] == "chain-major"
    assert chain.provenance["energy_evals"] == 60000 and 0.3 < chain.provenance["accept_rate"] < 0.95
    right = (chain.positions[:, 0] > 0).astype(float)
    steps = chain.provenance["steps"]
    g_ineff = np.mean([statistical_inefficiency(right[c * steps:(c + 1) * steps]) for c in range(8)])
    exact = double_well_right_population()
    se = math.sqrt(exact * (1 - exact) * g_ineff / len(right))
    assert abs(right.mean() - exact) < 4 * se, (right.mean(), exact, se)
    assert abs(exact - 0.5) > 10 * se  # the asymmetry is resolved, not just a symmetric guess


# ---- latent MCMC ----------------------------------------------------------------------------------
def test_latent_mala_and_hmc_recover_gaussian_moments():
    lat = latent_map(flow([0.5, 0.0], [1.0, 1.0]))  # a poor flow: the chains must do the work
    for n_leapfrog in (1, 4):
        ch = latent_mcmc(lat, gauss_u, chains=200, steps=60, step_size=0.3, n_leapfrog=n_leapfrog, burnin=40,
                         generator=torch.Generator().manual_seed(n_leapfrog))
        x = ch.x.reshape(-1, 2)
        assert torch.allclose(x.mean(0), MEAN, atol=0.08), x.mean(0)
        assert torch.allclose(x.std(0), STD, rtol=0.06), x.std(0)
        assert 0.4 < ch.accept_rate < 0.95
        assert torch.allclose(ch.u, gauss_u(ch.x), atol=1e-9)  # u recovered without an extra evaluation


def test_latent_mcmc_perfect_flow_pulls_back_to_the_base():
    lat = latent_map(flow(MEAN, STD))
    z = torch.randn(50, 2, dtype=D)
    log_pi = pulled_back_log_prob(lat, gauss_u)(z)
    assert torch.allclose(log_pi, lat.base_log_prob(z) + LOG_Z)  # pi = Z * p_Z exactly
    ch = latent_mcmc(lat, gauss_u, chains=64, steps=5, step_size=0.05, burnin=0,
                     generator=torch.Generator().manual_seed(0))
    assert ch.accept_rate > 0.97


def test_latent_mcmc_wraps_periodic_dims():
    """A circular latent dim (uniform base on [-pi, pi)) and a von Mises target exp(k cos(x - mu))."""
    base = MixedBase(1, circular=[0]).double()
    lat = latent_map(Flow(base, Affine([0.0], [1.0])))
    k, mu = 2.0, 2.8  # mass near the boundary pi: chains must wrap

    def u(x):
        return -k * torch.cos(x[:, 0] - mu)

    ch = latent_mcmc(lat, u, chains=200, steps=40, step_size=0.8, burnin=30, generator=torch.Generator().manual_seed(0))
    x = ch.x.reshape(-1)
    assert float(x.min()) >= -math.pi and float(x.max()) < math.pi
    r = float(torch.cos(x - mu).mean())
    from scipy.special import i0, i1

    assert abs(r - i1(k) / i0(k)) < 0.03, r


# ---- stochastic normalizing flows ------------------------------------------------------------------
def test_metropolis_block_at_the_target_gives_exact_weights():
    """y0 ~ p exactly and a reversible block on p: the path weight is log Z for every path (no variance)."""
    g = torch.Generator().manual_seed(0)
    y0 = MEAN + STD * torch.randn(500, 2, generator=g, dtype=D)
    log_p0 = -gauss_u(y0) - LOG_Z
    res = stochastic_path(y0, log_p0, [Stochastic(MetropolisBlock(0.5, n_steps=3, n_leapfrog=2), lambda y: -gauss_u(y))],
                          lambda y: -gauss_u(y), generator=g)
    assert torch.allclose(res.log_w, torch.full_like(res.log_w, LOG_Z), atol=1e-9)
    assert 0.3 < res.accept_rate < 1.0 and (res.y != y0).any()


@pytest.mark.parametrize("kernel", ["langevin", "mala"])
def test_snf_path_weights_are_unbiased(kernel):
    """A flow N(0, 2^2) -> latent blocks -> Gaussian target: E[w] = Z and the weighted mean is the target's
    (a flow wider than the target, so the plain weights have finite variance too)."""
    lat = latent_map(flow([0.0, 0.0], [2.0, 2.0]))
    r = latent_snf(lat, gauss_u, 40000, blocks=3, kernel=kernel, step_size=0.05, n_steps=2,
                   generator=torch.Generator().manual_seed(3))
    w = torch.exp(r.log_w - LOG_Z)
    se = float(w.std() / math.sqrt(w.numel()))
    assert abs(float(w.mean()) - 1.0) < 4 * se, (float(w.mean()), se)
    wn = w / w.sum()
    mean = (wn[:, None] * r.x).sum(0)
    assert torch.allclose(mean, MEAN, atol=0.05), mean
    # the blocks moved the samples towards the target: weights better than the flow's alone
    plain = latent_snf(lat, gauss_u, 40000, blocks=0, generator=torch.Generator().manual_seed(3))
    from boltzflow.core import kish_ess

    assert kish_ess(r.log_w) > kish_ess(plain.log_w)
    assert r.energy_evals > plain.energy_evals == 40000


def test_stochastic_path_with_deterministic_stage_is_unbiased():
    """Wu et al.'s interleaving: z ~ N(0, 1) -> Langevin on an interpolated density -> affine -> Metropolis."""
    g = torch.Generator().manual_seed(5)
    n = 40000
    z = torch.randn(n, 2, generator=g, dtype=D)
    log_p0 = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi)
    aff = Affine([1.0, -0.5], [0.8, 1.5])
    stages = [Stochastic(LangevinBlock(0.05, 2), lambda y: -0.5 * y.pow(2).sum(1) * 0.9),
              Deterministic(lambda y: aff(y)),
              Stochastic(MetropolisBlock(0.4), lambda y: -gauss_u(y))]
    res = stochastic_path(z, log_p0, stages, lambda y: -gauss_u(y), generator=g)
    w = torch.exp(res.log_w - LOG_Z)
    se = float(w.std() / math.sqrt(n))
    assert abs(float(w.mean()) - 1.0) < 4 * se
    assert res.evals == 3 + 2  # Langevin: start + 2 steps; Metropolis: start + 1 leapfrog


def test_mcmc_config_checks():
    assert MCMCConfig().method == "none"
    with pytest.raises(ConfigError):
        MCMCConfig(method="gibbs")
    with pytest.raises(ConfigError):
        MCMCConfig(chains=0)
    with pytest.raises(InputError):
        run_flow_mcmc(latent_map(flow(MEAN, STD)), gauss_u, MCMCConfig(), 10)


# ---- molecules -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adp():
    from boltzflow.pipeline import load_trained

    return load_trained("systems/alanine-dipeptide/generators/energy", device="cpu")


def test_generator_latent_view_reproduces_the_generator(adp):
    _, _, gen, energy = adp
    lat = latent_map(gen)
    with torch.no_grad():
        x1, lq1 = gen.sample_and_log_prob(64, generator=torch.Generator().manual_seed(2))
        x2, lq2 = lat.push(lat.sample_latent(64, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(x1, x2) and torch.equal(lq1, lq2)
    assert int(lat.circular.sum()) >= 2  # phi and psi at least are periodic latent dims


def test_flow_mcmc_on_alanine_dipeptide_native_energy(adp):
    system, _, gen, energy = adp
    lat = latent_map(gen)
    g = torch.Generator().manual_seed(0)
    imh = run_flow_mcmc(lat, energy, MCMCConfig(method="imh", chains=4, burnin=2), 1200, generator=g)
    assert imh.positions.shape == (4 * 298, 22, 3) and 0.4 < imh.provenance["accept_rate"] < 1.0
    mala = run_flow_mcmc(lat, energy, MCMCConfig(method="mala", chains=8, burnin=5, candidates=2), 24, generator=g)
    assert len(mala) == 24 and mala.provenance["energy_evals"] == 8 * 2 + 8 * (1 + 8)
    assert np.all(np.isfinite(mala.reduced_energy)) and mala.reduced_energy.mean() < 40
    snf = run_flow_mcmc(lat, energy, MCMCConfig(method="snf", snf_blocks=2, step_size=0.05), 64, generator=g)
    assert snf.log_weights is not None and np.isfinite(snf.log_weights).mean() > 0.9
    assert snf.provenance["energy_evals"] == 64 * (2 * 2 + 1)


@pytest.mark.parametrize("pipeline,representation", [("hnet", "cartesian"), ("conditional", "internal"),
                                                     ("conditional", "cartesian")])
def test_generator_latent_view_for_every_pipeline(pipeline, representation):
    """push(latent draw) is the generator's own sample (perturbed weights, so nothing is the identity);
    the conditional pipeline's latent holds the hydrogen flow's dims too."""
    from boltzflow.flows.generator import GeneratorConfig, build_generator
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-dipeptide", route="psf")
    gen = build_generator(system, GeneratorConfig(pipeline=pipeline, representation=representation, blocks=1,
                                                  hidden=16, hnet_hidden=16, h_blocks=1, h_hidden=16)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        x1, lq1 = gen.sample_and_log_prob(16, generator=torch.Generator().manual_seed(4))
        lat = latent_map(gen)
        x2, lq2 = lat.push(lat.sample_latent(16, generator=torch.Generator().manual_seed(4)))
    assert torch.allclose(x1, x2) and torch.allclose(lq1, lq2)
    n_heavy = len(system.heavy_indices)
    assert (lat.dim > 3 * n_heavy) == (pipeline == "conditional")
