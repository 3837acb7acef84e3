"""Kish ESS of a trained generator on fixed seeds: one JSON line per generator.

The weights of a tetrapeptide generator have Pareto k ~0.5 (docs/peptides.md), so one sample's Kish ESS
depends on which few draws land in the tail; comparing generators on the same seeds (common random
numbers) removes that part of the noise. For each generator this draws N samples with each seed and prints
the per-seed Kish ESS fractions, the pooled one, the pooled one with the top 1e-4 of the log weights clipped
(the published tables' way), the tail's Pareto k, and the per-seed and pooled Kish ESS of the Pareto-smoothed
weights (what the trainer's ESS guard ranks by; ``kish_ess(log_w, smooth=True)``).

    python benchmarks/kish_seeds.py RUN -n 100000 [--seeds 1 2 3 4 | --seeds 1..16] [--save-log-weights FILE.npz] [CHECKPOINT[:ema] ...]

RUN: a training run directory (its system and generator architecture; with no CHECKPOINT its generator.pt is
measured). CHECKPOINT: a training checkpoint of a run with the same architecture (e.g. RUN/checkpoints/latest.pt);
``:ema`` measures its moving average of the parameters (``training.ema``) instead of the raw ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from boltzflow.core.weights import kish_ess
from boltzflow.errors import InputError
from boltzflow.estimators.tails import pareto_k
from boltzflow.io import atomic_write
from boltzflow.pipeline import load_trained


def load_checkpoint_params(gen, spec: str) -> None:
    """Put the parameters of checkpoint ``PATH[:ema]`` into ``gen``."""
    path, _, which = spec.partition(":")
    if which not in ("", "ema"):
        raise InputError(f"checkpoint spec {spec!r}: the only suffix is ':ema'")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise InputError(f"{path} is not a training checkpoint (RUN/checkpoints/*.pt); pass a run directory as RUN "
                         "to measure its generator.pt")
    gen.load_state_dict(state["model"])
    if which == "ema":
        if state.get("ema") is None:
            raise InputError(f"{path} holds no moving average (trained without training.ema, or after its stage ended)")
        named = dict(gen.named_parameters())
        with torch.no_grad():
            for k, v in state["ema"]["params"].items():
                named[k].copy_(v)


def measure(gen, energy, n: int, seeds: list[int]) -> tuple[dict, np.ndarray]:
    """Per-seed and pooled Kish ESS fractions (plain and Pareto-smoothed), clipped Kish and Pareto k of
    ``len(seeds)`` x ``n`` draws, and the log weights ``(len(seeds), n)``."""
    gen.eval()
    lws = []
    with torch.no_grad():
        for seed in seeds:
            s = gen.sample(n, energy=energy, batch_size=5000, generator=torch.Generator().manual_seed(seed))
            lws.append(np.asarray(s.log_weights, dtype=np.float64))
    lw = np.concatenate(lws)
    return {"n": len(lw), "seeds": seeds, "per_seed": [round(kish_ess(v) / len(v), 4) for v in lws],
            "pooled": kish_ess(lw) / len(lw), "clip_1e-4": kish_ess(lw, clip_top=1e-4) / len(lw),
            "pareto_k": pareto_k(lw), "per_seed_smoothed": [round(kish_ess(v, smooth=True) / len(v), 4) for v in lws],
            "pooled_smoothed": kish_ess(lw, smooth=True) / len(lw)}, np.stack(lws)


def _seeds(text: str) -> list[int]:
    """One --seeds item: "7" -> [7], "1..16" -> [1, ..., 16]."""
    lo, sep, hi = text.partition("..")
    try:
        seeds = list(range(int(lo), int(hi) + 1)) if sep else [int(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed or a range A..B") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r}: empty range (A..B needs A <= B)")
    return seeds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="training run directory")
    ap.add_argument("checkpoints", nargs="*", help="CHECKPOINT[:ema] (none: the run's generator.pt)")
    ap.add_argument("-n", type=int, default=100_000, help="draws per seed (default 1e5)")
    ap.add_argument("--seeds", type=_seeds, nargs="+", default=[[1, 2, 3, 4]],
                    help="seeds, each a number or a range A..B (both ends included); default 1 2 3 4")
    ap.add_argument("--save-log-weights", metavar="FILE", help="write every generator's log weights (generators x seeds x n) "
                    "to this .npz (refused if it exists)")
    args = ap.parse_args(argv)
    args.seeds = [seed for group in args.seeds for seed in group]
    torch.set_num_threads(1)
    if args.save_log_weights and Path(args.save_log_weights).exists():
        raise InputError(f"{args.save_log_weights} exists; pass another file name")
    _, _, gen, energy = load_trained(args.run, "cpu")
    specs = args.checkpoints or ["generator.pt"]
    saved = []
    for spec in specs:
        t0 = time.time()
        if spec != "generator.pt":
            load_checkpoint_params(gen, spec)
        stats, lw = measure(gen, energy, args.n, args.seeds)
        saved.append(lw)
        print(json.dumps({"run": args.run, "generator": spec, **stats, "wall_s": time.time() - t0}), flush=True)
    if args.save_log_weights:
        arrays = {"log_weights": np.stack(saved), "generators": np.array(specs), "seeds": np.array(args.seeds)}
        atomic_write(args.save_log_weights, lambda fh: np.savez(fh, **arrays))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"kish_seeds: {e}", file=sys.stderr)
        raise SystemExit(2) from None
