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
from ..errors import InputError


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


def _phi_cdf(a: float) -> float:
    return 0.5 * (1.0 + math.erf(a / math.sqrt(2.0)))


def tailed_normal_log_norm(tail: float) -> float:
    """log of the normaliser of :func:`tailed_normal_log_prob`'s kernel relative to N(0, 1): ``log Z_a`` with
    ``Z_a = (2 Phi(a) - 1) + 2 phi(a) / a`` (core mass plus the two exponential tails); 0 for ``tail`` 0."""
    if tail == 0:
        return 0.0
    a = float(tail)
    return math.log((2.0 * _phi_cdf(a) - 1.0) + 2.0 * math.exp(-0.5 * a * a) / (a * math.sqrt(2.0 * math.pi)))


def tailed_normal_log_prob(z: torch.Tensor, tail: float = 0.0) -> torch.Tensor:
    """Elementwise log density of the unit normal whose tails beyond ``|z| > tail`` decay exponentially,
    ``exp(a^2 / 2 - a |z|)`` (the density and its slope are continuous at ``|z| = a``), renormalised; ``tail`` 0
    is N(0, 1) itself. With ``a`` 3 the tails hold 0.30 % of the mass per dimension (N(0, 1): 0.27 %), the core
    density is N(0, 1)'s less 2.5e-4 nats, and at ``|z|`` = 5 / 6 the density is 2 / 4.5 nats above N(0, 1)'s:
    a flow whose splines end at a finite bound keeps heavier-than-Gaussian tails there (docs/peptides.md)."""
    normal = -0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)
    if tail == 0:
        return normal
    a = float(tail)
    az = z.abs()
    return torch.where(az > a, 0.5 * a * a - a * az - 0.5 * math.log(2 * math.pi), normal) - tailed_normal_log_norm(a)


def tailed_normal_sample(n: int, dim: int, tail: float, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """``(n, dim)`` draws of :func:`tailed_normal_log_prob`'s density: ``torch.randn`` for ``tail`` 0; else a
    normal truncated to ``[-a, a]`` (inverse CDF) with the core's probability and ``a + Exp(1) / a`` with a
    random sign otherwise (computed in float64)."""
    if tail == 0:
        return torch.randn(n, dim, generator=generator, device=device, dtype=dtype)
    a = float(tail)
    u = torch.rand(3, n, dim, generator=generator, device=device, dtype=torch.float64)
    p_lo, core = 1.0 - _phi_cdf(a), 2.0 * _phi_cdf(a) - 1.0
    p_core = core / math.exp(tailed_normal_log_norm(a))
    inner = torch.special.ndtri(p_lo + u[1] * core)
    outer = torch.where(u[2] < 0.5, -1.0, 1.0) * (a - torch.log1p(-u[1]) / a)
    return torch.where(u[0] < p_core, inner, outer).to(dtype)


def valid_tail(tail: float) -> bool:
    """Whether ``tail`` is a base tail :func:`tailed_normal_log_prob` accepts: 0 (Gaussian) or finite > 0."""
    tail = float(tail)
    return tail == 0 or (math.isfinite(tail) and tail > 0)


def _check_tail(tail: float) -> float:
    tail = float(tail)
    if not valid_tail(tail):
        raise InputError(f"base tail must be 0 (Gaussian) or a positive |z| where the exponential tails start, got {tail}")
    return tail


class StandardNormal(BaseDistribution):
    """N(0, I) in ``dim`` dimensions (optionally scaled by ``std``); ``tail`` > 0: exponential tails beyond
    ``|z| / std > tail`` (:func:`tailed_normal_log_prob`)."""

    def __init__(self, dim: int, std: float = 1.0, tail: float = 0.0):
        super().__init__()
        self.dim = int(dim)
        self.std = float(std)
        self.tail = _check_tail(tail)
        self.register_buffer("_dummy", torch.zeros(()))

    def sample(self, n, generator=None):
        z = tailed_normal_sample(n, self.dim, self.tail, generator, self.device, self.dtype)
        return z * self.std

    def log_prob(self, z):
        return (tailed_normal_log_prob(z / self.std, self.tail) - math.log(self.std)).sum(-1)


class MixedBase(BaseDistribution):
    """Normal on most dimensions, uniform on [-pi, pi) on ``circular`` dimensions (torsions); ``tail`` > 0:
    the normal dimensions have exponential tails beyond ``|z| > tail`` (:func:`tailed_normal_log_prob`)."""

    def __init__(self, dim: int, circular: Sequence[int] = (), tail: float = 0.0):
        super().__init__()
        self.dim = int(dim)
        self.tail = _check_tail(tail)
        mask = torch.zeros(self.dim, dtype=torch.bool)
        mask[list(circular)] = True
        self.register_buffer("circular_mask", mask)
        self.register_buffer("_dummy", torch.zeros(()))

    def sample(self, n, generator=None):
        z = tailed_normal_sample(n, self.dim, self.tail, generator, self.device, self.dtype)
        u = torch.rand(n, self.dim, generator=generator, device=self.device, dtype=self.dtype)
        return torch.where(self.circular_mask, (2 * u - 1) * math.pi, z)

    def log_prob(self, z):
        normal = tailed_normal_log_prob(z, self.tail)
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
