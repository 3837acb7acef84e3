#!/usr/bin/env python
"""Compare data-free fine-tuning losses after a partial maximum-likelihood pre-training.

felardos2023 fig. 1 protocol: pre-train a flow with KLz on data for a fraction of the fine-tuning
length (partial pre-training: both modes covered, poorly), then fine-tune copies of it data-free
with KLx, KLz-df, L2+ and FAB (midgley2021). Reports, per loss, the minor-mode fraction of the
flow's samples (mode systems), Kish ESS, log Z (where exact) with its error, energy evaluations
and wall time, next to the exact values and the papers' claims.

    python benchmarks/loss_comparison.py --system double-well-12d --json
    python benchmarks/loss_comparison.py --system double-well-12d-fab --json   # Midgley's well: 15.6 % minor mode
    python benchmarks/loss_comparison.py --system many-well-16d --json
    python benchmarks/loss_comparison.py --system butane --json
    python benchmarks/loss_comparison.py --system many-well-16d --set flow=spline --set fab_steps=1500
    python benchmarks/loss_comparison.py --system double-well-12d --full     # paper sizes (hours)

Default sizes are reduced to finish in <= 20 min on 2 CPU cores (measured times in docs/losses.md);
``--full`` uses the papers' sizes (felardos2023: 8x4 coupling blocks of width 64 for the double well,
24x4 of width 256 for molecules, 1000 pre-training and 10000 fine-tuning iterations; midgley2021's
code for the Many Well: batch 1000, lr 1e-4, 1e5 iterations). ``--set KEY=VALUE`` overrides any
entry of ``settings`` (see :func:`sizes`). FAB costs ~13 flow + energy gradient evaluations per sample
per step, so by default it gets fewer steps than the other losses. Molecules use the shipped
replica-exchange reference ``systems/<name>/reference_300K.npz`` for pre-training and for the exact
mode fractions (butane: plus mirror images); an OpenMM Langevin stand-in is generated only when it
is missing.
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

TOY_SYSTEMS = ("double-well-12d", "double-well-12d-fab", "many-well-16d", "many-well-32d")
MOLECULES = ("butane", "alanine-dipeptide")
LOSS_NAMES = ("klx", "klz_df", "l2plus", "fab")

PAPER = {
    "double-well-12d": "felardos2023 fig.1: after partial pre-training KLx collapses to the major mode "
                       "(minor fraction -> 0); KLz-df and L2+ keep the true ratio.",
    "double-well-12d-fab": "felardos2023 fig.1 (with Midgley et al.'s x^4 - 6x^2 - 0.5x well, 15.6% minor mode): "
                           "KLx collapses to the major mode; KLz-df and L2+ keep the true ratio.",
    "many-well-16d": "midgley2021 table 2: FAB ESS 79.6% (85.2% with AIS), test log q -14.5; "
                     "flow trained by reverse KL ESS 0.01%.",
    "many-well-32d": "no published number (midgley2021 reports 16D only).",
    "butane": "felardos2023 fig.2: KLx drops the gauche modes, KLz-df keeps them.",
    "alanine-dipeptide": "felardos2023 fig.3: L2+ converges to the 1.21% minor-mode (phi>0) ratio of the "
                         "hydrogen-minimised target; KLz-df loses the minor mode.",
}


def sizes(system: str, full: bool) -> dict[str, Any]:
    """Architecture and schedule for ``system`` (every key can be overridden with ``--set KEY=VALUE``).

    Common keys: blocks x 4 RealNVP / spline couplings of width ``hidden``; ``pretrain_steps`` KLz steps
    at ``pretrain_lr`` (constant) with batch ``batch``; ``steps`` fine-tuning steps per data-free loss at
    ``lr`` (cosine to 0.1 lr, warm-up), ``fab_steps`` / ``fab_batch`` / ``fab_lr`` for FAB (AIS with
    ``ais_intermediate`` densities of ``ais_leapfrog`` leapfrog steps, initial step ``ais_step``);
    ``grad_clip`` on the gradient norm; ``energy_cap`` (kT, log-linear, fine-tuning only; 0 = none)."""
    common = dict(grad_clip=10.0, ais_intermediate=2, ais_leapfrog=5, ais_step=0.05, energy_cap=0.0)
    if system in MOLECULES:
        if full:  # felardos2023: 24x4 coupling blocks of width 256, 1000 KLz + 10000 fine-tuning iterations
            return dict(common, blocks=24, hidden=256, pretrain_steps=1000, steps=10000, fab_steps=10000,
                        batch=256, fab_batch=256, lr=1e-4, fab_lr=1e-4, pretrain_lr=1e-3, eval_n=100000,
                        ais_step=1e-3, energy_cap=100.0, ref_frames=50000, ref_interval=250,
                        ref_temperature=350.0 if system == "butane" else 500.0)
        # native energy, one thread, batch 128: KLz ~0.1 s, KLx/KLz-df/L2+ ~0.15 s and FAB ~1.5 s per step;
        # energies log-linearly capped above 100 kT during fine-tuning
        return dict(common, blocks=4, hidden=128, pretrain_steps=1000, steps=1000, fab_steps=120, batch=128,
                    fab_batch=128, lr=1e-4, fab_lr=1e-4, pretrain_lr=1e-3, eval_n=5000, ais_step=1e-3,
                    energy_cap=100.0, ref_frames=2000, ref_interval=100,
                    ref_temperature=350.0 if system == "butane" else 500.0)
    toy = dict(common, flow="realnvp", eval_n=20000, data_n=20000)
    if system.startswith("double-well-12d"):
        if full:  # felardos2023 fig. 1: 8x4 blocks of width 64, 1000 KLz + 10000 fine-tuning iterations
            return dict(toy, blocks=8, hidden=64, pretrain_steps=1000, steps=10000, fab_steps=10000, batch=256,
                        fab_batch=256, lr=1e-4, fab_lr=1e-4, pretrain_lr=1e-3, eval_n=100000, data_n=100000)
        return dict(toy, blocks=4, hidden=64, pretrain_steps=300, steps=1000, fab_steps=250, batch=256,
                    fab_batch=256, lr=5e-4, fab_lr=5e-4, pretrain_lr=3e-3)
    if full:  # midgley2021's code (FAB-2021): batch 1000, lr 1e-4, 1e5 iterations (no KLz pre-training there)
        return dict(toy, blocks=8, hidden=64, pretrain_steps=1000, steps=100000, fab_steps=100000, batch=1000,
                    fab_batch=1000, lr=1e-4, fab_lr=1e-4, pretrain_lr=1e-3, eval_n=100000, data_n=100000)
    # Many Well: rational-quadratic spline couplings (a RealNVP of this size reaches ESS ~0.1-0.25 in the same
    # time; see docs/losses.md); FAB ~0.6 s per step at batch 256
    return dict(toy, flow="spline", blocks=4, hidden=64, pretrain_steps=500, steps=1000, fab_steps=750,
                batch=256, fab_batch=256, lr=5e-4, fab_lr=5e-4, pretrain_lr=3e-3)


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
    gen = make_flow(target.dim, sz.get("flow", "realnvp"), blocks=sz["blocks"], hidden=sz["hidden"], seed=seed)
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

    from boltzflow.core.sampleset import SampleSet

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
    from boltzflow.core.sampleset import SampleSet

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


def parse_overrides(items: list[str], sz: dict[str, Any]) -> dict[str, Any]:
    """``["steps=200", "lr=1e-3"]`` -> typed overrides of the ``sizes`` keys (unknown keys are errors)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in sz:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(sz))}")
        old = sz[key]
        out[key] = type(old)(float(val)) if isinstance(old, int) and not isinstance(old, bool) else type(old)(val)
    return out


