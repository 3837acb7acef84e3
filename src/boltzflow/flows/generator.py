"""MolecularGenerator: heavy-atom flow + hydrogen model -> all-atom configurations with log q.

Pipelines (``GeneratorConfig.pipeline``; docs/pipelines.md has the bias of each):

* ``"hnet"`` (felardos2023): heavy-atom flow G, hydrogens by the placement net h.
  ``log_q`` is the heavy-atom density; ``biased = True``: weights -u(x_C, h(x_C)) - log q(x_C)
  target p_bar(x_C) ~ p_B(x_C, h(x_C)), not the heavy-atom marginal of p_B.
* ``"conditional"``: heavy-atom flow x conditional hydrogen flow q(x_H | x_C): exact all-atom
  density, unbiased.
* ``"internal-all"``: one flow over the all-atom internal coordinates (3n-6 dims, torsions
  circular): exact density (modulo rigid motions), unbiased. ``representation`` is not used.

Heavy-atom representation (``representation``): ``"cartesian"`` (3 n_heavy dims, per-coordinate
standardisation fitted on centred + aligned data, alignment penalty) or ``"internal"``
(Z-matrix bonds/angles/torsions, 3 n_heavy - 6 dims, exact log-det).

:class:`GeneratorMixture`: ``q = sum_k pi_k q_k`` of K trained generators of one system, an exact density
(every draw scored by every component) saved and loaded like one generator (``boltzflow mix``).

Protocol used by :mod:`boltzflow.losses`: ``sample_and_log_prob(n, generator)``, ``log_prob(x)``,
``penalty(x)``, ``parameters()``. Coordinates ``(n, n_atoms, 3)`` nm in input atom order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..transforms.cartesian import alignment_penalty, prepare_cartesian
from ..transforms.internal import (
    InternalCoordinates,
    amide_torsions,
    chiral_centers,
    improper_torsions,
    mirror_image_mask,
)
from ..transforms.zmatrix import all_atom_zmatrix, bond_graph, build_zmatrix
from .base import valid_tail

PIPELINES = ("hnet", "conditional", "internal-all")
REPRESENTATIONS = ("cartesian", "internal")
FLOW_KINDS = ("auto", "realnvp", "spline")
FIXED_TORSIONS = ("none", "improper", "isomer")
LEADS = ("none", "backbone")


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a :class:`MolecularGenerator` (TOML table ``[generator]``).

    pipeline: "hnet" | "conditional" | "internal-all". representation: heavy atoms "cartesian" |
    "internal". flow: "auto" (realnvp for Cartesian, spline for internal coordinates), "realnvp"
    (Cartesian only) or "spline". blocks / hidden / depth / bins: main flow (realnvp: blocks x 4
    affine couplings; spline: blocks x 2 RQ-spline couplings). lambda_align: alignment penalty weight
    (Cartesian), max_rotation: cap of its Kabsch rotation (rad). hnet_hidden / hnet_depth: hydrogen
    net MLP. h_blocks / h_hidden / h_depth / h_bins: conditional hydrogen spline flow.
    fixed_torsions: "none" (every Z-matrix torsion is a periodic coordinate), "improper" (torsions
    fixed by a centre's geometry, e.g. chirality at CA or a methyl hydrogen next to its sibling, are
    standardised deviations from their mean: the flow cannot flip a chiral centre or permute
    hydrogens and models a narrow peak instead of a circle; see
    :func:`~boltzflow.transforms.internal.improper_torsions`) or "isomer" (also the amide C-N torsions,
    :func:`~boltzflow.transforms.internal.amide_torsions`: the generator keeps the input structure's
    cis/trans peptide bonds; see :meth:`MolecularGenerator.same_isomer`). whiten: decorrelate the non-periodic
    internal coordinates (bonds, angles, fixed torsions) with the Cholesky factor of their correlation
    on the fitting data, so the flow starts from the data's Gaussian approximation. lead: "none" or
    "backbone" (internal-coordinate spline flows of peptides: the flow factorises as q(phi, psi) q(rest |
    phi, psi), with ``lead_blocks`` x 2 couplings of its own for the backbone torsions and every other
    coupling conditioned on them; see :func:`~boltzflow.flows.builders.spline_flow`). base_tail: 0 (the main
    flow's base is N(0, 1) on its non-periodic dims) or the ``|z|`` beyond which that base density decays
    exponentially instead (:func:`~boltzflow.flows.base.tailed_normal_log_prob`; 3 tried on the
    tetrapeptide): splines end at ``|z|`` = 5, beyond which a Gaussian base fixes the tails of bond lengths,
    angles and fixed torsions to be Gaussian, too light for the tetrapeptide's rare strained frames
    (docs/peptides.md, "Base tails"). It has no parameters: given to a trained generator (an ``init`` run may
    differ in it) it changes that generator's density in the tails only. seed: masks.
    """

    pipeline: str = "hnet"
    representation: str = "cartesian"
    flow: str = "auto"
    blocks: int = 8
    hidden: int = 256
    depth: int = 2
    bins: int = 8
    lambda_align: float = 10.0
    max_rotation: float = math.pi / 3
    hnet_hidden: int = 512
    hnet_depth: int = 3
    h_blocks: int = 4
    h_hidden: int = 128
    h_depth: int = 2
    h_bins: int = 8
    fixed_torsions: str = "none"
    whiten: bool = False
    lead: str = "none"
    lead_blocks: int = 4
    base_tail: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"unknown pipeline {self.pipeline!r}; choose one of {', '.join(PIPELINES)}")
        if self.representation not in REPRESENTATIONS:
            raise ConfigError(f"unknown representation {self.representation!r}; choose one of {', '.join(REPRESENTATIONS)}")
        if self.fixed_torsions not in FIXED_TORSIONS:
            raise ConfigError(f"unknown fixed_torsions {self.fixed_torsions!r}; choose one of {', '.join(FIXED_TORSIONS)}")
        if self.lead not in LEADS:
            raise ConfigError(f"unknown lead {self.lead!r}; choose one of {', '.join(LEADS)}")
        if self.lead != "none" and (self.heavy_kind != "spline" or self.representation == "cartesian"
                                    and self.pipeline != "internal-all"):
            raise ConfigError("lead='backbone' needs internal coordinates and a spline flow "
                              "(pipeline='internal-all', or representation='internal')")
        if self.flow not in FLOW_KINDS:
            raise ConfigError(f"unknown flow {self.flow!r}; choose one of {', '.join(FLOW_KINDS)}")
        if self.flow == "realnvp" and (self.representation == "internal" or self.pipeline == "internal-all"):
            raise ConfigError("internal coordinates have periodic torsions; use flow='spline' (or 'auto') with them")
        for name in ("blocks", "hidden", "depth", "bins", "hnet_hidden", "hnet_depth", "h_blocks", "h_hidden",
                     "h_depth", "h_bins", "lead_blocks"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not valid_tail(self.base_tail):
            raise ConfigError(f"base_tail must be 0 (Gaussian base) or the |z| > 0 where exponential tails start, "
                              f"got {self.base_tail}")
        if self.lambda_align < 0 or not 0 < self.max_rotation <= math.pi:
            raise ConfigError("lambda_align must be >= 0 and max_rotation in (0, pi]")

    @property
    def heavy_kind(self) -> str:
        """The main flow kind after resolving "auto"."""
        if self.flow != "auto":
            return self.flow
        internal = self.representation == "internal" or self.pipeline == "internal-all"
        return "spline" if internal else "realnvp"


#: the standardisations are fitted on at most about this many (evenly spaced) frames
FIT_MAX = 200_000
#: frames per chunk where whole data sets are measured (isomer checks)
CHUNK = 50_000


def backbone_lead(ic: InternalCoordinates, topology) -> list[int]:
    """Flow dims of ``ic`` (an :class:`InternalCoordinates` over atoms ``ic.atoms``) that carry the
    backbone torsions phi / psi of every residue (:func:`~boltzflow.systems.torsions.backbone_torsions`),
    in residue order. A torsion is the Z-matrix torsion about the same central bond, the exact
    quadruple where the Z-matrix has it (another one about that bond differs from it by a nearly
    constant offset). Raises ConfigError when fewer than 2 are found (not a peptide)."""
    from ..systems.torsions import backbone_torsions

    rows = ic.rows.cpu().numpy()
    atoms = np.asarray(ic.atoms)
    glob = np.where(rows >= 0, atoms[np.clip(rows, 0, None)], -1)
    fixed = set() if ic.fixed_idx is None else {int(q) for q in ic.fixed_idx.cpu().tolist()}
    m = ic.m
    out: list[int] = []
    for res in backbone_torsions(topology):
        for name in ("phi", "psi"):
            if name not in res:
                continue
            a, b, c, d = res[name]
            best = None
            for q in range(m - 3):
                i, j, k, l = (int(v) for v in glob[q + 3])
                if q in fixed or {j, k} != {b, c}:
                    continue
                if (i, j, k, l) in ((a, b, c, d), (d, c, b, a)):
                    best = q
                    break
                best = q if best is None else best
            if best is not None and 2 * m - 3 + best not in out:
                out.append(2 * m - 3 + best)
    if len(out) < 2:
        raise ConfigError(f"lead='backbone' found {len(out)} backbone torsion(s) in this molecule; it is for "
                          "peptides (residues with N, CA and a carbonyl C). Use lead='none'.")
    return out


class MolecularGenerator(nn.Module):
    """All-atom Boltzmann generator for a :class:`~boltzflow.systems.MolecularSystem`.

    Build with :func:`build_generator`. Attributes: ``config``, ``system``, ``biased`` (True for the
    "hnet" pipeline), ``heavy_flow`` / ``all_flow``, ``hnet`` or ``h_flow``.
    """

    def __init__(self, system, config: GeneratorConfig):
        super().__init__()
        from .builders import make_flow
        from .hydrogen import ConditionalHydrogenFlow, HydrogenNet

        self.system = system
        self.config = config
        self.biased = config.pipeline == "hnet"
        n = int(system.n_atoms)
        self.n_atoms = n
        heavy = np.array(system.heavy_indices)
        self.register_buffer("heavy", torch.as_tensor(heavy))
        self.register_buffer("hydrogens", torch.as_tensor(np.array(system.hydrogen_indices)))
        ref = np.array(system.positions, dtype=np.float64)
        adj = bond_graph(system.topology)
        self._chiral = chiral_centers(adj, heavy)
        c = config
        kind = c.heavy_kind
        kw: dict[str, Any] = dict(blocks=c.blocks, hidden=c.hidden, depth=c.depth, seed=c.seed, base_tail=c.base_tail)
        if kind == "spline":
            kw["bins"] = c.bins
        if c.pipeline == "internal-all":
            zm = all_atom_zmatrix(adj, heavy, system.hydrogen_indices, system.hydrogen_parents)
            self.all_ic = InternalCoordinates(zm, ref, atoms=np.arange(n), fixed_torsions=self._fixed(zm, adj),
                                              whiten=c.whiten)
            if c.lead != "none":
                kw.update(lead=backbone_lead(self.all_ic, system.topology), lead_blocks=c.lead_blocks)
            self.all_flow = make_flow(self.all_ic.dim, kind=kind, circular=self.all_ic.circular, **kw)
            self.to(torch.get_default_dtype())
            return
        n_heavy = len(heavy)
        ref_heavy = ref[heavy] - ref[heavy].mean(0, keepdims=True)
        self.register_buffer("ref_heavy", torch.as_tensor(ref_heavy))
        if c.representation == "cartesian":
            self.register_buffer("cart_mean", torch.as_tensor(ref_heavy.reshape(-1).copy()))
            self.register_buffer("cart_std", torch.full((3 * n_heavy,), 0.05, dtype=torch.float64))
            self.heavy_flow = make_flow(3 * n_heavy, kind=kind, **kw)
        else:
            zm = build_zmatrix(adj, heavy)
            self.heavy_ic = InternalCoordinates(zm, ref[heavy], atoms=heavy, fixed_torsions=self._fixed(zm, adj),
                                                whiten=c.whiten)
            if c.lead != "none":
                kw.update(lead=backbone_lead(self.heavy_ic, system.topology), lead_blocks=c.lead_blocks)
            self.heavy_flow = make_flow(self.heavy_ic.dim, kind=kind, circular=self.heavy_ic.circular, **kw)
        if c.pipeline == "hnet":
            self.hnet = HydrogenNet(system, hidden=c.hnet_hidden, depth=c.hnet_depth)
        else:
            self.h_flow = ConditionalHydrogenFlow(system, blocks=c.h_blocks, hidden=c.h_hidden, depth=c.h_depth,
                                                  bins=c.h_bins, seed=c.seed + 1)
        self.to(torch.get_default_dtype())  # float buffers follow the parameters (one dtype per checkpoint)

    def _fixed(self, zmatrix, adjacency) -> list[int]:
        mode = self.config.fixed_torsions
        if mode == "none":
            return []
        fixed = set(improper_torsions(zmatrix, adjacency))
        if mode == "isomer":
            elements = [a.element.symbol if a.element is not None else "" for a in self.system.topology.atoms()]
            fixed |= set(amide_torsions(zmatrix, adjacency, elements))
        return sorted(fixed)

    def same_isomer(self, x) -> np.ndarray:
        """(n,) bool: frames of x (n, n_atoms, 3) nm whose fixed torsions (``fixed_torsions``) lie within
        90 degrees of the input structure's, i.e. the isomer the generator models (same handedness at
        every chiral centre, same cis/trans amides with "isomer"). Data outside it would be outliers
        to maximum likelihood; the generator's weights target p restricted to this isomer."""
        ic = self.all_ic if self.config.pipeline == "internal-all" else getattr(self, "heavy_ic", None)
        n = len(x)
        if ic is None or ic.fixed_idx is None or n == 0:
            return np.ones(n, dtype=bool)
        dev = ic.fixed_idx.device  # measured where the transform's index buffers live (a CUDA generator too)
        atoms = torch.as_tensor(ic.atoms)
        ref = torch.as_tensor(np.array(self.system.positions, dtype=np.float64))[atoms][None].to(dev)
        idx = ic.fixed_idx
        t0 = ic._measure(ref)[2][:, idx]
        out = np.empty(n, dtype=bool)
        for s in range(0, n, CHUNK):  # chunks: float64 torsions of a million frames would need ~10 GB at once
            xs = torch.as_tensor(np.asarray(x[s:s + CHUNK], dtype=np.float64) if not isinstance(x, torch.Tensor)
                                 else x[s:s + CHUNK]).double().to(dev)
            off = torch.remainder(ic._measure(xs[:, atoms])[2][:, idx] - t0 + math.pi, 2 * math.pi) - math.pi
            out[s:s + CHUNK] = (off.abs() < math.pi / 2).all(1).cpu().numpy()
        return out

    # ---- data ------------------------------------------------------------------------------------
    def _as_x(self, x, cast: bool = True) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise InputError(f"coordinates must have shape (n, {self.n_atoms}, 3) in nm for {self.system.name}, "
                             f"got {tuple(x.shape)}")
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype if cast else x.dtype)

    def prepare_data(self, x, cast: bool = True) -> torch.Tensor:
        """Bring data x (n, n_atoms, 3) nm into the generator's frame: for Cartesian heavy atoms, centre
        the heavy atoms and Kabsch-align them to the reference (do this before KLz training);
        internal-coordinate pipelines return x unchanged (their density is rigid-motion invariant).
        Returns the generator's dtype/device (``cast=False``: keep x's dtype)."""
        x = self._as_x(x, cast)
        if self.config.pipeline != "internal-all" and self.config.representation == "cartesian":
            return prepare_cartesian(x, self.heavy, self.ref_heavy)
        return x

    @torch.no_grad()
    def fit(self, data) -> "MolecularGenerator":
        """Fit the standardisations (Cartesian mean/std, internal-coordinate bond/angle mean/std,
        hydrogen local frames) on data (n, n_atoms, 3) nm; n >= 2. Of more than :data:`FIT_MAX` frames an
        evenly spaced subset of about FIT_MAX is used (means and standard deviations; bounded memory)."""
        data = data[::max(1, len(data) // FIT_MAX)]
        x = self.prepare_data(torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data,
                                              dtype=torch.float64), cast=False)
        if x.shape[0] < 2:
            raise InputError("fitting a generator's standardisation needs at least 2 configurations")
        if self.config.pipeline == "internal-all":
            self.all_ic.fit(x)
            return self
        if self.config.representation == "cartesian":
            flat = x[:, self.heavy].reshape(x.shape[0], -1)
            self.cart_mean.copy_(flat.mean(0).to(self.cart_mean))
            self.cart_std.copy_(flat.std(0).clamp_min(0.01).to(self.cart_std))
        else:
            self.heavy_ic.fit(x[:, self.heavy])
        if self.config.pipeline == "hnet":
            self.hnet.fit(x)
        else:
            self.h_flow.fit(x)
        return self

    # ---- heavy atoms -----------------------------------------------------------------------------
    def _heavy_sample(self, n: int, generator):
        """(x_heavy (n, n_heavy, 3), log q(x_heavy) (n,))."""
        y, logq = self.heavy_flow.sample_and_log_prob(n, generator=generator)
        return self._heavy_from_flow(y, logq)

    def _heavy_from_flow(self, y: torch.Tensor, logq: torch.Tensor):
        """(x_heavy (n, n_heavy, 3), log q(x_heavy) (n,)) of the heavy flow's output y (n, dim) with log density logq."""
        n = y.shape[0]
        if self.config.representation == "cartesian":
            xh = (self.cart_mean.to(y) + self.cart_std.to(y) * y).reshape(n, -1, 3)
            return xh, logq - torch.log(self.cart_std.to(y)).sum()
        xh, ld = self.heavy_ic(y)
        xh = xh - xh.mean(dim=1, keepdim=True)  # centre (translation: density unchanged)
        return xh, logq - ld

    def _heavy_log_prob(self, xh: torch.Tensor) -> torch.Tensor:
        if self.config.representation == "cartesian":
            y = (xh.reshape(xh.shape[0], -1) - self.cart_mean.to(xh)) / self.cart_std.to(xh)
            return self.heavy_flow.log_prob(y) - torch.log(self.cart_std.to(xh)).sum()
        z, ld = self.heavy_ic.inverse(xh)
        return self.heavy_flow.log_prob(z) + ld

    # ---- protocol ----------------------------------------------------------------------------------
    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None):
        """x: (n, n_atoms, 3) nm all atoms in input order, log_q: (n,) (heavy-atom density for "hnet").
        Differentiable w.r.t. the parameters."""
        if self.config.pipeline == "internal-all":
            z, logq = self.all_flow.sample_and_log_prob(n, generator=generator)
            x, ld = self.all_ic(z)
            return x - x[:, self.heavy].mean(dim=1, keepdim=True), logq - ld
        xh, logq = self._heavy_sample(n, generator)
        x = xh.new_zeros(n, self.n_atoms, 3).index_copy(1, self.heavy, xh)
        if self.config.pipeline == "hnet":
            return self.hnet(x), logq
        x, logq_h = self.h_flow.sample_and_log_prob(x, generator=generator)
        return x, logq + logq_h

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q(x) (n,) for x (n, n_atoms, 3) nm; "hnet": heavy-atom density (hydrogens ignored)."""
        x = self._as_x(x)
        if self.config.pipeline == "internal-all":
            z, ld = self.all_ic.inverse(x)
            return self.all_flow.log_prob(z) + ld
        lp = self._heavy_log_prob(x[:, self.heavy])
        if self.config.pipeline == "conditional":
            lp = lp + self.h_flow.log_prob(x)
        return lp

    @property
    def has_penalty(self) -> bool:
        """Whether :meth:`penalty` can be non-zero (Cartesian heavy atoms with lambda_align > 0); losses
        need not draw a batch for it otherwise."""
        c = self.config
        return c.pipeline != "internal-all" and c.representation == "cartesian" and c.lambda_align > 0

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) lambda_align x alignment distance of the heavy atoms (Cartesian), else zeros."""
        if self.config.pipeline == "internal-all" or self.config.representation != "cartesian":
            return x.new_zeros(x.shape[0])
        c = self.config
        return alignment_penalty(x[:, self.heavy], self.ref_heavy.to(x), c.lambda_align, c.max_rotation)

    def mirror_images(self, x) -> np.ndarray:
        """(n,) bool: samples whose chiral centres (e.g. CA) have the opposite handedness of the input
        structure (D-amino acids), which internal-coordinate flows can produce."""
        return mirror_image_mask(x, self._chiral, self.system.positions)

    def checkpoint_entry(self) -> tuple[str, dict]:
        """(kind, config) under which :func:`save_generator` stores it."""
        from ..config import to_dict

        return "molecular", to_dict(self.config)

    @torch.no_grad()
    def sample(self, n: int, energy: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 1024,
               generator: torch.Generator | None = None):
        """Draw n samples as a :class:`~boltzflow.sampling.SampleSet` (positions float32 nm, log_q;
        with ``energy`` (callable (b, n_atoms, 3) -> (b,) kT) also reduced_energy and
        log_weights = -u - log_q; for the "hnet" pipeline the weights target the hydrogen-minimised
        distribution, recorded in provenance["biased"])."""
        prov = {"sampler": "MolecularGenerator", "pipeline": self.config.pipeline,
                "representation": self.config.representation, "biased": self.biased}
        return draw_samples(self, n, energy, batch_size, generator, prov)


