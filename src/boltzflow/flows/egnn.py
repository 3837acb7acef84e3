"""E(n)-equivariant graph neural network (Satorras et al. 2021, "stabilised" variant of their E(n)-NF).

Particles ``x: (batch, n, d)`` (any length unit) on a fully connected graph, with invariant node
features ``h: (batch, n, F)``. One :class:`EGNNLayer` computes, for every ordered pair i != j,

    m_ij  = phi_e(h_i, h_j, |x_i - x_j|^2)                       (message, invariant)
    a_ij  = sigmoid(w . m_ij)                                    (attention weight)
    x_i  <- x_i + sum_j (x_i - x_j) / (|x_i - x_j| + 1) * phi_x(m_ij) / (n - 1)
    h_i  <- h_i + phi_h(h_i, sum_j a_ij m_ij)

so rotations, reflections, translations and permutations of the particles commute with the layer.
:class:`EGNN` stacks layers with a global skip (``x + displacement``) and returns centre-of-mass-free
output; its last coordinate head starts at zero, so a fresh network is the identity on the CoM-free
subspace (the free-form flow then starts from the base distribution).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


def remove_com(x: torch.Tensor) -> torch.Tensor:
    """``x - mean_particles(x)`` for ``x: (..., n, d)``: the projection onto the CoM-free subspace."""
    return x - x.mean(dim=-2, keepdim=True)


def _mlp(n_in: int, hidden: int, n_out: int, act_last: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, n_out)]
    if act_last:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class EGNNLayer(nn.Module):
    """One equivariant message-passing layer (see module docstring); ``hidden`` is the width of the
    edge, node and coordinate networks (one hidden layer each, SiLU)."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.edge = _mlp(2 * features + 1, hidden, hidden)
        self.attention = nn.Linear(hidden, 1)
        self.node = _mlp(features + hidden, hidden, features, act_last=False)
        self.coord = _mlp(hidden, hidden, 1, act_last=False)
        last = self.coord[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (B, n, d)``, ``h: (B, n, F)`` -> updated ``(x, h)``, same shapes."""
        n = x.shape[-2]
        diff = x[:, :, None, :] - x[:, None, :, :]  # (B, n, n, d): x_i - x_j
        d2 = diff.pow(2).sum(-1, keepdim=True)  # (B, n, n, 1)
        # phi_e's first layer on [h_i, h_j, d2] = W_i h_i + W_j h_j + w d2 + b: the node terms once per node
        # (B n F H multiply-adds each) instead of once per edge (B n^2 (2F + 1) H)
        first = self.edge[0]
        f = h.shape[-1]
        wi, wj, wd = first.weight[:, :f], first.weight[:, f:2 * f], first.weight[:, 2 * f]
        pre = (h @ wi.T)[:, :, None, :] + (h @ wj.T)[:, None, :, :] + d2 * wd + first.bias
        m = self.edge[1:](pre)  # (B, n, n, H)
        off = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)[None, :, :, None]  # no self-edges
        a = torch.sigmoid(self.attention(m)) * off
        agg = (a * m).sum(2)  # (B, n, H)
        h = h + self.node(torch.cat([h, agg], dim=-1))
        # sqrt(d2 + tiny) keeps the map smooth where two particles coincide (diff is 0 there anyway)
        unit = diff / (torch.sqrt(d2 + 1e-12) + 1.0)
        x = x + (unit * self.coord(m) * off).sum(2) / max(n - 1, 1)
        return x, h


class EGNN(nn.Module):
    """A dimension-preserving E(n)-equivariant map of the CoM-free subspace:
    ``x: (B, n, d) -> (B, n, d)``, output centre of mass 0; identity at initialisation.

    ``layers`` message-passing layers of width ``hidden`` over ``features`` invariant node features;
    node features start as a learned constant vector (no particle types), so the map is
    permutation-equivariant."""

    def __init__(self, n_particles: int, n_spatial: int, layers: int = 4, hidden: int = 64, features: int = 32):
        super().__init__()
        if n_particles < 2 or n_spatial < 1 or layers < 1 or hidden < 1 or features < 1:
            raise InputError("EGNN needs n_particles >= 2, n_spatial >= 1, layers >= 1, hidden >= 1, features >= 1")
        self.n_particles, self.n_spatial = int(n_particles), int(n_spatial)
        self.h0 = nn.Parameter(torch.randn(features) * 0.1)
        self.layers = nn.ModuleList(EGNNLayer(features, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, n, d)`` (any centre of mass) -> CoM-free ``(B, n, d)``."""
        if x.ndim != 3 or x.shape[1:] != (self.n_particles, self.n_spatial):
            raise InputError(f"EGNN expects x of shape (batch, {self.n_particles}, {self.n_spatial}), "
                             f"got {tuple(x.shape)}")
        x = remove_com(x)
        h = self.h0.to(x.dtype).expand(x.shape[0], self.n_particles, -1)
        y = x
        for layer in self.layers:
            y, h = layer(y, h)
        return remove_com(y)
