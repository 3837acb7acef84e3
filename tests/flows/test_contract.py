"""One contract for every bijection: exact inverse, log-det = autograd Jacobian slogdet (float64),
gradients reach every parameter, save/load round trip."""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.flows.base import Compose, Inverse
from boltzflow.flows.builders import realnvp, spline_flow
from boltzflow.flows.checkpoint import load_model, register_builder, save_model
from boltzflow.flows.couplings import (
    ActNorm,
    AffineCoupling,
    CircularShift,
    Permute,
    Reverse,
    SplineCoupling,
)

DIM = 5
MASK = torch.tensor([True, False, True, False, False])
MASK2 = torch.tensor([True, True, False, False, False])


def _case(name: str):
    """(bijection, circular dims, context_dim) for a named case; float64, fresh init."""
    if name == "affine":
        return AffineCoupling(DIM, MASK, hidden=16), [], 0
    if name == "affine-conditional":
        return AffineCoupling(DIM, MASK, hidden=16, depth=3, context_dim=3), [], 3
    if name == "spline":
        return SplineCoupling(DIM, MASK, hidden=16, bins=6, bound=2.0), [], 0
    if name == "spline-circular":
        return SplineCoupling(DIM, MASK2, hidden=16, bins=5, bound=2.0, circular=[1, 3]), [1, 3], 0
    if name == "spline-circular-noshift":
        return SplineCoupling(DIM, MASK2, hidden=16, bins=5, circular=[1, 3, 4], circular_shift=False), [1, 3, 4], 0
    if name == "spline-circular-conditional":
        return SplineCoupling(DIM, MASK, hidden=16, bins=4, bound=2.0, circular=[0, 4], context_dim=2), [0, 4], 2
    if name == "spline-context-only":  # all dims transformed, conditioned on the context alone
        return SplineCoupling(DIM, torch.zeros(DIM, dtype=torch.bool), hidden=8, bins=4, bound=2.0,
                              circular=[2], context_dim=3), [2], 3
    if name == "affine-context-only-1d":
        return AffineCoupling(1, torch.tensor([False]), hidden=8, context_dim=2), [], 2
    if name == "permute":
        return Permute([3, 0, 4, 1, 2]), [], 0
    if name == "reverse":
        return Reverse(DIM), [], 0
    if name == "actnorm":
        return ActNorm(DIM, circular=[2]), [2], 0
    if name == "circular-shift":
        return CircularShift(DIM, [0, 3]), [0, 3], 0
    if name == "realnvp-builder":
        return realnvp(DIM, blocks=2, hidden=16), [], 0
    if name == "realnvp-builder-conditional":
        return realnvp(DIM, blocks=1, hidden=16, context_dim=4), [], 4
    if name == "spline-builder-1d-conditional":
        return spline_flow(1, blocks=2, hidden=8, bins=4, bound=2.0, context_dim=2), [], 2
    if name == "spline-builder-circular":
        return spline_flow(DIM, blocks=2, hidden=16, bins=4, bound=2.0, circular=[1, 2]), [1, 2], 0
    if name == "spline-blind":  # dims 0 and 2 pass through; only 0 is seen by the conditioner
        return SplineCoupling(DIM, MASK, hidden=8, bins=4, bound=2.0, circular=[0], blind=[2]), [0], 0
    if name == "spline-builder-lead":  # q(x_lead) q(x_rest | x_lead), lead dims circular
        return spline_flow(DIM, blocks=2, hidden=8, bins=4, bound=2.0, circular=[1, 3], lead=[1, 3],
                           lead_blocks=2), [1, 3], 0
    if name == "compose-mixed":
        # after Reverse the circular dim 4 sits at 0: the shift rotates it, the affine only reads it
        layers = [ActNorm(DIM, circular=[4]), SplineCoupling(DIM, MASK, hidden=8, circular=[4]), Reverse(DIM),
                  CircularShift(DIM, [0]), AffineCoupling(DIM, torch.tensor([True, False, True, False, True]), hidden=8)]
        return Compose(layers), [4], 0
    if name == "inverse-spline":
        return Inverse(SplineCoupling(DIM, MASK, hidden=16, bins=6, bound=2.0, circular=[3])), [3], 0
    if name == "inverse-compose":
        return Inverse(Compose([AffineCoupling(DIM, MASK, hidden=8), Permute([1, 2, 3, 4, 0]),
                                AffineCoupling(DIM, MASK, hidden=8, context_dim=1)])), [], 1
    raise KeyError(name)


CASES = [
    "affine", "affine-conditional", "spline", "spline-circular", "spline-circular-noshift",
    "spline-circular-conditional", "spline-context-only", "affine-context-only-1d", "permute", "reverse", "actnorm", "circular-shift", "realnvp-builder",
    "realnvp-builder-conditional", "spline-builder-1d-conditional", "spline-builder-circular", "spline-blind", "spline-builder-lead", "compose-mixed", "inverse-spline", "inverse-compose",
]
PARAMETER_FREE = {"permute", "reverse"}


