"""Free-form flows (draxler2024) on the centre-of-mass-free subspace of n particles in d dimensions.

An encoder f (configuration -> latent) and a decoder g (latent -> configuration), both free-form
dimension-preserving networks (here :class:`~boltzflow.flows.egnn.EGNN`), are trained together with

    loss(x) = 0.5 |f(x)|^2 - SG(v^T J_g(f(x))) J_f(x) v + beta |g(f(x)) - x|^2

(:func:`fff_loss`): the middle term's gradient is a one-sample Hutchinson estimate of the gradient of
``-log|det J_f(x)|`` (exact in expectation over ``v`` when ``g = f^-1``), the last term makes g the
inverse of f. Samples are ``g(z)``, ``z`` from :class:`CoMFreeNormal` (one network call).

Centre of mass: configurations and latents live on the subspace ``V = {x : sum_i x_i = 0}`` of
dimension ``(n - 1) d``; both networks map V to V. Densities are with respect to the Lebesgue measure
of V (orthonormal coordinates :func:`com_free_basis`), so ``log q(x) = log N_V(f(x)) - log|det Q^T
J_g(f(x)) Q|`` (:meth:`FreeFormFlow.log_prob`, exact Jacobian of the decoder, draxler2024 B.3), where
``N_V`` is the standard normal on V: ``log N_V(z) = -|z|^2 / 2 - (n - 1) d / 2 log(2 pi)``.
draxler2024's NLL tables leave out the constant; :meth:`FreeFormFlow.nll_paper` is theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .egnn import EGNN, remove_com


@dataclass(frozen=True)
class FreeFormConfig:
    """An E(n)-free-form flow (TOML table ``[generator]`` with ``kind = "freeform"``).

    layers / hidden / features: each EGNN (encoder and decoder alike); recon_weight: beta of
    :func:`fff_loss` (draxler2024: 10 for DW4, 200 for LJ13, 500 for LJ55); hutchinson: number of
    probe vectors per sample."""

    layers: int = 8
    hidden: int = 64
    features: int = 32
    recon_weight: float = 10.0
    hutchinson: int = 1

    def __post_init__(self):
        if self.layers < 1 or self.hidden < 1 or self.features < 1 or self.hutchinson < 1:
            raise ConfigError("freeform generator needs layers, hidden, features and hutchinson >= 1")
        if self.recon_weight <= 0:
            raise ConfigError(f"freeform recon_weight must be > 0, got {self.recon_weight}")


def com_free_basis(n: int, d: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal basis ``Q: (n d, (n - 1) d)`` of the CoM-free subspace (particle-major flattening
    ``x.reshape(n d)``): Helmert columns for the particle index, times the identity in space."""
    h = torch.zeros(n, n - 1, dtype=torch.float64)
    for k in range(1, n):
        h[:k, k - 1] = 1.0
        h[k, k - 1] = -float(k)
        h[:, k - 1] /= math.sqrt(k * (k + 1))
    return torch.kron(h, torch.eye(d, dtype=torch.float64)).to(dtype=dtype, device=device)


class CoMFreeNormal:
    """Standard normal on the CoM-free subspace of ``n`` particles in ``d`` dimensions."""

    def __init__(self, n_particles: int, n_spatial: int):
        self.n, self.d = int(n_particles), int(n_spatial)
        self.dof = (self.n - 1) * self.d

    def sample(self, batch: int, generator: torch.Generator | None = None, dtype=torch.float32,
               device=None) -> torch.Tensor:
        """``(batch, n, d)``: a standard normal in R^{n d} projected onto V (orthogonal projection of an
        isotropic normal is the standard normal on V)."""
        z = torch.randn(batch, self.n, self.d, generator=generator, dtype=dtype, device=device)
        return remove_com(z)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``z: (B, n, d)`` (projected onto V first) -> ``(B,)``."""
        z = remove_com(z)
        return -0.5 * z.pow(2).sum((-1, -2)) - 0.5 * self.dof * math.log(2 * math.pi)


def _flat_map(net: Callable[[torch.Tensor], torch.Tensor], n: int, d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` on one flattened configuration ``(n d,) -> (n d,)`` (for torch.func transforms)."""
    return lambda v: net(v.reshape(1, n, d)).reshape(n * d)


