"""The Kish effective sample size of importance weights and the Pareto fit of their tail: the one
implementation of each in boltzflow.

Training metrics (:func:`boltzflow.losses.base.kish_ess`, a fraction of N on torch tensors), the
trainer's ESS guard and the estimators (:func:`boltzflow.estimators.kish_ess`, an :class:`Estimate` with
a count; :mod:`boltzflow.estimators.tails`) all call the functions here.

A generator's weights are often heavy-tailed (Pareto k 0.45-0.6 on the peptides): the Kish ESS of one
sample is then set by its few largest weights and differs by luck between samples. :func:`pareto_smooth`
(PSIS, Vehtari et al. 2015/2024) replaces the largest weights by the quantiles of a generalized Pareto
distribution fitted to them, which keeps the tail's shape and drops the luck of which draws landed in
it; ``kish_ess(log_w, smooth=True)`` is the Kish ESS of those weights, the ESS guard's choice.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

#: fewest tail weights the Pareto fit accepts (fewer samples: k is not a number)
MIN_TAIL = 5
#: weakly informative prior on k (Vehtari et al. 2024): k-hat is pulled towards 0.5 as if by 10 draws
_PRIOR_K, _PRIOR_N = 0.5, 10.0
_MAX_LOG_RATIO = 700.0


def kish_ess(log_w: np.ndarray | torch.Tensor, clip_top: float = 0.0, smooth: bool = False) -> float:
    """Kish ESS = (sum w)^2 / sum w^2 as a count in [1, n] from log weights ``log_w`` (any shape, flattened).

    NaN and -inf log weights count as weight 0; no positive weight at all (or no sample) gives 0.0.
    A +inf log weight is an error (an energy of -inf or a log density of -inf upstream).

    clip_top > 0: the largest ``floor(clip_top * n)`` log weights are first lowered to the largest of
    the others, as TA-BG reports its ESS (clip_top 1e-4 of 1e7 samples); not an ESS of the weights the
    estimators use, only for comparison with published numbers (boltzflow reports clip_top = 0).

    smooth: the Kish ESS of the Pareto-smoothed weights (:func:`pareto_smooth`): less dependent on which
    few draws hold the largest weights, for comparing generators on one sample (the ESS guard); not
    combined with clip_top."""
    if not 0.0 <= clip_top < 1.0:
        raise InputError(f"clip_top must be a fraction in [0, 1), got {clip_top}")
    if smooth and clip_top > 0:
        raise InputError("kish_ess: smooth and clip_top are two ways of taming the tail; pass one of them")
    lw = _as_log_weights(log_w)
    if lw.size == 0 or not np.isfinite(lw).any():
        return 0.0
    if smooth:
        lw = pareto_smooth(lw)[0]
    k = int(clip_top * lw.size)
    if k > 0:
        lw = np.minimum(lw, np.partition(lw, lw.size - k - 1)[lw.size - k - 1])
    return ess_of_weights(np.exp(lw - np.max(lw)))


def ess_of_weights(w: np.ndarray) -> float:
    """Kish ESS = (sum w)^2 / sum w^2 of non-negative weights ``w: (n,)`` (normalised or not), a count."""
    w = np.asarray(w, dtype=np.float64)
    s = float(np.sum(w))
    return s * s / float(np.sum(w * w))


def _as_log_weights(log_w: np.ndarray | torch.Tensor) -> np.ndarray:
    """``log_w`` (any shape) as a flat float64 array, NaN (an invalid sample) as -inf; +inf is an error."""
    if isinstance(log_w, torch.Tensor):
        log_w = log_w.detach().to("cpu", torch.float64).numpy()
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    lw = np.where(np.isnan(lw), -np.inf, lw)
    if np.any(lw == np.inf):
        raise InputError("log weights contain +inf; check the energies and log densities")
    return lw


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
    return _pareto_fit(_as_log_weights(log_w))[0]


def pareto_smooth(log_w) -> tuple[np.ndarray, float]:
    """Pareto-smoothed log weights (PSIS; Vehtari et al. 2015/2024) and the tail's k-hat, from ``log_w: (n,)``.

    The M = :func:`tail_length` largest weights are replaced, in their order, by the quantiles
    (i - 1/2) / M of the generalized Pareto distribution fitted to them (:func:`pareto_k`'s fit: its
    scale, and the prior-adjusted shape, as PSIS does), capped at the largest raw weight; every other weight is
    kept. Returns ``(smoothed: (n,) float64 in the input's order, k)``; NaN log weights come back as
    -inf. With nan / -inf k (too few weights, no tail) the weights come back unchanged."""
    lw = _as_log_weights(log_w)
    k, sigma, tail_idx, threshold = _pareto_fit(lw)
    if not np.isfinite(k):
        return lw, k
    m = tail_idx.size
    p = (np.arange(1, m + 1, dtype=np.float64) - 0.5) / m
    q = -sigma * np.log1p(-p) if k == 0.0 else sigma * np.expm1(-k * np.log1p(-p)) / k
    out = lw.copy()
    out[tail_idx] = np.minimum(threshold + np.log1p(q), lw[tail_idx[-1]])
    return out, k


def _pareto_fit(lw: np.ndarray) -> tuple[float, float, np.ndarray, float]:
    """The Pareto fit of :func:`pareto_k` on flat float64 log weights ``lw`` (-inf: weight 0).

    Returns ``(k, sigma, tail_idx, threshold)``: the prior-adjusted shape, the fitted scale of the
    exceedances (in units of the threshold weight, from the unadjusted shape), the indices into ``lw`` of the
    M largest weights in increasing order, and the log of the next largest weight; k is nan (too few
    weights) or -inf (no tail) with sigma nan."""
    finite = np.flatnonzero(np.isfinite(lw))
    n = finite.size
    m = tail_length(n)
    if m < MIN_TAIL or n <= m:
        return float("nan"), float("nan"), finite[:0], float("nan")
    top = finite[np.argpartition(lw[finite], n - m - 1)[n - m - 1:]]
    top = top[np.argsort(lw[top], kind="stable")]  # (M + 1,): the threshold, then the tail
    threshold, tail_idx = float(lw[top[0]]), top[1:]
    # exceedances (w_i - w_threshold) / w_threshold, accurate near the threshold; a weight more than e^700
    # times the threshold is held at e^700 (k is far above 0.7 either way) so that nothing overflows
    x = np.expm1(np.minimum(lw[tail_idx] - threshold, _MAX_LOG_RATIO))
    if not x[-1] > 0:
        return float("-inf"), float("nan"), tail_idx, threshold
    k, b = _gpd_fit(x)
    return float((m * k + _PRIOR_N * _PRIOR_K) / (m + _PRIOR_N)), -k / b, tail_idx, threshold


def _gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Zhang & Stephens (2009) fit of a GPD to sorted exceedances ``x: (M,)``: ``(k, b)``, k the shape
    (k > 0: heavy tail) and b = -k / sigma.

    In their parametrisation (density (1/sigma) (1 + k x / sigma)^(-1/k - 1)), for fixed b the
    maximum-likelihood shape is k(b) = mean(log(1 - b x)) and the profile log-likelihood is
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
    return float(np.mean(np.log1p(-b_hat * x))), b_hat
