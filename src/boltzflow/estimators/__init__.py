"""Reweighting estimators (pure numpy): each returns an :class:`Estimate` (value, stderr, ESS, CI, n).

    from boltzflow.estimators import log_weights, kish_ess, expectation, log_z, population
    lw = log_weights(u, log_q)                 # -u - log q
    kish_ess(lw).extra["fraction"]             # ESS / n
    population(region.indicator(x), lw)        # P(phi > 0) with stderr and bootstrap CI
    pareto_k(lw)                               # tail of the weights: > 0.7 flags the error bars
"""

from .blocks import block_average, detect_equilibration, statistical_inefficiency, subsample_indices
from .core import (
                   Estimate,
                   ess_fraction,
                   expectation,
                   kish_ess,
                   log_weights,
                   log_z,
                   log_z_difference,
                   normalized_weights,
                   tail_checked,
)
from .free_energy import (
                   FreeEnergySurface,
                   bar_free_energy,
                   conformational_free_energy,
                   exp_free_energy,
                   free_energy_surface,
                   histogram_kl,
                   mode_populations,
                   population,
                   population_free_energy,
                   ramachandran_surface,
                   to_kj_per_mol,
)
from .regions import GRAMMAR, Region, parse_region, torsion_atoms
from .tails import (
                   PARETO_K_MAX,
                   batch_means_stderr,
                   heavy_tail_note,
                   pareto_k,
                   pareto_k_threshold,
                   slow_convergence_note,
)

__all__ = [
    "Estimate", "log_weights", "normalized_weights", "kish_ess", "ess_fraction", "expectation", "log_z",
    "log_z_difference", "block_average", "statistical_inefficiency", "detect_equilibration", "subsample_indices",
    "population", "mode_populations", "conformational_free_energy", "population_free_energy",
    "free_energy_surface", "ramachandran_surface", "FreeEnergySurface", "histogram_kl", "exp_free_energy", "bar_free_energy",
    "to_kj_per_mol", "parse_region", "Region", "GRAMMAR", "torsion_atoms",
    "pareto_k", "pareto_k_threshold", "PARETO_K_MAX", "heavy_tail_note", "slow_convergence_note", "batch_means_stderr",
    "tail_checked",
]
