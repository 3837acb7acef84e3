"""Populations, conformational free energies, free-energy surfaces, and free-energy differences
between thermodynamic states (EXP from one sample set, BAR from two; pymbar).

All free energies are reduced (kT) unless the name ends in ``_kj_mol``; kT at the sample
temperature converts (``to_kj_per_mol``). Estimates from importance weights carry the weights' Pareto k
and, above 0.7, the larger of the delta-method and batch-means errors (:func:`.core.tail_checked`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..core.weights import ess_of_weights
from ..errors import InputError
from ..systems.modes import dihedral
from ..units import kt_kj_per_mol
from .blocks import _quiet_pymbar
from .core import Z95, Estimate, _bootstrap_ci, _finite_lw, _rng, _vec, normalized_weights, tail_checked
from .regions import torsion_atoms
from .tails import pareto_k, spread_stderr

#: extra keys holding standard errors, scaled with ``stderr`` when an estimate is transformed
_SE_KEYS = ("stderr_delta", "stderr_batch_means")


def _scaled_errors(extra: dict, factor: float) -> dict:
    return {k: (v * factor if k in _SE_KEYS and isinstance(v, float) else v) for k, v in extra.items()}


def to_kj_per_mol(est: Estimate, temperature_k: float) -> Estimate:
    """A kT-valued Estimate converted to kJ/mol at ``temperature_k`` (K)."""
    if est.unit != "kT":
        raise InputError(f"estimate {est.name!r} is in {est.unit or 'no unit'}, not kT; cannot convert")
    kt = kt_kj_per_mol(temperature_k)
    return replace(est, name=est.name + "_kj_mol", value=est.value * kt, stderr=est.stderr * kt,
                   ci_low=est.ci_low * kt, ci_high=est.ci_high * kt, unit="kJ/mol", extra=_scaled_errors(est.extra, kt))


def _weights(n: int, lw) -> np.ndarray:
    if lw is None:
        return np.full(n, 1.0 / n)
    lwv = _finite_lw(lw)
    if lwv.size != n:
        raise InputError(f"log weights have {lwv.size} entries but there are {n} samples")
    return normalized_weights(lwv)


def population(indicator, lw=None, name: str = "population", n_bootstrap: int = 500, level: float = 0.95,
               seed: int | np.random.Generator = 0) -> Estimate:
    """P(region) = sum w_i 1[x_i in region] from an indicator (n,) bool and optional log weights (n,).

    stderr: delta method sqrt(sum w^2 (1 - P)^2 ...) for weighted samples, binomial sqrt(P(1-P)/n) for
    unweighted (independent) samples; CI: seeded bootstrap. Correlated series: use ``blocks.block_average``.
    Weighted: pareto_k of the weights; k > 0.7: the larger of the delta-method and batch-means errors."""
    a = np.asarray(indicator, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise InputError("no samples: a population needs at least one sample")
    w = _weights(a.size, lw)
    p = float(min(1.0, max(0.0, np.sum(w * a))))
    se = float(np.sqrt(np.sum(w * w * (a - p) ** 2)))
    if lw is None and a.size > 1:
        se = float(np.sqrt(max(p * (1 - p), 0.0) / (a.size - 1)))

    def stat(i):
        return float(np.sum(w[i] * a[i]) / np.sum(w[i])) if w[i].sum() > 0 else np.nan

    lo, hi = _bootstrap_ci(stat, a.size, n_bootstrap, level, seed)
    est = Estimate(name, p, se, ess_of_weights(w), lo, hi, int(a.size), unit="probability",
                   method="snis" if lw is not None else "binomial")
    return est if lw is None else tail_checked(est, lw, stat, bounds=(0.0, 1.0))


def mode_populations(modes, x, lw=None, seed: int = 0, n_bootstrap: int = 300) -> dict[str, Estimate]:
    """Populations of every mode of a system's mode set: ``{name: Estimate}``."""
    lab = modes.assign(x)
    return {nm: population(lab == i, lw, name=nm, seed=seed, n_bootstrap=n_bootstrap)
            for i, nm in enumerate(modes.names)}


