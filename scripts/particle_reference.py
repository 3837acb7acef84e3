"""Reference data of the particle benchmarks DW4, LJ13, LJ55 by parallel Metropolis MCMC (boltzflow's own).

    python scripts/particle_reference.py dw4  --chains 1000 --frames 120 --test-chains 100
    python scripts/particle_reference.py lj13 --chains 1000 --frames 60 --test-chains 100 --step 0.05
    python scripts/particle_reference.py lj55 --chains 500 --frames 10 --test-chains 100 --step 0.015

writes ``systems/<name>/reference_train.npy`` (not shipped: regenerate it with the command above),
``reference_test.npy`` (float32, CoM-free, ``(n, n_particles, n_spatial)``; the chains of the test
set are not in the training set) and ``reference.json`` (MCMC diagnostics: acceptance, integrated
autocorrelation time of the energy, thinning, energy evaluations, wall time, the split).
Deterministic for a given seed and torch version. See :mod:`boltzflow.systems.particles`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from boltzflow.systems.particles import PARTICLE_SYSTEMS, MCMCConfig, metropolis_reference, particle_target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=PARTICLE_SYSTEMS)
    p.add_argument("--chains", type=int, default=1000)
    p.add_argument("--frames", type=int, default=100, help="frames per chain")
    p.add_argument("--test-chains", type=int, default=100, help="chains whose frames form the test set")
    p.add_argument("--burnin", type=int, default=5000)
    p.add_argument("--pilot", type=int, default=3000)
    p.add_argument("--thin", type=int, default=0, help="0: 3 x tau_int of the energy from the pilot")
    p.add_argument("--step", type=float, default=0.2, help="initial step size (tuned in burn-in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out-dir", help="default: systems/<system>/")
    a = p.parse_args(argv)
    out = Path(a.out_dir or Path(__file__).resolve().parents[1] / "systems" / a.system)
    out.mkdir(parents=True, exist_ok=True)
    cfg = MCMCConfig(chains=a.chains, burnin=a.burnin, frames_per_chain=a.frames, thin=a.thin, pilot=a.pilot,
                     step=a.step, seed=a.seed)
    t0 = time.time()
    x, info = metropolis_reference(a.system, cfg)
    wall = time.time() - t0
    n_test = a.test_chains * a.frames
    train, test = x[:-n_test], x[-n_test:]
    np.save(out / "reference_train.npy", train.astype(np.float32))
    np.save(out / "reference_test.npy", test.astype(np.float32))
    t = particle_target(a.system)
    import torch

    u_test = t.energy(torch.from_numpy(test.reshape(len(test), -1))).numpy()
    info.update(wall_s=round(wall, 1), n_train=len(train), n_test=len(test), test_chains=a.test_chains,
                mean_energy_test=float(u_test.mean()), std_energy_test=float(u_test.std()),
                command="python scripts/particle_reference.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
    (out / "reference.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
