"""Mode summaries and sampler comparison: the one place where boltzflow turns samples into populations,
the minor mode's free energy, ESS, block errors and the cost to a target error.

``boltzflow estimate`` (:func:`sample_estimates`), ``boltzflow compare`` (:func:`compare_samplers`),
the HTML report (:func:`mode_fractions`, :func:`sample_ess`) and :func:`boltzflow.pipeline.estimate`
call these functions and only format their results.

Conventions, fixed here once:

* **Error bars.** Weighted samples (a generator's, with log weights): self-normalised importance
  sampling with delta-method errors. Time-ordered correlated frames (a SampleSet whose provenance
  says ``decorrelated: False``, e.g. a shipped reference with every iteration, or a replica-exchange
  series): block errors with :data:`N_BLOCKS` blocks. Decorrelated unweighted frames: binomial errors.
* **Block count.** :data:`N_BLOCKS` = 10 everywhere (the published reference numbers,
  ``systems/*/REFERENCE.md``, use 10; ``estimate`` and ``compare`` on time-ordered frames used 20
  before).
* **Too few effective samples.** Below :data:`MIN_ESS` effective samples an error bar is itself
  meaningless (ESS ~ 1 gives a stderr ~ 0), so results say so and no cost is extrapolated.
* **Heavy-tailed weights.** Every estimate from importance weights carries the weights' Pareto k
  (:func:`boltzflow.estimators.pareto_k`); above :data:`boltzflow.estimators.tails.PARETO_K_MAX` = 0.7 its error bar is flagged
  (``Estimate.reliable`` False, the one-line :func:`heavy_tail_note`), and ``stderr`` is the larger of the
  delta-method and the batch-means error over 10 chunks (:func:`boltzflow.estimators.core.tail_checked`).
* **Free energy of the minor mode.** ``dF(rest->MINOR) = -log(P_minor / (1 - P_minor))`` in kT (one
  name, :func:`minor_free_energy_name`): the ratio estimator on the samples, or propagated from a
  block-error population for correlated series.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.geometry import dihedral_of
from ..core.protocols import ModeSet, is_molecular
from ..core.sampleset import SampleSet
from ..core.weights import kish_ess as _kish_count
from ..errors import InputError
from ..systems.torsions import named_torsions
from ..units import kt_kj_per_mol
from .blocks import block_average
from .core import Estimate, kish_ess, log_z
from .free_energy import conformational_free_energy, histogram_kl, population, population_free_energy
from .tails import heavy_tail_note, pareto_k

#: blocks for every block error of a correlated series (see the module docstring)
N_BLOCKS = 10
#: below this many effective samples error bars and cost extrapolations are flagged as unreliable
MIN_ESS = 50.0
#: time-ordered frames get block errors only from this many frames on (4 per block); fewer: binomial
MIN_TIME_ORDERED = 4 * N_BLOCKS


def minor_free_energy_name(minor: str) -> str:
    """The one name of the minor mode's conformational free energy: ``dF(rest->MINOR)``."""
    return f"dF(rest->{minor})"


def too_few_effective_samples(ess: float) -> bool:
    """True when ``ess`` (a count) is below :data:`MIN_ESS` or not a number."""
    return not (ess == ess and ess >= MIN_ESS)


def few_samples_note(ess: float) -> str:
    """The sentence results carry when :func:`too_few_effective_samples` (empty otherwise)."""
    if not too_few_effective_samples(ess):
        return ""
    return f"ESS {ess:.1f} < {MIN_ESS:g}: error bars and cost extrapolation unreliable"


def sample_ess(samples: SampleSet) -> float:
    """Kish ESS of a SampleSet as a count: of its log weights when weighted, ``len(samples)`` when not."""
    return _kish_count(samples.log_weights) if samples.log_weights is not None else float(len(samples))


def sample_pareto_k(samples: SampleSet) -> float:
    """Pareto k of a SampleSet's importance weights (:func:`boltzflow.estimators.pareto_k`); nan when unweighted."""
    return pareto_k(samples.log_weights) if samples.log_weights is not None else float("nan")


def is_time_ordered(samples: SampleSet) -> bool:
    """Unweighted frames in time order (provenance ``decorrelated: False``), enough of them for block errors."""
    prov = samples.provenance or {}
    return samples.log_weights is None and prov.get("decorrelated") is False and len(samples) >= MIN_TIME_ORDERED


