"""Ready-made flow architectures.

* :func:`realnvp`: felardos2023's architecture, ``blocks`` coupling blocks of 4 affine couplings
  (CELU MLP conditioners). Toys: 8 x 4 couplings, hidden 64; molecules: 24 x 4, hidden 256.
* :func:`spline_flow`: ``blocks`` blocks of 2 complementary RQ-spline couplings, circular splines on
  periodic dims (internal-coordinate flows); optionally autoregressive in a few ``lead`` dims
  (q(x) = q(x_lead) q(x_rest | x_lead), e.g. a peptide's backbone torsions).
* :func:`make_flow`: a :class:`~boltzflow.flows.base.Flow` with the right base distribution;
  ``make_flow(**config)`` is exactly what :func:`boltzflow.flows.checkpoint.load_model` rebuilds.

Masks are drawn from ``torch.Generator().manual_seed(seed)``, so the same arguments give the same
architecture; masks are also buffers, so checkpoints restore them regardless.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from ..errors import InputError
from .base import Compose, Flow, MixedBase, StandardNormal
from .couplings import AffineCoupling, SplineCoupling, as_mask

FLOW_KINDS = ("realnvp", "spline")


def _half_masks(dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random half/half masks of a block: a random split, and the alternating split of the
    same random order (so the two pairs of couplings in a block mix different dimensions)."""
    perm = torch.randperm(dim, generator=generator)
    if dim == 1:  # conditional 1D flow: every coupling transforms the single dim given the context
        none = torch.zeros(1, dtype=torch.bool)
        return none, none
    a = torch.zeros(dim, dtype=torch.bool)
    a[perm[: dim // 2]] = True
    b = torch.zeros(dim, dtype=torch.bool)
    b[perm[0::2]] = True
    if dim == 2:  # only one split exists
        b = a.clone()
    return a, b


def _indices(circular, dim: int) -> list[int]:
    """Circular dims as a sorted list of non-negative indices (accepts indices or a bool mask)."""
    if isinstance(circular, torch.Tensor) and circular.dtype != torch.bool:
        circular = circular.tolist()
    if not isinstance(circular, torch.Tensor):
        circular = list(circular)
    mask = as_mask(circular, int(dim), "circular")
    return [int(i) for i in torch.nonzero(mask).flatten()]


def _check_common(dim: int, blocks: int, context_dim: int) -> None:
    if int(dim) < 1 or (int(dim) == 1 and int(context_dim) == 0):
        raise InputError(f"coupling flows need dim >= 2 (or dim 1 with a context), got dim {dim}; "
                         "pad a 1D problem with a dummy Gaussian dim")
    if int(blocks) < 1:
        raise InputError(f"blocks must be >= 1, got {blocks}")
    if int(context_dim) < 0:
        raise InputError(f"context_dim must be >= 0, got {context_dim}")


def realnvp(
    dim: int,
    blocks: int = 8,
    hidden: int = 64,
    depth: int = 2,
    context_dim: int = 0,
    activation: str = "celu",
    scale_clamp: float = 2.0,
    seed: int = 0,
) -> Compose:
    """RealNVP: ``blocks`` x 4 affine couplings with masks ``a, ~a, b, ~b`` per block.

    Every dimension is transformed twice per block. ``hidden``/``depth``: conditioner MLP width and
    number of linear layers. Returns a :class:`Compose` acting on ``(batch, dim)``.
    """
    _check_common(dim, blocks, context_dim)
    g = torch.Generator().manual_seed(int(seed))
    layers = []
    for _ in range(int(blocks)):
        a, b = _half_masks(int(dim), g)
        for m in ((a, ~a, b, ~b) if int(dim) > 1 else (a,) * 4):
            layers.append(AffineCoupling(dim, m, hidden=hidden, depth=depth, context_dim=context_dim,
                                         activation=activation, scale_clamp=scale_clamp))
    return Compose(layers)


def spline_flow(
    dim: int,
    blocks: int = 4,
    hidden: int = 128,
    depth: int = 2,
    bins: int = 8,
    bound: float = 5.0,
    circular: Sequence[int] = (),
    context_dim: int = 0,
    activation: str = "celu",
    circular_shift: bool = True,
    seed: int = 0,
    lead: Sequence[int] = (),
    lead_blocks: int = 4,
) -> Compose:
    """Neural spline flow: ``blocks`` x 2 complementary RQ-spline couplings (random split per block).

    ``circular``: indices of periodic dims in ``[-pi, pi)`` (circular splines + learned rotation);
    other dims get splines on ``[-bound, bound]`` with identity tails. Every dimension is
    transformed once per block. Returns a :class:`Compose` acting on ``(batch, dim)``.

    ``lead`` (indices, at least 2 and fewer than ``dim``): the flow factorises as
    q(x_lead) q(x_rest | x_lead). First (in the sampling direction) ``lead_blocks`` x 2 couplings act on
    the lead dims alone, blind to the rest; then the ``blocks`` x 2 couplings act on the rest, every one
    of them conditioned on the final lead values (a peptide's backbone torsions: the multimodal
    coordinates get a flow of their own, and every other coordinate's transform sees them).
    """
    _check_common(dim, blocks, context_dim)
    circ = as_mask(_indices(circular, dim), int(dim), "circular")
    g = torch.Generator().manual_seed(int(seed))
    common = dict(hidden=hidden, depth=depth, bins=bins, bound=bound, circular=circ, context_dim=context_dim,
                  activation=activation, circular_shift=circular_shift)
    lead_m = as_mask(list(lead), int(dim), "lead")
    if not bool(lead_m.any()):
        layers = []
        for _ in range(int(blocks)):
            a, _b = _half_masks(int(dim), g)
            for m in ((a, ~a) if int(dim) > 1 else (a, a)):
                layers.append(SplineCoupling(dim, m, **common))
        return Compose(layers)
    n_lead = int(lead_m.sum())
    if n_lead < 2 or n_lead >= int(dim):
        raise InputError(f"lead needs at least 2 dims and fewer than dim={dim}, got {n_lead}")
    if int(lead_blocks) < 1:
        raise InputError(f"lead_blocks must be >= 1, got {lead_blocks}")
    lead_idx = torch.nonzero(lead_m).flatten()
    rest_idx = torch.nonzero(~lead_m).flatten()

    def spread(sub: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(int(dim), dtype=torch.bool)
        full[idx[sub]] = True
        return full

    layers = []
    for _ in range(int(lead_blocks)):  # q(x_lead): lead dims only, blind to the rest
        a, _b = _half_masks(n_lead, g)
        for sub in (a, ~a):
            layers.append(SplineCoupling(dim, ~lead_m | spread(sub, lead_idx), blind=~lead_m, **common))
    for _ in range(int(blocks)):  # q(x_rest | x_lead): the lead dims condition every coupling
        a, _b = _half_masks(len(rest_idx), g)
        for sub in ((a, ~a) if len(rest_idx) > 1 else (a, a)):
            layers.append(SplineCoupling(dim, lead_m | spread(sub, rest_idx), **common))
    return Compose(layers)


def make_flow(dim: int, kind: str = "realnvp", circular: Sequence[int] = (), base_tail: float = 0.0, **kw) -> Flow:
    """A :class:`Flow` over ``(batch, dim)``: ``kind`` "realnvp" or "spline" (keywords go to the
    builder). Base: :class:`MixedBase` (uniform on ``[-pi, pi)`` for ``circular`` dims) when there
    are circular dims, else :class:`StandardNormal`; ``base_tail`` > 0 gives their normal dims exponential
    tails beyond ``|z| > base_tail`` (:func:`~boltzflow.flows.base.tailed_normal_log_prob`). RealNVP cannot
    handle circular dims."""
    circular = _indices(circular, dim)
    builder = {"realnvp": realnvp, "spline": spline_flow}.get(kind)
    if builder is not None:
        allowed = set(inspect.signature(builder).parameters) - {"dim", "circular"}
        unknown = sorted(set(kw) - allowed)
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for a {kind} flow; allowed: {sorted(allowed)}")
    if kind == "realnvp":
        if circular:
            raise InputError("realnvp cannot model circular (periodic) dims; use kind='spline'")
        bij = realnvp(dim, **kw)
    elif kind == "spline":
        bij = spline_flow(dim, circular=circular, **kw)
    else:
        raise InputError(f"unknown flow kind {kind!r}; choose one of {FLOW_KINDS}")
    base = MixedBase(dim, circular, tail=base_tail) if circular else StandardNormal(dim, tail=base_tail)
    return Flow(base, bij)


def flow_config(dim: int, kind: str = "realnvp", circular: Sequence[int] = (), **kw) -> dict:
    """The plain-dict config that :func:`make_flow` accepts (for checkpoints / TOML)."""
    return {"dim": int(dim), "kind": str(kind), "circular": _indices(circular, dim), **kw}
