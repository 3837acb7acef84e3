"""The Kish effective sample size of importance weights: the one implementation in boltzflow.

Training metrics (:func:`boltzflow.losses.base.kish_ess`, a fraction of N on torch tensors) and the
estimators (:func:`boltzflow.estimators.kish_ess`, an :class:`Estimate` with a count) both call
:func:`kish_ess` here.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError


def kish_ess(log_w: np.ndarray | torch.Tensor, clip_top: float = 0.0) -> float:
    """Kish ESS = (sum w)^2 / sum w^2 as a count in [1, n] from log weights ``log_w`` (any shape, flattened).

    NaN and -inf log weights count as weight 0; no positive weight at all (or no sample) gives 0.0.
    A +inf log weight is an error (an energy of -inf or a log density of -inf upstream).

    clip_top > 0: the largest ``floor(clip_top * n)`` log weights are first lowered to the largest of
    the others, as TA-BG reports its ESS (clip_top 1e-4 of 1e7 samples); not an ESS of the weights the
    estimators use, only for comparison with published numbers (boltzflow reports clip_top = 0)."""
    if not 0.0 <= clip_top < 1.0:
        raise InputError(f"clip_top must be a fraction in [0, 1), got {clip_top}")
    if isinstance(log_w, torch.Tensor):
        log_w = log_w.detach().to("cpu", torch.float64).numpy()
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    lw = np.where(np.isnan(lw), -np.inf, lw)
    if np.any(lw == np.inf):
        raise InputError("log weights contain +inf; check the energies and log densities")
    if lw.size == 0 or not np.isfinite(lw).any():
        return 0.0
    k = int(clip_top * lw.size)
    if k > 0:
        lw = np.minimum(lw, np.partition(lw, lw.size - k - 1)[lw.size - k - 1])
    return ess_of_weights(np.exp(lw - np.max(lw)))


def ess_of_weights(w: np.ndarray) -> float:
    """Kish ESS = (sum w)^2 / sum w^2 of non-negative weights ``w: (n,)`` (normalised or not), a count."""
    w = np.asarray(w, dtype=np.float64)
    s = float(np.sum(w))
    return s * s / float(np.sum(w * w))
