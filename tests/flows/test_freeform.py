"""E(n)-equivariant free-form flows: symmetry, exact log-density, surrogate log-det gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from boltzflow.flows.egnn import EGNN, remove_com
from boltzflow.flows.freeform import (
    CoMFreeNormal,
    FreeFormConfig,
    FreeFormFlow,
    com_free_basis,
    fff_loss,
    subspace_jacobian,
)


def _perturbed_egnn(n, d, seed=0, scale=0.3, layers=2):
    """An EGNN whose coordinate heads are not zero (a fresh one is the identity)."""
    torch.manual_seed(seed)
    net = EGNN(n, d, layers=layers, hidden=16, features=8).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def _random_orthogonal(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q  # det +-1: rotations and reflections


@pytest.mark.parametrize("d", [2, 3])
def test_egnn_equivariant_to_rotation_translation_permutation(d):
    n = 5
    net = _perturbed_egnn(n, d)
    x = torch.randn(4, n, d, dtype=torch.float64)
    y = net(x)
    assert y.abs().max() > 1e-3 and (y - remove_com(x)).abs().max() > 1e-3  # a non-trivial map
    assert torch.allclose(y.mean(1), torch.zeros(4, d, dtype=torch.float64), atol=1e-12)
    r = _random_orthogonal(d, 1)
    t = torch.randn(1, 1, d, dtype=torch.float64)
    assert torch.allclose(net(x @ r.T + t), y @ r.T, atol=1e-10)
    perm = torch.randperm(n)
    assert torch.allclose(net(x[:, perm]), y[:, perm], atol=1e-10)


def test_fresh_egnn_is_identity_on_com_free_subspace():
    net = EGNN(4, 2, layers=3, hidden=8, features=4).double()
    x = torch.randn(6, 4, 2, dtype=torch.float64)
    assert torch.allclose(net(x), remove_com(x), atol=1e-12)


def test_log_prob_invariant_under_euclidean_group_and_permutations():
    n, d = 4, 3
    flow = FreeFormFlow(n, d, encoder=_perturbed_egnn(n, d, 1), decoder=_perturbed_egnn(n, d, 2))
    x = torch.randn(3, n, d, dtype=torch.float64)
    lq = flow.log_prob(x)
    r = _random_orthogonal(d, 5)
    assert torch.allclose(flow.log_prob(x @ r.T + 2.0), lq, atol=1e-8)
    assert torch.allclose(flow.log_prob(x[:, torch.tensor([2, 0, 3, 1])]), lq, atol=1e-8)


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return self.s * remove_com(x)


@pytest.mark.parametrize("n,d", [(4, 2), (13, 3)])
def test_log_prob_of_scaled_identity_is_com_free_gaussian(n, d):
    """x = s z with z standard normal on V: log q(x) = -|x|^2 / (2 s^2) - (n-1)d/2 log(2 pi s^2); the
    CoM of the input is ignored. A wrong subspace measure or dimension count changes the constant."""
    s = 1.7
    flow = FreeFormFlow(n, d, encoder=_Scale(1 / s), decoder=_Scale(s))
    x = torch.randn(5, n, d, dtype=torch.float64) + 3.0
    xc = remove_com(x)
    dof = (n - 1) * d
    exact = -xc.pow(2).sum((1, 2)) / (2 * s * s) - 0.5 * dof * math.log(2 * math.pi * s * s)
    assert torch.allclose(flow.log_prob(x), exact, atol=1e-10)
    assert torch.allclose(flow.nll_paper(x), -exact - 0.5 * dof * math.log(2 * math.pi), atol=1e-10)


def test_subspace_logdet_matches_finite_differences_in_helmert_coordinates():
    """Brute force: central differences of the decoder along the orthonormal basis of V."""
    n, d = 3, 2
    net = _perturbed_egnn(n, d, 3, scale=0.5)
    z = remove_com(torch.randn(2, n, d, dtype=torch.float64))
    jac = subspace_jacobian(net, z)
    q = com_free_basis(n, d)
    eps = 1e-6
    for b in range(2):
        cols = []
        for k in range(q.shape[1]):
            dz = (eps * q[:, k]).reshape(1, n, d)
            col = (net(z[b:b + 1] + dz) - net(z[b:b + 1] - dz)).reshape(-1) / (2 * eps)
            cols.append(q.T @ col)
        fd = torch.stack(cols, 1)
        assert torch.allclose(jac[b], fd, atol=1e-7)
        assert abs(torch.linalg.slogdet(jac[b])[1] - torch.linalg.slogdet(fd)[1]) < 1e-6
    assert torch.linalg.slogdet(jac)[1].abs().max() > 1e-2  # not trivially the identity


def test_base_samples_have_identity_covariance_on_subspace():
    base = CoMFreeNormal(4, 2)
    z = base.sample(40000, torch.Generator().manual_seed(0), dtype=torch.float64)
    q = com_free_basis(4, 2)
    c = z.reshape(len(z), -1) @ q
    cov = c.T @ c / len(c)
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=0.03)
    assert z.mean(1).abs().max() < 1e-12


class _Linear(nn.Module):
    """x -> Q A Q^T x on V with a trainable A ((n-1)d square)."""

    def __init__(self, a, n, d):
        super().__init__()
        self.a, self.q, self.n, self.d = nn.Parameter(a), com_free_basis(n, d), n, d

    def forward(self, x):
        flat = x.reshape(len(x), -1) @ self.q @ self.a.T @ self.q.T
        return flat.reshape(len(x), self.n, self.d)


def test_surrogate_gradient_is_exact_logdet_gradient_in_expectation():
    """With g the exact inverse of f(x) = A x on V, the mean surrogate gradient over many probes equals
    grad_A of -log|det A| = -A^{-T} (plus the latent term's exact gradient)."""
    n, d = 3, 2
    k = (n - 1) * d
    torch.manual_seed(0)
    a = torch.eye(k, dtype=torch.float64) + 0.2 * torch.randn(k, k, dtype=torch.float64)
    enc = _Linear(a.clone(), n, d)
    dec = _Linear(torch.linalg.inv(a), n, d)
    x = remove_com(torch.randn(1, n, d, dtype=torch.float64)).expand(20000, n, d).contiguous()
    out = fff_loss(enc, dec, x, recon_weight=1.0, generator=torch.Generator().manual_seed(1))
    assert float(out.recon) < 1e-20
    out.loss.backward()
    xv = (x[0].reshape(-1) @ enc.q)  # x in subspace coordinates
    zv = a @ xv
    exact = torch.outer(zv, xv) - torch.linalg.inv(a).T  # d/dA [0.5 |A x|^2 - log|det A|]
    err = (enc.a.grad - exact).abs().max()
    assert err < 0.03, err  # probe noise ~ |A^-1| / sqrt(20000) ~ 0.01
    # a single probe is noisy: the estimator is stochastic, not the exact value
    enc.a.grad = None
    fff_loss(enc, dec, x[:1], 1.0, torch.Generator().manual_seed(2)).loss.backward()
    assert (enc.a.grad - exact).abs().max() > 1e-3


def test_surrogate_gradient_matches_trace_formula_for_egnns():
    """For any encoder/decoder pair the probe average of the surrogate's gradient is
    grad tr(SG(J_g(f(x))) J_f(x)) on V; checked against full Jacobians (brute force)."""
    n, d = 3, 2
    enc, dec = _perturbed_egnn(n, d, 4, 0.3, 1), _perturbed_egnn(n, d, 5, 0.3, 1)
    x1 = remove_com(torch.randn(1, n, d, dtype=torch.float64))
    x = x1.expand(6000, n, d).contiguous()
    # surrogate only: subtract the latent and reconstruction terms' gradients (computed exactly below)
    out = fff_loss(enc, dec, x, recon_weight=1.0, generator=torch.Generator().manual_seed(3))
    params = list(enc.parameters())
    g_total = torch.autograd.grad(out.loss, params, allow_unused=True)
    z = enc(x1)
    rest = (0.5 * z.pow(2).sum() + (dec(z) - x1).pow(2).sum())
    g_rest = torch.autograd.grad(rest, params, allow_unused=True)
    from torch.func import jacrev

    q = com_free_basis(n, d)
    with torch.no_grad():
        jg = q.T @ jacrev(lambda v: dec(v.reshape(1, n, d)).reshape(-1))(enc(x1).reshape(-1)) @ q
    jf = q.T @ jacrev(lambda v: enc(v.reshape(1, n, d)).reshape(-1), )(x1.reshape(-1)) @ q
    g_trace = torch.autograd.grad(-(jg.detach() * jf.T).sum(), params, allow_unused=True)
    num = den = 0.0
    for p, gt, gr, gx in zip(params, g_total, g_rest, g_trace):
        gt, gr, gx = (torch.zeros_like(p) if g is None else g for g in (gt, gr, gx))
        num += float((gt - gr - gx).pow(2).sum())
        den += float(gx.pow(2).sum())
    assert den > 1e-6
    assert math.sqrt(num / den) < 0.1, math.sqrt(num / den)


def test_sample_and_log_prob_consistent_with_log_prob_when_inverse_is_exact():
    n, d = 4, 2
    flow = FreeFormFlow(n, d, encoder=_Scale(0.5), decoder=_Scale(2.0))
    x, lq = flow.sample_and_log_prob(10, torch.Generator().manual_seed(0))
    assert x.shape == (10, n, d)
    assert torch.allclose(flow.log_prob(x), lq, atol=1e-5)


def test_exact_log_density_builds_no_autograd_graph():
    """The Jacobian behind log q is for reweighting: keeping its graph (with trainable EGNNs) cost
    ~17 GB for 256 LJ13 frames and killed the evaluation; it must come back without one, in chunks."""
    flow = FreeFormFlow(5, 3, FreeFormConfig(layers=2, hidden=16, features=8))
    assert any(p.requires_grad for p in flow.parameters())
    z = torch.randn(7, 5, 3)
    x, lq = flow.log_prob_latent(z, chunk=3)
    assert not lq.requires_grad and lq.grad_fn is None
    _, lq_one = flow.log_prob_latent(z, chunk=7)
    assert torch.allclose(lq, lq_one, atol=1e-5)


def test_training_reduces_free_form_loss_on_a_scaled_gaussian():
    """A few Adam steps on data x = 2 z move the flow's NLL towards the data's exact value."""
    n, d = 4, 2
    torch.manual_seed(0)
    flow = FreeFormFlow(n, d, FreeFormConfig(layers=2, hidden=16, features=8))
    base = CoMFreeNormal(n, d)
    data = 2.0 * base.sample(256, torch.Generator().manual_seed(1))
    exact_nll = float(-(-data.pow(2).sum((1, 2)) / 8 - 3 * math.log(2 * math.pi * 4)).mean())
    nll0 = float(-flow.log_prob(data).mean())
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        opt.zero_grad()
        fff_loss(flow.encode, flow.decode, data[torch.randint(0, 256, (64,), generator=g)], 10.0, g).loss.backward()
        opt.step()
    nll1 = float(-flow.log_prob(data).mean())
    assert nll1 < nll0 - 0.5 * (nll0 - exact_nll), (nll0, nll1, exact_nll)
