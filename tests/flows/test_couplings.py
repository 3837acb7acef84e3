"""Splines, couplings and builders: identity init, spline geometry, periodicity, normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.errors import InputError
from boltzflow.flows.builders import flow_config, make_flow, realnvp, spline_flow
from boltzflow.flows.couplings import ActNorm, AffineCoupling, Permute, SplineCoupling
from boltzflow.flows.nn import MLP
from boltzflow.flows.splines import circular_rq_spline, rational_quadratic_spline, unconstrained_rq_spline


def _perturb(module, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _rand_params(shape, k, seed=0, n_deriv=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, k, generator=g, dtype=torch.float64)
    h = torch.randn(*shape, k, generator=g, dtype=torch.float64)
    d = torch.randn(*shape, n_deriv if n_deriv is not None else k - 1, generator=g, dtype=torch.float64)
    return w, h, d


def test_mlp_zero_init_and_validation():
    m = MLP(3, 4, hidden=8, depth=3)
    assert len([l for l in m.net if isinstance(l, torch.nn.Linear)]) == 3
    assert torch.equal(m(torch.randn(5, 3)), torch.zeros(5, 4))
    with pytest.raises(InputError, match="activation"):
        MLP(3, 4, activation="swishy")
    with pytest.raises(InputError, match="depth"):
        MLP(3, 4, depth=0)


@pytest.mark.parametrize("kind", ["realnvp", "spline", "spline-circular"])
def test_flows_start_as_identity(kind):
    circ = [1] if kind == "spline-circular" else []
    flow = make_flow(4, "spline" if kind.startswith("spline") else "realnvp", circular=circ, blocks=2, hidden=8)
    z = flow.base.sample(32, generator=torch.Generator().manual_seed(0))
    x, ld = flow.bijection(z)
    assert torch.allclose(x, z, atol=1e-6) and torch.allclose(ld, torch.zeros(32), atol=1e-6)


def test_unconstrained_spline_geometry():
    k, bound = 7, 3.0
    w, h, d = (t.expand(200, -1) for t in _rand_params((1,), k, seed=3))  # one spline, 200 points
    x = torch.linspace(-5, 5, 200, dtype=torch.float64)
    y, ld = unconstrained_rq_spline(x, w, h, d, bound)
    # monotone, fixes the interval ends, identity tails
    assert (y[1:] > y[:-1]).all()
    tails = x.abs() > bound
    assert torch.equal(y[tails], x[tails]) and torch.equal(ld[tails], torch.zeros_like(ld[tails]))
    ends = torch.tensor([-bound, bound], dtype=torch.float64)
    ye, _ = unconstrained_rq_spline(ends, w[:2], h[:2], d[:2], bound)
    assert torch.allclose(ye, ends, atol=1e-12)
    # derivative is continuous at the bound (boundary slope 1)
    eps = 1e-6
    xb = torch.tensor([bound - eps, bound + eps], dtype=torch.float64)
    _, ldb = unconstrained_rq_spline(xb, w[:2], h[:2], d[:2], bound)
    assert abs(float(ldb[0])) < 1e-4
    # exact inverse
    xi, ldi = unconstrained_rq_spline(y, w, h, d, bound, inverse=True)
    assert torch.allclose(xi, x, atol=1e-10) and torch.allclose(ld + ldi, torch.zeros_like(ld), atol=1e-10)


def test_rq_spline_derivative_matches_finite_difference():
    k = 5
    w, h, _ = _rand_params((50,), k, seed=4)
    d = torch.nn.functional.softplus(torch.randn(50, k + 1, generator=torch.Generator().manual_seed(5),
                                                 dtype=torch.float64)) + 0.05
    x = torch.linspace(-0.99, 1.99, 50, dtype=torch.float64)
    eps = 1e-6
    y, ld = rational_quadratic_spline(x, w, h, d, -1.0, 2.0, -3.0, 1.0)
    yp, _ = rational_quadratic_spline(x + eps, w, h, d, -1.0, 2.0, -3.0, 1.0)
    ym, _ = rational_quadratic_spline(x - eps, w, h, d, -1.0, 2.0, -3.0, 1.0)
    fd = (yp - ym) / (2 * eps)
    assert torch.allclose(torch.log(fd), ld, atol=1e-6)
    assert (y >= -3.0).all() and (y <= 1.0).all()


def test_circular_spline_is_a_circle_diffeomorphism():
    k = 6
    w, h, d = (t.expand(3, -1) for t in _rand_params((1,), k, seed=7, n_deriv=k))  # one spline
    ends = torch.tensor([-math.pi, math.pi - 1e-9, -math.pi + 1e-9], dtype=torch.float64)
    y, ld = circular_rq_spline(ends, w, h, d)
    assert abs(float(y[0]) + math.pi) < 1e-12  # -pi is fixed
    # equal slopes on both sides of the seam: C^1 on the circle
    assert abs(float(ld[1] - ld[2])) < 1e-6
    # periodic input: theta and theta + 2 pi map to the same point
    t = torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)
    y1, _ = circular_rq_spline(t, w, h, d)
    y2, _ = circular_rq_spline(t + 2 * math.pi, w, h, d)
    assert torch.allclose(y1, y2, atol=1e-12)


def test_circular_conditioner_is_periodic():
    layer = _perturb(SplineCoupling(3, torch.tensor([True, False, False]), hidden=8, circular=[0, 2])).double()
    z = torch.tensor([[0.4, 0.7, -1.0], [2.5, -1.2, 2.0]], dtype=torch.float64)
    z2 = z.clone()
    z2[:, 0] += 2 * math.pi
    assert torch.allclose(layer(z)[0][:, 1:], layer(z2)[0][:, 1:], atol=1e-12)


def test_affine_scale_is_bounded():
    layer = AffineCoupling(2, torch.tensor([True, False]), hidden=4, scale_clamp=1.5)
    with torch.no_grad():
        layer.net.net[-1].bias.fill_(100.0)
    _, ld = layer(torch.randn(10, 2))
    assert torch.allclose(ld, torch.full((10,), 1.5), atol=1e-5)


def test_actnorm_data_init_standardises():
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(4000, 3, generator=g, dtype=torch.float64)
    an = ActNorm(3, circular=[2]).double()
    an.initialize(x)
    z, ld = an.inverse(x)
    assert torch.allclose(z[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(z[:, :2].std(0), torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert torch.equal(z[:, 2], x[:, 2])  # circular dim untouched
    assert torch.allclose(ld, -torch.log(x[:, :2].std(0)).sum().expand(4000))


def test_builders_structure_and_seeded_masks():
    f = realnvp(6, blocks=3, hidden=8)
    assert len(f.layers) == 12 and all(isinstance(l, AffineCoupling) for l in f.layers)
    # each block transforms every dim exactly twice
    for b in range(3):
        counts = sum((~l.mask).long() for l in f.layers[4 * b : 4 * b + 4])
        assert torch.equal(counts, torch.full((6,), 2))
    g = realnvp(6, blocks=3, hidden=8)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(f.layers, g.layers))
    h = realnvp(6, blocks=3, hidden=8, seed=1)
    assert any(not torch.equal(a.mask, b.mask) for a, b in zip(f.layers, h.layers))
    s = spline_flow(5, blocks=2, hidden=8, circular=[0])
    assert len(s.layers) == 4 and all(isinstance(l, SplineCoupling) for l in s.layers)
    assert all(bool(l.circular[0]) for l in s.layers)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="every dimension"):
        AffineCoupling(3, torch.tensor([True, True, True]))
    with pytest.raises(InputError, match="only allowed for conditional"):
        SplineCoupling(3, torch.tensor([False, False, False]))
    with pytest.raises(InputError, match="shape"):
        AffineCoupling(3, torch.tensor([True, False]))
    with pytest.raises(InputError, match="circular"):
        make_flow(4, "realnvp", circular=[1])
    with pytest.raises(InputError, match="unknown flow kind"):
        make_flow(4, "glow")
    with pytest.raises(InputError, match="unknown option"):
        make_flow(4, "realnvp", bins=8)
    with pytest.raises(InputError, match="dim >= 2"):
        make_flow(1)
    with pytest.raises(InputError, match="context"):
        AffineCoupling(3, torch.tensor([True, False, False]), context_dim=2)(torch.randn(4, 3))
    with pytest.raises(InputError, match="shape"):
        AffineCoupling(3, torch.tensor([True, False, False]))(torch.randn(4, 5))
    with pytest.raises(InputError, match="permutation"):
        Permute([0, 0, 1])


def _grid_mass(flow, lo1, hi1, lo2, hi2, n=400):
    a = torch.linspace(lo1, hi1, n + 1, dtype=torch.float64)
    b = torch.linspace(lo2, hi2, n + 1, dtype=torch.float64)
    ac, bc = 0.5 * (a[1:] + a[:-1]), 0.5 * (b[1:] + b[:-1])
    xx = torch.stack(torch.meshgrid(ac, bc, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        p = flow.log_prob(xx).exp()
    return float(p.sum() * (a[1] - a[0]) * (b[1] - b[0]))


@pytest.mark.parametrize("kind,circular", [("realnvp", []), ("spline", []), ("spline", [1])])
def test_flow_density_is_normalised_and_consistent(kind, circular):
    torch.manual_seed(0)
    kw = dict(blocks=2, hidden=16) if kind == "realnvp" else dict(blocks=2, hidden=16, bins=6, bound=3.0)
    flow = _perturb(make_flow(2, kind, circular=circular, **kw), scale=0.15).double()
    box = 10.0
    lo2, hi2 = (-math.pi, math.pi) if circular else (-box, box)
    mass = _grid_mass(flow, -box, box, lo2, hi2)
    x, logq = flow.sample_and_log_prob(20000, generator=torch.Generator().manual_seed(1))
    inside = float(((x[:, 0].abs() < box) & (x[:, 1] >= lo2) & (x[:, 1] < hi2)).double().mean())
    # quadrature of exp(log_prob) over the box == fraction of the flow's samples in the box
    assert inside > 0.95
    assert abs(mass - inside) < 6e-3, (mass, inside)
    assert torch.allclose(flow.log_prob(x[:500]), logq[:500], atol=1e-8)
    if circular:
        assert (x[:, 1] >= -math.pi).all() and (x[:, 1] < math.pi).all()


def test_flow_config_rebuilds_same_architecture():
    cfg = flow_config(6, "spline", circular=[2], blocks=2, hidden=8, bins=4)
    f1, f2 = make_flow(**cfg), make_flow(**cfg)
    assert [k for k in f1.state_dict()] == [k for k in f2.state_dict()]
    assert all(v.shape == f2.state_dict()[k].shape for k, v in f1.state_dict().items())


def test_circular_dims_accept_indices_or_bool_mask():
    as_bool = flow_config(5, "spline", circular=torch.tensor([False, True, False, False, True]))
    assert as_bool["circular"] == [1, 4] == flow_config(5, "spline", circular=(4, 1))["circular"]
    assert flow_config(5, "spline", circular=[-1])["circular"] == [4]
    with pytest.raises(InputError, match="out of range"):
        flow_config(5, "spline", circular=[5])


@pytest.mark.parametrize("kind", ["spline", pytest.param("realnvp", marks=pytest.mark.slow)])
def test_max_likelihood_fit_reaches_exact_entropy(kind):
    """Fit a 2D Many Well pair (exact sampler, exact log Z) by maximum likelihood: the flow's test
    NLL must approach the exact entropy E_p[u] + log Z and keep the minor mode."""
    from boltzflow.systems.toy import ManyWell

    torch.manual_seed(0)
    target = ManyWell(2)
    kw = dict(blocks=2, hidden=32, bins=8, bound=4.0) if kind == "spline" else dict(blocks=8, hidden=64)
    flow = make_flow(2, kind, **kw)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3 if kind == "spline" else 1e-3)
    for _ in range(300 if kind == "spline" else 1000):
        loss = -flow.log_prob(target.sample(256, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt = target.sample(20000, generator=g)
    with torch.no_grad():
        nll = float(-flow.log_prob(xt).mean())
        entropy = float(target.energy(xt.double()).mean() + target.log_z)
        minor = float((flow.sample(20000, generator=g)[:, 0] < 0).float().mean())
    assert entropy - 0.02 < nll < entropy + 0.12, (nll, entropy)
    assert abs(minor - target.exact_minor_fraction) < 0.03
