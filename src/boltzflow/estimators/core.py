"""Importance-sampling estimators: log weights, Kish ESS, self-normalised expectations, log Z.

Pure numpy. Every estimator returns an :class:`Estimate` (value, standard error, ESS, confidence
interval, n), never a bare float. Energies are reduced (kT), log densities natural-log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ..core.weights import ess_of_weights
from ..errors import InputError


@dataclass(frozen=True)
class Estimate:
    """One estimated quantity.

    value: the estimate; stderr: its standard error (nan when unknown); ess: effective sample size
    (count) behind it; ci_low/ci_high: confidence interval (``level``, default 95%); n: raw samples used.
    unit: "", "kT", "kJ/mol", "probability", ...; method: how the error was obtained.
    """

    name: str
    value: float
    stderr: float = float("nan")
    ess: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n: int = 0
    unit: str = ""
    method: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON form ``{"name", "value", "stderr", "ess"}`` (nan -> None)."""
        return {"name": self.name, "value": _f(self.value), "stderr": _f(self.stderr), "ess": _f(self.ess)}

    def to_full_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float):
                d[k] = _f(v)
        return d

    def __str__(self) -> str:
        u = f" {self.unit}" if self.unit and self.unit != "probability" else ""
        ess = f", ESS {self.ess:.0f}" if np.isfinite(self.ess) else ""
        return f"{self.name} = {self.value:.4g} +- {self.stderr:.2g}{u} (n={self.n}{ess})"


