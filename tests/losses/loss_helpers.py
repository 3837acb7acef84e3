"""Small real flows and toy targets for the loss tests (no mocks: real flows, exact densities)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from boltzflow.flows.base import Bijection, Compose, Flow, StandardNormal


class Affine(Bijection):
    """x = exp(s) * z + t, elementwise; log|det dx/dz| = sum s."""

    def __init__(self, dim: int):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(dim))
        self.t = nn.Parameter(torch.zeros(dim))

    def forward(self, z, context=None):
        return z * self.s.exp() + self.t, self.s.sum().expand(z.shape[0])

    def inverse(self, x, context=None):
        return (x - self.t) * (-self.s).exp(), (-self.s.sum()).expand(x.shape[0])


class Coupling(Bijection):
    """Affine coupling: dims where mask is 0 are transformed conditioned on dims where it is 1."""

    def __init__(self, mask: torch.Tensor, hidden: int = 32):
        super().__init__()
        self.register_buffer("mask", mask.float())
        d = mask.numel()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.CELU(), nn.Linear(hidden, hidden), nn.CELU(),
                                 nn.Linear(hidden, 2 * d))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _st(self, xm):
        s, t = self.net(xm).chunk(2, -1)
        s = torch.tanh(s) * 2.0
        return s * (1 - self.mask), t * (1 - self.mask)

    def forward(self, z, context=None):
        s, t = self._st(z * self.mask)
        return z * s.exp() + t, s.sum(-1)

    def inverse(self, x, context=None):
        s, t = self._st(x * self.mask)
        return (x - t) * (-s).exp(), -s.sum(-1)


def affine_flow(dim: int) -> Flow:
    return Flow(StandardNormal(dim), Compose([Affine(dim)]))


def coupling_flow(dim: int, n_layers: int = 6, hidden: int = 32, seed: int = 0) -> Flow:
    torch.manual_seed(seed)  # parameter init only; sampling always uses explicit generators
    layers: list[Bijection] = [Affine(dim)]
    for i in range(n_layers):
        mask = torch.zeros(dim)
        mask[i % 2::2] = 1.0
        layers.append(Coupling(mask, hidden))
    return Flow(StandardNormal(dim), Compose(layers))


class DoubleWell2D:
    """u(x) = x1^4/4 - 3 x1^2 + tilt x1 + x2^2/2; minor mode x1 > 0 (tilt > 0). Exact by quadrature."""

    def __init__(self, tilt: float = 0.5, dim: int = 2):
        self.tilt = tilt
        self.dim = dim
        g = np.linspace(-6, 6, 200001)
        self._grid = g
        e = g**4 / 4 - 3 * g**2 + tilt * g
        p = np.exp(-(e - e.min()))
        self._cdf = np.cumsum(p) / p.sum()
        dx = g[1] - g[0]
        self.log_z = float(np.log(p.sum() * dx) - e.min() + (dim - 1) * 0.5 * math.log(2 * math.pi))
        self.exact_minor_fraction = float(p[g > 0].sum() / p.sum())

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x[:, 0]
        return x1**4 / 4 - 3 * x1**2 + self.tilt * x1 + 0.5 * x[:, 1:].pow(2).sum(-1)

    __call__ = energy

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        x1 = np.interp(rng.random(n), self._cdf, self._grid)
        rest = rng.standard_normal((n, self.dim - 1))
        return torch.tensor(np.column_stack([x1, rest]), dtype=torch.float32)


def minor_fraction(x: torch.Tensor) -> float:
    return float((x[:, 0] > 0).double().mean())
