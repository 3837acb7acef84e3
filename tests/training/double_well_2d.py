"""The 2D double well the trainer tests train on (one process, and under DDP in tests/distributed)."""

from __future__ import annotations

import torch


def dw_energy(x: torch.Tensor) -> torch.Tensor:
    """2D double well (kT), minor mode x0 > 0. x: (batch, 2)."""
    x0 = x[:, 0]
    return x0**4 / 4 - 3 * x0**2 + 0.5 * x0 + 0.5 * x[:, 1] ** 2


def data(n: int = 512) -> torch.Tensor:
    """n frames: 10 % near x0 = +2.4, 90 % near -2.4 (fixed seed). (n, 2)."""
    g = torch.Generator().manual_seed(5)
    sign = torch.where(torch.rand(n, generator=g) < 0.1, 1.0, -1.0)
    return torch.stack([sign * 2.4 + 0.4 * torch.randn(n, generator=g), torch.randn(n, generator=g)], 1)
