"""Read replica-exchange storage: target-state SampleSets and MBAR over all states.

Positions are read from the analysis NetCDF (every replica, every iteration, all atoms in the
system's order, nm). Reduced energies are openmmtools' u = beta_k U (vacuum, no pV term).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.sampleset import SampleSet
from ..core.weights import ess_of_weights
from ..errors import InputError
from ..estimators.analysis import N_BLOCKS
from ..estimators.blocks import (
    _quiet_pymbar,
    block_average,
    detect_equilibration,
    statistical_inefficiency,
    subsample_indices,
)
from ..estimators.core import Estimate
from .exchange import CONFIG_NAME, COST_NAME, _quiet_openmmtools, storage_path


@dataclass(frozen=True)
class ReplicaData:
    """Everything of a run, iteration 1..T (iteration 0, the minimised start, is dropped).

    positions: (T, R, n_atoms, 3) float32 nm, per replica; states: (T, R) state index of each replica;
    energies: (T, R, K) reduced potential of replica r's configuration in state k;
    temperatures: (K,) K; wall_time_s: run wall time from the reporter's timestamps (nan if unknown).
    """

    positions: np.ndarray
    states: np.ndarray
    energies: np.ndarray
    temperatures: np.ndarray
    wall_time_s: float
    steps_per_iteration: int
    timestep_fs: float
    path: str
    record: dict = field(default_factory=dict)

    @property
    def n_iterations(self) -> int:
        return int(self.states.shape[0])

    def state_series(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions (T, n_atoms, 3), reduced energies (T,)) of whichever replica was in state k."""
        rep = np.argmax(self.states == k, axis=1)
        t = np.arange(self.n_iterations)
        return self.positions[t, rep], self.energies[t, rep, k]


def read_replica(storage: str | Path) -> ReplicaData:
    """Load a run's analysis storage (a run directory or its ``replica.nc``)."""
    import json

    import netCDF4

    path = storage_path(storage)
    if not path.is_file():
        raise InputError(f"no replica-exchange storage at '{path}'; run `boltzflow simulate SYSTEM -o DIR` first")
    try:
        ds = netCDF4.Dataset(str(path), "r")
    except OSError as e:
        raise InputError(f"'{path}' is not a readable NetCDF file ({e})") from e
    try:
        if "positions" not in ds.variables or "energies" not in ds.variables:
            raise InputError(f"'{path}' has no positions/energies; it was not written by boltzflow simulate")
        last = int(ds.variables["last_iteration"][0]) if "last_iteration" in ds.variables else None
        states = np.asarray(ds.variables["states"][:], dtype=np.int64)
        n = states.shape[0] if last is None else min(last + 1, states.shape[0])
        if n < 2:
            raise InputError(f"'{path}' holds no completed iteration yet; run longer")
        states = states[1:n]
        energies = np.asarray(ds.variables["energies"][1:n], dtype=np.float64)
        positions = np.asarray(ds.variables["positions"][1:n], dtype=np.float32)
        wall = float("nan")
        if "timestamp" in ds.variables:
            wall = _wall_time([str(v) for v in ds.variables["timestamp"][:n]])
    finally:
        ds.close()
    cfg_path = path.parent / CONFIG_NAME
    record = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg = record.get("config", {})
    cost_path = path.parent / COST_NAME
    if cost_path.is_file():
        wall = float(json.loads(cost_path.read_text()).get("wall_time_s", wall))
    temps = np.asarray(record.get("temperatures_k", []), dtype=np.float64)
    if temps.size != energies.shape[2]:
        temps = _temperatures_from_storage(path)
    return ReplicaData(positions, states, energies, temps, wall, int(cfg.get("steps_per_iteration", 0)),
                       float(cfg.get("timestep_fs", float("nan"))), str(path), record)


def _wall_time(stamps: list[str]) -> float:
    """Seconds between the first and last per-iteration ctime stamps (fallback when replica_cost.json
    is missing; includes any pause between a kill and a resume)."""
    import time as _time

    try:
        t = np.array([_time.mktime(_time.strptime(s.strip(), "%a %b %d %H:%M:%S %Y")) for s in stamps])
    except ValueError:
        return float("nan")
    if t.size < 2:
        return float("nan")
    return float(t[-1] - t[0])


def _temperatures_from_storage(path: Path) -> np.ndarray:
    _quiet_openmmtools()
    from openmm import unit
    from openmmtools import multistate

    rep = multistate.MultiStateReporter(str(path), open_mode="r")
    try:
        tstates, _ = rep.read_thermodynamic_states()
        return np.array([s.temperature.value_in_unit(unit.kelvin) for s in tstates])
    finally:
        rep.close()