@torch.no_grad()
def draw_samples(gen, n: int, energy: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 1024,
                 generator: torch.Generator | None = None, provenance: dict | None = None):
    """n draws of ``gen`` (anything with ``sample_and_log_prob(b, generator)`` and a ``system``) in batches, as
    a :class:`~boltzflow.sampling.SampleSet`: positions float32 nm, log_q; with ``energy`` also reduced_energy
    and log_weights = -u - log_q (-inf where u is not finite). ``provenance`` is extended by the system's
    name and fingerprint."""
    from ..core.sampleset import SampleSet

    if n < 1 or batch_size < 1:
        raise InputError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    xs, lqs, us = [], [], []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        x, lq = gen.sample_and_log_prob(b, generator=generator)
        xs.append(x.detach().cpu())
        lqs.append(lq.detach().cpu().double())
        if energy is not None:
            us.append(energy(x).detach().cpu().double())
    x = torch.cat(xs)
    lq = torch.cat(lqs)
    u = torch.cat(us) if us else None
    lw = None if u is None else torch.where(torch.isfinite(u), -u - lq, torch.full_like(u, -math.inf))
    prov = {**(provenance or {}), "system": gen.system.name, "fingerprint": gen.system.fingerprint()}
    return SampleSet(positions=x.numpy().astype(np.float32), reduced_energy=None if u is None else u.numpy(),
                     log_q=lq.numpy(), log_weights=None if lw is None else lw.numpy(),
                     temperature=float(gen.system.temperature), provenance=prov)


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
        """(kind, config) under which :func:`save_generator` stores it."""
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
    comps = [_build_molecular(c, system=system) for c in config["components"]]
    return GeneratorMixture(comps, config["weights"])


