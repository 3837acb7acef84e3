"""Tails of importance weights: the Pareto shape k-hat (PSIS diagnostic) and batch-means errors.

A generator's importance weights w = exp(-u - log q) are often heavy-tailed: a few draws hold most of
the weight, and which draws those are changes from run to run. The delta-method standard error and
the Kish ESS are then computed from a sum of squares that itself has (nearly) infinite variance, and
they come out too small far more often than not (measured on alanine dipeptide: in-run errors of
P(phi > 0) 2.4-3.5x smaller than the spread between replicate runs).

:func:`pareto_k` fits a generalized Pareto distribution to the largest weights (Zhang & Stephens 2009,
as used by Pareto-smoothed importance sampling, Vehtari et al. 2015/2024). Its shape k says how many
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

from ..errors import InputError

#: above this Pareto k the error bar of an importance-sampling estimate is flagged as unreliable
PARETO_K_MAX = 0.7
#: disjoint chunks for the batch-means standard error (the same 10 as the block errors of time series)
N_BATCHES = 10
#: fewest tail weights the Pareto fit accepts (fewer samples: k is not a number)
MIN_TAIL = 5
#: weakly informative prior on k (Vehtari et al. 2024): k-hat is pulled towards 0.5 as if by 10 draws
_PRIOR_K, _PRIOR_N = 0.5, 10.0
_MAX_LOG_RATIO = 700.0


def tail_length(n: int) -> int:
    """M = ceil(min(0.2 n, 3 sqrt(n))): how many of the ``n`` largest weights the Pareto fit uses."""
    return int(np.ceil(min(0.2 * n, 3.0 * np.sqrt(n)))) if n > 0 else 0


def pareto_k(log_w) -> float:
    """Generalized-Pareto shape k-hat of the tail of importance weights, from log weights ``log_w: (n,)``.

    Fits the exceedances of the M = :func:`tail_length` largest weights over the next largest by the
    Zhang & Stephens (2009) empirical-Bayes estimator, with PSIS's weak prior (k-hat pulled towards 0.5
    as by 10 draws). NaN / -inf log weights (weight 0, invalid samples) are left out; n counts the rest.
    Returns nan when fewer than 25 weights are non-zero (M < 5), -inf when the M largest weights are
    all equal (no tail at all, e.g. constant weights). Scale-free: adding a constant to ``log_w``
    changes nothing."""
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    if np.any(lw == np.inf):
        raise InputError("log weights contain +inf; check the energies and log densities")
    lw = lw[np.isfinite(lw)]
    n = lw.size
    m = tail_length(n)
    if m < MIN_TAIL or n <= m:
        return float("nan")
    top = np.sort(np.partition(lw, n - m - 1)[n - m - 1:])  # (M + 1,): the threshold, then the tail
    threshold, tail = top[0], top[1:]
    # exceedances (w_i - w_threshold) / w_threshold, accurate near the threshold; a weight more than e^700
    # times the threshold is held at e^700 (k is far above 0.7 either way) so that nothing overflows
    x = np.expm1(np.minimum(tail - threshold, _MAX_LOG_RATIO))
    if not x[-1] > 0:
        return float("-inf")
    k = _gpd_shape(x)
    return float((m * k + _PRIOR_N * _PRIOR_K) / (m + _PRIOR_N))


def _gpd_shape(x: np.ndarray) -> float:
    """Zhang & Stephens (2009) estimate of the GPD shape (k > 0: heavy tail) of sorted exceedances ``x: (M,)``.

    In their parametrisation (b = -k / sigma, density (1/sigma) (1 + k x / sigma)^(-1/k - 1)), for fixed b
    the maximum-likelihood shape is k(b) = mean(log(1 - b x)) and the profile log-likelihood is
    l(b) = M (log(-b / k(b)) - k(b) - 1). b is the posterior mean over a grid of m = 30 + floor(sqrt(M))
    quantiles of their prior, b_j = 1/x_max + (1 - sqrt(m / (j - 1/2))) / (3 x_q1) (x_q1: first quartile),
    weighted by exp(l(b_j)) / sum_l exp(l(b_l)); then k = mean(log(1 - b x))."""
    n = x.size
    q1 = x[int(np.floor(n / 4 + 0.5)) - 1]
    if not q1 > 0:  # ties at the threshold (weights taking few distinct values): use the smallest gap instead
        q1 = float(np.min(x[x > 0]))
    m = 30 + int(np.sqrt(n))
    j = np.arange(1, m + 1, dtype=np.float64)
    b = 1.0 / x[-1] + (1.0 - np.sqrt(m / (j - 0.5))) / (3.0 * q1)  # all < 1 / x_max: 1 - b x > 0
    b = b[b != 0.0]
    k = np.mean(np.log1p(-b[:, None] * x[None, :]), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = n * (np.log(-b / k) - k - 1.0)
    ll = np.where(np.isfinite(ll), ll, -np.inf)
    p = np.exp(ll - np.max(ll))
    b_hat = float(np.sum(p * b) / np.sum(p))
    return float(np.mean(np.log1p(-b_hat * x)))


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