def _equilibration(data: ReplicaData, state_index: int, discard: bool) -> tuple[int, float]:
    _, u = data.state_series(state_index)
    if discard:
        t0, g, _ = detect_equilibration(u)
    else:
        t0, g = 0, statistical_inefficiency(u)
    return t0, g


def extract_samples(storage: str | Path, state_index: int = 0, discard_equilibration: bool = True,
                    decorrelate: bool = True) -> "SampleSet":
    """Samples of thermodynamic state ``state_index`` (0 = target temperature) as a SampleSet.

    positions (n, n_atoms, 3) nm in the system's atom order; reduced_energy (n,) in kT at that state's
    temperature; log_q / log_weights None (Boltzmann samples). Equilibration is detected on the state's
    reduced-energy series (pymbar) and discarded; with ``decorrelate`` every g-th frame is kept (g the
    statistical inefficiency). Provenance records t0, g, iterations and cost."""
    data = read_replica(storage)
    k = int(state_index)
    if not 0 <= k < data.energies.shape[2]:
        raise InputError(f"state_index {k} out of range; the run has {data.energies.shape[2]} states")
    x, u = data.state_series(k)
    t0, g = _equilibration(data, k, discard_equilibration)
    idx = np.arange(t0, data.n_iterations)
    if decorrelate and idx.size > 2:
        idx = t0 + subsample_indices(u[t0:], g)
    n_rep = data.states.shape[1]
    steps = data.steps_per_iteration
    prov = {
        "sampler": "replica-exchange",
        "method": data.record.get("config", {}).get("method"),
        "storage": str(data.path),
        "system": data.record.get("system"),
        "fingerprint": data.record.get("fingerprint"),
        "state_index": k,
        "temperatures_k": data.temperatures.tolist(),
        "n_iterations": data.n_iterations,
        "equilibration_iterations": int(t0),
        "statistical_inefficiency": float(g),
        "decorrelated": bool(decorrelate),
        "steps_per_iteration": steps,
        "timestep_fs": data.timestep_fs,
        # every MD step of every replica costs one force evaluation
        "energy_evals": int(data.n_iterations * n_rep * max(steps, 1)),
        "wall_s": data.wall_time_s,
    }
    return SampleSet(positions=x[idx], reduced_energy=u[idx], temperature=float(data.temperatures[k]),
                     provenance=prov)


