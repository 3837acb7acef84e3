"""Centring, Kabsch alignment and the capped alignment penalty (science.md sec. 2)."""

import math

import pytest
import torch

from boltzflow.errors import InputError
from boltzflow.transforms.cartesian import (
    align,
    alignment_penalty,
    cap_rotation,
    centre,
    kabsch_rotation,
    prepare_cartesian,
    rotation_angle,
)


def _rot_z(theta):
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


@pytest.fixture
def ref():
    g = torch.Generator().manual_seed(0)
    return centre(torch.randn(1, 10, 3, generator=g, dtype=torch.float64) * 0.3)[0]


def test_kabsch_recovers_rotation(ref):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]
    x = ref[None] @ q.transpose(-1, -2) + 0.7
    assert torch.allclose(align(x, ref), ref[None].expand(5, -1, -1), atol=1e-10)
    r = kabsch_rotation(centre(x), ref)
    assert torch.allclose(torch.linalg.det(r), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0, 2.0, 3.0])
def test_penalty_of_rigid_rotation_is_capped(ref, theta):
    x = (ref @ _rot_z(theta).T)[None] + 0.3  # rotated and translated reference
    lam = 10.0
    rho = torch.sqrt((ref[:, :2] ** 2).sum())  # norm perpendicular to the z axis
    expected = lam * 2 * math.sin(min(theta, math.pi / 3) / 2) * rho
    p = alignment_penalty(x, ref, lambda_align=lam)
    assert p.shape == (1,)
    assert abs(p.item() - expected.item()) < 1e-8


def test_cap_rotation_keeps_axis():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(8, 3, generator=g, dtype=torch.float64)
    a = a / a.norm(dim=-1, keepdim=True)
    from boltzflow.transforms.cartesian import _rotation_about

    t = torch.linspace(0.1, 3.1, 8, dtype=torch.float64)
    r = _rotation_about(a, t)
    c = cap_rotation(r)
    assert torch.allclose(rotation_angle(c), t.clamp(max=math.pi / 3), atol=1e-7)
    assert torch.allclose((c @ a[:, :, None])[..., 0], a, atol=1e-7)  # the axis is unchanged


def test_penalty_gradient_matches_finite_differences(ref):
    g = torch.Generator().manual_seed(3)
    x = (ref @ _rot_z(0.4).T)[None] + 0.02 * torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    x[1] = ref @ _rot_z(1.5).T + 0.02 * torch.randn(10, 3, generator=g, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: alignment_penalty(v, ref), (x,), atol=1e-6)


def test_prepare_cartesian_centres_and_aligns(ref):
    x = torch.cat([ref, ref[:3] + 0.1])[None] @ _rot_z(0.9).T + 1.0  # 10 "heavy" + 3 extra atoms
    heavy = torch.arange(10)
    y = prepare_cartesian(x, heavy, ref)
    assert torch.allclose(y[0, :10], ref, atol=1e-10)
    assert torch.allclose(torch.cdist(y, y), torch.cdist(x, x), atol=1e-10)


def test_shape_error(ref):
    with pytest.raises(InputError):
        alignment_penalty(torch.zeros(2, 4, 3, dtype=torch.float64), ref)


@pytest.mark.parametrize("theta", [0.0, 1e-4, 1.0, math.pi / 3 + 1e-3, 3.1, math.pi - 1e-6])
def test_penalty_gradient_finite_in_float32(ref, theta):
    """Regression: NaN gradients (acos near pi, float32 SVD) once broke Cartesian KLz training."""
    g = torch.Generator().manual_seed(4)
    x = ((ref @ _rot_z(theta).T)[None] + 1e-3 * torch.randn(4, 10, 3, generator=g, dtype=torch.float64)).float()
    x.requires_grad_(True)
    alignment_penalty(x, ref.float()).sum().backward()
    assert torch.isfinite(x.grad).all()