def _build(name: str, seed: int = 0):
    torch.manual_seed(1234)  # nn.Linear init uses torch's default generator
    bij, circ, ctx_dim = _case(name)
    bij = bij.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move away from the identity initialisation
        for p in bij.parameters():
            p.add_(0.25 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    first = bij.layers[0] if isinstance(bij, Compose) else bij
    return bij, circ, ctx_dim, getattr(first, "dim", DIM)


def _inputs(circ, ctx_dim, dim, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)  # some beyond bound=2 (tails)
    if circ:
        u = (2 * torch.rand(n, len(circ), generator=g, dtype=torch.float64) - 1) * math.pi
        z[:, circ] = u
    ctx = torch.randn(n, ctx_dim, generator=g, dtype=torch.float64) if ctx_dim else None
    return z, ctx


def _angle_diff(a, b):
    return torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi


@pytest.mark.parametrize("name", CASES)
def test_inverse_roundtrip_and_logdets_cancel(name):
    bij, circ, ctx_dim, dim = _build(name)
    z, ctx = _inputs(circ, ctx_dim, dim)
    x, ld = bij(z, context=ctx)
    assert x.shape == z.shape and ld.shape == (z.shape[0],)
    assert torch.isfinite(x).all() and torch.isfinite(ld).all()
    z2, ld2 = bij.inverse(x, context=ctx)
    diff = z2 - z
    if circ:
        diff[:, circ] = _angle_diff(z2[:, circ], z[:, circ])
        assert (x[:, circ] >= -math.pi).all() and (x[:, circ] < math.pi).all()
    assert diff.abs().max() < 1e-8
    assert torch.allclose(ld + ld2, torch.zeros_like(ld), atol=1e-9)
    if name not in PARAMETER_FREE:
        assert (x - z).abs().max() > 1e-3, "perturbed layer should not be the identity"


@pytest.mark.parametrize("name", CASES)
def test_logdet_matches_autograd_jacobian(name):
    bij, circ, ctx_dim, dim = _build(name)
    z, ctx = _inputs(circ, ctx_dim, dim, n=6)
    with torch.no_grad():
        x, ld = bij(z, context=ctx)
        _, ld_inv = bij.inverse(x, context=ctx)
    for i in range(z.shape[0]):
        c = None if ctx is None else ctx[i : i + 1]
        jf = torch.autograd.functional.jacobian(lambda v: bij(v[None], context=c)[0][0], z[i])
        ji = torch.autograd.functional.jacobian(lambda v: bij.inverse(v[None], context=c)[0][0], x[i])
        sf, lf = torch.linalg.slogdet(jf)
        si, li = torch.linalg.slogdet(ji)
        assert sf != 0 and si != 0
        assert abs(float(lf - ld[i])) < 1e-8, (float(lf), float(ld[i]))
        assert abs(float(li - ld_inv[i])) < 1e-8, (float(li), float(ld_inv[i]))


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_every_parameter(name):
    bij, circ, ctx_dim, dim = _build(name)
    params = dict(bij.named_parameters())
    if name in PARAMETER_FREE:
        assert params == {}
        return
    assert params
    z, ctx = _inputs(circ, ctx_dim, dim)
    for direction in ("forward", "inverse"):
        bij.zero_grad()
        fn = bij if direction == "forward" else bij.inverse
        x, ld = fn(z, context=ctx)
        (torch.sin(x).sum() + ld.sum()).backward()
        for pname, p in params.items():
            assert p.grad is not None, f"{direction}: no gradient reaches {pname}"
            assert torch.isfinite(p.grad).all()
            assert p.grad.abs().max() > 0, f"{direction}: zero gradient on {pname}"


def _contract_builder(config, **kw):
    bij, _, _ = _case(config["case"])
    return bij


@pytest.mark.parametrize("name", CASES)
def test_save_load_roundtrip(name, tmp_path):
    register_builder("contract-test-bijection", _contract_builder, overwrite=True)
    bij, circ, ctx_dim, dim = _build(name)
    z, ctx = _inputs(circ, ctx_dim, dim)
    x, ld = bij(z, context=ctx)
    path = save_model(tmp_path / "m.pt", bij, "contract-test-bijection", {"case": name}, fingerprint="fp-1")
    loaded = load_model(path, expected_fingerprint="fp-1")
    assert all(v.dtype == torch.float64 for v in loaded.state_dict().values() if v.is_floating_point())
    x2, ld2 = loaded(z, context=ctx)
    assert torch.equal(x2, x.detach()) and torch.equal(ld2, ld.detach())
    z3, _ = loaded.inverse(x2, context=ctx)
    z3d = z3 - z
    if circ:
        z3d[:, circ] = _angle_diff(z3[:, circ], z[:, circ])
    assert z3d.abs().max() < 1e-9
