"""Would a per-residue backbone-torsion marginal correction raise a peptide generator's Kish ESS? One JSON line.

The heavy weights of the tetrapeptide generators sit in rare backbone states (docs/peptides.md). If the flow's
(phi, psi) marginal of a residue were wrong, a bijection on that torsion pair matching it to p's would divide
the weights by c(phi, psi) = p(phi, psi) / q(phi, psi) = E_q[w | phi, psi]. This draws N samples, estimates c on
a 2D grid per residue from one half of the draws (weights clipped at their (1 - CLIP) quantile, ALPHA pseudo-draws
of weight mean(w) per cell) and measures the Kish ESS of w / prod_r c_r on the other half (two-fold cross-fit),
for each residue alone and for all of them.

    python benchmarks/marginal_probe.py RUN -n 300000 [--seed 11] [--bins 24] [--alpha 200] [--clip 1e-3]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from boltzflow.core.weights import kish_ess
from boltzflow.errors import InputError
from boltzflow.pipeline import load_trained


def cell(phi_deg: np.ndarray, psi_deg: np.ndarray, bins: int) -> np.ndarray:
    """Grid cell index in [0, bins^2) of torsions in degrees, ``(n,)`` each."""
    def b(a):
        return np.clip(((a + 180.0) / 360.0 * bins).astype(int), 0, bins - 1)
    return b(phi_deg) * bins + b(psi_deg)


def corrected_kish(phi, psi, lw, residues, bins: int, alpha: float, clip: float, seed: int = 0) -> float:
    """Cross-fitted Kish ESS fraction of the weights divided by the residues' marginal corrections."""
    n = lw.size
    half = np.random.default_rng(seed).random(n) < 0.5
    out = []
    for fit, ev in ((half, ~half), (~half, half)):
        lf = np.minimum(lw[fit], np.quantile(lw[fit], 1.0 - clip))
        wf = np.exp(lf - lf.max())
        mw = wf.mean()
        lc = np.zeros(n)
        for r in residues:
            c = cell(phi[:, r], psi[:, r], bins)
            ratio = (np.bincount(c[fit], wf, bins * bins) + alpha * mw) / (np.bincount(c[fit], None, bins * bins) + alpha) / mw
            lc += np.log(ratio[c])
        out.append(kish_ess(lw[ev] - lc[ev]) / ev.sum())
    return float(np.mean(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="trained run directory of a peptide (its system has backbone states)")
    ap.add_argument("-n", type=int, default=300_000, help="draws (default 3e5)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--bins", type=int, default=24, help="grid cells per torsion (default 24: 15 degrees)")
    ap.add_argument("--alpha", type=float, default=200.0, help="pseudo-draws per cell (default 200)")
    ap.add_argument("--clip", type=float, default=1e-3, help="weights above this top quantile are clipped for the fit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    system, _, gen, energy = load_trained(args.run, "cpu")
    if not hasattr(system.modes, "torsions_deg"):
        raise InputError(f"{args.run}: the system has no per-residue backbone states (not a peptide)")
    gen.eval()
    with torch.no_grad():
        s = gen.sample(args.n, energy=energy, batch_size=5000, generator=torch.Generator().manual_seed(args.seed))
    phi, psi = system.modes.torsions_deg(np.asarray(s.positions))
    lw = np.asarray(s.log_weights, dtype=np.float64)
    n_res = phi.shape[1]
    half = np.random.default_rng(0).random(lw.size) < 0.5
    plain = float(np.mean([kish_ess(lw[m]) / m.sum() for m in (half, ~half)]))
    row = {"run": args.run, "n": args.n, "seed": args.seed, "bins": args.bins, "alpha": args.alpha, "clip": args.clip,
           "kish_halves": plain,
           "corrected": {system.modes.residue_names[r]: corrected_kish(phi, psi, lw, [r], args.bins, args.alpha, args.clip)
                         for r in range(n_res)},
           "corrected_all": corrected_kish(phi, psi, lw, range(n_res), args.bins, args.alpha, args.clip)}
    print(json.dumps(row))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"marginal_probe: {e}", file=sys.stderr)
        raise SystemExit(2) from None
