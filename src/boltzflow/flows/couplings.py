"""Coupling layers and cheap bijections on flat vectors ``(batch, dim)``.

A coupling layer splits the dimensions with a boolean ``mask`` of shape ``(dim,)``: dimensions
where ``mask`` is True *condition* the transform and pass through unchanged; the others are
transformed elementwise with parameters predicted by an :class:`~boltzflow.flows.nn.MLP` from the
conditioning dimensions (and an optional ``context``, concatenated to the MLP input). A
conditional layer (``context_dim > 0``) may have an all-False mask: it then transforms every
dimension, conditioned on the context only. An optional ``blind`` mask hides pass-through dimensions
from the conditioner (autoregressive structure: a layer acting on a few "lead" dimensions that must
not see the rest). The MLP's
last layer is zero-initialised, so every coupling is the identity at initialisation.

Circular (periodic, e.g. torsion) dimensions: :class:`SplineCoupling` transforms them with circular
splines on ``[-pi, pi)``; when they condition, they enter the MLP as ``(cos, sin)`` so the
conditioner is periodic too. :class:`AffineCoupling` and :class:`ActNorm` are for non-periodic
dimensions only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from .base import Bijection
from .nn import MLP
from .splines import packed_rq_spline, wrap_angle


def as_mask(spec: torch.Tensor | Sequence[int] | Sequence[bool] | None, dim: int, what: str = "mask") -> torch.Tensor:
    """A boolean ``(dim,)`` mask from a BoolTensor / bool list, or from a list of indices."""
    if spec is None:
        return torch.zeros(dim, dtype=torch.bool)
    if isinstance(spec, torch.Tensor) and spec.dtype == torch.bool:
        m = spec.detach().to("cpu").clone()
    else:
        items = list(spec.tolist() if isinstance(spec, torch.Tensor) else spec)
        if items and all(isinstance(v, bool) for v in items):
            m = torch.tensor(items, dtype=torch.bool)
        else:
            m = torch.zeros(dim, dtype=torch.bool)
            for i in items:
                i = int(i)
                if not -dim <= i < dim:
                    raise InputError(f"{what} index {i} is out of range for dim {dim}")
                m[i] = True
            return m
    if m.shape != (dim,):
        raise InputError(f"{what} must have shape ({dim},), got {tuple(m.shape)}")
    return m


def _check_input(z: torch.Tensor, dim: int, name: str) -> None:
    if z.ndim != 2 or z.shape[-1] != dim:
        raise InputError(f"{name} expects input of shape (batch, {dim}), got {tuple(z.shape)}")


def _check_context(context: torch.Tensor | None, batch: int, context_dim: int, name: str) -> None:
    if context_dim == 0:
        return
    if context is None:
        raise InputError(f"{name} is conditional (context_dim={context_dim}); pass context of shape (batch, {context_dim})")
    if context.shape != (batch, context_dim):
        raise InputError(f"{name} expects context of shape ({batch}, {context_dim}), got {tuple(context.shape)}")


class _Coupling(Bijection):
    """Shared bookkeeping: index buffers, conditioner features and output assembly."""

    def __init__(self, dim: int, mask, circular, context_dim: int, blind=None):
        super().__init__()
        dim = int(dim)
        self.context_dim = int(context_dim)
        if self.context_dim < 0:
            raise InputError(f"context_dim must be >= 0, got {context_dim}")
        if dim < 1:
            raise InputError(f"a coupling layer needs dim >= 1, got {dim}")
        mask = as_mask(mask, dim, "mask")
        circ = as_mask(circular, dim, "circular")
        hidden_dims = as_mask(blind, dim, "blind")
        if bool((hidden_dims & ~mask).any()):
            raise InputError("a coupling's blind dims must be pass-through (mask True) dims")
        if bool(mask.all()):
            raise InputError("coupling mask marks every dimension as conditioning (True); leave some to transform")
        if not bool((mask & ~hidden_dims).any()) and self.context_dim == 0:
            raise InputError("coupling mask marks no dimension as conditioning (True); "
                             "that is only allowed for conditional layers (context_dim > 0)")
        self.dim = dim
        ar = torch.arange(dim)
        seen = mask & ~hidden_dims
        cond_lin = ar[seen & ~circ]
        cond_circ = ar[seen & circ]
        trans_lin = ar[~mask & ~circ]
        trans_circ = ar[~mask & circ]
        self.register_buffer("mask", mask)
        self.register_buffer("circular", circ)
        self.register_buffer("cond_lin", cond_lin)
        self.register_buffer("cond_circ", cond_circ)
        self.register_buffer("trans_lin", trans_lin)
        self.register_buffer("trans_circ", trans_circ)
        self.n_cond_features = len(cond_lin) + 2 * len(cond_circ) + self.context_dim

    def _features(self, z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        parts = [z.index_select(1, self.cond_lin)]
        if len(self.cond_circ):
            c = z.index_select(1, self.cond_circ)
            parts += [torch.cos(c), torch.sin(c)]
        if self.context_dim:
            parts.append(context.to(z.dtype))
        return torch.cat(parts, dim=-1)

    def _assemble(self, z: torch.Tensor, y_lin: torch.Tensor | None, y_circ: torch.Tensor | None) -> torch.Tensor:
        """``z`` with its transformed dims replaced (index_select/index_copy: much faster than
        advanced indexing on CPU)."""
        out = z
        if y_lin is not None and len(self.trans_lin):
            out = out.index_copy(1, self.trans_lin, y_lin)
        if y_circ is not None and len(self.trans_circ):
            out = out.index_copy(1, self.trans_circ, y_circ)
        return out


class AffineCoupling(_Coupling):
    """RealNVP affine coupling: ``x_t = z_t * exp(s) + t`` with ``(s, t) = MLP(z_cond, context)``.

    ``mask: (dim,)`` bool, True = conditioning dims. The log-scale is soft-clamped,
    ``s = scale_clamp * tanh(raw / scale_clamp)``, so one layer scales by at most
    ``exp(scale_clamp)`` (numerical stability). Identity at initialisation.
    ``forward(z: (batch, dim), context: (batch, context_dim) | None) -> (x, logdet: (batch,))``.
    """

    def __init__(
        self,
        dim: int,
        mask: torch.Tensor,
        hidden: int = 64,
        depth: int = 2,
        context_dim: int = 0,
        activation: str = "celu",
        scale_clamp: float = 2.0,
    ):
        super().__init__(dim, mask, None, context_dim)
        if scale_clamp <= 0:
            raise InputError(f"scale_clamp must be > 0, got {scale_clamp}")
        self.scale_clamp = float(scale_clamp)
        self.n_trans = len(self.trans_lin)
        self.net = MLP(self.n_cond_features, 2 * self.n_trans, hidden, depth, activation)

    def _params(self, z, context):
        raw = self.net(self._features(z, context))
        raw_s, t = raw[:, : self.n_trans], raw[:, self.n_trans :]
        s = self.scale_clamp * torch.tanh(raw_s / self.scale_clamp)
        return s, t

    def forward(self, z, context=None):
        _check_input(z, self.dim, "AffineCoupling")
        _check_context(context, z.shape[0], self.context_dim, "AffineCoupling")
        s, t = self._params(z, context)
        y = z.index_select(1, self.trans_lin) * torch.exp(s) + t
        return self._assemble(z, y, None), s.sum(-1)

    def inverse(self, x, context=None):
        _check_input(x, self.dim, "AffineCoupling")
        _check_context(context, x.shape[0], self.context_dim, "AffineCoupling")
        s, t = self._params(x, context)
        y = (x.index_select(1, self.trans_lin) - t) * torch.exp(-s)
        return self._assemble(x, y, None), -s.sum(-1)


class SplineCoupling(_Coupling):
    """Rational-quadratic spline coupling (Durkan et al. 2019), circular where asked.

    ``mask: (dim,)`` bool, True = conditioning dims. Transformed non-circular dims get an RQ
    spline on ``[-bound, bound]`` with identity tails; transformed ``circular`` dims (BoolTensor
    ``(dim,)`` or index list) get a circular RQ spline on ``[-pi, pi)`` followed by a learned,
    conditioner-predicted rotation (``circular_shift``), so the layer can move every point of the
    circle. ``bins`` spline bins per dimension. ``blind``: pass-through dims the conditioner does not
    see (default none). Identity at initialisation.
    ``forward(z: (batch, dim), context) -> (x, logdet: (batch,))``; circular outputs in ``[-pi, pi)``.
    """

    def __init__(
        self,
        dim: int,
        mask: torch.Tensor,
        hidden: int = 128,
        depth: int = 2,
        bins: int = 8,
        bound: float = 5.0,
        circular: torch.Tensor | Sequence[int] | None = None,
        context_dim: int = 0,
        activation: str = "celu",
        circular_shift: bool = True,
        blind: torch.Tensor | Sequence[int] | None = None,
    ):
        super().__init__(dim, mask, circular, context_dim, blind)
        if not 2 <= int(bins) <= 256:
            raise InputError(f"spline bins must be in [2, 256], got {bins}")
        if not bound > 0:
            raise InputError(f"spline bound must be > 0, got {bound}")
        self.bins = int(bins)
        self.bound = float(bound)
        self.circular_shift = bool(circular_shift)
        k = self.bins
        # per transformed dim: K widths, K heights, K derivatives, 1 shift (layout shared by both kinds;
        # linear dims use K - 1 interior derivatives, circular dims K derivatives + the shift).
        self.n_lin, self.n_circ = len(self.trans_lin), len(self.trans_circ)
        self.n_lin_params = 3 * k - 1
        self.n_circ_params = 3 * k + (1 if self.circular_shift else 0)
        out = self.n_lin * self.n_lin_params + self.n_circ * self.n_circ_params
        self.net = MLP(self.n_cond_features, out, hidden, depth, activation)

    def _split(self, z, context):
        raw = self.net(self._features(z, context))
        b, k = z.shape[0], self.bins
        n_lin_out = self.n_lin * self.n_lin_params
        p_lin = raw[:, :n_lin_out].reshape(b, self.n_lin, self.n_lin_params)
        p_circ = raw[:, n_lin_out:].reshape(b, self.n_circ, self.n_circ_params)
        return p_lin, p_circ, k

    def _transform(self, z, context, inverse: bool):
        name = "SplineCoupling"
        _check_input(z, self.dim, name)
        _check_context(context, z.shape[0], self.context_dim, name)
        p_lin, p_circ, k = self._split(z, context)
        logdet = z.new_zeros(z.shape[0])
        y_lin = y_circ = None
        if self.n_lin:
            y_lin, ld = packed_rq_spline(z.index_select(1, self.trans_lin), p_lin, False, self.bound, inverse=inverse)
            logdet = logdet + ld.sum(-1)
        if self.n_circ:
            y_circ = z.index_select(1, self.trans_circ)
            spl = p_circ[..., : 3 * k]
            shift = p_circ[..., 3 * k] if self.circular_shift else None
            if inverse:
                if shift is not None:
                    y_circ = wrap_angle(y_circ - shift)
                y_circ, ld = packed_rq_spline(y_circ, spl, True, inverse=True)
                y_circ = wrap_angle(y_circ)
            else:
                y_circ, ld = packed_rq_spline(y_circ, spl, True, inverse=False)
                if shift is not None:
                    y_circ = y_circ + shift
                y_circ = wrap_angle(y_circ)
            logdet = logdet + ld.sum(-1)
        return self._assemble(z, y_lin, y_circ), logdet

    def forward(self, z, context=None):
        return self._transform(z, context, inverse=False)

    def inverse(self, x, context=None):
        return self._transform(x, context, inverse=True)


class Permute(Bijection):
    """Fixed permutation of dimensions: ``x = z[:, perm]`` (log-det 0)."""

    def __init__(self, perm: torch.Tensor | Sequence[int]):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long).flatten()
        dim = perm.numel()
        if dim < 1 or not torch.equal(torch.sort(perm).values, torch.arange(dim)):
            raise InputError(f"Permute needs a permutation of 0..{dim - 1}, got {perm.tolist()}")
        self.dim = dim
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    @classmethod
    def random(cls, dim: int, generator: torch.Generator | None = None) -> "Permute":
        """A random permutation drawn with ``generator`` (seeded for reproducibility)."""
        return cls(torch.randperm(int(dim), generator=generator))

    def forward(self, z, context=None):
        _check_input(z, self.dim, "Permute")
        return z.index_select(1, self.perm), z.new_zeros(z.shape[0])

    def inverse(self, x, context=None):
        _check_input(x, self.dim, "Permute")
        return x.index_select(1, self.inv_perm), x.new_zeros(x.shape[0])


class Reverse(Permute):
    """Reverse the order of the dimensions."""

    def __init__(self, dim: int):
        super().__init__(torch.arange(int(dim) - 1, -1, -1))


class ActNorm(Bijection):
    """Elementwise affine map ``x = z * exp(log_scale) + shift`` (Glow's ActNorm), identity at init.

    ``circular`` dims (BoolTensor or index list) are left untouched (a scale would break
    periodicity). :meth:`initialize` sets the parameters from data so that ``inverse(x)`` has zero
    mean and unit variance per dimension (call it explicitly; nothing happens implicitly).
    """

    def __init__(self, dim: int, circular: torch.Tensor | Sequence[int] | None = None):
        super().__init__()
        self.dim = int(dim)
        circ = as_mask(circular, self.dim, "circular")
        self.register_buffer("active", (~circ).to(torch.get_default_dtype()))
        self.log_scale = nn.Parameter(torch.zeros(self.dim))
        self.shift = nn.Parameter(torch.zeros(self.dim))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, eps: float = 1e-6) -> None:
        """Data-dependent init from samples ``x: (batch, dim)`` of the layer's output space."""
        _check_input(x, self.dim, "ActNorm.initialize")
        if x.shape[0] < 2:
            raise InputError("ActNorm.initialize needs at least 2 samples")
        a = self.active.to(x.dtype)
        mean, std = x.mean(0), x.std(0).clamp_min(eps)
        self.log_scale.copy_((torch.log(std) * a).to(self.log_scale.dtype))
        self.shift.copy_((mean * a).to(self.shift.dtype))

    def _ls(self, ref):
        a = self.active.to(ref.dtype)
        return self.log_scale.to(ref.dtype) * a, self.shift.to(ref.dtype) * a

    def forward(self, z, context=None):
        _check_input(z, self.dim, "ActNorm")
        ls, sh = self._ls(z)
        return z * torch.exp(ls) + sh, ls.sum().expand(z.shape[0])

    def inverse(self, x, context=None):
        _check_input(x, self.dim, "ActNorm")
        ls, sh = self._ls(x)
        return (x - sh) * torch.exp(-ls), (-ls.sum()).expand(x.shape[0])


class CircularShift(Bijection):
    """Learned constant rotation of ``circular`` dims: ``x = wrap(z + theta)`` (log-det 0)."""

    def __init__(self, dim: int, circular: torch.Tensor | Sequence[int]):
        super().__init__()
        self.dim = int(dim)
        circ = as_mask(circular, self.dim, "circular")
        if not bool(circ.any()):
            raise InputError("CircularShift needs at least one circular dimension")
        self.register_buffer("circular", circ)
        self.theta = nn.Parameter(torch.zeros(int(circ.sum())))

    def _shifted(self, z, sign: float):
        _check_input(z, self.dim, "CircularShift")
        full = z.new_zeros(self.dim).masked_scatter(self.circular, self.theta.to(z.dtype))
        y = torch.where(self.circular, wrap_angle(z + sign * full), z)
        return y, z.new_zeros(z.shape[0])

    def forward(self, z, context=None):
        return self._shifted(z, 1.0)

    def inverse(self, x, context=None):
        return self._shifted(x, -1.0)


__all__ = [
    "as_mask", "AffineCoupling", "SplineCoupling", "Permute", "Reverse", "ActNorm", "CircularShift",
]