def block_population(indicator, name: str, n_bootstrap: int = 1000, seed: int = 0) -> Estimate:
    """Population of a region from a correlated series of indicators ``(n,)`` in time order, with the
    :data:`N_BLOCKS`-block error (:func:`boltzflow.estimators.block_average`)."""
    return block_average(np.asarray(indicator, dtype=np.float64), n_blocks=N_BLOCKS, name=name,
                         n_bootstrap=n_bootstrap, seed=seed)


def region_population(samples: SampleSet, indicator, name: str, seed: int = 0, n_bootstrap: int = 500) -> Estimate:
    """P(region) of a SampleSet from ``indicator: (n,) bool``, with the error bar its kind of samples
    needs (module docstring): block errors for time-ordered frames, importance sampling otherwise."""
    if is_time_ordered(samples):
        return block_population(indicator, name, n_bootstrap=n_bootstrap, seed=seed)
    return population(indicator, samples.log_weights, name=name, seed=seed, n_bootstrap=n_bootstrap)


def residue_region_names(modes: ModeSet | None) -> list[str]:
    """Per-residue state names ``res<i>_<state>`` of a peptide's modes
    (:class:`boltzflow.systems.modes.PeptideModes`); empty for mode sets without per-residue states."""
    return list(getattr(modes, "region_names", None) or [])


def residue_populations(modes: ModeSet, samples: SampleSet, seed: int = 0, n_bootstrap: int = 500) -> dict[str, Estimate]:
    """``{res<i>_<state>: Estimate}``: every residue's backbone-state population (alpha_R / beta_PPII /
    alpha_L, ``modes.residue_states``) in ``samples`` with the error bar of :func:`region_population`
    (importance sampling for weighted samples, block errors for time-ordered frames); empty without
    per-residue states. The three states of a residue sum to 1."""
    names = residue_region_names(modes)
    if not names:
        return {}
    st = modes.residue_states(samples.positions)  # type: ignore[attr-defined]  # PeptideModes: (n, n_residues)
    n_states = len(names) // st.shape[1]
    out = {}
    for k, name in enumerate(names):
        r, j = divmod(k, n_states)
        out[name] = region_population(samples, st[:, r] == j, name, seed=seed, n_bootstrap=n_bootstrap)
    return out


def z_score(a: Estimate, b: Estimate) -> float:
    """``(a - b) / sqrt(se_a^2 + se_b^2)``: the difference of two independent estimates in combined
    standard errors; 0 when both agree exactly with zero errors, +-inf when they differ with zero errors,
    nan when an error bar is unknown."""
    den = float(np.hypot(a.stderr, b.stderr))
    diff = float(a.value - b.value)
    if not den == den:
        return float("nan")
    if den == 0.0:
        return 0.0 if diff == 0.0 else float(np.copysign(np.inf, diff))
    return diff / den


def mode_fractions(modes: ModeSet, positions, log_weights=None) -> dict[str, float]:
    """Weighted fraction of samples in each mode, ``{name: fraction}`` (no error bars; for tables)."""
    lab = modes.assign(positions)
    w = SampleSet(np.asarray(positions), log_weights=log_weights).normalized_weights()
    return {nm: float(w[lab == i].sum()) for i, nm in enumerate(modes.names)}


@dataclass(frozen=True)
class ModeSummary:
    """Mode populations of one sampler's samples and the minor mode's free energy.

    populations: ``{mode name: Estimate}`` (probability); dF: ``dF(rest->minor)`` in kT (None when a mode
    is empty; ``dF_note`` says why); ess: effective samples behind the minor mode's population (count);
    n: samples; error_method: how the population errors were obtained; temperature_k: K; pareto_k: of
    the importance weights (nan for unweighted samples; above 0.7 the error bars are flagged)."""

    populations: dict[str, Estimate]
    minor: str
    dF: Estimate | None
    ess: float
    n: int
    error_method: str
    temperature_k: float | None = None
    dF_note: str = ""
    pareto_k: float = float("nan")

    @property
    def reliable(self) -> bool:
        """Enough effective samples (>= :data:`MIN_ESS`) for the error bars to mean something."""
        return not too_few_effective_samples(self.ess)

    @property
    def tail_note(self) -> str:
        """The heavy-tail warning (:func:`heavy_tail_note`) when the weights' Pareto k > 0.7, else empty."""
        return heavy_tail_note(self.pareto_k)

    @property
    def dF_kj_mol(self) -> float | None:
        """dF in kJ/mol at ``temperature_k`` (None without dF or temperature)."""
        if self.dF is None or not self.temperature_k:
            return None
        return self.dF.value * kt_kj_per_mol(self.temperature_k)


