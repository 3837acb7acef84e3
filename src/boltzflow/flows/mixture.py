"""A mixture of trained generators of one system: ``q(x) = sum_k pi_k q_k(x)``.

Flows trained separately (other seeds, other data) make partly independent errors, so their mixture
can be closer to p than each of them: its density is exact (every draw is scored by every component,
K density passes per draw), so reweighting stays unbiased. Measured on alanine tetrapeptide in
docs/peptides.md, "Mixtures of generators".

* :class:`GeneratorMixture`: the :class:`~boltzflow.core.protocols.Generator` of K components;
* saved by :func:`boltzflow.flows.generator.save_generator`'s checkpoint format under kind "mixture",
  so :func:`boltzflow.flows.generator.load_generator` and ``boltzflow sample`` read it like any generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .generator import MolecularGenerator, draw_samples


class GeneratorMixture(nn.Module):
    """``q(x) = sum_k pi_k q_k(x)`` over K >= 2 :class:`MolecularGenerator` of one system (internal-coordinate
    representations: their densities do not depend on the frame).

    weights: (K,) mixture probabilities pi (positive; normalised here; default equal)."""

    def __init__(self, components: Sequence[MolecularGenerator], weights: Sequence[float] | None = None):
        super().__init__()
        components = list(components)
        if len(components) < 2:
            raise InputError(f"a mixture needs at least 2 generators, got {len(components)}")
        prints = {c.system.fingerprint() for c in components}
        if len(prints) > 1:
            raise InputError("the generators of a mixture must be made for the same system (their system "
                             "fingerprints differ)")
        cart = [i for i, c in enumerate(components)
                if c.config.pipeline != "internal-all" and c.config.representation == "cartesian"]
        if cart:
            raise InputError(f"generator(s) {cart} model Cartesian heavy atoms in an aligned frame, which a mixture "
                             "cannot share; mix internal-coordinate generators (representation 'internal')")
        w = np.full(len(components), 1.0 / len(components)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(components),) or not np.all(np.isfinite(w)) or not np.all(w > 0):
            raise InputError(f"mixture weights must be {len(components)} positive numbers, got {list(np.ravel(w))}")
        self.components = nn.ModuleList(components)
        self.register_buffer("log_weights", torch.as_tensor(np.log(w / w.sum()), dtype=torch.float64))

    # ---- what callers of a generator use --------------------------------------------------------
    @property
    def system(self):
        return self.components[0].system

    @property
    def config(self):
        """The first component's :class:`~boltzflow.flows.generator.GeneratorConfig` (pipeline, representation)."""
        return self.components[0].config

    @property
    def n_atoms(self) -> int:
        return self.components[0].n_atoms

    @property
    def biased(self) -> bool:
        return any(bool(c.biased) for c in self.components)

    @property
    def weights(self) -> list[float]:
        return [float(v) for v in self.log_weights.exp()]

    def prepare_data(self, x, cast: bool = True) -> torch.Tensor:
        """x as a tensor in the generators' dtype (internal-coordinate components need no alignment)."""
        return self.components[0].prepare_data(x, cast)

    def same_isomer(self, x) -> np.ndarray:
        """(n,) bool: frames every component models (:meth:`MolecularGenerator.same_isomer`)."""
        return np.logical_and.reduce([c.same_isomer(x) for c in self.components])

    def mirror_images(self, x) -> np.ndarray:
        return self.components[0].mirror_images(x)

    def checkpoint_entry(self) -> tuple[str, dict]:
        """(kind, config) under which :func:`~boltzflow.flows.generator.save_generator` stores it."""
        from ..config import to_dict

        return "mixture", {"components": [to_dict(c.config) for c in self.components], "weights": self.weights}

    # ---- protocol -----------------------------------------------------------------------------
    def _component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(n, K) log pi_k + log q_k(x), float64."""
        return torch.stack([c.log_prob(x).double() for c in self.components], 1) + self.log_weights.to(x.device)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q(x) (n,) float64 for x (n, n_atoms, 3) nm: K density passes."""
        return torch.logsumexp(self._component_log_probs(x), 1)

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None):
        """x (n, n_atoms, 3) nm in random component order, log q(x) (n,) float64 of the mixture. The
        component counts are multinomial(n, pi); each draw is scored by every component."""
        pi = self.log_weights.exp().float().cpu()
        which = torch.multinomial(pi, n, replacement=True, generator=_cpu(generator))
        xs, lqs = [], []
        for k, comp in enumerate(self.components):
            m = int((which == k).sum())
            if m == 0:
                continue
            x, lq_own = comp.sample_and_log_prob(m, generator=generator)
            terms = [lq_own.double() if j == k else other.log_prob(x).double()
                     for j, other in enumerate(self.components)]
            lq = torch.logsumexp(torch.stack(terms, 1) + self.log_weights.to(x.device), 1)
            xs.append(x)
            lqs.append(lq)
        x, lq = torch.cat(xs), torch.cat(lqs)
        order = torch.randperm(n, generator=_cpu(generator)).to(x.device)
        return x[order], lq[order]

    @torch.no_grad()
    def sample(self, n: int, energy: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 1024,
               generator: torch.Generator | None = None):
        """n draws as a :class:`~boltzflow.sampling.SampleSet` (see :func:`~boltzflow.flows.generator.draw_samples`)."""
        prov = {"sampler": "GeneratorMixture", "pipeline": self.config.pipeline,
                "representation": self.config.representation, "biased": self.biased,
                "mixture_weights": self.weights}
        return draw_samples(self, n, energy, batch_size, generator, prov)


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator`` when it is a CPU generator, else None (multinomial / randperm draw on the CPU)."""
    return generator if generator is None or generator.device.type == "cpu" else None


def _build_mixture(config: dict, system=None, **_ignored) -> GeneratorMixture:
    from .generator import _build_molecular

    comps = [_build_molecular(c, system=system) for c in config["components"]]
    return GeneratorMixture(comps, config["weights"])


def register() -> None:
    """Register the "mixture" builder with :mod:`boltzflow.flows.checkpoint` (idempotent)."""
    from .checkpoint import register_builder

    register_builder("mixture", _build_mixture, overwrite=True)


register()

__all__ = ["GeneratorMixture", "register"]
