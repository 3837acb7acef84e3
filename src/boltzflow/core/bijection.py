"""The base class of every invertible map with a log-determinant (flow layers, coordinate transforms).

Conventions: ``forward`` maps latent -> configuration, ``forward(z) -> (x, logdet)`` with
``logdet = log|det dx/dz|`` of shape ``(batch,)``; ``inverse(x) -> (z, logdet)`` with
``logdet = log|det dz/dx|``. Tensors are flat ``(batch, dim)`` unless a bijection says otherwise.
"""

from __future__ import annotations

import torch
from torch import nn


class Bijection(nn.Module):
    """Base class: subclasses implement ``forward`` and ``inverse``, each returning (out, logdet).

    ``context`` (optional, ``(batch, context_dim)``) conditions the map (conditional flows, e.g.
    hydrogens given heavy atoms); unconditional layers ignore it.
    """

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
