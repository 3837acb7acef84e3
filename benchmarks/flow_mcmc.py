"""Flow-MCMC against plain reweighting with the same generator: effective samples per energy evaluation.

    python benchmarks/flow_mcmc.py --json                       # shipped alanine-dipeptide generator
    python benchmarks/flow_mcmc.py --quick --json               # toy size (seconds), as in the tests
    python benchmarks/flow_mcmc.py --run RUN_DIR --n 100000 --replicates 20 --json
    python benchmarks/flow_mcmc.py --pool results/a.json results/b.json --json   # gains over pooled replicates

For each of ``--replicates`` independent replicates (own seeds) and each method, the population of the
system's minor mode (alanine dipeptide: phi > 0) and the mean reduced energy <u> are estimated:

* ``reweighting``: ``--n`` flow draws, self-normalised importance weights (``--n`` energy evaluations);
* ``imh``: independence Metropolis-Hastings chains (``--chains``, ``--burnin`` steps dropped each) over
  the very same draws: the same energy evaluations, unweighted exact samples;
* ``mala``: MCMC in the latent space on the pulled-back density (``--latent-chains`` chains of
  ``--latent-steps`` recorded steps after ``--latent-burnin``; every energy+gradient evaluation counted);
* ``snf``: ``--snf-n`` flow draws through ``--snf-blocks`` latent MALA blocks with path weights.

Effective samples of an observable f: ``Var_p(f) / Var(estimate)``. Two measures, both reported per
energy evaluation: ``n_eff_replicates`` from the spread of the estimates over the replicates (no model
of the estimator; relative error ~ sqrt(2 / (R - 1))) and ``n_eff_in_run`` from one replicate's own
error model (reweighting: delta method; chains: n / statistical inefficiency, pymbar), averaged over
replicates. Var_p(f) and the reference values come from reweighting all replicates' draws pooled.
``gain`` = IMH / reweighting effective samples per energy evaluation (> 1: flow-MCMC wins), with a
95 % interval of the replicate measure from a paired bootstrap over replicates. Also the Kish ESS fraction of the draws (reweighting's observable-free efficiency).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_RUN = "systems/alanine-dipeptide/generators/energy"


def _stats(values: list[float], var_p: float, evals: float, in_run: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    sd = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
    n_eff = var_p / sd ** 2 if sd > 0 else float("nan")
    return {"mean": float(v.mean()), "sd_replicates": sd, "n_eff_per_eval_replicates": n_eff / evals,
            "n_eff_per_eval_in_run": float(np.mean(in_run)) / evals, "values": [float(x) for x in v]}


def paired_gain_interval(rw: list[float], imh: list[float], seed: int = 0, n_boot: int = 2000) -> list[float]:
    """95 % percentile interval of Var(reweighting) / Var(IMH) over replicates resampled in pairs (the two
    estimates of a replicate share its draws); [nan, nan] below 3 replicates."""
    a, b = np.asarray(rw, np.float64), np.asarray(imh, np.float64)
    if a.size < 3:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, (n_boot, a.size))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.var(a[idx], axis=1, ddof=1) / np.var(b[idx], axis=1, ddof=1)
    ratio = ratio[np.isfinite(ratio)]
    return [float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))]


def pool(paths: list[str], seed: int = 0) -> dict:
    """IMH / reweighting gains (variance ratio of the estimates, same evaluations) over the replicates of
    several result files of this script (same ``--n``, different seeds), with the paired-bootstrap CI."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if len({r["n"] for r in runs}) != 1:
        raise SystemExit("--pool needs result files with the same --n")
    out: dict[str, Any] = {"pooled": list(paths), "n": runs[0]["n"], "replicates": sum(r["replicates"] for r in runs),
                           "gain": {}}
    for k in (runs[0]["minor"], "u"):
        rw = [v for r in runs for v in r["methods"]["reweighting"][k]["values"]]
        imh = [v for r in runs for v in r["methods"]["imh"][k]["values"]]
        out["gain"][k] = {"n_eff_per_eval_replicates": float(np.var(rw, ddof=1) / np.var(imh, ddof=1)),
                          "replicates_ci95": paired_gain_interval(rw, imh, seed)}
    return out


