"""How much Kish ESS a per-state reweighting of a peptide generator's own draws would buy.

A generator q and a partition of configuration space into states s (every combination of per-residue
backbone states, :meth:`PeptideModes.combinations`) define q'(x) ~ q(x) r_s(x): the same density inside
every state, the states' masses changed. Rejection sampling draws from q' exactly (accept a draw of q with
probability r_s / max r; no energy evaluation for a rejected draw), and self-normalised importance weights
need q' only up to its constant. Inside every state q' has q's Kish ESS kish_s, so with P_s the reweighted
share of state s the Kish ESS fraction is 1 / sum_s P_s^2 / (Q'_s kish_s), largest at Q'_s ~ P_s / sqrt(kish_s).
This probe fits r on some seeds' draws (P_s, Q_s, kish_s) and measures q' on other seeds' draws, from the
same draws of q: Kish(q') = E_q[w]^2 / (E_q[r] E_q[w^2 / r]).

    python benchmarks/state_reweight_probe.py RUN -n 100000 --fit-seeds 1 2 3 4 --test-seeds 5 6 7 8 \\
        [--draws FILE.npz] [--cap 1 3 10 30]

``--draws`` keeps every draw's state and log weight (reused when the file exists).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from boltzflow.core.weights import kish_ess
from boltzflow.pipeline import load_trained


def draw(run: str, n: int, seeds: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    system, _config, gen, energy = load_trained(run)
    modes = system.modes
    if not hasattr(modes, "combinations"):
        raise SystemExit(f"{run}: the system's modes are not per-residue backbone states")
    out = {}
    with torch.no_grad():
        for seed in seeds:
            s = gen.sample(n, energy=energy, batch_size=5000, generator=torch.Generator().manual_seed(seed))
            out[seed] = (modes.combinations(np.asarray(s.positions)), np.asarray(s.log_weights, dtype=np.float64))
    return out


def kish(lw: np.ndarray, log_r: np.ndarray | None = None) -> float:
    """Kish ESS fraction of q' ~ q r from draws of q with log weights lw (log r per draw; None: q itself)."""
    if log_r is None:
        return kish_ess(lw) / len(lw)
    w = np.exp(lw - lw.max())
    r = np.exp(log_r)
    return float(w.mean() ** 2 / (r.mean() * np.mean(w * w / r)))


def fit(states: np.ndarray, lw: np.ndarray, cap: float, min_draws: int = 20) -> np.ndarray:
    """log r per state index (0..max state), optimal for the fitted P_s, Q_s, kish_s, r capped at ``cap``
    relative to the median draw's r; states with fewer than ``min_draws`` draws keep r = 1."""
    n_s = int(states.max()) + 1
    w = np.exp(lw - lw.max())
    log_r = np.zeros(n_s)
    target = np.zeros(n_s)
    q = np.zeros(n_s)
    for s in range(n_s):
        m = states == s
        k = int(m.sum())
        if k < min_draws:
            continue
        ws = w[m]
        p_s = ws.sum() / w.sum()
        kish_s = ws.sum() ** 2 / (k * np.sum(ws * ws))
        target[s] = p_s / np.sqrt(kish_s)
        q[s] = k / len(w)
    ok = target > 0
    target[ok] /= target[ok].sum() / q[ok].sum()
    log_r[ok] = np.log(target[ok] / q[ok])
    ref = float(np.median(log_r[states][ok[states]]))
    log_r[~ok] = ref
    return np.clip(log_r - ref, -np.log(cap), np.log(cap))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--fit-seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--test-seeds", type=int, nargs="+", default=[5, 6, 7, 8])
    ap.add_argument("--cap", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    ap.add_argument("--draws", help="npz of every draw's state and log weight (written if absent, read if present)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.fit_seeds + args.test_seeds
    if args.draws and Path(args.draws).exists():
        d = np.load(args.draws)
        data = {s: (d[f"states_{s}"], d[f"log_w_{s}"]) for s in seeds}
    else:
        data = draw(args.run, args.n, seeds)
        if args.draws:
            np.savez(args.draws, **{f"states_{s}": v[0] for s, v in data.items()},
                     **{f"log_w_{s}": v[1] for s, v in data.items()})
    fs = np.concatenate([data[s][0] for s in args.fit_seeds])
    fw = np.concatenate([data[s][1] for s in args.fit_seeds])
    ts = np.concatenate([data[s][0] for s in args.test_seeds])
    tw = np.concatenate([data[s][1] for s in args.test_seeds])
    rows = []
    for cap in args.cap:
        log_r = fit(fs, fw, cap)
        lr_t = log_r[np.minimum(ts, len(log_r) - 1)] * (ts < len(log_r))
        r_t = np.exp(lr_t)
        rows.append({"cap": cap, "kish_fit": kish(fw, log_r[fs]), "kish_test": kish(tw, lr_t),
                     "per_test_seed": [round(kish(data[s][1], (log_r[np.minimum(data[s][0], len(log_r) - 1)]
                                                               * (data[s][0] < len(log_r)))), 4)
                                       for s in args.test_seeds],
                     "acceptance": float(r_t.mean() / r_t.max()),
                     "r": {int(s): round(float(np.exp(v)), 3) for s, v in enumerate(log_r) if v != 0.0}})
    json.dump({"run": args.run, "n": args.n, "fit_seeds": args.fit_seeds, "test_seeds": args.test_seeds,
               "kish_q_fit": kish(fw), "kish_q_test": kish(tw), "rows": rows}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
