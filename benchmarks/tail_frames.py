"""Langevin frames from a generator's heaviest draws: extra training frames where the generator is too thin.

Draws N samples of a trained generator, keeps the TOP fraction by log importance weight (where q under-fills p
most) and runs batched Langevin dynamics at the system temperature with the target energy from each
(:func:`boltzflow.training.augment.langevin_augment`: BAOAB, 1 fs, friction 5/ps; ``--burnin`` steps, then
``--frames`` frames ``--stride`` steps apart). The frames go to OUT as a SampleSet whose provenance holds the
cost (N density and energy passes plus the Langevin steps), ready for ``--set 'data.extra=["OUT"]'`` of a
``logvar_data`` / ``chi2_data`` run from the same generator (docs/pipelines.md, item 6). Prints one JSON line.

    python benchmarks/tail_frames.py RUN -o tail.npz [-n 400000] [--top 0.01] [--frames 20] [--seed 777]

Measured on the tetrapeptide (docs/peptides.md, "Frames where the generator is thin"): the Langevin frames relax
within ~0.1 ps to p's typical energies, and training on them beside the tempering frames did not raise the Kish
ESS (it lagged the same run without them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from boltzflow.errors import InputError
from boltzflow.pipeline import load_trained
from boltzflow.sampling import SampleSet
from boltzflow.training.augment import LangevinAugmentConfig, langevin_augment


def tail_frames(run: str, n: int, top: float, frames: int, burnin: int = 100, stride: int = 50,
                seed: int = 777) -> tuple[SampleSet, dict]:
    """(SampleSet of the Langevin frames, info) for the ``top`` fraction of ``n`` draws of ``run``'s generator."""
    if n < 1 or not 0.0 < top <= 1.0 or frames < 1:
        raise InputError(f"need n >= 1, 0 < top <= 1 and frames >= 1 (got n={n}, top={top}, frames={frames})")
    system, _, gen, energy = load_trained(run)
    t0 = time.perf_counter()
    with torch.no_grad():
        s = gen.sample(n, energy=energy, batch_size=5000, generator=torch.Generator().manual_seed(seed))
    lw = np.asarray(s.log_weights, dtype=np.float64)
    ok = np.isfinite(lw)
    k = max(1, int(round(top * n)))
    idx = np.argsort(np.where(ok, lw, -np.inf))[::-1][:k]
    med = float(np.median(lw[ok]))
    cfg = LangevinAugmentConfig(frames_per_start=frames, burnin=burnin, stride=stride, batch=1024)
    res = langevin_augment(energy, torch.as_tensor(s.positions[idx], dtype=torch.float64), system.masses, system.kT,
                           cfg, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    wall = time.perf_counter() - t0
    info = {"generator": str(run), "draws": n, "top": top, "starts": k, "frames": int(len(res.positions)),
            "dropped_chains": int(res.dropped_chains), "start_log_w_above_median": [float(lw[idx[-1]] - med),
                                                                                 float(lw[idx[0]] - med)],
            "mean_u": float(np.mean(res.reduced_energy)) if len(res.positions) else None,
            "energy_evals": int(res.energy_evals) + n, "wall_s": wall,
            "langevin": {"burnin": burnin, "stride": stride, "frames_per_start": frames, "timestep_fs": 1.0,
                         "friction_per_ps": 5.0}}
    out = SampleSet(res.positions, res.reduced_energy, None, None, system.temperature,
                    {"sampler": "Langevin from a generator's heaviest draws (benchmarks/tail_frames.py)", **info})
    return out, info


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="trained run or shipped generator directory")
    ap.add_argument("-o", "--output", required=True, help="SampleSet .npz to write (refused if it exists)")
    ap.add_argument("-n", type=int, default=400_000, help="generator draws to rank (default 4e5)")
    ap.add_argument("--top", type=float, default=0.01, help="fraction of the draws, heaviest first, to start from")
    ap.add_argument("--frames", type=int, default=20, help="Langevin frames per start (default 20)")
    ap.add_argument("--burnin", type=int, default=100, help="Langevin steps before the first frame (1 fs each)")
    ap.add_argument("--stride", type=int, default=50, help="Langevin steps between frames")
    ap.add_argument("--seed", type=int, default=777)
    args = ap.parse_args(argv)
    if Path(args.output).exists():
        raise SystemExit(f"error: '{args.output}' exists; choose another -o")
    torch.set_num_threads(1)
    out, info = tail_frames(args.run, args.n, args.top, args.frames, args.burnin, args.stride, args.seed)
    out.save(args.output)
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
