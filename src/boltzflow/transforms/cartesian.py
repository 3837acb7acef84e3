"""Cartesian representation helpers: centring, Kabsch alignment and the alignment penalty.

How rigid-body dofs are handled for Cartesian flows (felardos2023, sec. 3.2): the flow acts on
all ``3 n_heavy`` Cartesian coordinates (an ordinary bijection, log-det exact). Training data
are centred (heavy-atom centroid at the origin) and Kabsch-aligned to a reference with
:func:`prepare_cartesian`, so the flow learns a narrow distribution in the 6 rigid directions;
the :func:`alignment_penalty` keeps generated orientations near the reference during
data-free training. The energy is invariant to those 6 directions, so importance weights
``-u - log q`` are exact for the 3n-dim flow density; the rigid part only adds a near-constant
offset whose fluctuation lowers the ESS a little, it biases nothing when all samples are
reweighted. Centring itself is a projection, not a bijection: it is applied to data
(never inside ``log_prob``), so ``log_prob(sample)`` stays equal to the sampled ``log q``.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

#: Default cap of the rotation angle used in the alignment penalty (science.md sec. 2).
MAX_ROTATION = math.pi / 3


def centre(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Remove the (weighted) centroid: x (batch, m, 3) nm -> (batch, m, 3). weights: (m,) or None."""
    if weights is None:
        c = x.mean(dim=1, keepdim=True)
    else:
        w = weights.to(x) / weights.sum()
        c = (x * w[None, :, None]).sum(dim=1, keepdim=True)
    return x - c


def kabsch_rotation(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Proper rotations R (batch, 3, 3) minimising sum_i |R x_i - ref_i|^2 for centred x (batch, m, 3)
    and centred reference (m, 3). Aligned coordinates: ``x @ R.transpose(-1, -2)``."""
    # SVD in float64: its backward divides by s_i^2 - s_j^2, which float32 resolves poorly
    h = x.to(torch.float64).transpose(-1, -2) @ reference.to(x.device, torch.float64)[None]  # sum x_i ref_i^T
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(-1, -2)
    d = torch.sign(torch.linalg.det(v @ u.transpose(-1, -2))).detach()
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.ones(x.shape[0], 3, dtype=h.dtype, device=x.device)
    diag[:, 2] = d
    return (v @ torch.diag_embed(diag) @ u.transpose(-1, -2)).to(x.dtype)


def rotation_angle(r: torch.Tensor) -> torch.Tensor:
    """Rotation angle in [0, pi] of rotation matrices (batch, 3, 3)."""
    tr = r.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.acos(((tr - 1) / 2).clamp(-1.0, 1.0))


def _rotation_about(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation by angle t (batch,) about unit axes a (batch, 3)."""
    k = torch.zeros(a.shape[0], 3, 3, dtype=a.dtype, device=a.device)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -a[:, 2], a[:, 1], -a[:, 0]
    k = k - k.transpose(-1, -2)
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    return eye + torch.sin(t)[:, None, None] * k + (1 - torch.cos(t))[:, None, None] * (k @ k)


def cap_rotation(r: torch.Tensor, max_angle: float = MAX_ROTATION) -> torch.Tensor:
    """Rotations with the same axis and angle min(angle, max_angle). (batch, 3, 3) -> (batch, 3, 3).

    Differentiable; the axis is only computed for rotations beyond the cap (well conditioned there)."""
    theta = rotation_angle(r)
    over = theta > max_angle
    if not bool(over.any()):
        return r
    ro = r[over]
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    # axis from the symmetric part (robust near pi): sym = cos t I + (1 - cos t) a a^T; cos t from the
    # trace directly (no acos, whose gradient diverges near pi)
    c = ((ro.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    sym = 0.5 * (ro + ro.transpose(-1, -2))
    aat = (sym - c[:, None, None] * eye) / (1 - c)[:, None, None]
    col = aat.diagonal(dim1=-2, dim2=-1).argmax(-1)
    a = aat[torch.arange(ro.shape[0]), :, col]
    a = a / a.norm(dim=-1, keepdim=True)
    skew = torch.stack([ro[:, 2, 1] - ro[:, 1, 2], ro[:, 0, 2] - ro[:, 2, 0], ro[:, 1, 0] - ro[:, 0, 1]], -1)
    sgn = torch.sign((a * skew).sum(-1)).detach()
    a = a * torch.where(sgn == 0, torch.ones_like(sgn), sgn)[:, None]
    capped = _rotation_about(a, torch.full_like(c, max_angle))
    out = r.clone()
    out[over] = capped
    return out


def alignment_penalty(x: torch.Tensor, reference: torch.Tensor, lambda_align: float = 10.0,
                      max_angle: float = MAX_ROTATION, detach_rotation: bool = False) -> torch.Tensor:
    """science.md sec. 2: ``lambda_align * || x_c - x_c R^T ||`` per sample (batch,), nm x lambda.

    x: (batch, m, 3) heavy atoms nm; reference: (m, 3) nm (centred here). x_c is x centred; R
    the Kabsch rotation of x_c onto the reference with its angle capped at ``max_angle``; the
    penalty is the L2 distance between the coordinates and their aligned image, zero when x is
    aligned with the reference, ``2 sin(min(angle, cap)/2) * rho`` for a rigid rotation (rho:
    radius of gyration-like norm perpendicular to the axis). Differentiable through the SVD;
    ``detach_rotation=True`` treats R as a constant (for near-degenerate, e.g. linear, molecules).
    """
    if x.dim() != 3 or x.shape[1:] != reference.shape:
        raise InputError(f"alignment needs x of shape (batch, {tuple(reference.shape)}), got {tuple(x.shape)}")
    xc = centre(x)
    ref = reference.to(x) - reference.to(x).mean(0, keepdim=True)
    if detach_rotation:
        with torch.no_grad():
            r = cap_rotation(kabsch_rotation(xc, ref), max_angle)
    else:
        r = cap_rotation(kabsch_rotation(xc, ref), max_angle)
    diff = xc - xc @ r.transpose(-1, -2)
    return lambda_align * torch.sqrt(diff.pow(2).sum(dim=(-1, -2)) + 1e-20)


def align(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Centre x (batch, m, 3) and rotate it onto the centred reference (m, 3) (no cap)."""
    xc = centre(x)
    ref = reference.to(x) - reference.to(x).mean(0, keepdim=True)
    r = kabsch_rotation(xc, ref)
    return xc @ r.transpose(-1, -2)


def prepare_cartesian(x_all: torch.Tensor, heavy: torch.Tensor, reference_heavy: torch.Tensor) -> torch.Tensor:
    """Translate and rotate all-atom frames (batch, n_atoms, 3) so their heavy atoms are centred and
    Kabsch-aligned to ``reference_heavy`` (m, 3). Use on data before Cartesian-flow training."""
    xh = x_all[:, heavy]
    c = xh.mean(dim=1, keepdim=True)
    ref = reference_heavy.to(x_all) - reference_heavy.to(x_all).mean(0, keepdim=True)
    r = kabsch_rotation(xh - c, ref)
    return (x_all - c) @ r.transpose(-1, -2)