def state_populations(storage: str | Path, indicators: dict[str, Callable[[np.ndarray], np.ndarray]],
                      state_index: int = 0, n_blocks: int = N_BLOCKS, discard_equilibration: bool = True,
                      seed: int = 0) -> dict:
    """Populations of regions at state ``state_index`` from that state's (correlated) series with block
    errors: ``{name: Estimate}``; ``indicators[name](x: (T, n_atoms, 3)) -> (T,) bool``. ``n_blocks``
    defaults to :data:`boltzflow.estimators.analysis.N_BLOCKS` (fewer for series shorter than 2 per block)."""
    data = read_replica(storage)
    x, _ = data.state_series(state_index)
    t0, g = _equilibration(data, state_index, discard_equilibration)
    out = {}
    for name, fn in indicators.items():
        ind = np.asarray(fn(x[t0:]), dtype=np.float64)
        est = block_average(ind, n_blocks=min(n_blocks, max(2, ind.size // 2)), name=name, seed=seed)
        out[name] = est
    return out


@dataclass(frozen=True)
class MBARResult:
    """MBAR over all states of a run.

    free_energies: (K,) reduced free energies f_k - f_0 (dimensionless, -log Z_k/Z_0);
    free_energy_errors: (K,) MBAR standard errors; temperatures: (K,) K;
    observables: {name: Estimate} at ``target_state``; Estimate.stderr is the bootstrap-over-blocks
    error, ``extra`` holds the block (between-block spread) error and the naive MBAR error.
    """

    free_energies: np.ndarray
    free_energy_errors: np.ndarray
    temperatures: np.ndarray
    target_state: int
    n_samples: int
    statistical_inefficiency: float
    equilibration_iterations: int
    observables: dict = field(default_factory=dict)


def mbar_analysis(storage: str | Path, observables: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
                  target_state: int = 0, n_blocks: int = 10, n_bootstrap: int = 200,
                  discard_equilibration: bool = True, seed: int = 0) -> MBARResult:
    """MBAR (pymbar) over every replica's samples: free energies between states and reweighted
    observables at ``target_state``.

    Samples after equilibration are subsampled with the statistical inefficiency of the summed
    replica energies. Observables ``fn(x: (m, n_atoms, 3) nm) -> (m,)`` are averaged with the MBAR
    weights of ``target_state``; their errors: (i) naive MBAR, (ii) between-block spread of
    per-block estimates (contiguous iteration blocks, global f_k), (iii) bootstrap over blocks
    (reported as stderr). (i) understates rare-state populations several-fold for correlated runs.
    """
    _quiet_pymbar()
    from pymbar import MBAR
    from pymbar.utils import ParameterError
    data = read_replica(storage)
    T, R, K = data.energies.shape
    # u_kn over all replicas: energy of the configuration of replica r at iteration t in every state
    u_sum = np.array([data.energies[t, np.arange(R), data.states[t]].sum() for t in range(T)])
    if discard_equilibration:
        t0, g, _ = detect_equilibration(u_sum)
    else:
        t0, g = 0, statistical_inefficiency(u_sum)
    stride = max(1, int(round(g))) if T - t0 > 20 * max(1, int(round(g))) else 1
    its = np.arange(t0, T, stride)
    if its.size < 2:
        raise InputError(f"only {its.size} usable iterations after equilibration; run longer")
    # samples ordered (iteration, replica)
    u_kn = data.energies[its].reshape(-1, K).T  # (K, N)
    N_k = np.zeros(K, dtype=int)
    st = data.states[its].reshape(-1)
    for k in range(K):
        N_k[k] = int(np.sum(st == k))
    order = np.argsort(st, kind="stable")  # MBAR wants samples grouped by the state that generated them
    u_kn = u_kn[:, order]
    it_of_sample = np.repeat(its, R)[order]
    mbar = MBAR(u_kn, N_k, solver_protocol="robust") if K > 1 else None
    if mbar is not None:
        res = mbar.compute_free_energy_differences(compute_uncertainty=True)
        f = np.asarray(res["Delta_f"][0])
        df = np.asarray(res["dDelta_f"][0])
        f_abs = np.asarray(mbar.f_k)
    else:
        f, df, f_abs = np.zeros(1), np.zeros(1), np.zeros(1)
    # log MBAR weights of the target state for every sample
    log_den = _logsumexp_cols(np.log(np.maximum(N_k, 1e-300))[:, None] + f_abs[:, None] - u_kn)
    log_w = f_abs[target_state] - u_kn[target_state] - log_den
    obs_out = {}
    if observables:
        xs = data.positions[its].reshape(-1, *data.positions.shape[2:])[order]
        blocks_of = np.searchsorted(np.linspace(its[0], its[-1] + 1, n_blocks + 1)[1:-1], it_of_sample, side="right")
        w = np.exp(log_w - log_w.max())
        rng = np.random.default_rng(seed)
        for name, fn in observables.items():
            a = np.asarray(fn(xs), dtype=np.float64)
            value = float(np.sum(w * a) / np.sum(w))
            naive = float("nan")
            if mbar is not None:
                try:
                    with np.errstate(divide="ignore"):  # pymbar takes log(A) of a 0/1 indicator
                        r = mbar.compute_expectations(a, state_dependent=False)
                    naive = float(np.asarray(r["sigma"])[target_state])
                except (ValueError, FloatingPointError, np.linalg.LinAlgError, ParameterError):
                    naive = float("nan")  # pymbar fails on degenerate inputs (e.g. a constant observable)
            num = np.bincount(blocks_of, weights=w * a, minlength=n_blocks)
            den = np.bincount(blocks_of, weights=w, minlength=n_blocks)
            ok = den > 0
            means = num[ok] / den[ok]
            se_block = float(np.std(means, ddof=1) / np.sqrt(ok.sum())) if ok.sum() > 1 else float("nan")
            reps = []
            for _ in range(n_bootstrap):
                pick = rng.integers(0, n_blocks, n_blocks)
                d = den[pick].sum()
                if d > 0:
                    reps.append(num[pick].sum() / d)
            reps = np.asarray(reps)
            se_boot = float(np.std(reps, ddof=1)) if reps.size > 1 else float("nan")
            ess = ess_of_weights(w)
            lo, hi = (float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))) if reps.size else (np.nan, np.nan)
            obs_out[name] = _estimate(name, value, se_boot, ess, lo, hi, int(a.size),
                                      {"stderr_block": se_block, "stderr_mbar": naive, "n_blocks": int(ok.sum())})
    return MBARResult(f, df, data.temperatures, int(target_state), int(u_kn.shape[1]), float(g), int(t0), obs_out)


def _estimate(name, value, se, ess, lo, hi, n, extra):
    return Estimate(name, value, se, ess, lo, hi, n, unit="probability", method="mbar+bootstrap-over-blocks",
                    extra=extra)


def _logsumexp_cols(a: np.ndarray) -> np.ndarray:
    m = np.max(a, axis=0)
    return m + np.log(np.sum(np.exp(a - m), axis=0))
