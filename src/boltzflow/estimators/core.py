"""Importance-sampling estimators: log weights, Kish ESS, self-normalised expectations, log Z.

Pure numpy. Every estimator returns an :class:`Estimate` (value, standard error, ESS, confidence
interval, n), never a bare float. Energies are reduced (kT), log densities natural-log.

Estimates from importance weights carry the Pareto k of the weights' tail (:mod:`.tails`) and, when it
is above 0.7, an error bar widened by :func:`tail_checked` (the rule and its reason are there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np

from ..core.weights import ess_of_weights
from ..errors import InputError
from .tails import N_BATCHES, batch_means_stderr, heavy_tail_note, heavy_tailed, pareto_k, pareto_k_threshold

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """One estimated quantity.

    value: the estimate; stderr: its standard error (nan when unknown); ess: effective sample size
    (count) behind it; ci_low/ci_high: confidence interval (``level``, default 95%); n: raw samples used.
    unit: "", "kT", "kJ/mol", "probability", ...; method: how the error was obtained.
    pareto_k: Pareto shape k-hat of the importance weights behind it (:func:`boltzflow.estimators.pareto_k`;
    nan: unweighted samples or too few to fit); above 0.7 the error bar is flagged (:attr:`reliable`) and
    ``stderr`` is the larger of the delta-method and batch-means errors (:func:`tail_checked`).
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
    pareto_k: float = float("nan")

    @property
    def reliable(self) -> bool:
        """False when the weights are heavy-tailed (``pareto_k`` > 0.7): the error bar may be too small.
        True otherwise, also when there is no Pareto k (unweighted samples)."""
        return not heavy_tailed(self.pareto_k)

    @property
    def tail_note(self) -> str:
        """The heavy-tail warning (one line) when not :attr:`reliable`, else empty."""
        return heavy_tail_note(self.pareto_k)

    def to_dict(self) -> dict[str, Any]:
        """JSON form ``{"name", "value", "stderr", "ess"}`` (nan -> None); estimates from importance weights
        add ``"pareto_k"`` (None: no tail, all largest weights equal), ``"reliable"`` and ``"stderr_method"``,
        and when not reliable ``"stderr_delta"`` and ``"stderr_batch_means"``."""
        d: dict[str, Any] = {"name": self.name, "value": _f(self.value), "stderr": _f(self.stderr), "ess": _f(self.ess)}
        if self.pareto_k == self.pareto_k:
            d.update(pareto_k=_f(self.pareto_k), reliable=self.reliable)
            for key in ("stderr_method", "stderr_delta", "stderr_batch_means"):
                if key in self.extra:
                    v = self.extra[key]
                    d[key] = _f(v) if isinstance(v, float) else v
        return d

    def to_full_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float):
                d[k] = _f(v)
        if self.pareto_k == self.pareto_k:
            d["reliable"] = self.reliable
        return d

    def __str__(self) -> str:
        u = f" {self.unit}" if self.unit and self.unit != "probability" else ""
        ess = f", ESS {self.ess:.0f}" if np.isfinite(self.ess) else ""
        k = f", Pareto k {self.pareto_k:.2f} > 0.7: error bar unreliable" if not self.reliable else ""
        return f"{self.name} = {self.value:.4g} +- {self.stderr:.2g}{u} (n={self.n}{ess}{k})"