def mode_summary(modes: ModeSet, samples: SampleSet, temperature_k: float | None = None, seed: int = 0,
                 n_bootstrap: int = 300, populations: Mapping[str, Estimate] | None = None,
                 error_method: str | None = None) -> ModeSummary:
    """Populations of every mode of ``modes`` in ``samples`` and dF(rest->minor).

    ``populations`` (optional): populations computed elsewhere from a correlated series with block
    errors (a replica-exchange run's target-state series, :func:`boltzflow.replica.state_populations`);
    dF is then propagated from the minor mode's population, as for time-ordered frames."""
    names = list(modes.names)
    minor = modes.minor
    imin = names.index(minor)
    lw = samples.log_weights
    block = populations is not None or is_time_ordered(samples)
    lab = modes.assign(samples.positions)
    if populations is not None:
        pops = dict(populations)
        method = error_method or "block"
    elif block:
        pops = {nm: block_population(lab == i, nm, seed=seed) for i, nm in enumerate(names)}
        method = error_method or "block (time-ordered frames)"
    else:
        pops = {nm: population(lab == i, lw, name=nm, seed=seed, n_bootstrap=n_bootstrap) for i, nm in enumerate(names)}
        method = error_method or ("self-normalised importance sampling (delta method)" if lw is not None
                                  else "binomial (decorrelated samples)")
    name = minor_free_energy_name(minor)
    try:
        if block:
            dF: Estimate | None = population_free_energy(pops[minor], name=name)
        else:
            dF = conformational_free_energy(lab != imin, lab == imin, lw, name=name, temperature_k=temperature_k,
                                            seed=seed)
        note = ""
    except InputError as e:  # a mode without (weighted) samples: dF undefined, the result says why
        dF, note = None, str(e)
    ess = float(pops[minor].ess) if pops[minor].ess == pops[minor].ess else float(len(samples))
    k = pops[minor].pareto_k if populations is None and lw is not None and not block else float("nan")
    if heavy_tail_note(k) and error_method is None:
        method = ("self-normalised importance sampling (Pareto k > 0.7: the larger of the delta method and "
                  "batch means over 10 chunks)")
    return ModeSummary(pops, minor, dF, ess, int(pops[minor].n) if populations is not None else len(samples),
                       method, temperature_k, note, k)


@dataclass(frozen=True)
class SampleEstimates:
    """What :func:`sample_estimates` found: ``estimates`` by name (insertion order: ``ess``, ``log_Z``, one
    population per mode, ``dF(rest->minor)``, then a peptide's per-residue states ``res<i>_<state>``) and ``notes``: sentences about what could not be estimated.
    pareto_k: of the importance weights (nan for unweighted samples)."""

    estimates: dict[str, Estimate]
    notes: tuple[str, ...] = ()
    pareto_k: float = float("nan")

    @property
    def warning(self) -> str:
        """The one-line heavy-tail warning (:func:`heavy_tail_note`) when Pareto k > 0.7, else empty."""
        return heavy_tail_note(self.pareto_k)


def sample_estimates(samples: SampleSet, modes: ModeSet | None = None, temperature_k: float | None = None,
                     seed: int = 0, n_bootstrap: int = 500) -> SampleEstimates:
    """What ``boltzflow estimate`` and :func:`boltzflow.pipeline.estimate` report for a SampleSet:
    ``"ess"`` and ``"log_Z"`` (weighted samples), one population per mode (keyed by the mode's name) and
    ``dF(rest->minor)`` (kT) when defined, and for a peptide every residue's backbone-state population
    (``res<i>_<state>``, :func:`residue_populations`). Error bars as in the module docstring; every
    estimate from the weights carries their Pareto k, and so does the result (``pareto_k``)."""
    out: dict[str, Estimate] = {}
    notes: list[str] = []
    lw = samples.log_weights
    if lw is not None:
        out["ess"] = kish_ess(lw)
        out["log_Z"] = log_z(lw, seed=seed, n_bootstrap=n_bootstrap)
    if modes is not None:
        if np.asarray(samples.positions).ndim == 3 and not is_molecular(modes):
            raise InputError("the system's modes (a toy target's) do not apply to molecular samples")
        block = is_time_ordered(samples)
        lab = modes.assign(samples.positions)
        names = list(modes.names)
        for i, nm in enumerate(names):
            out[nm] = (block_population(lab == i, nm, n_bootstrap=n_bootstrap, seed=seed) if block else
                       population(lab == i, lw, name=nm, seed=seed, n_bootstrap=n_bootstrap))
        name = minor_free_energy_name(modes.minor)
        imin = names.index(modes.minor)
        try:
            out[name] = (population_free_energy(out[modes.minor], name=name) if block else
                         conformational_free_energy(lab != imin, lab == imin, lw, name=name, temperature_k=temperature_k,
                                                    seed=seed, n_bootstrap=n_bootstrap))
        except InputError as e:  # a mode without (weighted) samples: no dF, and the result says why
            notes.append(f"no {name} ({e})")
        out.update(residue_populations(modes, samples, seed=seed, n_bootstrap=n_bootstrap))
    k = out["ess"].pareto_k if "ess" in out else float("nan")
    return SampleEstimates(out, tuple(notes), k)


