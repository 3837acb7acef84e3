#!/usr/bin/env python
"""E(n)-free-form flows (draxler2024) on the particle benchmarks DW4, LJ13, LJ55.

    python benchmarks/particle_systems.py --system dw4 --json                 # train, then evaluate
    python benchmarks/particle_systems.py --system dw4 --quick --json         # seconds (the test suite's size)
    python benchmarks/particle_systems.py --system lj13 --out runs/fff/lj13 --set steps=4000 --json
    python benchmarks/particle_systems.py --system lj55 --step-cost --json    # CPU time per step, paper sizes
    python benchmarks/particle_systems.py --system lj55 --step-cost --set layers=1 --set steps=2 --json
    python benchmarks/particle_systems.py --evaluate systems/dw4/generators/fff \
        --data systems/dw4/reference_test.npy --json                          # {"nll": ...} of a trained flow

Training data: ``systems/<system>/reference_train.npy`` (boltzflow's own MCMC,
``scripts/particle_reference.py``; its energy evaluations and wall time are read from
``reference.json`` and counted in the training cost); ``--quick`` makes a short MCMC run instead.
Test data: ``systems/<system>/reference_test.npy`` (chains not used for training).

Printed (JSON): ``nll`` mean test NLL per sample in draxler2024's convention (``-log q`` on the
centre-of-mass-free subspace without the latent normal's constant ``(n-1)d/2 log 2pi``, decoder Jacobian
at the encoder's latent, their appendix B.3), ``nll_se``, ``nll_normalized`` (with the constant),
``paper_nll`` (draxler2024 table 1, E(n)-FFF), ``ess`` (Kish ESS of ``n_eval`` flow samples as a
fraction, log w = -u - log q with the exact log q), ``log_z`` (importance-sampling estimate of log of
the integral of exp(-u) over the CoM-free subspace), ``sample_ms`` (decoder time per sample, batches of
``sample_batch``), ``sample_ms_with_logq`` (with the exact Jacobian), ``energy_evals`` (reference MCMC +
the ``n_eval`` samples' energies), ``wall_s`` (training loop), ``training_steps``, ``step_ms``,
``recon_error`` (mean |g(f(x)) - x| on the test set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("dw4", "lj13", "lj55")
#: draxler2024 table 1, E(n)-FFF (NLL, their convention) and sampling time per sample (A100/A40 GPU)
PAPER = {"dw4": {"nll": 1.68, "nll_err": 0.01, "sample_ms": 0.026},
         "lj13": {"nll": -17.09, "nll_err": 0.16, "sample_ms": 0.11},
         "lj55": {"nll": -88.72, "nll_err": 0.16, "sample_ms": 2.1}}
#: draxler2024 table 5 (layers, reconstruction weight, batch); our defaults are smaller (2 CPU cores)
PAPER_SETTINGS = {"dw4": {"layers": 20, "recon_weight": 10.0, "batch": 256, "steps": 19550},
                  "lj13": {"layers": 8, "recon_weight": 200.0, "batch": 256, "steps": 156000},
                  "lj55": {"layers": 10, "recon_weight": 500.0, "batch": 48, "steps": 300000}}


def sizes(system: str, quick: bool) -> dict[str, Any]:
    """Default settings (override with ``--set KEY=VALUE``)."""
    recon = PAPER_SETTINGS[system]["recon_weight"]
    if quick:
        return {"layers": 2, "hidden": 16, "features": 8, "recon_weight": recon, "steps": 30, "batch": 64,
                "lr": 1e-3, "n_eval": 200, "n_test": 100, "sample_batch": 100, "mcmc_chains": 32, "mcmc_frames": 8}
    return {"layers": {"dw4": 6, "lj13": 4, "lj55": 3}[system], "hidden": 64, "features": 32, "recon_weight": recon,
            "steps": 3000, "batch": 256, "lr": 1e-3, "n_eval": 5000, "n_test": 5000, "sample_batch": 500,
            "mcmc_chains": 0, "mcmc_frames": 0}


def _quick_data(system: str, s: dict[str, Any], seed: int) -> tuple[np.ndarray, int]:
    from boltzflow.systems.particles import MCMCConfig, metropolis_reference

    cfg = MCMCConfig(chains=s["mcmc_chains"], burnin=300, frames_per_chain=s["mcmc_frames"], thin=10, pilot=0,
                     step={"dw4": 0.2, "lj13": 0.05, "lj55": 0.015}[system], seed=seed)
    x, info = metropolis_reference(system, cfg, log=lambda _m: None)
    return x, int(info["energy_evals"])


def evaluate(flow, system: str, test: np.ndarray, n_eval: int, sample_batch: int, seed: int) -> dict[str, Any]:
    """Test NLL, reweighting (Kish ESS, log Z) and sampling time of a trained flow."""
    import torch

    from boltzflow.core.weights import kish_ess
    from boltzflow.estimators import log_z
    from boltzflow.systems.particles import particle_target
    from boltzflow.training.freeform import nll_of_frames

    out: dict[str, Any] = nll_of_frames(flow, test)
    target = particle_target(system)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    n_done = 0
    while n_done < n_eval:
        flow.sample(min(sample_batch, n_eval - n_done), g)
        n_done += sample_batch
    out["sample_ms"] = 1000 * (time.perf_counter() - t0) / n_eval
    t0 = time.perf_counter()
    xs, lqs = [], []
    for lo in range(0, n_eval, sample_batch):
        x, lq = flow.sample_and_log_prob(min(sample_batch, n_eval - lo), g)
        xs.append(x)
        lqs.append(lq)
    out["sample_ms_with_logq"] = 1000 * (time.perf_counter() - t0) / n_eval
    x = torch.cat(xs).double()
    lq = torch.cat(lqs).double()
    with torch.no_grad():
        u = target.energy(x.reshape(len(x), -1))
    log_w = (-u - lq).numpy()
    finite = np.isfinite(log_w)
    ess = kish_ess(log_w)
    lz = log_z(log_w, n_bootstrap=200, seed=seed)
    out.update(ess=ess / n_eval, ess_count=ess, n_eval=n_eval, nonfinite_weights=int((~finite).sum()),
               log_z=lz.value, log_z_se=lz.stderr, mean_energy_samples=float(u[torch.from_numpy(finite)].mean()))
    return out


def run(system: str, quick: bool = False, overrides: dict[str, Any] | None = None, out_dir: str | None = None,
        seed: int = 0) -> dict[str, Any]:
    """Train an E(n)-FFF on ``system`` and evaluate it; returns the benchmark's JSON dict."""
    import tempfile

    from boltzflow.training.freeform import (
        FreeFormTrainConfig,
        ParticleGeneratorConfig,
        ParticleRunConfig,
        load_frames,
        train_freeform,
    )

    s = sizes(system, quick)
    s.update(overrides or {})
    sysdir = ROOT / "systems" / system
    if quick:
        data, ref_evals = _quick_data(system, s, seed)
        ref_wall = None
    else:
        data = load_frames(sysdir / "reference_train.npy", system)
        info = json.loads((sysdir / "reference.json").read_text())
        ref_evals, ref_wall = int(info["energy_evals"]), info.get("wall_s")
    test = load_frames(sysdir / "reference_test.npy", system)[: int(s["n_test"])]
    cfg = ParticleRunConfig(system=system, generator=ParticleGeneratorConfig(
        layers=int(s["layers"]), hidden=int(s["hidden"]), features=int(s["features"]),
        recon_weight=float(s["recon_weight"])),
        training=FreeFormTrainConfig(steps=int(s["steps"]), batch=int(s["batch"]), lr=float(s["lr"]), seed=seed,
                                     log_every=max(1, int(s["steps"]) // 50),
                                     checkpoint_every=max(1, int(s["steps"]) // 20)))
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory()
        out_dir = tmp.name
    resume = (Path(out_dir) / "checkpoints" / "latest.pt").is_file()
    summary = train_freeform(cfg, out_dir, resume=resume, data=data, log=lambda _m: None)
    from boltzflow.training.freeform import load_freeform

    flow, _ = load_freeform(out_dir)
    res = evaluate(flow, system, test, int(s["n_eval"]), int(s["sample_batch"]), seed)
    if tmp is not None:
        tmp.cleanup()
    res.update(system=system, quick=quick, paper_nll=PAPER[system]["nll"], paper_nll_err=PAPER[system]["nll_err"],
               paper_sample_ms_gpu=PAPER[system]["sample_ms"], paper_settings=PAPER_SETTINGS[system],
               energy_evals=ref_evals + int(s["n_eval"]), reference_mcmc_evals=ref_evals,
               reference_mcmc_wall_s=ref_wall, wall_s=summary["training_wall_s"],
               training_steps=summary["training_steps"], step_ms=summary["step_ms"],
               step_cpu_ms=summary["step_cpu_ms"], training_cpu_s=summary["training_cpu_s"], n_train=len(data),
               settings=s, threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0), run_dir=None if tmp else out_dir)
    return res


def evaluate_run(run_dir: str, data: str, n: int = 0, n_eval: int = 0, seed: int = 0) -> dict[str, Any]:
    """``{"nll": ...}`` of a trained run directory on a sample file ``(n, particles, dim)``; with
    ``n_eval > 0`` also ESS / log Z / sampling time from that many flow samples. A run directory without
    generator.pt is evaluated at its latest checkpoint (``checkpoint_step``)."""
    from boltzflow.training.freeform import load_checkpointed, load_frames, load_freeform, nll_of_frames

    step = None
    if (Path(run_dir) / "generator.pt").is_file() or not Path(run_dir).is_dir():
        flow, cfg = load_freeform(run_dir)
    else:  # a run still training (or stopped): its latest checkpoint
        flow, cfg, step = load_checkpointed(run_dir)
    x = load_frames(data, cfg.system)
    if n:
        x = x[:n]
    if n_eval:
        res = evaluate(flow, cfg.system, x, n_eval, 500, seed)
    else:
        res = nll_of_frames(flow, x)
    res.update(system=cfg.system, run_dir=run_dir, data=data, paper_nll=PAPER[cfg.system]["nll"],
               checkpoint_step=step)
    return res


def step_cost(system: str, steps: int = 3, seed: int = 0, layers: int = 0) -> dict[str, Any]:
    """CPU and wall time of one training step at draxler2024's sizes (table 5: layers, batch,
    reconstruction weight; our EGNN width 64), the mean over ``steps`` steps after one warm-up step,
    and the CPU time their full training would take on this machine at that rate. ``layers > 0`` times
    that many EGNN layers instead and scales the cost linearly to the paper's layer count (every layer
    is the same computation; the fixed overhead is then over-counted, so the extrapolation is high).
    Frames: the training reference where it exists, else jittered lattices (the cost does not depend
    on the values)."""
    import torch

    from boltzflow.flows.freeform import FreeFormConfig, FreeFormFlow, fff_loss
    from boltzflow.systems.particles import _initial
    from boltzflow.training.freeform import load_frames, particle_shape

    ps = PAPER_SETTINGS[system]
    n, d = particle_shape(system)
    path = ROOT / "systems" / system / "reference_train.npy"
    g = torch.Generator().manual_seed(seed)
    if path.is_file():
        x_all, source = torch.as_tensor(load_frames(path, system), dtype=torch.float32), "reference_train.npy"
    else:
        x_all, source = _initial(system, 1024, g).float(), "jittered lattice"
    torch.manual_seed(seed)
    n_layers = int(layers) or int(ps["layers"])
    flow = FreeFormFlow(n, d, FreeFormConfig(layers=n_layers, hidden=64, recon_weight=float(ps["recon_weight"])))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    cpu, wall = [], []
    for i in range(steps + 1):
        c0, w0 = time.process_time(), time.perf_counter()
        xb = x_all[torch.randint(0, len(x_all), (int(ps["batch"]),), generator=g)]
        opt.zero_grad()
        fff_loss(flow.encode, flow.decode, xb, float(ps["recon_weight"]), g).loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
        opt.step()
        if i:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    cpu_ms = 1000 * float(np.mean(cpu)) * int(ps["layers"]) / n_layers
    return {"system": system, "paper_settings": ps, "data": source, "steps_measured": steps, "layers_timed": n_layers,
            "step_cpu_ms": cpu_ms, "step_wall_ms": 1000 * float(np.mean(wall)) * int(ps["layers"]) / n_layers,
            "threads": torch.get_num_threads(), "paper_training_cpu_h": cpu_ms * int(ps["steps"]) / 3.6e6,
            "params": sum(p.numel() for p in flow.parameters())}


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            out[k] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=SYSTEMS)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the test suite")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a size (see sizes())")
    p.add_argument("--out", help="keep the run directory here (resumes when it holds a checkpoint)")
    p.add_argument("--evaluate", metavar="RUN_DIR", help="evaluate a trained run directory instead of training")
    p.add_argument("--data", help="with --evaluate: sample file (n, particles, dim) .npy")
    p.add_argument("--n", type=int, default=0, help="with --evaluate: use the first n frames (0 = all)")
    p.add_argument("--n-eval", type=int, default=0, help="with --evaluate: also ESS/log Z from this many samples")
    p.add_argument("--step-cost", action="store_true", help="only time training steps at the paper's sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.step_cost:
        if not a.system:
            p.error("--step-cost needs --system")
        sv = _parse_set(a.set)
        res = step_cost(a.system, int(sv.get("steps", 3)), a.seed, int(sv.get("layers", 0)))
    elif a.evaluate:
        if not a.data:
            p.error("--evaluate needs --data X.npy")
        res = evaluate_run(a.evaluate, a.data, a.n, a.n_eval, a.seed)
    else:
        if not a.system:
            p.error("--system is required (or --evaluate RUN_DIR)")
        res = run(a.system, a.quick, _parse_set(a.set), a.out, a.seed)
    if a.json:
        print(json.dumps(res, default=str))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
