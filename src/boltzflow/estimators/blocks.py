"""Errors for correlated time series (MD, replica exchange): statistical inefficiency, block
averaging (between-block spread) and bootstrap over blocks.

A naive error sqrt(p(1-p)/n) on a rare-state population from correlated frames understates the
real spread between independent runs several-fold; these estimators do not.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .core import Estimate, _rng, _vec


def _quiet_pymbar() -> None:
    import logging

    for name in ("pymbar.timeseries", "pymbar.mbar_solvers", "pymbar"):
        logging.getLogger(name).setLevel(logging.ERROR)


def statistical_inefficiency(series, fast: bool = False) -> float:
    """Statistical inefficiency g >= 1 of a time series (n,) (pymbar.timeseries); n_eff = n / g."""
    _quiet_pymbar()
    from pymbar import timeseries

    a = _vec(series, "series")
    if a.size < 3 or np.ptp(a) == 0:
        return 1.0
    return float(max(1.0, timeseries.statistical_inefficiency(a, fast=fast)))


def detect_equilibration(series, nskip: int = 1) -> tuple[int, float, float]:
    """(t0, g, n_eff): equilibration start index, statistical inefficiency after t0, effective samples
    (pymbar.timeseries.detect_equilibration, Chodera 2016)."""
    _quiet_pymbar()
    from pymbar import timeseries

    a = _vec(series, "series")
    if a.size < 4 or np.ptp(a) == 0:
        return 0, 1.0, float(a.size)
    t0, g, neff = timeseries.detect_equilibration(a, nskip=nskip)
    return int(t0), float(max(g, 1.0)), float(neff)


def subsample_indices(series, g: float | None = None) -> np.ndarray:
    """Indices of approximately uncorrelated samples (every g-th), via pymbar."""
    _quiet_pymbar()
    from pymbar import timeseries

    a = _vec(series, "series")
    if g is None:
        g = statistical_inefficiency(a)
    return np.asarray(timeseries.subsample_correlated_data(a, g=g), dtype=np.int64)


def _blocks(n: int, n_blocks: int, block_sizes=None) -> list[np.ndarray]:
    if block_sizes is not None:
        sizes = np.asarray(block_sizes, dtype=int)
        if sizes.ndim != 1 or sizes.size < 2 or (sizes < 0).any() or sizes.sum() != n:
            raise InputError(f"block_sizes must be >= 2 non-negative sizes summing to the {n} samples")
        edges = np.concatenate([[0], np.cumsum(sizes)])
        return [np.arange(edges[i], edges[i + 1]) for i in range(sizes.size)]
    if n_blocks < 2:
        raise InputError(f"need at least 2 blocks for a block error, got n_blocks={n_blocks}")
    if n < n_blocks:
        raise InputError(f"{n} samples cannot be split into {n_blocks} blocks; use fewer blocks or a longer run")
    edges = np.linspace(0, n, n_blocks + 1).round().astype(int)
    return [np.arange(edges[i], edges[i + 1]) for i in range(n_blocks)]


def block_average(values, log_weights=None, n_blocks: int = 10, name: str = "mean", n_bootstrap: int = 1000,
                  level: float = 0.95, seed: int | np.random.Generator = 0, block_sizes=None) -> Estimate:
    """Mean of a correlated series ``values`` (n,) in time order (optionally weighted by ``log_weights``),
    with the between-block standard error std(block means)/sqrt(B) as ``stderr`` and a bootstrap-over-blocks
    percentile CI. ``block_sizes`` (B,) instead of ``n_blocks`` equal blocks: consecutive blocks of these
    sizes (e.g. the frames of independent chains, one block each; an empty block is skipped). ``extra`` holds the bootstrap-over-blocks standard error, the naive (independent
    samples) error and the statistical inefficiency. ``ess`` = n / g."""
    f = _vec(values, "values")
    n = f.size
    w = np.ones(n) if log_weights is None else np.exp(np.asarray(log_weights, float) - np.max(log_weights))
    if w.shape != f.shape:
        raise InputError(f"values {f.shape} and log_weights {w.shape} must have the same shape")
    blocks = [b for b in _blocks(n, n_blocks, block_sizes) if b.size]
    num = np.array([np.sum(w[b] * f[b]) for b in blocks])
    den = np.array([np.sum(w[b]) for b in blocks])
    value = float(num.sum() / den.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        means = num / den
    good = np.isfinite(means)
    se_block = float(np.std(means[good], ddof=1) / np.sqrt(good.sum())) if good.sum() > 1 else float("nan")
    rng = _rng(seed)
    reps = []
    for _ in range(max(n_bootstrap, 0)):
        pick = rng.integers(0, len(blocks), len(blocks))
        d = den[pick].sum()
        if d > 0:
            reps.append(num[pick].sum() / d)
    reps = np.asarray(reps)
    a = (1 - level) / 2
    lo, hi = (float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))) if reps.size else (np.nan, np.nan)
    se_boot = float(np.std(reps, ddof=1)) if reps.size > 1 else float("nan")
    wn = w / w.sum()
    naive = float(np.sqrt(np.sum(wn * wn * (f - value) ** 2)))
    g = statistical_inefficiency(f) if log_weights is None else float("nan")
    return Estimate(name, value, se_block, float(n / g) if np.isfinite(g) else float("nan"), lo, hi, n,
                    method=f"block({len(blocks)})",
                    extra={"stderr_bootstrap_blocks": se_boot, "stderr_naive": naive, "statistical_inefficiency": g,
                           "n_blocks": len(blocks)})
