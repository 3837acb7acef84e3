"""The contracts between packages, as typed Protocols (structural: no inheritance needed).

* :class:`ReducedEnergy`: what the losses, samplers and the trainer call, e.g.
  :class:`boltzflow.energy.Energy` or a toy target's ``energy``;
* :class:`Generator`: what the trainer and the samplers need of a trained flow, e.g.
  :class:`boltzflow.flows.generator.MolecularGenerator`;
* :class:`ModeSet` / :class:`MolecularModeSet`: the conformational states of a system
  (:mod:`boltzflow.systems.modes`). Mode sets say which kind they are with the class attribute
  ``molecular`` (coordinates ``(n, n_atoms, 3)`` and a torsion to histogram) instead of callers
  probing attributes; :func:`is_molecular` reads it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ReducedEnergy(Protocol):
    """``u = energy(x)``: positions ``x: (batch, ...)`` (molecules: ``(batch, n_atoms, 3)`` in nm) ->
    reduced energies ``(batch,)`` in kT, differentiable w.r.t. ``x``; ``+inf`` where invalid."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Generator(Protocol):
    """A normalised sampler with a tractable density: draws ``x: (n, ...)`` with ``log q(x): (n,)``
    (natural log, density w.r.t. the coordinates the energy takes)."""

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ModeSet(Protocol):
    """Conformational states (modes) of a system: ``assign(x) -> (n,)`` int labels indexing ``names``;
    ``minor`` names the rare mode whose population is the headline number."""

    molecular: ClassVar[bool]
    names: tuple[str, ...]
    minor: str

    def assign(self, x: Any) -> np.ndarray: ...

    def fractions(self, x: Any) -> dict[str, float]: ...

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class MolecularModeSet(ModeSet, Protocol):
    """A :class:`ModeSet` over molecular coordinates ``(n, n_atoms, 3)`` (``molecular = True``), with the
    four atoms of the torsion a one-dimensional histogram shows."""

    @property
    def atoms(self) -> tuple[int, int, int, int]: ...


def is_molecular(modes: ModeSet | None) -> bool:
    """True for a mode set over molecular coordinates (``modes.molecular``), False for toy targets' and None."""
    return modes is not None and bool(modes.molecular)
