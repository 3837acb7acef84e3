#!/usr/bin/env python
"""Compare data-free fine-tuning losses after a partial maximum-likelihood pre-training.

felardos2023 fig. 1 protocol: pre-train a flow with KLz on data for a fraction of the fine-tuning
length (partial pre-training: both modes covered, poorly), then fine-tune copies of it data-free
with KLx, KLz-df, L2+ and FAB (midgley2021). Reports, per loss, the minor-mode fraction of the
flow's samples (mode systems), Kish ESS, log Z (where exact) with its error, energy evaluations
and wall time, next to the exact values and the papers' claims.

    python benchmarks/loss_comparison.py --system double-well-12d --json
    python benchmarks/loss_comparison.py --system many-well-16d --json       # ~20 min on 2 cores
    python benchmarks/loss_comparison.py --system double-well-12d --full     # paper sizes (hours)

Default sizes are reduced to finish in <= 5 min (double well) / <= 20 min (many well) on 2 CPU
cores; ``--full`` uses felardos2023's (8x4 coupling blocks, hidden 64, 1000 pre-training and
10000 fine-tuning iterations). FAB costs ~15 energy+flow evaluations per sample per step, so by
default it gets a quarter of the steps of the other losses (see ``settings`` in the output).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

TOY_SYSTEMS = ("double-well-12d", "many-well-16d", "many-well-32d")
MOLECULES = ("butane", "alanine-dipeptide")
LOSS_NAMES = ("klx", "klz_df", "l2plus", "fab")

PAPER = {
    "double-well-12d": "felardos2023 fig.1: after partial pre-training KLx collapses to the major mode "
                       "(minor fraction -> 0); KLz-df and L2+ keep the true ratio.",
    "many-well-16d": "midgley2021 table 2: FAB ESS 79.6% (85.2% with AIS), test log q -14.5; "
                     "flow trained by reverse KL ESS 0.01%.",
    "many-well-32d": "no published number (midgley2021 reports 16D only).",
    "butane": "felardos2023 fig.2: KLx drops the gauche modes, KLz-df keeps them.",
    "alanine-dipeptide": "felardos2023 fig.3: L2+ converges to the 1.21% minor-mode (phi>0) ratio of the "
                         "hydrogen-minimised target; KLz-df loses the minor mode.",
}


def sizes(system: str, full: bool) -> dict[str, Any]:
    """Architecture and schedule for ``system``."""
    if full:
        return dict(blocks=8, hidden=64, pretrain_steps=1000, steps=10000, fab_steps=10000, batch=256,
                    lr=1e-4, pretrain_lr=1e-3, eval_n=100000, data_n=100000, ref_frames=50000,
                    ref_interval=250, ref_temperature=500.0)
    if system in MOLECULES:
        return dict(blocks=4, hidden=128, pretrain_steps=300, steps=800, fab_steps=100, batch=128, lr=1e-4,
                    pretrain_lr=1e-3, eval_n=5000, ais_step=1e-3, ref_frames=2000, ref_interval=100,
                    ref_temperature=350.0 if system == "butane" else 500.0)
    if system == "double-well-12d":
        return dict(blocks=4, hidden=64, pretrain_steps=300, steps=1000, fab_steps=250, batch=256,
                    lr=5e-4, pretrain_lr=3e-3, eval_n=20000, data_n=20000)
    return dict(blocks=4, hidden=64, pretrain_steps=500, steps=3000, fab_steps=750, batch=256,
                lr=5e-4, pretrain_lr=3e-3, eval_n=20000, data_n=20000)


def evaluate(gen, energy, modes, n: int, seed: int, chunk: int = 4096) -> dict[str, float]:
    """Flow samples -> minor fraction (plain and reweighted), ESS, log Z estimate."""
    import numpy as np
    import torch

    from boltzflow.losses.base import kish_ess, log_z_estimate

    g = torch.Generator().manual_seed(seed)
    xs, lws = [], []
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, log_q = gen.sample_and_log_prob(min(chunk, n - start), generator=g)
            u = energy(x)
            lw = torch.where(torch.isfinite(u) & torch.isfinite(log_q), -u - log_q, torch.full_like(u, -math.inf))
            xs.append(x)
            lws.append(lw.double())
    x = torch.cat(xs)
    lw = torch.cat(lws)
    out = {"ess": kish_ess(lw), "log_z": log_z_estimate(lw), "n_eval": n,
           "n_invalid": int((~torch.isfinite(lw)).sum())}
    if modes is not None:
        lab = modes.assign(x)
        minor = list(modes.names).index(modes.minor)
        out["minor_fraction"] = float(np.mean(lab == minor))
        w = torch.softmax(lw, 0).numpy()
        out["minor_fraction_reweighted"] = float(w[lab == minor].sum())
    return out


def toy_problem(system: str, sz: dict[str, Any], seed: int):
    import torch

    from boltzflow.flows.builders import make_flow
    from boltzflow.systems.toy import toy_target

    target = toy_target(system)
    data = target.sample(sz["data_n"], torch.Generator().manual_seed(seed + 1))
    torch.manual_seed(seed)  # conditioner initialisation only
    gen = make_flow(target.dim, "realnvp", blocks=sz["blocks"], hidden=sz["hidden"], seed=seed)
    exact = {"minor_fraction": target.exact_minor_fraction, "log_z": target.log_z}
    return gen, target.energy, data, target.modes, exact


def langevin_reference(system, n_frames: int, seed: int, t_sample: float, interval: int = 250,
                       equilibrate: int = 20000):
    """A small reference SampleSet at ``system.temperature`` from plain OpenMM Langevin dynamics at the
    elevated temperature ``t_sample`` (K), reweighted by ``exp(-(beta - beta_sample) U)``.

    Stand-in until the replica-exchange reference ``systems/<name>/reference_300K.npz`` exists."""
    import numpy as np
    import openmm
    from openmm import unit

    from boltzflow.sampling.sampleset import SampleSet

    integ = openmm.LangevinMiddleIntegrator(t_sample * unit.kelvin, 1.0 / unit.picosecond, 0.001 * unit.picoseconds)
    integ.setRandomNumberSeed(seed + 1)
    try:
        platform = openmm.Platform.getPlatformByName("CPU")
        ctx = openmm.Context(system.system, integ, platform, {"Threads": "1"})
    except Exception:  # no CPU platform: fall back to OpenMM's default choice
        ctx = openmm.Context(system.system, integ)
    ctx.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1.0, 200)
    ctx.setVelocitiesToTemperature(t_sample * unit.kelvin, seed + 1)
    integ.step(equilibrate)
    pos = np.empty((n_frames, system.n_atoms, 3))
    pot = np.empty(n_frames)
    for i in range(n_frames):
        integ.step(interval)
        st = ctx.getState(getPositions=True, getEnergy=True)
        pos[i] = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        pot[i] = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    kB = 0.00831446261815324  # kJ/mol/K
    u = pot / (kB * system.temperature)
    log_w = -(u - pot / (kB * t_sample))
    return SampleSet(positions=pos, reduced_energy=u, log_weights=log_w - log_w.max(),
                     temperature=system.temperature,
                     provenance={"sampler": "openmm-langevin", "t_sample_K": t_sample, "frames": n_frames,
                                 "interval_fs": interval, "seed": seed,
                                 "note": "elevated-temperature Langevin, reweighted to the system temperature"})


def molecular_problem(system_name: str, sz: dict[str, Any], seed: int, cache_dir: str | None = None):
    """(generator, energy, pre-training data, modes, exact) for a shipped molecule."""
    from pathlib import Path

    import numpy as np
    import torch

    from boltzflow.errors import InputError

    try:
        from boltzflow.energy import Energy
        from boltzflow.flows import generator as genmod
        from boltzflow.systems.builtin import builtin_dir, builtin_system
    except ImportError as e:
        raise InputError(f"--system {system_name} is not yet available: it needs the molecular generator "
                         f"(boltzflow.flows.generator) and the native energy ({e}); use a toy system for now") from e
    from boltzflow.sampling.sampleset import SampleSet

    system = builtin_system(system_name)
    ref_path = builtin_dir(system_name) / "reference_300K.npz"
    if ref_path.is_file():
        ref = SampleSet.load(ref_path)
        source = str(ref_path)
    else:
        cache = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "boltzflow")
        cached = cache / f"{system_name}_langevin_{sz['ref_frames']}_{seed}.npz"
        if cached.is_file():
            ref = SampleSet.load(cached)
        else:
            ref = langevin_reference(system, sz["ref_frames"], seed, sz["ref_temperature"], sz["ref_interval"],
                                     equilibrate=5000)
            cache.mkdir(parents=True, exist_ok=True)
            ref.save(cached)
        source = f"{cached} (OpenMM Langevin at {sz['ref_temperature']} K, reweighted to 300 K)"
    if system_name == "butane":
        # butane is achiral: the mirror image (x -> -x) has the same energy, so adding it makes the short
        # reference exactly symmetric between gauche+ and gauche- (a 200 ps trajectory is not)
        ref = SampleSet.concatenate([ref, dataclasses.replace(ref, positions=-ref.positions)])
        source += " + mirror images"
    w = ref.normalized_weights()
    lab = system.modes.assign(ref.positions)
    minor = list(system.modes.names).index(system.modes.minor)
    exact = {"minor_fraction": float(w[lab == minor].sum()), "log_z": None, "reference": source,
             "reference_ess": float(1.0 / (len(w) * np.sum(w**2)))}
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ref), size=len(ref), p=w) if ref.weighted else np.arange(len(ref))
    data = torch.as_tensor(ref.positions[idx], dtype=torch.get_default_dtype())
    torch.manual_seed(seed)
    # exact-density pipeline (no hydrogen-placement bias): internal coordinates + conditional hydrogens
    gcfg = genmod.GeneratorConfig(pipeline="conditional", representation="internal", blocks=sz["blocks"],
                                  hidden=sz["hidden"], seed=seed)
    gen = genmod.build_generator(system, gcfg, data)
    data = gen.prepare_data(data)
    energy = Energy(system, backend="auto")
    energy_fn = lambda x: energy(x.to(torch.float64)).to(x.dtype)  # noqa: E731
    return gen, energy_fn, data, system.modes, exact


def run(system: str, full: bool = False, seed: int = 0, losses=LOSS_NAMES, progress: bool = False,
        cache_dir: str | None = None) -> dict[str, Any]:
    import torch

    from boltzflow.sampling.ais import AISConfig
    from boltzflow.training.trainer import OptimConfig, StageConfig, TrainConfig, Trainer

    torch.set_num_threads(1)
    sz = sizes(system, full)
    if system in TOY_SYSTEMS:
        gen, energy, data, modes, exact = toy_problem(system, sz, seed)
    elif system in MOLECULES:
        gen, energy, data, modes, exact = molecular_problem(system, sz, seed, cache_dir)
    else:
        from boltzflow.errors import InputError

        raise InputError(f"unknown system {system!r}; choose one of {', '.join(TOY_SYSTEMS + MOLECULES)}")

    t0 = time.perf_counter()
    pre_cfg = TrainConfig(pretrain=StageConfig("klz", sz["pretrain_steps"], sz["batch"]),
                          finetune=StageConfig("klx", 0, sz["batch"]),
                          optimizer=OptimConfig(lr=sz["pretrain_lr"], schedule="constant"),
                          seed=seed, log_every=max(sz["pretrain_steps"] // 10, 1), progress=progress, eval_batch=0)
    Trainer(gen, energy, pre_cfg, data=data, modes=modes).run()
    pre = evaluate(gen, energy, modes, sz["eval_n"], seed + 7)
    pre["wall_s"] = time.perf_counter() - t0

    results: dict[str, Any] = {}
    for name in losses:
        steps = sz["fab_steps"] if name == "fab" else sz["steps"]
        cfg = TrainConfig(finetune=StageConfig(name, steps, sz["batch"]),
                          optimizer=OptimConfig(lr=sz["lr"], schedule="cosine", warmup_steps=min(50, steps // 10),
                                                min_lr_factor=0.1),
                          grad_clip=10.0, seed=seed + 100, log_every=max(steps // 10, 1), progress=progress,
                          eval_batch=0, ais=AISConfig(step_size=sz.get("ais_step", 0.05)))
        g = copy.deepcopy(gen)
        t1 = time.perf_counter()
        trainer = Trainer(g, energy, cfg, modes=modes)
        summary = trainer.run()
        res = evaluate(g, energy, modes, sz["eval_n"], seed + 7)
        res.update({"energy_evals": summary["energy_evals"], "wall_s": time.perf_counter() - t1, "steps": steps,
                    "skipped_steps": summary["skipped_steps"]})
        if exact.get("log_z") is not None:
            res["log_z_error"] = res["log_z"] - exact["log_z"]
        if modes is not None:
            res["minor_fraction_trajectory"] = [[r["step"], r.get("minor_fraction")] for r in trainer.history]
        if name == "fab":
            res["ess_ais_last_batch"] = trainer.history[-1].get("ess_ais") if trainer.history else None
        results[name] = res
    if exact.get("log_z") is not None:
        pre["log_z_error"] = pre["log_z"] - exact["log_z"]
    return {
        "system": system,
        "exact": {k: v for k, v in exact.items() if v is not None and k in ("minor_fraction", "log_z")},
        "reference": {k: v for k, v in exact.items() if k not in ("minor_fraction", "log_z")},
        "results": results,
        "pretrained": pre,
        "settings": {**sz, "seed": seed, "full": full, "protocol": "partial KLz pre-training, then data-free "
                     "fine-tuning of copies; metrics on eval_n fresh flow samples"},
        "paper": PAPER.get(system, ""),
        "wall_s_total": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", required=True, choices=TOY_SYSTEMS + MOLECULES)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--full", action="store_true", help="the papers' sizes (hours on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", default=",".join(LOSS_NAMES), help="comma-separated subset of " + ",".join(LOSS_NAMES))
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--cache-dir", default=None, help="where generated molecular reference data is kept "
                   "(default ~/.cache/boltzflow)")
    args = p.parse_args(argv)
    from boltzflow.errors import InputError

    losses = tuple(s for s in args.losses.split(",") if s)
    bad = [s for s in losses if s not in LOSS_NAMES]
    if bad:
        print(f"loss_comparison: error: unknown loss(es) {bad}; choose from {', '.join(LOSS_NAMES)}", file=sys.stderr)
        return 2
    try:
        out = run(args.system, args.full, args.seed, losses, args.progress, args.cache_dir)
    except InputError as e:
        print(f"loss_comparison: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    ex = out["exact"]
    print(f"system {out['system']}  exact: " + ", ".join(f"{k}={v:.4g}" for k, v in ex.items()))
    print(f"{'loss':10s} {'minor':>8s} {'minor_rw':>8s} {'ess':>7s} {'logZ':>9s} {'evals':>10s} {'wall_s':>7s}")
    rows = [("pretrained", out["pretrained"])] + list(out["results"].items())
    for name, r in rows:
        print(f"{name:10s} {r.get('minor_fraction', float('nan')):8.4f} {r.get('minor_fraction_reweighted', float('nan')):8.4f} "
              f"{r['ess']:7.4f} {r['log_z']:9.3f} {r.get('energy_evals', 0):10d} {r['wall_s']:7.1f}")
    print(f"paper: {out['paper']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
