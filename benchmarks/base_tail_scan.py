"""The Kish ESS a trained generator would have with exponential base tails (``generator.base_tail``), for several
tails at once, from one set of draws of the generator as it is; and where its heaviest draws sit in the base.

    python benchmarks/base_tail_scan.py RUN -n 100000 --seeds 1 2 3 4 --tails 2.5 3 3.5 4 [--json]
    python benchmarks/base_tail_scan.py RUN ... --frames RUN/data/tempering.npz [--max-frames 200000]

The generator's splines end at ``|z|`` = 5; beyond, the main flow is the identity and its base fixes the tails of
the non-periodic coordinates (bond lengths, angles, fixed torsions). With a Gaussian base those tails are Gaussian,
and frames of p out there get weights many nats above the median (docs/peptides.md, "Base tails"). A base whose
density decays as ``exp(-a |z|)`` beyond ``|z| > a`` (:func:`boltzflow.flows.base.tailed_normal_log_prob`) has no
weights, so it can be given to a trained generator; its Kish ESS follows from the draws x ~ q_0 of the Gaussian
base by reweighting, ``E_{q_a}[w_a^2] = E_{q_0}[w_0^2 exp(-delta)]``, ``delta = log q_a(x) - log q_0(x)`` (a sum
over the base coordinates ``u(x)`` of the draw; ``E[w]`` = Z is the same for both). Each draw is mapped back to
the base once (one more density pass).

Prints one JSON object: ``kish`` per tail (``"0"``: the generator as it is), per seed and pooled, and ``top``:
the heaviest draws' log weight above the median with their largest ``|u|`` over the non-periodic base dims
(a heavy draw at ``|u|`` > 4 is a base-tail draw).

``--frames F.npz`` (repeatable; SampleSets of frames drawn from p with their reduced energies, e.g. the run's
training frames) adds ``frames``: per file, the Kish ESS estimated from p's side, ``1 / E_p[w / Z]`` (the same
quantity, ``E_q[w^2] / Z^2 = E_p[w / Z]``, with Z from the draws), for each tail, and the largest
``log w - log Z`` of a frame. Draws rarely reach a region where q under-fills p by many nats; frames of p do.
Frames of another isomer than the generator's are left out, as training does.

Measured (2026-12-05, twenty-ninth session; the tetrapeptide generator of the twenty-eighth session, F, seeds 1-16
x 1e5 draws): Gaussian 0.389; tails 2.5 / 3 / 3.5 / 4 / 4.5: 0.391 / 0.410 / 0.407 / 0.400 / 0.393. Drawn with
the tail 3 base (new draws, ``benchmarks/kish_seeds.py``): 0.402 on seeds 1-16, 0.353 on seeds 17-32: the plain
Kish of 1.6e6 draws moves by more than the tails give (docs/peptides.md, "Base tails").
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy.special import logsumexp


def tail_delta(u_abs: np.ndarray, tail: float) -> np.ndarray:
    """``log q_a - log q_0`` per draw, ``u_abs: (n, dims)`` the absolute base coordinates of its non-periodic
    dims: the tailed normal's log density less N(0, 1)'s, summed over dims."""
    from boltzflow.flows.base import tailed_normal_log_prob

    u = torch.as_tensor(u_abs, dtype=torch.float64)
    return (tailed_normal_log_prob(u, tail) - tailed_normal_log_prob(u, 0.0)).sum(-1).numpy()


def reweighted_kish(log_w: np.ndarray, delta: np.ndarray) -> float:
    """Kish ESS fraction of the generator whose log density is ``log q_0 + delta``, from ``log_w`` of n draws of
    q_0: ``(mean w)^2 / mean(w^2 exp(-delta))``; non-finite log weights are dropped."""
    ok = np.isfinite(log_w)
    lw, d = log_w[ok], delta[ok]
    return float(np.exp(2 * logsumexp(lw) - logsumexp(2 * lw - d) - np.log(len(lw))))


def scan(gen, energy, n: int, seeds: list[int], tails: list[float], top: int = 10) -> dict:
    """Draw ``n`` per seed from ``gen`` (its own base), score every tail; see the module docstring."""
    flow = gen.all_flow
    circ = flow.base.circular_mask.cpu().numpy()
    per_seed, lws, deltas, umax = [], [], {t: [] for t in tails}, []
    gen.eval()
    for seed in seeds:
        with torch.no_grad():
            s = gen.sample(n, energy=energy, batch_size=5000, generator=torch.Generator().manual_seed(seed))
            lw = np.asarray(s.log_weights, dtype=np.float64)
            us = []
            for i in range(0, n, 5000):
                x = torch.as_tensor(s.positions[i:i + 5000], dtype=next(gen.parameters()).dtype)
                z, _ = gen.all_ic.inverse(gen._as_x(x))
                u, _ = flow.bijection.inverse(z)
                us.append(np.abs(u.double().cpu().numpy()[:, ~circ]))
        u = np.concatenate(us)
        d = {t: tail_delta(u, t) for t in tails}
        per_seed.append({"seed": seed, "0": round(reweighted_kish(lw, np.zeros(n)), 4),
                         **{str(t): round(reweighted_kish(lw, d[t]), 4) for t in tails}})
        lws.append(lw)
        umax.append(u.max(1))
        for t in tails:
            deltas[t].append(d[t])
    lw, um = np.concatenate(lws), np.concatenate(umax)
    ok = np.isfinite(lw)
    med = float(np.median(lw[ok]))
    order = np.argsort(np.where(ok, lw, -np.inf))[::-1][:top]
    return {"n": int(len(lw)), "seeds": seeds, "log_z": float(logsumexp(lw[ok]) - np.log(ok.sum())),
            "kish": {"0": reweighted_kish(lw, np.zeros(len(lw))),
                     **{str(t): reweighted_kish(lw, np.concatenate(deltas[t])) for t in tails}},
            "per_seed": per_seed,
            "top": [{"log_w_above_median": round(float(lw[i]) - med, 3), "max_abs_u": round(float(um[i]), 3)}
                    for i in order]}


def frames_kish(gen, energy, positions: np.ndarray, log_z: float, tails: list[float], batch: int = 5000) -> dict:
    """p-side Kish ESS fractions ``1 / mean(exp(log w - log Z))`` of frames ``positions: (n, n_atoms, 3)`` nm
    (assumed drawn from p) for the Gaussian base (``"0"``) and each tail, and the largest ``log w - log Z``."""
    flow = gen.all_flow
    circ = flow.base.circular_mask.cpu().numpy()
    keep = np.flatnonzero(gen.same_isomer(positions))
    r0, d = [], {t: [] for t in tails}
    dtype = next(gen.parameters()).dtype
    with torch.no_grad():
        for i in range(0, len(keep), batch):
            x = torch.as_tensor(positions[keep[i:i + batch]], dtype=dtype)
            z, ld_ic = gen.all_ic.inverse(gen._as_x(x))
            u, ld_flow = flow.bijection.inverse(z)
            log_q = flow.base.log_prob(u).double() + ld_flow.double() + ld_ic.double()
            r0.append((-energy(x.double()).double() - log_q).cpu().numpy() - log_z)
            ua = np.abs(u.double().cpu().numpy()[:, ~circ])
            for t in tails:
                d[t].append(tail_delta(ua, t))
    r0 = np.concatenate(r0)
    out = {"frames": int(len(keep)), "other_isomer": int(len(positions) - len(keep))}
    for t, r in [(0.0, r0)] + [(t, r0 - np.concatenate(d[t])) for t in tails]:
        ok = np.isfinite(r)
        key = "0" if t == 0.0 else str(t)
        out[key] = {"kish_p": float(np.exp(-(logsumexp(r[ok]) - np.log(ok.sum())))),
                    "max_log_w_minus_log_z": round(float(r[ok].max()), 3)}
    return out


def main(argv=None) -> None:
    from boltzflow.errors import InputError
    from boltzflow.pipeline import load_trained

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="trained run directory (an internal-all generator with a Gaussian base)")
    ap.add_argument("-n", type=int, default=100_000, help="draws per seed (default 1e5)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--tails", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--frames", action="append", default=[], metavar="FILE.npz",
                    help="SampleSet of frames from p: add the p-side Kish ESS per tail (repeatable)")
    ap.add_argument("--max-frames", type=int, default=0, help="score at most this many frames per file "
                    "(an evenly spaced subset; 0: all)")
    ap.add_argument("--json", action="store_true", help="(the output is always JSON; accepted for symmetry)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _, _, gen, energy = load_trained(args.run)
    if gen.config.pipeline != "internal-all":
        raise InputError(f"{args.run}: base tails are scanned for internal-all generators; this one is "
                         f"{gen.config.pipeline!r}")
    if gen.config.base_tail != 0:
        raise InputError(f"{args.run}: its base already has tails beyond {gen.config.base_tail}; scan a generator "
                         "with the Gaussian base (generator.base_tail = 0)")
    if any(t <= 0 for t in args.tails):
        raise InputError(f"--tails must be > 0, got {args.tails}")
    t0 = time.time()
    out = scan(gen, energy, args.n, args.seeds, args.tails)
    if args.frames:
        from boltzflow.core.sampleset import SampleSet

        out["frames"] = {}
        for f in args.frames:
            pos = SampleSet.load(f).positions
            if args.max_frames and len(pos) > args.max_frames:
                pos = pos[np.linspace(0, len(pos) - 1, args.max_frames).astype(int)]
            out["frames"][f] = frames_kish(gen, energy, np.asarray(pos), out["log_z"], args.tails)
    out["run"], out["wall_s"] = args.run, round(time.time() - t0, 1)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