def _f(v: float) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def tail_checked(est: Estimate, log_w, stat: Callable[[np.ndarray], float] | None = None,
                 delta: str = "delta method", n_batches: int = N_BATCHES,
                 bounds: tuple[float, float] = (-np.inf, np.inf), k: float | None = None,
                 batches: Callable[[int], float] | None = None) -> Estimate:
    """``est`` with the Pareto k of the weights ``exp(log_w)`` (``log_w: (n,)``, or ``k`` given) recorded,
    and its error bar checked against the weights' tail.

    The rule: when k > 0.7 the delta-method error (``delta`` names how ``est.stderr`` was obtained) is
    kept in ``extra['stderr_delta']``, the batch-means error over ``n_batches`` (>= 10) disjoint chunks,
    ``stat(indices of a chunk)`` = the same estimator on that chunk, in ``extra['stderr_batch_means']``,
    and ``stderr`` becomes the larger of the two (``extra['stderr_method']`` names it; the CI is widened
    to at least value +- 1.96 stderr, clipped to ``bounds``). Why: with k > 0.7 the weights have no
    finite variance; the delta method squares the weights that happened to be drawn and is too small
    in most runs (2.4-3.5x below the spread of replicate runs, measured), while chunk-to-chunk spread
    at least sees how much the largest weights move the estimate. Neither is a guarantee: the flag
    (:attr:`Estimate.reliable` False) says so. k <= 0.7: ``est`` unchanged but for k.
    ``batches(n_batches)`` instead of ``stat``: the batch-means error computed by the caller (estimators
    over two sample sets)."""
    if k is None:
        k = pareto_k(log_w)
    n = int(np.asarray(log_w).size)
    extra = dict(est.extra)
    if k == k:
        extra["pareto_k_threshold"] = pareto_k_threshold(int(np.sum(np.isfinite(np.asarray(log_w, float)))))
    if stat is None and batches is None:  # no error bar to check (e.g. the ESS itself)
        return replace(est, pareto_k=float(k), extra=extra)
    extra["stderr_method"] = delta
    if not heavy_tailed(k):
        return replace(est, pareto_k=float(k), extra=extra)
    if n_batches < N_BATCHES:
        raise InputError(f"heavy-tailed weights need batch means over >= {N_BATCHES} chunks, got {n_batches}")
    se_b = batches(n_batches) if batches is not None else batch_means_stderr(stat, n, n_batches)
    se_d = float(est.stderr)
    use_batch = se_b == se_b and not se_b <= se_d
    se = se_b if use_batch else se_d
    extra.update(stderr_delta=se_d, stderr_batch_means=se_b, n_batches=n_batches,
                 stderr_method=f"batch means ({n_batches} chunks; Pareto k > 0.7)" if use_batch
                 else f"{delta} (>= batch means over {n_batches} chunks; Pareto k > 0.7)")
    lo, hi = est.ci_low, est.ci_high
    if se == se:
        v = est.value
        lo = max(bounds[0], min(lo, v - Z95 * se)) if lo == lo else max(bounds[0], v - Z95 * se)
        hi = min(bounds[1], max(hi, v + Z95 * se)) if hi == hi else min(bounds[1], v + Z95 * se)
    return replace(est, stderr=se, ci_low=float(lo), ci_high=float(hi), pareto_k=float(k), extra=extra,
                   method=f"{est.method}; heavy tails: {extra['stderr_method']}")


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
    return tail_checked(Estimate("ess", float(ess), float("nan"), float(ess), n=n, unit="samples", method="kish",
                                 extra={"fraction": float(ess / n)}), lw)


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
    ess: Kish ESS; pareto_k of the weights, and with k > 0.7 the larger of the delta-method and batch-means
    errors (:func:`tail_checked`)."""
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
    def stat(idx):
        return _weighted_mean(f[idx], w[idx]) if w[idx].sum() > 0 else np.nan

    lo, hi = _bootstrap_ci(stat, f.size, n_bootstrap, level, seed)
    est = Estimate(name, mu, se, float(ess), lo, hi, int(f.size), method="snis+bootstrap")
    return est if lw is None else tail_checked(est, lwv, stat)


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
    CI from a seeded bootstrap. Unbiased in Z, biased low in log Z for small ESS. pareto_k of the weights;
    with k > 0.7 the larger of the delta-method and batch-means errors (:func:`tail_checked`)."""
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
    est = Estimate(name, value, se, ess, lo, hi, n, unit="", method="logsumexp+delta")
    return tail_checked(est, lwv, lambda idx: stat(idx) if np.any(w[idx] > 0) else np.nan)


def log_z_difference(lw_a, lw_b, name: str = "delta_log_Z", seed: int | np.random.Generator = 0) -> Estimate:
    """log Z_B - log Z_A from two independent generators' log weights (wu2021). Errors add in quadrature.

    For two thermodynamic states with reduced energies u_A, u_B: the free-energy difference
    F_B - F_A = -(log Z_B - log Z_A) in kT. pareto_k: the larger of the two generators' (each log Z's
    error already checked against its tail, :func:`tail_checked`)."""
    a = log_z(lw_a, seed=seed)
    b = log_z(lw_b, seed=seed)
    se = float(np.hypot(a.stderr, b.stderr))
    v = b.value - a.value
    lo = v - Z95 * se
    hi = v + Z95 * se
    k = float(np.nanmax([a.pareto_k, b.pareto_k])) if a.pareto_k == a.pareto_k or b.pareto_k == b.pareto_k \
        else float("nan")
    extra: dict[str, Any] = {"log_Z_a": a.value, "log_Z_b": b.value, "pareto_k_a": a.pareto_k, "pareto_k_b": b.pareto_k}
    method = "logZ difference"
    if heavy_tailed(k):
        extra["stderr_method"] = "log Z errors in quadrature, each with batch means (Pareto k > 0.7)"
        method += "; heavy tails: " + extra["stderr_method"]
    return Estimate(name, v, se, min(a.ess, b.ess), lo, hi, a.n + b.n, method=method, extra=extra, pareto_k=k)