def _f(v: float) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
def _vec(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1:
        raise InputError(f"{name} must be a 1-D array (n,), got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{name} is empty; estimators need at least one sample")
    return a


def log_weights(reduced_energy, log_q) -> np.ndarray:
    """log w = -u - log q, (n,). ``reduced_energy`` u in kT, ``log_q`` the sampler's log density.

    Non-finite u (invalid configurations) or log q give log w = -inf (weight 0)."""
    u = _vec(reduced_energy, "reduced_energy")
    lq = _vec(log_q, "log_q")
    if u.shape != lq.shape:
        raise InputError(f"reduced_energy {u.shape} and log_q {lq.shape} must have the same shape")
    lw = -u - lq
    return np.where(np.isfinite(lw) | (lw == -np.inf), lw, -np.inf)


def _finite_lw(lw) -> np.ndarray:
    lw = _vec(lw, "log_weights")
    lw = np.where(np.isnan(lw), -np.inf, lw)
    if np.any(lw == np.inf):
        raise InputError("log weights contain +inf; check the energies and log densities")
    return lw


def normalized_weights(lw) -> np.ndarray:
    """Self-normalised weights (n,) from log weights; all-invalid -> InputError."""
    lw = _finite_lw(lw)
    m = np.max(lw)
    if not np.isfinite(m):
        raise InputError("all importance weights are zero (every sample invalid); nothing to estimate")
    w = np.exp(lw - m)
    return w / w.sum()


def kish_ess(lw) -> Estimate:
    """Kish ESS = (sum w)^2 / sum w^2 as a count (``value``) with ``extra['fraction']`` = ESS / n."""
    w = normalized_weights(lw)  # raises for all-invalid weights
    n = w.size
    ess = ess_of_weights(w)
    return Estimate("ess", float(ess), float("nan"), float(ess), n=n, unit="samples", method="kish",
                    extra={"fraction": float(ess / n)})


def ess_fraction(lw) -> float:
    """Kish ESS / n in (0, 1]."""
    return kish_ess(lw).extra["fraction"]


def _weighted_mean(f: np.ndarray, w: np.ndarray) -> float:
    return float(np.sum(w * f) / np.sum(w))


def expectation(values, lw=None, name: str = "expectation", n_bootstrap: int = 500, level: float = 0.95,
                seed: int | np.random.Generator = 0) -> Estimate:
    """Self-normalised importance-sampling estimate of E_p[f] from ``values`` f(x_i) (n,) and log weights
    ``lw`` (n,) (None = unweighted samples of p).

    stderr: delta-method standard error sqrt(sum w_i^2 (f_i - mu)^2) (self-normalised w);
    CI: percentile bootstrap over samples with a seeded numpy Generator (``n_bootstrap`` resamples);
    ess: Kish ESS."""
    f = _vec(values, "values")
    if lw is None:
        w = np.full(f.size, 1.0 / f.size)
    else:
        lwv = _finite_lw(lw)
        if lwv.shape != f.shape:
            raise InputError(f"values {f.shape} and log weights {lwv.shape} must have the same shape")
        w = normalized_weights(lwv)
    keep = w > 0
    if not np.all(np.isfinite(f[keep])):
        raise InputError(f"{name}: the observable is not finite on some samples with non-zero weight")
    f = np.where(keep, f, 0.0)
    mu = _weighted_mean(f, w)
    se = float(np.sqrt(np.sum(w * w * (f - mu) ** 2)))
    if lw is None and f.size > 1:
        se = float(np.std(f, ddof=1) / np.sqrt(f.size))
    ess = ess_of_weights(w)
    lo, hi = _bootstrap_ci(lambda idx: _weighted_mean(f[idx], w[idx]) if w[idx].sum() > 0 else np.nan,
                           f.size, n_bootstrap, level, seed)
    return Estimate(name, mu, se, float(ess), lo, hi, int(f.size), method="snis+bootstrap")


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, n_bootstrap: int, level: float, seed) -> tuple[float, float]:
    if n_bootstrap <= 0 or n < 2:
        return float("nan"), float("nan")
    if not 0 < level < 1:
        raise InputError(f"confidence level must be in (0, 1), got {level}")
    rng = _rng(seed)
    reps = np.array([stat(rng.integers(0, n, n)) for _ in range(n_bootstrap)])
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def log_z(lw, name: str = "log_Z", n_bootstrap: int = 500, level: float = 0.95,
          seed: int | np.random.Generator = 0) -> Estimate:
    """log Z ~ logsumexp(log w) - log n from log weights -u - log q (n,).

    stderr by the delta method: sd(w) / (sqrt(n) mean(w)) (the relative error of the mean weight);
    CI from a seeded bootstrap. Unbiased in Z, biased low in log Z for small ESS."""
    lwv = _finite_lw(lw)
    n = lwv.size
    m = np.max(lwv)
    if not np.isfinite(m):
        raise InputError("all importance weights are zero; log Z cannot be estimated")
    w = np.exp(lwv - m)
    mean_w = w.mean()
    value = float(m + np.log(mean_w))
    se = float(np.std(w, ddof=1) / (np.sqrt(n) * mean_w)) if n > 1 else float("nan")
    ess = ess_of_weights(w)

    def stat(idx):
        return float(np.log(np.mean(w[idx]))) + m

    lo, hi = _bootstrap_ci(stat, n, n_bootstrap, level, seed)
    return Estimate(name, value, se, ess, lo, hi, n, unit="", method="logsumexp+delta")


def log_z_difference(lw_a, lw_b, name: str = "delta_log_Z", seed: int | np.random.Generator = 0) -> Estimate:
    """log Z_B - log Z_A from two independent generators' log weights (wu2021). Errors add in quadrature.

    For two thermodynamic states with reduced energies u_A, u_B: the free-energy difference
    F_B - F_A = -(log Z_B - log Z_A) in kT."""
    a = log_z(lw_a, seed=seed)
    b = log_z(lw_b, seed=seed)
    se = float(np.hypot(a.stderr, b.stderr))
    v = b.value - a.value
    lo = v - 1.959964 * se
    hi = v + 1.959964 * se
    return Estimate(name, v, se, min(a.ess, b.ess), lo, hi, a.n + b.n, method="logZ difference",
                    extra={"log_Z_a": a.value, "log_Z_b": b.value})