# ---- cost ---------------------------------------------------------------------------------------
def _number(prov: Mapping[str, Any], key: str) -> float:
    v = prov.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
        return float(v)
    return float("nan")


@dataclass(frozen=True)
class SamplingCost:
    """What a SampleSet cost, from its provenance (one spelling per key, see
    :data:`boltzflow.core.sampleset.PROVENANCE_KEYS`); nan where not recorded.

    energy_evals: single-configuration energy evaluations of sampling; wall_s: seconds of sampling;
    training_energy_evals / training_wall_s: the same for training the generator (generators only)."""

    energy_evals: float
    wall_s: float
    training_energy_evals: float = float("nan")
    training_wall_s: float = float("nan")


def sampling_cost(samples: SampleSet) -> SamplingCost:
    """The :class:`SamplingCost` of ``samples``. A weighted set without ``energy_evals`` counts one energy
    evaluation per sample (each weight needs one)."""
    prov = samples.provenance or {}
    evals = _number(prov, "energy_evals")
    if evals != evals and samples.log_weights is not None:
        evals = float(len(samples))
    return SamplingCost(evals, _number(prov, "wall_s"), _number(prov, "training_energy_evals"),
                        _number(prov, "training_wall_s"))


def cost_to_target(stderr: float, cost: float, ess: float, target_stderr: float) -> float:
    """``cost * (stderr / target_stderr)^2``: the cost (energy evaluations or seconds) to bring an error
    bar ``stderr`` down to ``target_stderr`` (errors shrink as 1/sqrt(cost)); nan when the error bar
    rests on fewer than :data:`MIN_ESS` effective samples or a number is missing."""
    if not target_stderr > 0:
        raise InputError(f"the target standard error must be > 0, got {target_stderr}")
    if not (stderr == stderr and stderr > 0 and cost == cost) or too_few_effective_samples(ess):
        return float("nan")
    return float(cost * (stderr / target_stderr) ** 2)


# ---- energies and conformations -------------------------------------------------------------------
def energy_stats(u, weights=None) -> dict[str, float] | None:
    """Weighted mean and standard deviation of reduced energies ``u: (n,)`` kT over the finite entries,
    and the fraction that is finite; None without energies or without a finite one."""
    if u is None:
        return None
    u = np.asarray(u, dtype=np.float64)
    ok = np.isfinite(u)
    if not ok.any():
        return None
    ww = np.ones(ok.sum()) if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    ww = ww / ww.sum()
    m = float(np.sum(ww * u[ok]))
    return {"mean_kT": m, "std_kT": float(np.sqrt(np.sum(ww * (u[ok] - m) ** 2))), "fraction_finite": float(ok.mean())}


@dataclass(frozen=True)
class ConformationKL:
    """KL(reference || generator) of torsion histograms, reweighted and raw.

    name: ``ramachandran_kl_64x64`` (phi/psi) or ``torsion_kl_64`` (the mode set's torsion);
    ref_angles / gen_angles: ``(x_deg, y_deg or None)`` per sample, for plots."""

    name: str
    reweighted: float
    unweighted: float
    ref_angles: tuple[np.ndarray, np.ndarray | None] = field(repr=False)
    gen_angles: tuple[np.ndarray, np.ndarray | None] = field(repr=False)


