"""Core flow objects: composition of bijections (the :class:`Bijection` base lives in
:mod:`boltzflow.core.bijection`), base distributions, Flow.

Conventions (design.md): ``forward`` maps latent -> configuration, ``forward(z) -> (x, logdet)``
with ``logdet = log|det dx/dz|`` of shape (batch,); ``inverse(x) -> (z, logdet)`` with
``logdet = log|det dz/dx|``. Tensors are flat ``(batch, dim)`` unless a bijection says otherwise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..core.bijection import Bijection


class Compose(Bijection):
    """Sequential composition: ``forward`` applies layers[0], layers[1], ... in order."""

    def __init__(self, layers: Sequence[Bijection]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, z, context=None):
        logdet = z.new_zeros(z.shape[0])
        for layer in self.layers:
            z, ld = layer(z, context=context)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, x, context=None):
        logdet = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x, context=context)
            logdet = logdet + ld
        return x, logdet


class Inverse(Bijection):
    """Swap forward and inverse of a bijection."""

    def __init__(self, bijection: Bijection):
        super().__init__()
        self.bijection = bijection

    def forward(self, z, context=None):
        return self.bijection.inverse(z, context=context)

    def inverse(self, x, context=None):
        return self.bijection(x, context=context)


class BaseDistribution(nn.Module):
    """A latent distribution over flat ``(batch, dim)`` vectors."""

    dim: int

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _ref(self) -> torch.Tensor:
        return self._dummy

    @property
    def device(self) -> torch.device:
        return self._dummy.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dummy.dtype


class StandardNormal(BaseDistribution):
    """N(0, I) in ``dim`` dimensions (optionally scaled by ``std``)."""

    def __init__(self, dim: int, std: float = 1.0):
        super().__init__()
        self.dim = int(dim)
        self.std = float(std)
        self.register_buffer("_dummy", torch.zeros(()))

    def sample(self, n, generator=None):
        z = torch.randn(n, self.dim, generator=generator, device=self.device, dtype=self.dtype)
        return z * self.std

    def log_prob(self, z):
        return -0.5 * (z / self.std).pow(2).sum(-1) - self.dim * (0.5 * math.log(2 * math.pi) + math.log(self.std))


class MixedBase(BaseDistribution):
    """Normal on most dimensions, uniform on [-pi, pi) on ``circular`` dimensions (torsions)."""

    def __init__(self, dim: int, circular: Sequence[int] = ()):
        super().__init__()
        self.dim = int(dim)
        mask = torch.zeros(self.dim, dtype=torch.bool)
        mask[list(circular)] = True
        self.register_buffer("circular_mask", mask)
        self.register_buffer("_dummy", torch.zeros(()))

    def sample(self, n, generator=None):
        z = torch.randn(n, self.dim, generator=generator, device=self.device, dtype=self.dtype)
        u = torch.rand(n, self.dim, generator=generator, device=self.device, dtype=self.dtype)
        return torch.where(self.circular_mask, (2 * u - 1) * math.pi, z)

    def log_prob(self, z):
        normal = -0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)
        inside = (z >= -math.pi) & (z <= math.pi)
        unif = torch.where(inside, torch.full_like(z, -math.log(2 * math.pi)), torch.full_like(z, -math.inf))
        return torch.where(self.circular_mask, unif, normal).sum(-1)


class Flow(nn.Module):
    """A normalizing flow ``x = bijection(z)``, ``z ~ base``.

    ``log_prob(x) = base.log_prob(z) + log|det dz/dx|`` with ``z = bijection.inverse(x)``.
    """

    def __init__(self, base: BaseDistribution, bijection: Bijection):
        super().__init__()
        self.base = base
        self.bijection = bijection

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        z, ld = self.bijection.inverse(x, context=context)
        return self.base.log_prob(z) + ld

    def sample_and_log_prob(
        self, n: int, generator: torch.Generator | None = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: ``x: (n, dim)`` and ``log q(x): (n,)``, differentiable w.r.t. parameters."""
        z = self.base.sample(n, generator=generator)
        logq_z = self.base.log_prob(z)
        x, ld = self.bijection(z, context=context)
        return x, logq_z - ld

    def sample(self, n: int, generator: torch.Generator | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.sample_and_log_prob(n, generator, context)[0]

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        """Extra per-sample training penalty (e.g. alignment); zero for plain flows. (batch,)"""
        return x.new_zeros(x.shape[0])
