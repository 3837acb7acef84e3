"""Reweighted maximum-likelihood probe: rounds of (draw a large pool from the generator, importance-
resample it towards the Boltzmann distribution, maximum likelihood on the resampled pool), starting
from a trained generator, with the Kish ESS of every pool (fresh draws of the current generator).

    python benchmarks/rwml_probe.py systems/alanine-dipeptide/generators/energy --pool 1000000 --rounds 5

Nothing is written to ``RUN``; ``--save DIR`` copies the run directory with the final generator.
Output: one JSON row per round ``{"round", "pool_kish", "pool_kish_chunks", "top_w_share", "wall_s",
"energy_evals", "nll"}`` and a final summary."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv=None) -> dict:
    from boltzflow import pipeline
    from boltzflow.core.weights import kish_ess
    from boltzflow.estimators.tails import pareto_k
    from boltzflow.losses.core import rwml
    from boltzflow.sampling.pool import PoolConfig, ReweightedPool

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--pool", type=int, default=1_000_000, help="generator draws per round")
    ap.add_argument("--resample", type=int, default=1_000_000, help="resampled frames per round")
    ap.add_argument("--clip", type=float, default=1e-4, help="fraction of largest log weights clipped")
    ap.add_argument("--power", type=float, default=1.0,
                    help="resample in proportion to w**power: 1 = towards p (forward KL), 2 = towards p^2/q (FAB's alpha = 2)")
    ap.add_argument("--move-fraction", type=float, default=0.0,
                    help="share of the resampled frames moved by HMC in internal coordinates (resample-move)")
    ap.add_argument("--move-steps", type=int, default=5, help="HMC transitions per moved frame")
    ap.add_argument("--move-leapfrog", type=int, default=5, help="leapfrog steps per HMC transition")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1000, help="maximum-likelihood steps per round")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--save")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    system, config, gen, energy = pipeline.load_trained(a.run)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    evals = 0
    rows = []

    mover = None
    if a.move_fraction > 0:
        from boltzflow.flows.latent import internal_map

        mover = internal_map(gen)
    pool = ReweightedPool(PoolConfig(size=a.pool, resample=a.resample, clip=a.clip, refresh=a.steps,
                                     batch_size=5000, power=a.power, move_fraction=a.move_fraction,
                                     move_steps=a.move_steps, move_leapfrog=a.move_leapfrog), mover=mover)
    for r in range(a.rounds + 1):
        evals += pool.refresh(gen, energy, generator=g)
        lw = pool.log_weights
        chunks = [float(kish_ess(c)) / len(c) for c in lw.split(100_000)]
        row = {"round": r, "pool_kish": pool.stats["kish"], "pool_kish_chunks_median": float(np.median(chunks)),
               "pareto_k": float(pareto_k(lw.numpy())),
               "pool_kish_chunks_min": float(np.min(chunks)), "top_w_share": pool.stats["top_weight"],
               "n_invalid": int(pool.stats["n_invalid"]), "energy_evals": evals, "wall_s": time.time() - t0}
        if r == a.rounds:
            rows.append(row)
            print(json.dumps(row), flush=True)
            break
        row["resample_unique"] = int(pool.stats["unique"])
        row["resample_ess"] = pool.stats["resample_ess"]
        if "move_accept" in pool.stats:
            row["move_accept"], row["move_step"] = pool.stats["move_accept"], pool.stats["move_step"]
        gen.train()
        opt = torch.optim.Adam(gen.parameters(), lr=a.lr)
        nll = []
        while not pool.due:
            loss = rwml(gen, energy, a.batch, pool, generator=g).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), 100.0)
            opt.step()
            nll.append(float(loss))
        row["nll"] = float(np.mean(nll[-100:]))
        row["wall_s_after_ml"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = dict(vars(a), rounds_out=rows)
    if a.save:
        import shutil
        from pathlib import Path

        from boltzflow.flows.generator import save_generator

        shutil.copytree(a.run, a.save, dirs_exist_ok=False)
        save_generator(Path(a.save) / "generator.pt", gen.eval())
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