def conformation_kl(topology, modes: ModeSet, ref: SampleSet, gen: SampleSet, bins: int = 64) -> ConformationKL:
    """Histogram KL(ref || gen) on a ``bins x bins`` phi/psi grid when the topology has phi and psi, else on
    ``bins`` bins of the mode set's torsion (degrees, [-180, 180))."""
    tors = named_torsions(topology)
    edges = np.linspace(-180, 180, bins + 1)
    angles: Callable[[SampleSet], tuple[np.ndarray, np.ndarray | None]]
    if "phi" in tors and "psi" in tors:
        def angles(ss):
            return np.degrees(dihedral_of(ss.positions, tors["phi"])), np.degrees(dihedral_of(ss.positions, tors["psi"]))

        def hist(a, w):
            return np.histogram2d(a[0], a[1], bins=[edges, edges], weights=w)[0]
        name = f"ramachandran_kl_{bins}x{bins}"
    else:
        if not is_molecular(modes):
            raise InputError("no phi/psi and no torsion modes: nothing to histogram for the KL")
        atoms = modes.atoms  # type: ignore[attr-defined]  # MolecularModeSet

        def angles(ss):
            return np.degrees(dihedral_of(ss.positions, atoms)), None

        def hist(a, w):
            return np.histogram(a[0], bins=edges, weights=w)[0]
        name = f"torsion_kl_{bins}"
    ra, ga = angles(ref), angles(gen)
    h_ref = hist(ra, None)
    return ConformationKL(name, histogram_kl(h_ref, hist(ga, gen.normalized_weights())), histogram_kl(h_ref, hist(ga, None)),
                          ra, ga)


# ---- the comparison ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerResult:
    """One sampler in a comparison: its :class:`ModeSummary`, :class:`SamplingCost`, the cost to the
    target error on the minor mode's population, and its reduced-energy statistics."""

    summary: ModeSummary
    cost: SamplingCost
    energy_evals_to_target: float
    wall_s_to_target: float
    energy: dict[str, float] | None
    kish_ess: float

    @property
    def note(self) -> str:
        """``error_method`` plus the few-samples warning when it applies (the heavy-tail warning is
        ``summary.tail_note``)."""
        extra = few_samples_note(self.summary.ess)
        return self.summary.error_method + (f"; {extra}" if extra else "")


@dataclass(frozen=True)
class SamplerComparison:
    """A reference sampler (replica exchange) and a generator on the same system and temperature."""

    minor: str
    temperature_k: float
    target_stderr: float
    reference: SamplerResult
    generator: SamplerResult
    generator_unweighted: dict[str, float]
    energy_unweighted: dict[str, float] | None
    kl: ConformationKL


def _sampler(summary: ModeSummary, cost: SamplingCost, target: float, energy, ess_kish: float) -> SamplerResult:
    se = summary.populations[summary.minor].stderr
    return SamplerResult(summary, cost, cost_to_target(se, cost.energy_evals, summary.ess, target),
                         cost_to_target(se, cost.wall_s, summary.ess, target), energy, ess_kish)


def compare_samplers(topology, modes: ModeSet, ref: SampleSet, gen: SampleSet, target_stderr: float = 0.005,
                     temperature_k: float | None = None, seed: int = 0,
                     reference_populations: Mapping[str, Estimate] | None = None,
                     reference_error: str | None = None) -> SamplerComparison:
    """Compare a reference sampler's samples ``ref`` with a generator's weighted samples ``gen``: mode
    populations and dF (:func:`mode_summary`), costs and cost to ``target_stderr`` on the minor mode's
    population (:func:`cost_to_target`), reduced-energy statistics, and the torsion-histogram KL.

    ``reference_populations``: block-error populations of the reference's correlated series (replica
    exchange storage), used instead of the populations of ``ref``'s frames."""
    if not target_stderr > 0:
        raise InputError(f"--target-stderr must be > 0, got {target_stderr}")
    if ref.temperature and gen.temperature and abs(ref.temperature - gen.temperature) > 1e-6:
        raise InputError(f"replica samples are at {ref.temperature} K but generator samples at {gen.temperature} K")
    kt = temperature_k or ref.temperature or gen.temperature
    rs = mode_summary(modes, ref, kt, seed=seed, populations=reference_populations, error_method=reference_error)
    gs = mode_summary(modes, gen, kt, seed=seed)
    raw = mode_fractions(modes, gen.positions)
    wg = gen.normalized_weights()
    return SamplerComparison(
        modes.minor, float(kt), target_stderr,
        _sampler(rs, sampling_cost(ref), target_stderr, energy_stats(ref.reduced_energy), sample_ess(ref)),
        _sampler(gs, sampling_cost(gen), target_stderr, energy_stats(gen.reduced_energy, wg), sample_ess(gen)),
        raw, energy_stats(gen.reduced_energy), conformation_kl(topology, modes, ref, gen))
