"""Losses against hand-computed values, gradient signs (felardos2023 section 3.2 / appendix G-H),
and convergence towards targets with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from loss_helpers import affine_flow
from torch import nn

from boltzflow.errors import InputError
from boltzflow.losses import DATA_LOSSES, LOSSES, chi2_data, fab, get_loss, klx, klx_path, klz, klz_df, logvar_data
from boltzflow.sampling.ais import AISConfig

LOG2PI = math.log(2 * math.pi)


class FixedGaussianGen(nn.Module):
    """1D generator x = mu + s z on a fixed latent batch z: a real Gaussian density with two parameters."""

    def __init__(self, z, mu: float, s: float):
        super().__init__()
        self.register_buffer("z", torch.as_tensor(z, dtype=torch.float64)[:, None])
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.log_s = nn.Parameter(torch.tensor(math.log(s), dtype=torch.float64))

    def log_prob(self, x):
        s = self.log_s.exp()
        return (-0.5 * ((x - self.mu) / s) ** 2 - self.log_s - 0.5 * LOG2PI).sum(-1)

    def sample_and_log_prob(self, n, generator=None):
        x = self.mu + self.log_s.exp() * self.z[:n]
        return x, self.log_prob(x)

    def penalty(self, x):
        return x.new_zeros(x.shape[0])


class TableGen(nn.Module):
    """Fixed sample batch; ``log_prob(x) = log N(x; 0, I) + a`` so that d loss / d a_i = d loss / d log q_i."""

    def __init__(self, x):
        super().__init__()
        self.register_buffer("x", x)
        self.a = nn.Parameter(torch.zeros(x.shape[0], dtype=x.dtype))

    def log_prob(self, x):
        match = (x[:, None, :] == self.x[None]).all(-1)
        assert match.any(1).all(), "TableGen only knows its own samples"
        return -0.5 * x.pow(2).sum(-1) - 0.5 * x.shape[1] * LOG2PI + self.a[match.double().argmax(1)]

    def sample_and_log_prob(self, n, generator=None):
        return self.x[:n], self.log_prob(self.x[:n])

    def penalty(self, x):
        return x.new_zeros(x.shape[0])


def quad_u(x):
    """u(x) = (x - 1)^2 (a Gaussian with mean 1, std 1/sqrt 2)."""
    return ((x - 1.0) ** 2).sum(-1)


def dw_u(x):
    x0 = x[:, 0]
    return x0**4 / 4 - 3 * x0**2 + 0.5 * x0 + 0.5 * x[:, 1:].pow(2).sum(-1)


Z = [-1.5, -0.5, 0.3, 1.2, 2.0]
MU, S = 0.2, 1.5


def hand_r():
    xs = [MU + S * z for z in Z]
    logq = [-0.5 * z * z - math.log(S) - 0.5 * LOG2PI for z in Z]
    return [-(x - 1.0) ** 2 - lq for x, lq in zip(xs, logq)]


def test_l2plus_matches_hand_computation_and_ablations_differ():
    r = hand_r()
    n = len(r)
    k = sum(r) / n
    relu = [max(ri - k, 0.0) for ri in r]
    dr_dmu = [-z / S for z in Z]  # d r_i / d mu at fixed x_i: -d log q(x_i) / d mu = -(x_i - mu)/s^2
    expect = {
        "l2plus": (sum(v * v for v in relu) / n, sum(2 * v * d for v, d in zip(relu, dr_dmu)) / n),
        "l2plus_nomask": (sum((ri - k) ** 2 for ri in r) / n, sum(2 * (ri - k) * d for ri, d in zip(r, dr_dmu)) / n),
        "l2plus_nodetach": (sum(v * v for v in relu) / n,
                            sum(2 * v * (d - sum(dr_dmu) / n) for v, d in zip(relu, dr_dmu)) / n),
    }
    grads = {}
    for name, (value, grad_mu) in expect.items():
        gen = FixedGaussianGen(Z, MU, S)
        out = LOSSES[name](gen, quad_u, n)
        out.loss.backward()
        assert float(out.loss.detach()) == pytest.approx(value, rel=1e-10), name
        assert float(gen.mu.grad) == pytest.approx(grad_mu, rel=1e-9, abs=1e-12), name
        assert out.metrics["K"] == pytest.approx(k, rel=1e-12)
        grads[name] = float(gen.mu.grad)
    assert expect["l2plus_nomask"][0] > expect["l2plus"][0]  # the mask drops the r < K half
    assert grads["l2plus_nodetach"] != pytest.approx(grads["l2plus"], rel=1e-3)


def test_klz_df_and_klx_and_fab_hand_values():
    r = hand_r()
    w = [math.exp(v - max(r)) for v in r]
    w = [v / sum(w) for v in w]
    nll = [0.5 * z * z + math.log(S) + 0.5 * LOG2PI for z in Z]
    gen = FixedGaussianGen(Z, MU, S)
    assert float(klz_df(gen, quad_u, 5).loss.detach()) == pytest.approx(sum(a * b for a, b in zip(w, nll)), rel=1e-10)
    assert float(klx(gen, quad_u, 5).loss.detach()) == pytest.approx(-sum(r) / 5, rel=1e-10)
    # no intermediate density: x_AIS = x, log w_AIS = r, loss = logsumexp(2 r) - log N
    out = fab(gen, quad_u, 5, AISConfig(n_intermediate=0))
    lse = max(2 * v for v in r) + math.log(sum(math.exp(2 * v - max(2 * v for v in r)) for v in r))
    assert float(out.loss.detach()) == pytest.approx(lse - math.log(5), rel=1e-10)
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    assert float(klz(gen, x).loss.detach()) == pytest.approx(float(-gen.log_prob(x).mean().detach()), rel=1e-12)


def test_gradient_signs_with_respect_to_log_q():
    """L2+ and KLz-df never lower log q at a sample; the ablations do (appendix G/H)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 2
    signs = {}
    for name in ("l2plus", "klz_df", "l2plus_nodetach", "l2plus_nomask"):
        gen = TableGen(x)
        out = LOSSES[name](gen, dw_u, 64)
        out.loss.backward()
        grad = gen.a.grad
        signs[name] = (int((grad > 1e-12).sum()), int((grad < -1e-12).sum()))
    for name in ("l2plus", "klz_df"):
        pos, neg = signs[name]
        assert pos == 0 and neg > 0, (name, signs[name])  # d loss / d log q_i <= 0 for all i
    for name in ("l2plus_nodetach", "l2plus_nomask"):
        assert signs[name][0] > 0, (name, signs[name])  # some samples get their density lowered


