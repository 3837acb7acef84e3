"""The fused CPU spline kernel gives the torch implementation's values and first derivatives."""

import math

import pytest
import torch

from boltzflow.flows import spline_cpu
from boltzflow.flows import splines as S

pytestmark = pytest.mark.skipif(spline_cpu.load() is None, reason="no C++ compiler for the spline kernel")


def _torch_spline(x, p, circular, inverse, k):
    w, h, d = p[..., :k], p[..., k:2 * k], p[..., 2 * k:]
    if circular:
        return S.circular_rq_spline(x, w, h, d, inverse=inverse)
    return S.unconstrained_rq_spline(x, w, h, d, 5.0, inverse=inverse)


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [2, 8])
def test_fused_matches_torch(circular, inverse, k):
    g = torch.Generator().manual_seed(k + 2 * circular + inverse)
    n = 3000
    n_par = 3 * k if circular else 3 * k - 1
    x = ((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * (math.pi if circular else 6.0)).requires_grad_()
    p = (1.5 * torch.randn(n, n_par, generator=g, dtype=torch.float64)).requires_grad_()
    gy, gl = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    y1, l1 = S.packed_rq_spline(x, p, circular, 5.0, inverse)
    assert y1.grad_fn is not None and "Fused" in type(y1.grad_fn).__name__
    gx1, gp1 = torch.autograd.grad((y1 * gy + l1 * gl).sum(), [x, p])
    y2, l2 = _torch_spline(x, p, circular, inverse, k)
    gx2, gp2 = torch.autograd.grad((y2 * gy + l2 * gl).sum(), [x, p])
    if circular:  # both return angles; compare on the circle
        assert torch.allclose(torch.sin(y1), torch.sin(y2), atol=1e-10) and torch.allclose(torch.cos(y1), torch.cos(y2), atol=1e-10)
    else:
        assert torch.allclose(y1, y2, atol=1e-10)
    assert torch.allclose(l1, l2, atol=1e-9)
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-8)
    assert torch.allclose(gp1, gp2, rtol=1e-6, atol=1e-8)
    if not circular:  # identity tails outside [-5, 5]
        out = x.detach().abs() > 5
        assert out.any() and torch.equal(y1.detach()[out], x.detach()[out]) and torch.all(l1.detach()[out] == 0)


def test_fused_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    x = ((torch.rand(20, generator=g, dtype=torch.float64) * 2 - 1) * 4).requires_grad_()
    p = torch.randn(20, 23, generator=g, dtype=torch.float64).requires_grad_()
    for inverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: S.packed_rq_spline(a, b, False, 5.0, inverse), (x, p))


def test_flow_log_prob_same_with_and_without_kernel(monkeypatch):
    from boltzflow.flows.builders import make_flow

    torch.manual_seed(0)
    f = make_flow(12, kind="spline", circular=[8, 9, 10, 11], blocks=2, hidden=16).double()
    for prm in f.parameters():  # move away from the identity initialisation
        prm.data.add_(0.05 * torch.randn_like(prm))
    z = f.sample(64).detach()
    fused = f.log_prob(z)
    monkeypatch.setattr(spline_cpu, "usable", lambda x: False)
    plain = f.log_prob(z)
    assert (fused - plain).abs().max() < 1e-7 and (fused - fused.mean()).abs().max() > 0.1


@pytest.mark.parametrize("circular", [False, True])
def test_fused_without_gradients_gives_the_same_values(circular):
    g = torch.Generator().manual_seed(11)
    n_par = 24 if circular else 23
    x = (torch.rand(500, generator=g, dtype=torch.float64) * 2 - 1) * 3
    p = torch.randn(500, n_par, generator=g, dtype=torch.float64)
    for inverse in (False, True):
        with torch.no_grad():
            y0, l0 = S.packed_rq_spline(x, p, circular, 5.0, inverse)
        y1, l1 = S.packed_rq_spline(x, p.clone().requires_grad_(), circular, 5.0, inverse)
        assert y0.grad_fn is None and y1.grad_fn is not None
        assert torch.allclose(y0, y1.detach(), atol=1e-12) and torch.allclose(l0, l1.detach(), atol=1e-12)


def test_spline_kernel_benchmark_runs_and_reports_ratios(capsys):
    """benchmarks/spline_kernel.py at toy size: every spline kind and mode, ratios measured in the same run."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from spline_kernel import main

    assert main(["-n", "256", "--repeats", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["kind"], r["mode"]) for r in out["results"]} == {(k, m) for k in ("bounded", "circular")
                                                               for m in ("train", "sample")}
    assert all(r["kernel_ms"] > 0 and r["speedup_vs_torch"] > 0 for r in out["results"])
