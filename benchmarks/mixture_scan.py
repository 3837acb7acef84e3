"""The Kish ESS of a mixture of trained generators ``q_pi = sum_k pi_k q_k`` for many weights pi at once,
from one set of draws per component.

    python benchmarks/mixture_scan.py RUN_A RUN_B -n 50000 --json
    python benchmarks/mixture_scan.py RUN_A RUN_B --grid 0,0.01,0.02,0.05,0.1 --test REF.npz --json

Every component k draws ``n`` samples x ~ q_k; each is evaluated once by the energy (u, kT) and by every
component's density (log q_j). For any weights pi the mixture's expectations follow without new draws
(stratification): ``E_{q_pi}[f] = sum_k pi_k E_{q_k}[f]``, so with w = exp(-u) / q_pi the Kish ESS fraction
is ``(sum_k pi_k mean_k w)^2 / sum_k pi_k mean_k w^2``. With two components the scan runs over the weight
of the second (``--grid``); with more, over the weights given by ``--weights`` (repeatable). ``--test``:
the held-out log-likelihood ``mean log q_pi`` of reference frames (a SampleSet .npz) for the same weights.
The mixture itself is made by ``boltzflow mix RUN_A RUN_B -o DEST --weights ...`` (``pipeline.mix_generators``).

Prints ``{"components": [...], "n_per_component", "scan": [{"weights", "kish", "test_log_q"}], "best"}``;
``kish`` of a single component (weights 1, 0) uses only that component's draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from scipy.special import logsumexp


def mixture_kish(log_q: list[np.ndarray], u: list[np.ndarray], weights) -> float:
    """Kish ESS fraction of the mixture ``sum_k weights[k] q_k`` for the target exp(-u).

    log_q[k]: (n_k, K) log densities of component k's draws under every component (nats);
    u[k]: (n_k,) reduced energies of those draws (kT; non-finite: weight 0). Stratified over the components.
    """
    pi = np.asarray(weights, dtype=np.float64)
    if pi.ndim != 1 or len(pi) != len(log_q) or np.any(pi < 0) or not np.isclose(pi.sum(), 1.0):
        raise ValueError(f"weights must be {len(log_q)} non-negative numbers summing to 1, got {weights}")
    with np.errstate(divide="ignore"):
        log_pi = np.log(pi)
    lm1, lm2 = [], []  # log pi_k + log mean_k w, log pi_k + log mean_k w^2
    for k, (lq, uk) in enumerate(zip(log_q, u)):
        if pi[k] == 0.0:
            continue
        lqm = logsumexp(lq + log_pi[None, :], axis=1)
        lw = np.where(np.isfinite(uk), -uk - lqm, -np.inf)
        n = len(lw)
        lm1.append(log_pi[k] + logsumexp(lw) - np.log(n))
        lm2.append(log_pi[k] + logsumexp(2.0 * lw) - np.log(n))
    return float(np.exp(2.0 * logsumexp(lm1) - logsumexp(lm2)))


def mixture_log_q(log_q_test: np.ndarray, weights) -> np.ndarray:
    """(n,) log q_pi for log_q_test: (n, K) component log densities of the same frames."""
    with np.errstate(divide="ignore"):
        return logsumexp(log_q_test + np.log(np.asarray(weights, dtype=np.float64))[None, :], axis=1)


def _draw(runs: list[str], n: int, batch: int, seed: int, test: str | None):
    import torch

    from boltzflow.pipeline import load_trained
    from boltzflow.sampling import SampleSet

    loaded = [load_trained(r) for r in runs]
    gens = [g for _, _, g, _ in loaded]
    energy = loaded[0][3]
    log_q, u, cost = [], [], []
    for k, gen in enumerate(gens):
        t0 = time.time()
        g = torch.Generator().manual_seed(seed + 1000 * k)
        s = gen.sample(n, energy=energy, batch_size=batch, generator=g)
        lq = np.empty((n, len(gens)))
        lq[:, k] = s.log_q
        with torch.no_grad():
            for j, other in enumerate(gens):
                if j == k:
                    continue
                for a in range(0, n, batch):
                    x = torch.as_tensor(s.positions[a:a + batch])
                    lq[a:a + batch, j] = other.log_prob(x).double().cpu().numpy()
        log_q.append(lq)
        u.append(np.asarray(s.reduced_energy, dtype=np.float64))
        cost.append(time.time() - t0)
    lq_test = None
    if test:
        ref = SampleSet.load(test)
        keep = gens[0].same_isomer(ref.positions)
        xs = ref.positions[keep]
        lq_test = np.empty((len(xs), len(gens)))
        with torch.no_grad():
            for j, gen in enumerate(gens):
                for a in range(0, len(xs), batch):
                    lq_test[a:a + batch, j] = gen.log_prob(torch.as_tensor(xs[a:a + batch])).double().cpu().numpy()
    return log_q, u, lq_test, cost


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("runs", nargs="+", help="trained run (or shipped generator) directories of one system")
    ap.add_argument("-n", type=int, default=50_000, help="draws per component (default 5e4)")
    ap.add_argument("--grid", default="0,0.005,0.01,0.02,0.03,0.05,0.08,0.12,0.2,0.5,1",
                    help="two components: weights of the second to scan (comma-separated)")
    ap.add_argument("--weights", action="append", default=[],
                    help="a weight vector 'a,b,c' to evaluate (repeatable; any number of components)")
    ap.add_argument("--test", default=None, help="reference frames (SampleSet .npz) for the held-out log q")
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the JSON only")
    a = ap.parse_args(argv)
    if len(a.runs) < 2:
        ap.error("give at least two run directories")
    if a.n < 2:
        ap.error("-n must be >= 2")
    vectors = [[float(v) for v in s.split(",")] for s in a.weights]
    if len(a.runs) == 2:
        vectors += [[1.0 - e, e] for e in (float(v) for v in a.grid.split(","))]
    if not vectors:
        ap.error("with more than two components give --weights")
    for v in vectors:
        if len(v) != len(a.runs) or min(v) < 0 or abs(sum(v) - 1.0) > 1e-9:
            ap.error(f"weights {v} must be {len(a.runs)} non-negative numbers summing to 1")
    log_q, u, lq_test, cost = _draw(a.runs, a.n, a.batch, a.seed, a.test)
    scan = []
    for v in vectors:
        row = {"weights": v, "kish": mixture_kish(log_q, u, v)}
        if lq_test is not None:
            row["test_log_q"] = float(np.mean(mixture_log_q(lq_test, v)))
        scan.append(row)
    out = {"components": list(a.runs), "n_per_component": a.n, "seed": a.seed, "wall_s_per_component": cost,
           "scan": scan, "best": max(scan, key=lambda r: r["kish"]),
           "command": "python benchmarks/mixture_scan.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if lq_test is not None:
        out["n_test"] = int(len(lq_test))
    if not a.json:
        for r in scan:
            t = f"  test log q {r['test_log_q']:.3f}" if "test_log_q" in r else ""
            print(f"weights {', '.join(f'{w:.3f}' for w in r['weights'])}: Kish {r['kish']:.4f}{t}")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
