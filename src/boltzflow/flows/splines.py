"""Monotonic rational-quadratic (RQ) splines (Durkan et al. 2019, "Neural Spline Flows").

Written in-house (see docs/flows.md). A spline with ``K`` bins on ``[left, right] -> [bottom, top]``
is defined by ``K`` bin widths, ``K`` bin heights and ``K + 1`` positive knot derivatives. In bin
``k`` with knots ``(x_k, y_k)``, width ``w``, height ``h``, slope ``s = h / w`` and
``xi = (x - x_k) / w``::

    y = y_k + h (s xi^2 + d_k xi (1 - xi)) / (s + (d_{k+1} + d_k - 2 s) xi (1 - xi))
    dy/dx = s^2 (d_{k+1} xi^2 + 2 s xi (1 - xi) + d_k (1 - xi)^2) / (s + (d_{k+1} + d_k - 2 s) xi (1 - xi))^2

The inverse solves the quadratic ``a xi^2 + b xi + c = 0`` in closed form (numerically stable root).

Two wrappers:

* :func:`unconstrained_rq_spline`: spline on ``[-bound, bound]`` with identity (linear, slope 1)
  tails outside; the boundary derivatives are fixed to 1 so the map is C^1.
* :func:`circular_rq_spline`: spline on ``[-pi, pi]`` onto itself whose derivatives at ``-pi`` and
  ``pi`` are equal (Rezende et al. 2020), so it is a C^1 diffeomorphism of the circle.

All functions act elementwise on ``x: (...)`` with parameters ``(..., K)`` (``(..., K - 1)`` interior
derivatives for the unconstrained spline, ``(..., K)`` for the circular one) and return
``(y, logabsdet)`` with ``logabsdet: (...)`` = log|dy/dx| (forward) or log|dx/dy| (inverse).
Unnormalised parameters are mapped with softmax (widths, heights) and softplus (derivatives); all
zeros give the identity map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def positive_derivatives(unnormalised: torch.Tensor, min_derivative: float = MIN_DERIVATIVE) -> torch.Tensor:
    """Knot derivatives ``> min_derivative``; ``0 -> 1`` exactly (identity initialisation)."""
    offset = math.log(math.expm1(1.0 - min_derivative))
    return min_derivative + F.softplus(unnormalised + offset)


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension in elementwise ops: for the spline's few bins (K ~ 8) torch's
    softmax kernel is ~5x slower on the CPU (fwd) and ~2.5x (fwd + bwd); same values to rounding."""
    e = torch.exp(x - x.detach().amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _knots(unnormalised: torch.Tensor, low: float, high: float, min_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions ``(..., K + 1)`` and bin sizes ``(..., K)`` on ``[low, high]``."""
    k = unnormalised.shape[-1]
    if min_size * k >= 1.0:
        raise ValueError(f"minimal bin size {min_size} too large for {k} bins")
    frac = _softmax_last(unnormalised)
    frac = min_size + (1.0 - min_size * k) * frac
    cum = torch.cumsum(frac, dim=-1)
    cum = F.pad(cum, (1, 0), value=0.0)
    cum = low + (high - low) * cum
    # pin both ends exactly (cumsum rounding)
    cum = torch.cat([torch.full_like(cum[..., :1], low), cum[..., 1:-1], torch.full_like(cum[..., :1], high)], dim=-1)
    return cum, cum[..., 1:] - cum[..., :-1]


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, -1, idx).squeeze(-1)


def rational_quadratic_spline(
    x: torch.Tensor,
    unnormalised_widths: torch.Tensor,
    unnormalised_heights: torch.Tensor,
    derivatives: torch.Tensor,
    left: float,
    right: float,
    bottom: float,
    top: float,
    inverse: bool = False,
    min_bin_width: float = MIN_BIN_WIDTH,
    min_bin_height: float = MIN_BIN_HEIGHT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotonic RQ spline ``[left, right] -> [bottom, top]`` (or its inverse).

    ``x: (...)`` must lie in the domain (``[bottom, top]`` when ``inverse``); values outside are
    clamped. ``unnormalised_widths/heights: (..., K)``; ``derivatives: (..., K + 1)`` positive knot
    slopes. Returns ``(y, logabsdet)``, both ``(...)``.
    """
    cumw, widths = _knots(unnormalised_widths, left, right, min_bin_width)
    cumh, heights = _knots(unnormalised_heights, bottom, top, min_bin_height)
    k = widths.shape[-1]
    if inverse:
        x = x.clamp(bottom, top)
        idx = torch.searchsorted(cumh.contiguous(), x.unsqueeze(-1).contiguous(), right=True) - 1
    else:
        x = x.clamp(left, right)
        idx = torch.searchsorted(cumw.contiguous(), x.unsqueeze(-1).contiguous(), right=True) - 1
    idx = idx.clamp(0, k - 1)
    xk, wk = _gather(cumw, idx), _gather(widths, idx)
    yk, hk = _gather(cumh, idx), _gather(heights, idx)
    dk, dk1 = _gather(derivatives, idx), _gather(derivatives, idx + 1)
    s = hk / wk
    if inverse:
        dy = x - yk
        sumd = dk1 + dk - 2.0 * s
        a = hk * (s - dk) + dy * sumd
        b = hk * dk - dy * sumd
        c = -s * dy
        disc = (b.pow(2) - 4.0 * a * c).clamp_min(0.0)
        xi = (2.0 * c) / (-b - disc.sqrt())
        xi = xi.clamp(0.0, 1.0)
        out = xk + xi * wk
    else:
        xi = ((x - xk) / wk).clamp(0.0, 1.0)
    t = xi * (1.0 - xi)
    den = s + (dk1 + dk - 2.0 * s) * t
    dnum = s.pow(2) * (dk1 * xi.pow(2) + 2.0 * s * t + dk * (1.0 - xi).pow(2))
    logabsdet = torch.log(dnum) - 2.0 * torch.log(den)
    if inverse:
        return out, -logabsdet
    y = yk + hk * (s * xi.pow(2) + dk * t) / den
    return y, logabsdet


def unconstrained_rq_spline(
    x: torch.Tensor,
    unnormalised_widths: torch.Tensor,
    unnormalised_heights: torch.Tensor,
    unnormalised_derivatives: torch.Tensor,
    bound: float = 5.0,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RQ spline on ``[-bound, bound]`` with identity tails outside.

    ``unnormalised_derivatives: (..., K - 1)`` are the interior knot slopes; the two boundary
    slopes are 1 so the map is C^1 at the tails. Returns ``(y, logabsdet)``.
    """
    ones = torch.ones_like(unnormalised_derivatives[..., :1])
    derivs = torch.cat([ones, positive_derivatives(unnormalised_derivatives), ones], dim=-1)
    inside = (x >= -bound) & (x <= bound)
    y_in, ld_in = rational_quadratic_spline(
        x, unnormalised_widths, unnormalised_heights, derivs, -bound, bound, -bound, bound, inverse=inverse
    )
    y = torch.where(inside, y_in, x)
    ld = torch.where(inside, ld_in, torch.zeros_like(ld_in))
    return y, ld


def wrap_angle(x: torch.Tensor) -> torch.Tensor:
    """Map angles to ``[-pi, pi)``."""
    return torch.remainder(x + math.pi, 2.0 * math.pi) - math.pi


def circular_rq_spline(
    x: torch.Tensor,
    unnormalised_widths: torch.Tensor,
    unnormalised_heights: torch.Tensor,
    unnormalised_derivatives: torch.Tensor,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Circular RQ spline: a diffeomorphism of ``[-pi, pi)`` fixing ``-pi`` (Rezende et al. 2020).

    ``unnormalised_derivatives: (..., K)``: slopes at knots ``0..K-1``; the slope at knot ``K``
    (= ``pi``, the same point of the circle as ``-pi``) equals the one at knot 0, which makes the
    map C^1 on the circle. Inputs are wrapped to ``[-pi, pi)`` first; outputs lie in ``[-pi, pi]``.
    Returns ``(y, logabsdet)``.
    """
    d = positive_derivatives(unnormalised_derivatives)
    derivs = torch.cat([d, d[..., :1]], dim=-1)
    y, ld = rational_quadratic_spline(
        wrap_angle(x), unnormalised_widths, unnormalised_heights, derivs,
        -math.pi, math.pi, -math.pi, math.pi, inverse=inverse,
    )
    return y, ld


def packed_rq_spline(
    x: torch.Tensor, params: torch.Tensor, circular: bool, bound: float = 5.0, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Either spline with its parameters packed in one tensor, as coupling layers predict them.

    ``x: (...)``; ``params: (..., P)`` = ``[K width logits | K height logits | derivative logits]``
    with ``K - 1`` derivative logits (``circular=False``: :func:`unconstrained_rq_spline` on
    ``[-bound, bound]``) or ``K`` (``circular=True``: :func:`circular_rq_spline`). On the CPU this runs
    the fused kernel of :mod:`boltzflow.flows.spline_cpu` (same values and first derivatives, several
    times faster); elsewhere, or without a compiler, the torch ops above. Returns ``(y, logabsdet)``."""
    from . import spline_cpu

    n_par = params.shape[-1]
    k = n_par // 3 if circular else (n_par + 1) // 3
    if spline_cpu.usable(x) and 2 <= k <= 256:
        offset = math.log(math.expm1(1.0 - MIN_DERIVATIVE))
        return spline_cpu.fused_spline(x, params, 1 if circular else 0, math.pi if circular else bound, inverse,
                                       MIN_BIN_WIDTH, MIN_BIN_HEIGHT, MIN_DERIVATIVE, offset)
    w, h, d = params[..., :k], params[..., k:2 * k], params[..., 2 * k:]
    if circular:
        return circular_rq_spline(x, w, h, d, inverse=inverse)
    return unconstrained_rq_spline(x, w, h, d, bound, inverse=inverse)
