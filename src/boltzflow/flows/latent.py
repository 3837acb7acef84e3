"""Flows seen from their latent space: the :class:`~boltzflow.sampling.latent.LatentMap` adapters that
latent MCMC and stochastic normalizing flows (:mod:`boltzflow.sampling.latent`, :mod:`.snf`) run on.

:func:`latent_map` adapts a plain :class:`~boltzflow.flows.base.Flow` (flat ``(n, dim)`` targets) or a
:class:`~boltzflow.flows.generator.MolecularGenerator` (all three pipelines). For a generator the
latent vector is the heavy-atom (or all-atom) flow's base variable, followed for the "conditional"
pipeline by the hydrogen flow's; ``push(z)`` returns exactly what ``sample_and_log_prob`` returns for
the same base draw (the "hnet" pipeline's hydrogens are placed by the net and carry no latent
dims; its log q is the heavy-atom density, so its targets are biased like its weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..sampling.latent import wrap_periodic
from .base import BaseDistribution, Flow, MixedBase


def _circular(base: BaseDistribution) -> torch.Tensor:
    if isinstance(base, MixedBase):
        return base.circular_mask.detach().cpu().clone()
    return torch.zeros(base.dim, dtype=torch.bool)


def _push_flow(flow: Flow, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, log q(y)) of a flow's base draw z (n, dim): y = bijection(z), log q = log p_Z(z) - log|det|."""
    y, ld = flow.bijection(z, context=context)
    return y, flow.base.log_prob(z) - ld


class FlowLatent:
    """:class:`~boltzflow.sampling.latent.LatentMap` of a :class:`Flow` over flat ``(n, dim)`` coordinates."""

    def __init__(self, flow: Flow):
        self.flow = flow
        self.dim = int(flow.base.dim)
        self.circular = _circular(flow.base)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.flow.base.sample(n, generator=generator)

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.flow.base.log_prob(z)

    def push(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _push_flow(self.flow, z)

    def wrap(self, z: torch.Tensor) -> torch.Tensor:
        return wrap_periodic(z, self.circular.to(z.device))


class GeneratorLatent:
    """:class:`~boltzflow.sampling.latent.LatentMap` of a :class:`~boltzflow.flows.generator.MolecularGenerator`:
    ``push(z) -> (x: (n, n_atoms, 3) nm, log q(x): (n,))`` as ``sample_and_log_prob`` gives them."""

    def __init__(self, gen: nn.Module):
        self.gen = gen
        pipeline = gen.config.pipeline
        self.pipeline = pipeline
        self.main: Flow = gen.all_flow if pipeline == "internal-all" else gen.heavy_flow
        self.h: Flow | None = gen.h_flow.flow if pipeline == "conditional" else None
        self.d_main = int(self.main.base.dim)
        parts = [_circular(self.main.base)] + ([_circular(self.h.base)] if self.h is not None else [])
        self.circular = torch.cat(parts)
        self.dim = int(self.circular.numel())

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z[:, : self.d_main], z[:, self.d_main:]

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, dim) base draws, in the order ``sample_and_log_prob`` draws them (same seed, same samples)."""
        z = self.main.base.sample(n, generator=generator)
        if self.h is not None:
            z = torch.cat([z, self.h.base.sample(n, generator=generator)], 1)
        return z

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        zm, zh = self._split(z)
        lp = self.main.base.log_prob(zm)
        return lp + self.h.base.log_prob(zh) if self.h is not None else lp

    def push(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.gen
        zm, zh = self._split(z)
        y, logq = _push_flow(self.main, zm)
        if self.pipeline == "internal-all":
            x, ld = gen.all_ic(y)
            return x - x[:, gen.heavy].mean(dim=1, keepdim=True), logq - ld
        xh, logq = gen._heavy_from_flow(y, logq)
        x = xh.new_zeros(z.shape[0], gen.n_atoms, 3).index_copy(1, gen.heavy, xh)
        if self.h is None:
            return gen.hnet(x), logq
        yh, logq_y = _push_flow(self.h, zh, context=gen.h_flow.features(x))
        x, logq_h = gen.h_flow.place(yh, logq_y, x)
        return x, logq + logq_h

    def wrap(self, z: torch.Tensor) -> torch.Tensor:
        return wrap_periodic(z, self.circular.to(z.device))


class InternalMap:
    """:class:`~boltzflow.sampling.moves.CoordinateMap` of an "internal-all" generator: the coordinates its
    flow models (standardised bonds and angles, torsions in radians; ``circular`` marks the periodic
    torsions). ``pull(x)`` -> q: (n, dim); ``push(q)`` -> (x: (n, n_atoms, 3) nm centred like the generator's
    samples, log|det dx/dq|: (n,)), so ``log q(x) = log q_flow(q) - log|det dx/dq|``."""

    def __init__(self, gen: nn.Module):
        if getattr(getattr(gen, "config", None), "pipeline", None) != "internal-all":
            raise InputError("moves in internal coordinates need a generator with pipeline = 'internal-all'")
        self.gen = gen
        self.ic: Any = gen.all_ic
        self.dim = int(self.ic.dim)
        circular = torch.zeros(self.dim, dtype=torch.bool)
        circular[list(self.ic.circular)] = True
        self.circular = circular

    def pull(self, x: torch.Tensor) -> torch.Tensor:
        return self.ic.inverse(x)[0]

    def push(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld = self.ic(q)
        return x - x[:, self.gen.heavy].mean(dim=1, keepdim=True), ld


def internal_map(gen: nn.Module) -> InternalMap:
    """The internal-coordinate view of an "internal-all" molecular generator (InputError for other pipelines)."""
    return InternalMap(gen)


def latent_map(model: nn.Module) -> FlowLatent | GeneratorLatent:
    """The latent-space view of a :class:`Flow` or a molecular generator (anything with ``config.pipeline``)."""
    if isinstance(model, Flow):
        return FlowLatent(model)
    if hasattr(model, "config") and hasattr(model.config, "pipeline"):
        return GeneratorLatent(model)
    raise TypeError(f"no latent-space view of {type(model).__name__}; expected a Flow or a MolecularGenerator")


__all__ = ["FlowLatent", "GeneratorLatent", "InternalMap", "internal_map", "latent_map"]