def run(system: str, full: bool = False, seed: int = 0, losses=LOSS_NAMES, progress: bool = False,
        cache_dir: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from boltzflow.sampling.ais import AISConfig
    from boltzflow.training.trainer import CapConfig, OptimConfig, StageConfig, TrainConfig, Trainer

    torch.set_num_threads(1)
    sz = {**sizes(system, full), **(overrides or {})}
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
        is_fab = name == "fab"
        steps = sz["fab_steps"] if is_fab else sz["steps"]
        cfg = TrainConfig(finetune=StageConfig(name, steps, sz["fab_batch"] if is_fab else sz["batch"]),
                          optimizer=OptimConfig(lr=sz["fab_lr"] if is_fab else sz["lr"], schedule="cosine",
                                                warmup_steps=min(50, steps // 10), min_lr_factor=0.1),
                          grad_clip=sz["grad_clip"] or None, seed=seed + 100, log_every=max(steps // 10, 1),
                          progress=progress, eval_batch=0,
                          ais=AISConfig(n_intermediate=sz["ais_intermediate"], n_leapfrog=sz["ais_leapfrog"],
                                        step_size=sz["ais_step"]),
                          cap=CapConfig(energy_max=sz["energy_cap"] or None))
        g = copy.deepcopy(gen)
        t1 = time.perf_counter()
        trainer = Trainer(g, energy, cfg, modes=modes)
        summary = trainer.run()
        res = evaluate(g, energy, modes, sz["eval_n"], seed + 7)
        res.update({"energy_evals": summary["energy_evals"], "wall_s": time.perf_counter() - t1, "steps": steps,
                    "skipped_steps": summary["skipped_steps"]})
        if exact.get("log_z") is not None:
            res["log_z_error"] = res["log_z"] - exact["log_z"]
        res["ess_trajectory"] = [[r["step"], r.get("ess")] for r in trainer.history]  # batch ESS while training
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one size/hyperparameter of the chosen system (see 'settings' in the output)")
    args = p.parse_args(argv)
    from boltzflow.errors import InputError

    losses = tuple(s for s in args.losses.split(",") if s)
    bad = [s for s in losses if s not in LOSS_NAMES]
    if bad:
        print(f"loss_comparison: error: unknown loss(es) {bad}; choose from {', '.join(LOSS_NAMES)}", file=sys.stderr)
        return 2
    try:
        overrides = parse_overrides(args.set, sizes(args.system, args.full))
    except ValueError as e:
        print(f"loss_comparison: error: {e}", file=sys.stderr)
        return 2
    try:
        out = run(args.system, args.full, args.seed, losses, args.progress, args.cache_dir, overrides)
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