def conformational_free_energy(in_a, in_b, lw=None, name: str = "dF", temperature_k: float | None = None,
                               n_bootstrap: int = 500, level: float = 0.95,
                               seed: int | np.random.Generator = 0) -> Estimate:
    """dF(A -> B) = -log(P_B / P_A) in kT from indicators ``in_a``, ``in_b`` (n,) and log weights.

    stderr by the delta method on the ratio estimator (z_i = w_i (b_i - r a_i)); CI by seeded bootstrap.
    With ``temperature_k`` the kJ/mol value is in ``extra['value_kj_mol']``. Weighted: pareto_k of the
    weights; k > 0.7: the larger of the delta-method error and the batch-means error of the ratio
    r = P_B / P_A over chunks, propagated as se(r) / r like the delta method (chunks without weight in
    B give r = 0 and count)."""
    a = np.asarray(in_a, dtype=np.float64).reshape(-1)
    b = np.asarray(in_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise InputError(f"indicators of A {a.shape} and B {b.shape} must be non-empty and of equal length")
    w = _weights(a.size, lw)
    pa, pb = float(np.sum(w * a)), float(np.sum(w * b))
    if pa <= 0 or pb <= 0:
        empty = "A" if pa <= 0 else "B"
        raise InputError(f"region {empty} has no (weighted) samples; dF is undefined (sample longer or check the region)")
    r = pb / pa
    z = w * (b - r * a)
    se_r = float(np.sqrt(np.sum(z * z))) / pa
    if lw is None and a.size > 1:
        se_r *= np.sqrt(a.size / (a.size - 1))
    value = -float(np.log(r))
    se = se_r / r

    def stat(i):
        sa, sb = np.sum(w[i] * a[i]), np.sum(w[i] * b[i])
        return -float(np.log(sb / sa)) if sa > 0 and sb > 0 else np.nan

    lo, hi = _bootstrap_ci(stat, a.size, n_bootstrap, level, seed)
    extra = {"P_A": pa, "P_B": pb}
    ess = ess_of_weights(w)
    est = Estimate(name, value, se, ess, lo, hi, int(a.size), unit="kT", method="ratio+delta", extra=extra)
    if lw is not None:
        def chunk(i):  # dF linearised around the full estimate: -log r_b ~ value - (r_b - r) / r
            sa, sb = np.sum(w[i] * a[i]), np.sum(w[i] * b[i])
            return value - (sb / sa - r) / r if sa > 0 else np.nan

        est = tail_checked(est, lw, chunk)
    if temperature_k is not None:
        kt = kt_kj_per_mol(temperature_k)
        est.extra.update(value_kj_mol=value * kt, stderr_kj_mol=est.stderr * kt)
    return est


def population_free_energy(p: Estimate, name: str = "dF") -> Estimate:
    """dF = -log(P / (1 - P)) in kT (region vs its complement) from a population Estimate; error propagated
    (and the population's Pareto k and error method kept)."""
    v = p.value
    if not 0 < v < 1:
        raise InputError(f"population {p.name} = {v} must be strictly between 0 and 1 for a free energy")
    se = p.stderr / (v * (1 - v))

    def f(q):
        return -np.log(q / (1 - q)) if 0 < q < 1 else np.nan

    extra = {"population": v, **_scaled_errors({k: x for k, x in p.extra.items() if k in _SE_KEYS
                                                or k in ("stderr_method", "n_batches", "pareto_k_threshold")},
                                               1.0 / (v * (1 - v)))}
    return Estimate(name, float(f(v)), float(se), p.ess, float(f(p.ci_high)), float(f(p.ci_low)), p.n, unit="kT",
                    method="from population" + (f" ({p.method})" if not p.reliable else ""), extra=extra,
                    pareto_k=p.pareto_k)


@dataclass(frozen=True)
class FreeEnergySurface:
    """Reweighted free-energy surface on a 2-D grid (e.g. phi/psi in degrees).

    edges_x, edges_y: (bins+1,) bin edges; free_energy: (bins, bins) in kT, min 0, +inf for empty bins;
    probability: (bins, bins) weighted histogram summing to 1; ess: Kish ESS of the weights."""

    edges_x: np.ndarray
    edges_y: np.ndarray
    free_energy: np.ndarray
    probability: np.ndarray
    ess: float
    n: int


def free_energy_surface(x, y, lw=None, bins: int = 64, range_deg: tuple[float, float] = (-180.0, 180.0)) -> FreeEnergySurface:
    """F(x, y) = -log p(x, y) (kT, shifted to min 0) on a ``bins`` x ``bins`` grid from coordinates
    ``x``, ``y`` (n,) (degrees for torsions) and optional log weights (n,)."""
    xv, yv = _vec(x, "x"), _vec(y, "y")
    if xv.shape != yv.shape:
        raise InputError(f"x {xv.shape} and y {yv.shape} must have the same length")
    if bins < 2:
        raise InputError(f"bins must be >= 2, got {bins}")
    w = _weights(xv.size, lw)
    edges = np.linspace(range_deg[0], range_deg[1], bins + 1)
    h, ex, ey = np.histogram2d(xv, yv, bins=[edges, edges], weights=w)
    p = h / max(h.sum(), 1e-300)
    with np.errstate(divide="ignore"):
        f = -np.log(p)
    if np.any(np.isfinite(f)):
        f = f - np.min(f[np.isfinite(f)])
    return FreeEnergySurface(ex, ey, f, p, ess_of_weights(w), int(xv.size))


def ramachandran_surface(positions, topology, lw=None, bins: int = 64) -> FreeEnergySurface:
    """Reweighted phi/psi free-energy surface (degrees, kT) of molecular samples ``positions: (n, n_atoms, 3)``
    nm; phi/psi are found from ``topology`` (first residue with both)."""
    x = np.asarray(positions)
    phi = np.degrees(dihedral(x, torsion_atoms(topology, "phi")))
    psi = np.degrees(dihedral(x, torsion_atoms(topology, "psi")))
    return free_energy_surface(phi, psi, lw, bins=bins)


def histogram_kl(p, q, eps: float = 1e-10) -> float:
    """KL(p || q) in nats between two histograms (any shape; normalised here; q floored at ``eps``)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise InputError(f"histograms must have the same shape, got {p.shape} and {q.shape}")
    p = p / p.sum()
    q = np.maximum(q / q.sum(), eps)
    q = q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


# ---- free energies between thermodynamic states ------------------------------------------------
def exp_free_energy(delta_u, lw=None, name: str = "dF_exp", n_bootstrap: int = 500, level: float = 0.95,
                    seed: int | np.random.Generator = 0) -> Estimate:
    """EXP (Zwanzig): dF_BC = -log E_B[exp(-(u_C - u_B))] in kT from ``delta_u`` = u_C - u_B (n,) on samples
    of state B (unweighted: pymbar.other_estimators.exp) or on weighted samples whose log weights ``lw``
    point at B (felardos2023 eq. 8): dF = -(logsumexp(lw - du) - logsumexp(lw)).

    pareto_k: of the combined weights w exp(-du) (the exponential average is itself importance sampling),
    and of w when weighted, the larger; k > 0.7: the larger of the pymbar / delta-method error and
    batch means (:func:`.core.tail_checked`)."""
    du = _vec(delta_u, "delta_u")
    if not np.all(np.isfinite(du)):
        raise InputError("delta_u has non-finite entries (invalid energies); remove those samples first")
    n = du.size
    if lw is None:
        _quiet_pymbar()
        from pymbar import other_estimators

        r = other_estimators.exp(du)
        value, se = float(r["Delta_f"]), float(r["dDelta_f"])
        w = np.full(n, 1.0 / n)
        lwv = np.zeros(n)
    else:
        lwv = _finite_lw(lw)
        if lwv.size != n:
            raise InputError(f"delta_u has {n} entries but log weights have {lwv.size}")
        w = normalized_weights(lwv)
        value = _exp_weighted(du, lwv)
        # delta method on the ratio sum(w e^-du)/sum(w)
        e = np.exp(-(du - np.min(du)))
        r_ = np.sum(w * e)
        se = float(np.sqrt(np.sum(w * w * (e - r_) ** 2)) / r_)
    ew = w * np.exp(-(du - np.min(du)))
    ess = ess_of_weights(ew)  # ESS of the combined (target C) weights
    lo, hi = _bootstrap_ci(lambda i: _exp_weighted(du[i], lwv[i]), n, n_bootstrap, level, seed)
    est = Estimate(name, value, se, ess, lo, hi, n, unit="kT", method="EXP", extra={"ess_target_fraction": ess / n})
    ks = [pareto_k(lwv - du)] + ([pareto_k(lwv)] if lw is not None else [])
    k = max(ks) if all(x == x for x in ks) else float("nan")

    def stat(i):
        return _exp_weighted(du[i], lwv[i]) if np.any(np.isfinite(lwv[i])) else np.nan

    return tail_checked(est, lwv, stat, delta="delta method" if lw is not None else "pymbar", k=k)


def _exp_weighted(du: np.ndarray, lw: np.ndarray) -> float:
    a = lw - du
    ma, mb = np.max(a), np.max(lw)
    return -float((ma + np.log(np.sum(np.exp(a - ma)))) - (mb + np.log(np.sum(np.exp(lw - mb)))))


def bar_free_energy(w_f, w_r, lw_f=None, lw_r=None, name: str = "dF_bar",
                    seed: int | np.random.Generator = 0) -> Estimate:
    """BAR (pymbar.other_estimators.bar): dF_BC in kT from forward work ``w_f`` = u_C - u_B on samples of B
    and reverse work ``w_r`` = u_B - u_C on samples of C.

    Weighted sample sets (generators, ``lw_f``/``lw_r`` log weights towards B resp. C) are first turned
    into Boltzmann samples by seeded multinomial resampling to their Kish ESS (rounded). pareto_k: the
    larger of the two sets' weights (nan when neither is weighted); k > 0.7: the larger of pymbar's error
    and batch means (BAR on 10 pairs of disjoint chunks, each resampled as above)."""
    _quiet_pymbar()
    from pymbar import other_estimators

    wf0, wr0 = _vec(w_f, "w_f"), _vec(w_r, "w_r")
    rng = _rng(seed)
    wf, wr = _resample(wf0, lw_f, rng), _resample(wr0, lw_r, rng)
    if not (np.all(np.isfinite(wf)) and np.all(np.isfinite(wr))):
        raise InputError("work values contain non-finite entries (invalid energies); remove those samples first")
    r = other_estimators.bar(wf, wr, compute_uncertainty=True)
    value, se = float(r["Delta_f"]), float(r["dDelta_f"])
    est = Estimate(name, value, se, float(min(wf.size, wr.size)), value - Z95 * se, value + Z95 * se,
                   int(wf.size + wr.size), unit="kT", method="BAR", extra={"n_forward": int(wf.size),
                                                                           "n_reverse": int(wr.size)})
    lws = [np.asarray(x, dtype=np.float64).reshape(-1) for x in (lw_f, lw_r) if x is not None]
    if not lws:
        return est
    ks = [pareto_k(x) for x in lws]
    k = max(ks) if all(x == x for x in ks) else float("nan")

    def batches(n_batches: int) -> float:  # BAR on chunk b of the forward and chunk b of the reverse set
        from pymbar.utils import BoundsError, ConvergenceError

        def chunk(i: np.ndarray, j: np.ndarray) -> float:
            if i.size < 2 or j.size < 2:
                return np.nan
            try:
                f = _resample(wf0[i], None if lw_f is None else np.asarray(lw_f)[i], rng)
                g = _resample(wr0[j], None if lw_r is None else np.asarray(lw_r)[j], rng)
                return float(other_estimators.bar(f, g, compute_uncertainty=False)["Delta_f"])
            except (InputError, ArithmeticError, ValueError, BoundsError, ConvergenceError):
                return np.nan  # a chunk without weight or without overlap: left out

        return spread_stderr([chunk(i, j) for i, j in zip(np.array_split(np.arange(wf0.size), n_batches),
                                                          np.array_split(np.arange(wr0.size), n_batches))])

    return tail_checked(est, np.concatenate(lws), delta="pymbar", k=k, batches=batches)


def _resample(values: np.ndarray, lw, rng: np.random.Generator) -> np.ndarray:
    if lw is None:
        return values
    w = normalized_weights(_finite_lw(lw))
    if w.size != values.size:
        raise InputError(f"{values.size} work values but {w.size} log weights")
    m = max(2, int(round(ess_of_weights(w))))
    return values[rng.choice(values.size, size=m, replace=True, p=w)]