def build_generator(system, config: GeneratorConfig | None = None, data=None) -> MolecularGenerator:
    """A :class:`MolecularGenerator` for ``system``; ``data`` (n, n_atoms, 3) nm (optional) fits the
    standardisations (Cartesian mean/std after alignment, bond/angle mean/std, hydrogen frames)."""
    gen = MolecularGenerator(system, config or GeneratorConfig())
    if data is not None:
        gen.fit(data)
    return gen


# ---- checkpoints ----------------------------------------------------------------------------------
def _build_molecular(config: dict, system=None, **_ignored) -> MolecularGenerator:
    from ..config import from_dict

    if system is None:
        raise InputError("loading a 'molecular' checkpoint needs the system: load_model(path, system=...)")
    return MolecularGenerator(system, from_dict(GeneratorConfig, config))


def register() -> None:
    """Register the "molecular" builder with :mod:`boltzflow.flows.checkpoint` (idempotent)."""
    from .checkpoint import register_builder

    register_builder("molecular", _build_molecular, overwrite=True)
    register_builder("mixture", _build_mixture, overwrite=True)


def save_generator(path: str | Path, gen, extra: dict | None = None,
                   weights_dtype: str | None = None) -> Path:
    """Atomically save weights, config and the system fingerprint. weights_dtype: "float16" stores the
    parameters rounded (half the file; "int8" a quarter; see :func:`~boltzflow.flows.checkpoint.save_model`)."""
    from .checkpoint import save_model

    register()
    kind, config = gen.checkpoint_entry()
    return save_model(path, gen, kind, config, fingerprint=gen.system.fingerprint(), extra=extra,
                      weights_dtype=weights_dtype)


def load_generator(path: str | Path, system) -> MolecularGenerator:
    """Load a generator saved by :func:`save_generator` (a :class:`MolecularGenerator` or a
    :class:`GeneratorMixture`); CheckpointError if made for another system."""
    from .checkpoint import load_model

    register()
    return load_model(path, expected_fingerprint=system.fingerprint(), system=system)


# make checkpoint.load_model(path, system=...) work as soon as this module is imported (a dict insert)
register()

__all__ = ["GeneratorConfig", "MolecularGenerator", "build_generator", "save_generator", "load_generator", "draw_samples",
           "GeneratorMixture",
           "all_atom_zmatrix", "PIPELINES", "REPRESENTATIONS"]