def test_invalid_samples_are_dropped_and_counted():
    gen = TableGen(torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [50.0, 0.0]], dtype=torch.float64))

    def u(x):
        return torch.where(x[:, 0] > 10, torch.full_like(x[:, 0], math.inf), dw_u(x))

    for name in ("klx", "klz_df", "l2plus"):
        out = LOSSES[name](gen, u, 4)
        assert torch.isfinite(out.loss), name
        assert out.metrics["n_invalid"] == 1.0 and out.log_w[3] == -math.inf, name
        out.loss.backward()
        assert torch.isfinite(gen.a.grad).all() and gen.a.grad[3] == 0, name
        gen.a.grad = None
    flow = affine_flow(2)
    out = fab(flow, lambda x: torch.where(x[:, 0] > 1, torch.full_like(x[:, 0], math.inf), dw_u(x)), 64,
              AISConfig(step_size=0.3), generator=torch.Generator().manual_seed(0))
    assert 0 < out.metrics["n_invalid"] < 64 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters())
    bad = LOSSES["l2plus"](gen, lambda x: torch.full((x.shape[0],), math.inf, dtype=x.dtype), 4)
    assert torch.isnan(bad.loss) and bad.metrics["n_invalid"] == 4


def test_registry():
    assert set(LOSSES) == {"klz", "klx", "klx_path", "klz_df", "l2plus", "l2plus_nomask", "l2plus_nodetach", "fab", "alpha2",
                           "rwml", "chi2_data", "logvar_data"}
    assert set(DATA_LOSSES) <= set(LOSSES) and {"klz", "chi2_data", "logvar_data"} == set(DATA_LOSSES)
    assert get_loss("fab") is fab
    with pytest.raises(InputError, match="unknown loss"):
        get_loss("kl")