def main(argv=None) -> dict:
    from boltzflow import pipeline
    from boltzflow.core import kish_ess
    from boltzflow.estimators import expectation, statistical_inefficiency
    from boltzflow.flows.latent import latent_map
    from boltzflow.sampling.flow_mcmc import draw_proposals, run_flow_mcmc
    from boltzflow.sampling.mcmc_config import MCMCConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=DEFAULT_RUN, help="trained run directory or shipped generator")
    ap.add_argument("--n", type=int, default=50000, help="flow draws per replicate (reweighting and IMH)")
    ap.add_argument("--replicates", type=int, default=10)
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--burnin", type=int, default=20)
    ap.add_argument("--latent-chains", type=int, default=64)
    ap.add_argument("--latent-steps", type=int, default=200)
    ap.add_argument("--latent-burnin", type=int, default=50)
    ap.add_argument("--snf-n", type=int, default=4000)
    ap.add_argument("--snf-blocks", type=int, default=4)
    ap.add_argument("--methods", default="reweighting,imh,mala,snf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="toy sizes (seconds)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--pool", nargs="+", metavar="JSON", help="only pool the replicates of earlier result files")
    a = ap.parse_args(argv)
    if a.pool:
        pooled = pool(a.pool, a.seed)
        print(json.dumps(pooled) if a.json else json.dumps(pooled, indent=2))
        return pooled
    if a.quick:
        a.n, a.replicates, a.chains, a.burnin = 1000, 2, 4, 5
        a.latent_chains, a.latent_steps, a.latent_burnin, a.snf_n, a.snf_blocks = 8, 5, 3, 100, 2
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    torch.set_num_threads(1)
    t_start = time.time()
    system, _, gen, energy = pipeline.load_trained(a.run, device="cpu")
    lat = latent_map(gen)
    modes = system.modes
    minor = modes.names.index(modes.minor)

    def observables(positions, u):
        return {modes.minor: (modes.assign(positions) == minor).astype(np.float64), "u": np.asarray(u, np.float64)}

    est: dict[str, dict[str, list[float]]] = {m: {modes.minor: [], "u": []} for m in methods}
    in_run: dict[str, dict[str, list[float]]] = {m: {modes.minor: [], "u": []} for m in methods}
    evals: dict[str, list[float]] = {m: [] for m in methods}
    wall: dict[str, float] = {m: 0.0 for m in methods}
    accept: dict[str, list[float]] = {m: [] for m in methods}
    kish: dict[str, list[float]] = {m: [] for m in methods}
    pooled_lw, pooled_f = [], {modes.minor: [], "u": []}
    for r in range(a.replicates):
        g = torch.Generator().manual_seed(1000 * a.seed + r)
        draws = None
        if "reweighting" in methods or "imh" in methods:
            t0 = time.time()
            draws = draw_proposals(lat, energy, a.n, batch_size=4000, generator=g)
            t_draw = time.time() - t0
            obs = observables(draws.positions, draws.reduced_energy)
            pooled_lw.append(draws.log_weights)
            for k in obs:
                pooled_f[k].append(obs[k])
        if "reweighting" in methods:
            assert draws is not None
            wall["reweighting"] += t_draw
            evals["reweighting"].append(a.n)
            kish["reweighting"].append(kish_ess(draws.log_weights) / a.n)
            for k, f in obs.items():
                e = expectation(f, draws.log_weights, n_bootstrap=0)
                est["reweighting"][k].append(e.value)
                var_p = float(np.sum(draws.normalized_weights() * (f - e.value) ** 2))
                in_run["reweighting"][k].append(var_p / e.stderr ** 2 if e.stderr > 0 else float("nan"))
        runs = []
        if "imh" in methods:
            t0 = time.time()
            runs.append(("imh", run_flow_mcmc(lat, energy, MCMCConfig(method="imh", chains=a.chains, burnin=a.burnin),
                                              a.n, proposals=draws, seed=r), t_draw + time.time() - t0))
        if "mala" in methods:
            t0 = time.time()
            cfg = MCMCConfig(method="mala", chains=a.latent_chains, burnin=a.latent_burnin, step_size=0.3)
            runs.append(("mala", run_flow_mcmc(lat, energy, cfg, a.latent_chains * a.latent_steps, generator=g),
                         time.time() - t0))
        for name, s, dt in runs:
            wall[name] += dt
            evals[name].append(float(s.provenance["energy_evals"]))
            accept[name].append(float(s.provenance["accept_rate"]))
            steps = int(s.provenance["steps"])
            for k, f in observables(s.positions, s.reduced_energy).items():
                est[name][k].append(float(f.mean()))
                gs = [statistical_inefficiency(f[c * steps:(c + 1) * steps]) for c in range(int(s.provenance["chains"]))]
                in_run[name][k].append(len(f) / float(np.mean(gs)))
        if "snf" in methods:
            t0 = time.time()
            cfg = MCMCConfig(method="snf", snf_blocks=a.snf_blocks, snf_kernel="mala", step_size=0.05)
            s = run_flow_mcmc(lat, energy, cfg, a.snf_n, generator=g, batch_size=2000)
            wall["snf"] += time.time() - t0
            evals["snf"].append(float(s.provenance["energy_evals"]))
            accept["snf"].append(float(s.provenance["accept_rate"]))
            kish["snf"].append(kish_ess(s.log_weights) / a.snf_n)
            for k, f in observables(s.positions, s.reduced_energy).items():
                e = expectation(f, s.log_weights, n_bootstrap=0)
                est["snf"][k].append(e.value)
                var_p = float(np.sum(s.normalized_weights() * (f - e.value) ** 2))
                in_run["snf"][k].append(var_p / e.stderr ** 2 if e.stderr > 0 else float("nan"))
        print(f"replicate {r + 1}/{a.replicates}: " + ", ".join(
            f"{m} {est[m][modes.minor][-1]:.4f} ({wall[m]:.0f} s)" for m in methods if est[m][modes.minor]),
            file=sys.stderr, flush=True)
    reference: dict[str, Any] = {}
    var_p: dict[str, float] = {}
    if pooled_lw:
        lw = np.concatenate(pooled_lw)
        for k in pooled_f:
            f = np.concatenate(pooled_f[k])
            e = expectation(f, lw, n_bootstrap=0)
            w = np.exp(lw - lw.max())
            w /= w.sum()
            var_p[k] = float(np.sum(w * (f - e.value) ** 2))
            reference[k] = {"value": e.value, "stderr": e.stderr, "var_p": var_p[k]}
        reference["n_pooled"] = int(lw.size)
        reference["kish_ess_fraction_pooled"] = kish_ess(lw) / lw.size
    out: dict[str, Any] = {"run": a.run, "system": system.name, "n": a.n, "replicates": a.replicates, "chains": a.chains,
                           "burnin": a.burnin, "minor": modes.minor, "reference": reference, "methods": {}}
    for m in methods:
        ev = float(np.mean(evals[m]))
        row: dict[str, Any] = {"energy_evals": ev, "wall_s": wall[m]}
        if accept[m]:
            row["accept_rate"] = float(np.mean(accept[m]))
        if kish[m]:
            row["kish_ess_fraction"] = float(np.mean(kish[m]))
            row["kish_ess_per_eval"] = float(np.mean(kish[m])) * (a.n if m == "reweighting" else a.snf_n) / ev
        for k in (modes.minor, "u"):
            if k in var_p:
                row[k] = _stats(est[m][k], var_p[k], ev, in_run[m][k])
        out["methods"][m] = row
    if {"reweighting", "imh"} <= set(methods):
        rw, imh = out["methods"]["reweighting"], out["methods"]["imh"]
        out["gain"] = {k: {kind: imh[k][kind] / rw[k][kind] for kind in ("n_eff_per_eval_replicates",
                                                                           "n_eff_per_eval_in_run")}
                       for k in (modes.minor, "u")}
        for k in (modes.minor, "u"):
            out["gain"][k]["replicates_ci95"] = paired_gain_interval(rw[k]["values"], imh[k]["values"], a.seed)
    out["wall_s"] = time.time() - t_start
    out = json.loads(json.dumps(out, default=float).replace("NaN", "null"))
    if a.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
