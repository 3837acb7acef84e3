"""Tails of importance weights: the Pareto shape k-hat (PSIS diagnostic) and batch-means errors.

A generator's importance weights w = exp(-u - log q) are often heavy-tailed: a few draws hold most of
the weight, and which draws those are changes from run to run. The delta-method standard error and
the Kish ESS are then computed from a sum of squares that itself has (nearly) infinite variance, and
they come out too small far more often than not (measured on alanine dipeptide: in-run errors of
P(phi > 0) 2.4-3.5x smaller than the spread between replicate runs).

:func:`pareto_k` (defined in :mod:`boltzflow.core.weights`, beside the Kish ESS, so that training can use
the same fit) fits a generalized Pareto distribution to the largest weights (Zhang & Stephens 2009, as
used by Pareto-smoothed importance sampling, Vehtari et al. 2015/2024). Its shape k says how many
moments the weights have (moments of order < 1/k exist):

* k < 0.5: finite variance; error bars can be trusted;
* 0.5 <= k <= 0.7: finite mean, infinite variance; usable, but the error converges slowly;
* k > 0.7 (:data:`PARETO_K_MAX`): the estimate's error bar is not trustworthy; draw more samples or
  improve the generator. With few draws the bar is lower, :func:`pareto_k_threshold`
  (1 - 1/log10(n)); boltzflow flags at 0.7 and reports this threshold beside it.

:func:`batch_means_stderr` is the error from the spread of one estimator over disjoint chunks of the
samples; the estimators use the larger of it and the delta method when k > 0.7 (see
:func:`boltzflow.estimators.core.tail_checked`). Pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..core.weights import MIN_TAIL, pareto_k, tail_length
from ..errors import InputError

__all__ = ["MIN_TAIL", "PARETO_K_MAX", "N_BATCHES", "tail_length", "pareto_k", "pareto_k_threshold", "heavy_tailed",
           "heavy_tail_note", "slow_convergence_note", "batch_means_stderr", "spread_stderr"]

#: above this Pareto k the error bar of an importance-sampling estimate is flagged as unreliable
PARETO_K_MAX = 0.7
#: disjoint chunks for the batch-means standard error (the same 10 as the block errors of time series)
N_BATCHES = 10
def pareto_k_threshold(n: int) -> float:
    """The sample-size-dependent bar min(1 - 1/log10(n), 0.7) (Vehtari et al. 2024): above it, ``n``
    draws are too few for the estimate to be accurate; for n >= 2 155 it is the fixed 0.7."""
    if n <= 1:
        return float("-inf")
    return float(min(1.0 - 1.0 / np.log10(n), PARETO_K_MAX))


def heavy_tailed(k: float) -> bool:
    """Whether a Pareto k flags the error bar as unreliable (k > :data:`PARETO_K_MAX`; nan: unknown, False)."""
    return bool(k > PARETO_K_MAX)


def heavy_tail_note(k: float) -> str:
    """The one-line warning results carry when :func:`heavy_tailed` (empty otherwise)."""
    if not heavy_tailed(k):
        return ""
    shown = f"{k:.2f}" if np.isfinite(k) else str(k)
    return (f"weights heavy-tailed (Pareto k = {shown} > {PARETO_K_MAX:g}): the error bar may be too small; "
            "draw more samples or improve the generator")


def slow_convergence_note(k: float) -> str:
    """The one-line note for 0.5 < k <= 0.7 (finite mean, infinite variance: usable, but the estimate
    converges slowly and the error bar is often too small); empty otherwise. Not a flag: the error bar
    is kept."""
    if not 0.5 < k <= PARETO_K_MAX:
        return ""
    return (f"weights have infinite variance (Pareto k = {k:.2f} in (0.5, {PARETO_K_MAX:g}]): the estimate converges "
            "slowly and its error bar is often too small; compare independent sample sets")


def batch_means_stderr(stat: Callable[[np.ndarray], float], n: int, n_batches: int = N_BATCHES) -> float:
    """Standard error of an estimator from its spread over ``n_batches`` disjoint contiguous chunks of ``n``
    samples: sd(theta_b) / sqrt(B), theta_b = ``stat(indices of chunk b)``. Chunks where the estimator is
    undefined (nan, e.g. no weight in a region) are left out; nan with fewer than 2 chunks left or
    fewer than 2 samples per chunk."""
    if n_batches < 2:
        raise InputError(f"batch means need at least 2 chunks, got n_batches={n_batches}")
    if n < 2 * n_batches:
        return float("nan")
    return spread_stderr([stat(idx) for idx in np.array_split(np.arange(n), n_batches)])


def spread_stderr(chunk_values) -> float:
    """sd(theta_b) / sqrt(B) over the finite values of ``chunk_values: (B,)`` (one estimate per disjoint
    chunk); nan with fewer than 2 finite values."""
    vals = np.asarray(chunk_values, dtype=np.float64).reshape(-1)
    vals = vals[np.isfinite(vals)]
    if vals.size < 2:
        return float("nan")
    return float(np.std(vals, ddof=1) / np.sqrt(vals.size))
