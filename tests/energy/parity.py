"""One parity check of the native energy against OpenMM (Reference platform), shared by the energy tests
and the chignolin scale check: every per-term energy, and the forces, to a relative tolerance."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b's scale floored at 1e-12)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def assert_native_matches_openmm(ms, x: torch.Tensor, tol: float = 1e-6, label=()) -> dict[str, torch.Tensor]:
    """Native vs OpenMM Reference for system ``ms`` at ``x: (batch, n_atoms, 3)`` nm (float64): the same
    terms, each within ``tol`` relative, the total per configuration within ``tol`` relative, and
    per-configuration forces within ``tol`` relative to the largest force component. Returns the native
    per-term energies."""
    from boltzflow.energy.native import NativeEnergy
    from boltzflow.energy.openmm_bridge import OpenMMEnergy

    with OpenMMEnergy(ms, platform="Reference") as bridge:
        tb = bridge.terms(x)
        xb = x.clone().requires_grad_(True)
        ub = bridge(xb)
        (gb,) = torch.autograd.grad(ub.sum(), xb)
    native = NativeEnergy(ms)
    tn = native.terms(x)
    assert set(tn) == set(tb), (label, sorted(tn), sorted(tb))
    for k in tb:
        assert rel_err(tn[k], tb[k]) <= tol, (*label, k)
    xn = x.clone().requires_grad_(True)
    un = native(xn)
    (gn,) = torch.autograd.grad(un.sum(), xn)
    assert float(((un - ub).abs() / ub.abs()).max().detach()) <= tol, (*label, "total")
    err = (gn - gb).flatten(1).abs().max(1).values / gb.flatten(1).abs().max(1).values
    assert float(err.max()) <= tol, (*label, float(err.max()))
    return tn