def gauss_kl(flow, m_p, s_p) -> float:
    """Exact KL(q || p) for the affine flow q = N(t, exp(s)^2) and diagonal Gaussian p."""
    aff = flow.bijection.layers[0]
    m_q, s_q = aff.t.detach().double(), aff.s.detach().double().exp()
    return float((torch.log(s_p / s_q) + (s_q**2 + (m_q - m_p) ** 2) / (2 * s_p**2) - 0.5).sum())


@pytest.mark.parametrize("name", ["klz", "klx", "klx_path", "klz_df", "l2plus", "l2plus_nomask", "fab", "alpha2", "rwml",
                                  "chi2_data", "logvar_data"])
def test_each_loss_moves_gaussian_flow_to_target(name):
    m_p = torch.tensor([1.0, -0.5], dtype=torch.float64)
    s_p = torch.tensor([0.6, 1.8], dtype=torch.float64)

    def u(x):
        return 0.5 * ((x.double() - m_p) / s_p).pow(2).sum(-1).to(x.dtype)

    flow = affine_flow(2)
    g = torch.Generator().manual_seed(1)
    data = (m_p + s_p * torch.randn(4096, 2, generator=g, dtype=torch.float64)).float()
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    kl0 = gauss_kl(flow, m_p, s_p)
    for step in range(150):
        if name == "klz":
            out = klz(flow, data[torch.randint(0, 4096, (256,), generator=g)])
        elif name in ("chi2_data", "logvar_data"):
            out = LOSSES[name](flow, u, data[torch.randint(0, 4096, (256,), generator=g)])
        elif name == "fab":
            out = fab(flow, u, 256, AISConfig(step_size=0.3), generator=g)
        else:
            out = LOSSES[name](flow, u, 256, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    kl1 = gauss_kl(flow, m_p, s_p)
    assert kl0 > 1.0 and kl1 < 0.05 * kl0, (name, kl0, kl1)


@pytest.mark.parametrize("n_intermediate", [0, 2])
def test_fab_gradient_matches_exact_alpha2_gradient(n_intermediate):
    """FAB (AIS towards p, then eq. 5) estimates the gradient of log int p^2 / q (midgley2021 eq. 6-11).

    1D Gaussian flow q = N(mu, s^2), target p = N(1, 0.8^2) (unnormalised): the exact gradient of
    log int p^2/q dx w.r.t. (mu, log s) by quadrature vs the FAB loss gradient on 40000 samples."""
    m_p, s_p = 1.0, 0.8

    def u(x):
        return 0.5 * ((x[:, 0] - m_p) / s_p) ** 2 + 3.0  # arbitrary offset: log Z_B is unknown to FAB

    g = torch.Generator().manual_seed(4)
    z = torch.randn(40000, generator=g, dtype=torch.float64)
    gen = FixedGaussianGen(z, 0.3, 1.5)
    out = fab(gen, u, 40000, AISConfig(n_intermediate=n_intermediate, step_size=0.6, adapt_step_size=False),
              generator=g)
    out.loss.backward()
    fab_grad = torch.stack([gen.mu.grad, gen.log_s.grad])

    ref = FixedGaussianGen(z[:1], 0.3, 1.5)
    t = torch.linspace(-25.0, 25.0, 200001, dtype=torch.float64)[:, None]
    log_p = -0.5 * ((t[:, 0] - m_p) / s_p) ** 2 - math.log(s_p) - 0.5 * LOG2PI
    obj = torch.logsumexp(2 * log_p - ref.log_prob(t), 0)  # log int p^2/q up to log dt
    obj.backward()
    exact = torch.stack([ref.mu.grad, ref.log_s.grad])
    assert exact.abs().min() > 0.1  # both components are informative
    assert torch.allclose(fab_grad, exact, rtol=0.03, atol=0.005), (fab_grad, exact)  # seen: < 0.6 %
    if n_intermediate:
        assert out.metrics["ess_ais"] > out.metrics["ess"]  # annealing improves the weights


def test_chi2_data_gradient_is_the_exact_chi2_gradient_and_power_0_is_maximum_likelihood():
    """On frames from p, chi2_data's gradient estimates that of log int p^2 / q = log E_q[w^2] (exact by
    quadrature for q = N(mu, s^2), p = N(1, 0.8^2)); with power 0 it is klz's gradient on the same frames."""
    m_p, s_p = 1.0, 0.8

    def u(x):
        return 0.5 * ((x[:, 0] - m_p) / s_p) ** 2 + 3.0  # the offset (unknown log Z) must not matter

    g = torch.Generator().manual_seed(5)
    data = (m_p + s_p * torch.randn(200000, 1, generator=g, dtype=torch.float64))
    gen = FixedGaussianGen(torch.zeros(1), 0.3, 1.5)
    out = chi2_data(gen, u, data)
    assert out.energy_evals == 200000 and "ess" not in out.metrics  # not the generator's own ESS
    # the exact fraction of frames that count: E_p[w]^2 / E_p[w^2] for w = p/q
    assert 0.2 < out.metrics["batch_ess"] < 0.9
    out.loss.backward()
    got = torch.stack([gen.mu.grad, gen.log_s.grad])

    ref = FixedGaussianGen(torch.zeros(1), 0.3, 1.5)
    t = torch.linspace(-25.0, 25.0, 200001, dtype=torch.float64)[:, None]
    log_p = -0.5 * ((t[:, 0] - m_p) / s_p) ** 2 - math.log(s_p) - 0.5 * LOG2PI
    torch.logsumexp(2 * log_p - ref.log_prob(t), 0).backward()
    exact = torch.stack([ref.mu.grad, ref.log_s.grad])
    assert exact.abs().min() > 0.1
    assert torch.allclose(got, exact, rtol=0.03, atol=0.01), (got, exact)

    a, b = FixedGaussianGen(torch.zeros(1), 0.3, 1.5), FixedGaussianGen(torch.zeros(1), 0.3, 1.5)
    chi2_data(a, u, data[:500], power=0.0).loss.backward()
    klz(b, data[:500]).loss.backward()
    assert torch.allclose(a.mu.grad, b.mu.grad) and torch.allclose(a.log_s.grad, b.log_s.grad)

    # ml_fraction f: the gradient is (1 - f) x chi-square's + f x maximum likelihood's on the same frames
    grads = []
    for kw in ({}, {"power": 0.0}, {"ml_fraction": 0.3}):
        c = FixedGaussianGen(torch.zeros(1), 0.3, 1.5)
        chi2_data(c, u, data[:500], **kw).loss.backward()
        grads.append(torch.stack([c.mu.grad, c.log_s.grad]))
    assert not torch.allclose(grads[0], grads[1], rtol=0.1)
    assert torch.allclose(grads[2], 0.7 * grads[0] + 0.3 * grads[1])
    with pytest.raises(InputError, match="ml_fraction"):
        chi2_data(FixedGaussianGen(torch.zeros(1), 0.3, 1.5), u, data[:10], ml_fraction=1.5)


def test_logvar_data_gradient_is_half_the_variance_gradient_and_ml_fraction_1_is_maximum_likelihood():
    """On frames from p, logvar_data's gradient estimates that of Var_p[log w] / 2, log w = -u - log q (exact
    by quadrature for q = N(mu, s^2), p = N(1, 0.8^2)); ml_fraction 1 is klz on the same frames, between a mix."""
    m_p, s_p = 1.0, 0.8

    def u(x):
        return 0.5 * ((x[:, 0] - m_p) / s_p) ** 2 + 3.0  # the offset (unknown log Z) must not matter

    g = torch.Generator().manual_seed(6)
    data = m_p + s_p * torch.randn(400000, 1, generator=g, dtype=torch.float64)
    gen = FixedGaussianGen(torch.zeros(1), -0.2, 1.5)
    out = logvar_data(gen, u, data, clip=1e9)  # no clipping: the plain estimator
    assert out.energy_evals == 400000 and "ess" not in out.metrics
    out.loss.backward()
    got = torch.stack([gen.mu.grad, gen.log_s.grad])

    ref = FixedGaussianGen(torch.zeros(1), -0.2, 1.5)
    t = torch.linspace(-12.0, 14.0, 200001, dtype=torch.float64)[:, None]
    dt = float(t[1, 0] - t[0, 0])
    p = torch.exp(-0.5 * ((t[:, 0] - m_p) / s_p) ** 2) / (s_p * math.sqrt(2 * math.pi))
    lw = -u(t) - ref.log_prob(t)
    mean = (p * lw).sum() * dt
    var = (p * (lw - mean) ** 2).sum() * dt
    assert abs(float(var) - out.metrics["var_log_w"]) < 0.02 * float(var)
    (0.5 * var).backward()
    exact = torch.stack([ref.mu.grad, ref.log_s.grad])
    assert exact.abs().min() > 0.1
    assert torch.allclose(got, exact, rtol=0.03, atol=0.01), (got, exact)

    grads = []
    for kw in ({}, {"ml_fraction": 1.0}, {"ml_fraction": 0.3}):
        c = FixedGaussianGen(torch.zeros(1), -0.2, 1.5)
        logvar_data(c, u, data[:500], **kw).loss.backward()
        grads.append(torch.stack([c.mu.grad, c.log_s.grad]))
    b = FixedGaussianGen(torch.zeros(1), -0.2, 1.5)
    klz(b, data[:500]).loss.backward()
    assert torch.allclose(grads[1], torch.stack([b.mu.grad, b.log_s.grad]))
    assert not torch.allclose(grads[0], grads[1], rtol=0.1)
    assert torch.allclose(grads[2], 0.7 * grads[0] + 0.3 * grads[1])
    # the clip bounds what one far-off frame can do: with clip 0.5 no frame weighs more than 0.5
    far = torch.cat([data[:499], torch.tensor([[9.0]], dtype=torch.float64)])
    d = FixedGaussianGen(torch.zeros(1), -0.2, 1.5)
    e = FixedGaussianGen(torch.zeros(1), -0.2, 1.5)
    logvar_data(d, u, far, clip=0.5).loss.backward()
    logvar_data(e, u, far, clip=1e9).loss.backward()
    assert not torch.allclose(d.log_s.grad, e.log_s.grad, rtol=0.1)
    for bad in ({"ml_fraction": -0.1}, {"clip": 0.0}):
        with pytest.raises(InputError):
            logvar_data(FixedGaussianGen(torch.zeros(1), -0.2, 1.5), u, data[:10], **bad)


def test_alpha2_resampling_follows_the_exact_alpha2_gradient():
    # resampling with probability w^2 / sum w^2 and taking -mean log q: in expectation the gradient is
    # -E_q[w^2 grad log q] / E_q[w^2], the exact gradient of D_2(p || q) = log E_q[w^2] up to its sign
    torch.manual_seed(0)
    from boltzflow.losses import alpha2_resampled

    m_p = torch.tensor([0.4, -0.2], dtype=torch.float64)

    def u(x):
        return 0.5 * (x.double() - m_p).pow(2).sum(-1)

    flow = affine_flow(2).double()
    g = torch.Generator().manual_seed(3)
    grads = []
    for _ in range(60):
        out = alpha2_resampled(flow, u, 2000, generator=g, pool=4)
        assert out.energy_evals == 8000 and 0 < out.metrics["ess_w2"] <= 8000
        flow.zero_grad()
        out.loss.backward()
        grads.append(flow.bijection.layers[0].t.grad.clone())
    g_mean = torch.stack(grads).mean(0)
    # exact: q = N(0, I), p = N(m, I): w^2 ∝ exp(2 m.x), so E[w^2 (x - t)] / E[w^2] = 2 m and the gradient
    # of -log q with respect to the shift t is -(x - t): expected gradient -2 m
    assert torch.allclose(g_mean, -2 * m_p, atol=0.05), g_mean


def test_path_gradient_is_exact_per_sample_and_vanishes_at_the_target():
    """x = mu + s z, u = (x - 1)^2: reverse KL's gradient is d/dmu = 2 (mu - 1), d/dlog s = 2 s^2 - 1.
    The path estimator per sample is g * dx/dtheta with g = d/dx (u + log q) = 2 (x - 1) - z / s, so its
    batch mean equals the exact gradient up to the batch's own moments; at q = p every sample's is 0."""
    z = torch.randn(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gen = FixedGaussianGen(z, mu=0.2, s=1.5)
    out = klx_path(gen, quad_u, len(z))
    out.loss.backward()
    zz, x = z, 0.2 + 1.5 * z
    g = 2 * (x - 1.0) - zz / 1.5
    assert gen.mu.grad.item() == pytest.approx(float(g.mean()), rel=1e-10)
    assert gen.log_s.grad.item() == pytest.approx(float((g * 1.5 * zz).mean()), rel=1e-10)
    assert gen.mu.grad.item() == pytest.approx(2 * (0.2 - 1.0), abs=0.05)
    assert gen.log_s.grad.item() == pytest.approx(2 * 1.5**2 - 1, abs=0.1)
    assert out.metrics["kl"] == pytest.approx(float((quad_u(x[:, None]) + gen.log_prob(x[:, None])).detach().mean()), rel=1e-10)
    exact = FixedGaussianGen(z[:64], mu=1.0, s=math.sqrt(0.5))
    klx_path(exact, quad_u, 64).loss.backward()
    assert abs(exact.mu.grad.item()) < 1e-12 and abs(exact.log_s.grad.item()) < 1e-12
    plain = FixedGaussianGen(z[:64], mu=1.0, s=math.sqrt(0.5))
    klx(plain, quad_u, 64).loss.backward()  # the total-derivative estimator is noisy even at q = p
    assert abs(plain.log_s.grad.item()) > 1e-3


def test_path_gradient_cap_rescales_each_sample_to_grad_max():
    """grad_max caps each sample's |g| = |d(u + log q)/dx|: samples under the cap keep their term of the
    exact per-sample gradient, those over it are shrunk to norm grad_max (same direction)."""
    z = torch.randn(2000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = 0.2 + 1.5 * z
    g = 2 * (x - 1.0) - z / 1.5
    cap = float(g.abs().median())
    gen = FixedGaussianGen(z, mu=0.2, s=1.5)
    out = klx_path(gen, quad_u, len(z), grad_max=cap)
    out.loss.backward()
    gc = g * torch.clamp(cap / g.abs(), max=1.0)
    assert gen.mu.grad.item() == pytest.approx(float(gc.mean()), rel=1e-10)
    assert gen.log_s.grad.item() == pytest.approx(float((gc * 1.5 * z).mean()), rel=1e-10)
    assert out.metrics["path_grad_capped"] == pytest.approx(float((g.abs() > cap).double().mean()))
    assert out.metrics["path_grad_rms"] == pytest.approx(float(g.pow(2).mean().sqrt()), rel=1e-10)  # before the cap
    loose = FixedGaussianGen(z, mu=0.2, s=1.5)
    klx_path(loose, quad_u, len(z), grad_max=1e12).loss.backward()
    assert loose.mu.grad.item() == pytest.approx(float(g.mean()), rel=1e-10)