def subspace_jacobian(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``Q^T J_net(x) Q: (B, (n-1)d, (n-1)d)`` for ``x: (B, n, d)``: the Jacobian of a CoM-free map
    restricted to the CoM-free subspace, by ``torch.func`` (full ``n d`` forward-mode columns)."""
    from torch.func import jacfwd, vmap

    b, n, d = x.shape
    q = com_free_basis(n, d, dtype=x.dtype, device=x.device)
    f = _flat_map(net, n, d)
    out = []
    for lo in range(0, b, chunk):
        jac = vmap(jacfwd(f))(x[lo:lo + chunk].reshape(-1, n * d))  # (b, nd, nd)
        out.append(q.T @ jac @ q)
    return torch.cat(out)


class FreeFormFlow(nn.Module):
    """Encoder/decoder pair on the CoM-free subspace of ``n_particles`` x ``n_spatial`` coordinates.

    ``encoder``/``decoder``: modules ``(B, n, d) -> (B, n, d)`` with CoM-free output (default: E(n)-GNNs
    of ``config``). Coordinates in the target's length unit; ``(B, n, d)`` or flat ``(B, n d)``."""

    def __init__(self, n_particles: int, n_spatial: int, config: FreeFormConfig = FreeFormConfig(),
                 encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.n_particles, self.n_spatial, self.config = int(n_particles), int(n_spatial), config
        self.base = CoMFreeNormal(n_particles, n_spatial)

        def egnn() -> nn.Module:
            return EGNN(n_particles, n_spatial, config.layers, config.hidden, config.features)

        self.encoder = encoder if encoder is not None else egnn()
        self.decoder = decoder if decoder is not None else egnn()
        self.register_buffer("_ref", torch.zeros(()))  # dtype / device of samples, follows .to()

    @property
    def dof(self) -> int:
        """Dimension of the CoM-free subspace, ``(n - 1) d``."""
        return self.base.dof

    def _shape(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2 and x.shape[1] == self.n_particles * self.n_spatial:
            x = x.reshape(-1, self.n_particles, self.n_spatial)
        if x.ndim != 3 or x.shape[1:] != (self.n_particles, self.n_spatial):
            raise InputError(f"expected positions (batch, {self.n_particles}, {self.n_spatial}) or flat, "
                             f"got {tuple(x.shape)}")
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Configuration -> latent, ``(B, n, d)`` CoM-free."""
        return remove_com(self.encoder(remove_com(self._shape(x))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> configuration, ``(B, n, d)`` CoM-free."""
        return remove_com(self.decoder(remove_com(self._shape(z))))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, n_particles, n_spatial)`` CoM-free samples: one decoder call, no density."""
        return self.decode(self.base.sample(n, generator, dtype=self._ref.dtype, device=self._ref.device))

    def log_prob_latent(self, z: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x = g(z), log q(x))`` with the exact decoder Jacobian at ``z``: ``(B, n, d)``, ``(B,)``."""
        z = remove_com(self._shape(z))
        with torch.no_grad():  # a density to reweight with, not to train on: no graph for the Jacobian
            x = self.decode(z)
            jac = subspace_jacobian(self.decode, z.detach(), chunk)
        logdet = torch.linalg.slogdet(jac.to(torch.float64))[1].to(z.dtype)
        return x, self.base.log_prob(z) - logdet

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None,
                            chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples ``(n, n_particles, n_spatial)`` and their exact log q ``(n,)`` (decoder Jacobian)."""
        z = self.base.sample(n, generator, dtype=self._ref.dtype, device=self._ref.device)
        x, lq = self.log_prob_latent(z, chunk)
        return x.detach(), lq.detach()

    def log_prob(self, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Exact-Jacobian log density of configurations ``x`` (any CoM) on the CoM-free subspace:
        ``log N_V(f(x)) - log|det J_g(f(x))|`` (draxler2024 B.3), ``(B,)``; no gradient."""
        with torch.no_grad():
            z = self.encode(x)
        return self.log_prob_latent(z, chunk)[1].detach()

    def nll_paper(self, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """draxler2024's NLL per sample (their tables): ``-log q(x)`` without the latent normal's
        constant ``(n - 1) d / 2 log(2 pi)``, ``(B,)``."""
        return -self.log_prob(x, chunk) - 0.5 * self.dof * math.log(2 * math.pi)


@dataclass(frozen=True)
class FreeFormLoss:
    """Parts of :func:`fff_loss`, batch means: ``loss`` (what to differentiate; its value is not an NLL),
    ``latent`` (``0.5 |z|^2``, detached) and ``recon`` (``|g(f(x)) - x|^2`` summed over coordinates,
    detached)."""

    loss: torch.Tensor
    latent: torch.Tensor
    recon: torch.Tensor


def hutchinson_probe(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
                     dtype=torch.float32, device=None) -> torch.Tensor:
    """A probe ``v`` with identity covariance on the CoM-free subspace, ``shape = (B, n, d)``."""
    return remove_com(torch.randn(*shape, generator=generator, dtype=dtype, device=device))


def fff_loss(encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
             x: torch.Tensor, recon_weight: float, generator: torch.Generator | None = None,
             probes: int = 1) -> FreeFormLoss:
    """Free-form flow loss (draxler2024 eq. 15) of data ``x: (B, n, d)`` (CoM-free) for CoM-free maps
    ``encode``/``decode``. The log-det surrogate: ``SG(v^T J_g(z)) (J_f(x) v)`` with ``J_f v`` by
    forward-mode AD (``torch.func.jvp``) and ``v^T J_g`` by one backward pass, ``probes`` vectors ``v``
    averaged."""
    from torch.func import jvp

    x = remove_com(x)
    surrogate = x.new_zeros(x.shape[0])
    z = None
    for _ in range(probes):
        v = hutchinson_probe(x.shape, generator, dtype=x.dtype, device=x.device)
        z, jf_v = jvp(encode, (x,), (v,))
        x1 = decode(z)
        (vt_jg,) = torch.autograd.grad(x1, z, v, retain_graph=True)
        surrogate = surrogate + (vt_jg.detach() * jf_v).sum((-1, -2)) / probes
    assert z is not None
    latent = 0.5 * z.pow(2).sum((-1, -2))
    recon = (x1 - x).pow(2).sum((-1, -2))
    loss = (latent - surrogate + recon_weight * recon).mean()
    return FreeFormLoss(loss=loss, latent=latent.mean().detach(), recon=recon.mean().detach())
