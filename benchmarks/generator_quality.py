"""Generator quality: Kish ESS, reweighted populations, log Z and the full cost of a trained generator.

    python benchmarks/generator_quality.py --system alanine-dipeptide --route energy --json
    python benchmarks/generator_quality.py --system alanine-dipeptide --route data --seeds 0,1,2 --json
    python benchmarks/generator_quality.py --route energy --quick --json          # seconds, for the tests
    python benchmarks/generator_quality.py --system alanine-tetrapeptide --route peptide --seeds 0 --json

For every seed it trains the route's recipe (``boltzflow.recipes``: "energy" = parallel tempering from
the input structure + maximum likelihood, no reference frames; "data" = maximum likelihood on the
shipped reference frames grown by Langevin dynamics; "peptide" = the default for peptides: tempering, maximum
likelihood with a backbone-lead flow, then logvar_data cycles) in ``--out/ROUTE-seedS`` (resumable: a killed
benchmark continues where it stopped, a finished run is reused), draws ``--samples`` samples
(default 1e6), and prints::

    {"system", "route", "seeds": [{"seed", "ess", "n_samples", "phi_positive": {"value", "stderr"},
      "log_z", "energy_evals", "wall_s", "curve": [{"step", "energy_evals", "wall_s", "ess"}, ...]}, ...],
     "ess_mean", "ess_sd", "reference": {...}}

``ess``: Kish ESS / n on the final samples. ``energy_evals`` counts everything: the training data
(parallel tempering or the Langevin growth; the reference frames of the data route were made by a
replica-exchange run of ``reference_energy_evals`` evaluations, reported beside it), the evaluation
batches logged during training, and the final samples. ``wall_s``: data generation + training +
sampling. ``curve``: the ESS of the training log's evaluation batches (``training.eval_batch``
samples each) against the cumulative evaluations and wall time, so the cost of a given ESS can be
read off; its ESS values come from small batches, which rarely see the heavy tail of the weights, so
they overestimate the ESS of a large sample. ``curve_checkpoints``: the Kish ESS of ``--curve-samples``
samples (default 2e4) from the checkpoints kept every ``--curve-every`` steps, the honest curve.
``pool_curve`` (reweighted maximum likelihood only): the Kish ESS of every pool of ``training.pool.size``
fresh draws (1e6 in the recipe) against cost. ``ess_chunks``: median / min / max of the Kish ESS over the
final samples cut into 1e5-sample blocks; ``pareto_k``: the weights' tail index (> 0.7: error bars
unreliable, docs/pipelines.md).
``ess_clip_1e-4``: the Kish ESS after clipping the largest 1e-4 of the log weights, the way TA-BG reports its
ESS; for comparison with published tables only (``ess`` is the plain Kish ESS).

Peptides (``alanine-tetrapeptide``, ``alanine-hexapeptide``, any system with per-residue modes,
docs/peptides.md): the minor mode is ``any_alpha_L`` instead of ``phi_positive``, and every seed also
gets ``"residue_populations": {"res<i>_<state>": {"label", "value", "stderr", "reference",
"reference_stderr", "z"}}`` (alpha_R / beta_PPII / alpha_L of every residue; generator: importance
sampling errors; reference: block errors over the shipped time-ordered reference frames; z = difference
in combined standard errors) and ``"residue_max_abs_z"``; the report gets
``"reference_residue_populations"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

QUICK = {
    "generator.blocks": 1, "generator.hidden": 32,
    "training.pretrain.steps": 40, "training.pretrain.batch": 64, "training.log_every": 10,
    "training.finetune.steps": 20, "training.finetune.batch": 64, "training.ess_guard": 200,
    "training.finetune_min_ess": 0.0,  # toy flows are far below the recipes' floor: run every stage anyway
    "training.checkpoint_every": 20, "training.eval_batch": 128,
    "tempering.ladders": 4, "tempering.replicas": 3, "tempering.t_max": 600.0, "tempering.burnin_rounds": 2,
    "tempering.frames": 25, "tempering.steps_per_swap": 10,
    "data.md_frames": 2, "data.md_burnin": 10, "data.md_stride": 5, "data.max_samples": 500,
    "training.pool.size": 2000, "training.pool.resample": 2000, "training.pool.refresh": 10,
}


def pool_curve_of(run_dir: Path, data_evals: int, data_wall: float) -> list[dict]:
    """Kish ESS of every reweighted-maximum-likelihood pool (``finetune.loss = "rwml"``: ``training.pool.size``
    fresh draws of the generator at each refresh, far more than the logging batches) against cumulative
    cost; empty for other losses. The first metric row after a refresh carries the new pool's numbers."""
    rows: list[dict] = []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return rows
    last = None
    for line in path.read_text().splitlines():
        r = json.loads(line)
        key = (r.get("pool_kish"), r.get("pool_unique"))
        if r.get("pool_kish") is None or key == last:
            continue
        last = key
        rows.append({"step": int(r["step"]), "energy_evals": int(r.get("energy_evals", 0)) + data_evals,
                     "wall_s": float(r.get("wall_s", 0.0)) + data_wall, "ess": float(r["pool_kish"])})
    return rows


def chunk_kish(log_w: np.ndarray, chunk: int = 100_000) -> dict:
    """Kish ESS fractions of consecutive ``chunk``-sample blocks of ``log_w`` (median, min, max): how
    much a 1e5-sample ESS depends on which draws hold the largest weights. Empty below two chunks."""
    from boltzflow.core.weights import kish_ess

    k = len(log_w) // chunk
    if k < 2:
        return {}
    vals = [float(kish_ess(np.asarray(log_w[i * chunk:(i + 1) * chunk]))) / chunk for i in range(k)]
    return {"chunk": chunk, "n_chunks": k, "median": float(np.median(vals)), "min": min(vals), "max": max(vals)}


def curve_of(run_dir: Path, data_evals: int, data_wall: float) -> list[dict]:
    """ESS of the logged evaluation batches against cumulative cost (data generation included)."""
    rows = []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("ess") is None:
            continue
        rows.append({"step": int(r["step"]), "energy_evals": int(r.get("energy_evals", 0)) + data_evals,
                     "wall_s": float(r.get("wall_s", 0.0)) + data_wall, "ess": float(r["ess"])})
    return rows


def checkpoint_curve(run_dir: Path, batch_curve: list[dict], n: int, every: int) -> list[dict]:
    """Kish ESS of ``n`` samples from every kept checkpoint (``checkpoints/step_*.pt``) whose step is a
    multiple of ``every``, with the cost logged at that step; the batch ESS of the training log beside it."""
    import torch

    from boltzflow.estimators import kish_ess
    from boltzflow.pipeline import load_trained

    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    if not ckpts:
        return []
    system, config, gen, energy = load_trained(run_dir, "cpu")
    by_step = {c["step"]: c for c in batch_curve}
    rows = []
    for path in ckpts:
        step = int(path.stem.split("_")[1])
        if step % every and path != ckpts[-1]:
            continue
        state = torch.load(path, map_location="cpu", weights_only=False)
        gen.load_state_dict(state["model"])
        gen.eval()
        g = torch.Generator().manual_seed(1000 + step)
        with torch.no_grad():
            s = gen.sample(n, energy=energy, batch_size=min(5000, n), generator=g)
        near = by_step.get(step) or min(batch_curve, key=lambda c: abs(c["step"] - step))
        rows.append({"step": step, "energy_evals": near["energy_evals"], "wall_s": near["wall_s"],
                     "ess": float(kish_ess(s.log_weights).value / n), "ess_batch": near["ess"], "n_samples": n})
    return rows


def reference_residue_populations(system) -> dict:
    """Per-residue backbone-state populations of the system's shipped reference frames with block errors
    (``{res<i>_<state>: Estimate}``, :func:`boltzflow.estimators.analysis.residue_populations`); empty for
    systems without per-residue states."""
    from boltzflow.estimators.analysis import residue_populations, residue_region_names
    from boltzflow.pipeline import DataConfig, load_reference

    if not residue_region_names(system.modes):
        return {}
    ref, _ = load_reference(system, DataConfig())
    return residue_populations(system.modes, ref)


def residue_comparison(system, samples, reference: dict) -> dict:
    """``{res<i>_<state>: {"label", "value", "stderr", "reference", "reference_stderr", "z"}}``: every
    residue's backbone-state population in the generator's weighted ``samples`` (importance-sampling
    errors) against ``reference`` (:func:`reference_residue_populations`), z = difference in combined
    standard errors (:func:`boltzflow.estimators.analysis.z_score`); empty without per-residue states."""
    from boltzflow.estimators.analysis import residue_populations, z_score

    labels = {f"res{r[0]}": r[1] for r in getattr(system.modes, "residues", ())}
    out = {}
    for name, est in residue_populations(system.modes, samples).items():
        row = {"label": labels.get(name.split("_", 1)[0], ""), "value": est.value, "stderr": est.stderr}
        ref = reference.get(name)
        if ref is not None:
            row.update(reference=ref.value, reference_stderr=ref.stderr, z=z_score(est, ref))
        out[name] = row
    return out


def run_seed(system, route: str, seed: int, out: Path, overrides: dict, n_samples: int, quick: bool,
             curve_samples: int = 20000, curve_every: int = 1000, residue_reference: dict | None = None) -> dict:
    from boltzflow import pipeline
    from boltzflow.core.rundir import RunDir

    ov = dict(QUICK) if quick else {}
    ov.update(overrides)
    ov.update({"seed": seed, "training.seed": seed, "generator.seed": seed, "tempering.seed": seed,
               "training.keep_checkpoints": True})
    cfg = pipeline.recipe_config(route, ov)
    run_dir = out / f"{route}-seed{seed}"
    rd = RunDir(run_dir)
    summary = rd.read_summary()
    if not summary.get("training_finished"):
        resume = rd.latest_checkpoint.is_file()
        if resume:
            cfg = pipeline.load_run_config(rd.config_path)
        summary = pipeline.train(system, cfg, run_dir, resume=resume, progress=False)
    t0 = time.time()
    samples = pipeline.sample(run_dir, n=n_samples, batch_size=min(5000, n_samples), progress=False)
    sample_wall = time.time() - t0
    est = pipeline.estimate(run_dir)
    summary = rd.read_summary()
    data = summary.get("data_tempering") or summary.get("data_augmentation") or {}
    data_evals, data_wall = int(data.get("energy_evals", 0)), float(data.get("wall_s", 0.0))
    minor = system.modes.minor
    ess = est["ess"].value / len(samples)
    result = {
        "seed": seed, "ess": ess, "pareto_k": est["ess"].pareto_k, "n_samples": len(samples),
        minor: {"value": est[minor].value, "stderr": est[minor].stderr},
        "log_z": est["log_Z"].value, "log_z_stderr": est["log_Z"].stderr,
        "energy_evals": int(summary.get("energy_evals_training", 0)) + len(samples),
        "wall_s": float(summary.get("training_wall_s", 0.0)) + sample_wall,
        "training_steps": int(summary.get("training_steps", 0)),
        "data_energy_evals": data_evals, "data_wall_s": data_wall,
        "log_likelihood": summary.get("log_likelihood"),
        "curve": curve_of(run_dir, data_evals, data_wall),
        "run_dir": str(run_dir),
    }
    pool_curve = pool_curve_of(run_dir, data_evals, data_wall)
    if pool_curve:
        result["pool_curve"] = pool_curve
    from boltzflow.core.weights import kish_ess as kish_count

    # the ESS as TA-BG reports it (top 1e-4 of the log weights clipped), for comparison with published tables only
    result["ess_clip_1e-4"] = kish_count(samples.log_weights, clip_top=1e-4) / len(samples)
    chunks = chunk_kish(np.asarray(samples.log_weights, dtype=np.float64))
    if chunks:
        result["ess_chunks"] = chunks
    residues = residue_comparison(system, samples, residue_reference or {})
    if residues:  # a peptide: per-residue backbone states against the reference
        result["residue_populations"] = residues
        zs = [abs(r["z"]) for r in residues.values() if r.get("z") is not None and np.isfinite(r["z"])]
        result["residue_max_abs_z"] = max(zs) if zs else None
    if curve_samples > 0:
        result["curve_checkpoints"] = checkpoint_curve(run_dir, result["curve"], curve_samples, curve_every)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--system", default="alanine-dipeptide", help="built-in system name (needs declared modes)")
    ap.add_argument("--route", choices=["energy", "data", "peptide"], required=True,
                    help="the recipe to train (peptide: the default for peptides; it trains in one process here, "
                    "~8-10 h per seed for the tetrapeptide at full size)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--samples", type=int, default=None,
                    help="final samples per seed (default 1e6: the Kish ESS of 1e5 samples of one generator ranged "
                    "0.04-0.73, so the JSON also gives the median and range over 1e5 chunks; --quick 2000)")
    ap.add_argument("--out", default=None, help="run directories (default runs/generator_quality[-quick])")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (seconds), same JSON")
    ap.add_argument("--curve-samples", type=int, default=None,
                    help="samples per kept checkpoint for curve_checkpoints (default 20000; --quick 200; 0 = off)")
    ap.add_argument("--curve-every", type=int, default=None, help="checkpoint steps between curve points (default 1000)")
    ap.add_argument("--json", action="store_true", help="print the JSON only")
    args = ap.parse_args(argv)

    from boltzflow.cli.train import parse_set
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system(args.system)
    if system.modes is None:
        raise SystemExit(f"system {args.system!r} declares no modes; the benchmark reports the minor-mode population")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    n = args.samples or (2000 if args.quick else 1_000_000)
    out = Path(args.out or ("runs/generator_quality-quick" if args.quick else "runs/generator_quality"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        res_ref = reference_residue_populations(system)
    except Exception as e:  # noqa: BLE001 - a missing reference only drops the per-residue comparison
        res_ref, res_ref_error = {}, str(e)
    else:
        res_ref_error = None
    results = []
    for s in seeds:
        cs = args.curve_samples if args.curve_samples is not None else (200 if args.quick else 20000)
        ce = args.curve_every or (20 if args.quick else 1000)
        r = run_seed(system, args.route, s, out / args.system, parse_set(args.set), n, args.quick, cs, ce, res_ref)
        results.append(r)
        if not args.json:
            print(f"seed {s}: ESS {r['ess']:.4f} of {r['n_samples']}, {system.modes.minor} "
                  f"{r[system.modes.minor]['value']:.4f} +- {r[system.modes.minor]['stderr']:.4f}, "
                  f"{r['energy_evals']:.3g} evaluations, {r['wall_s']:.0f} s", file=sys.stderr)
            if r.get("residue_max_abs_z") is not None:
                print(f"  per-residue backbone states: max |z| vs reference {r['residue_max_abs_z']:.2f}", file=sys.stderr)
    ess = np.array([r["ess"] for r in results])
    ref = None
    try:
        from boltzflow.pipeline import reference_population

        ref = reference_population(system)
    except Exception as e:  # noqa: BLE001 - a missing reference only drops the comparison line
        ref = {"error": str(e)}
    report = {"system": args.system, "route": args.route, "quick": bool(args.quick), "seeds": results,
              "ess_mean": float(ess.mean()), "ess_sd": float(ess.std(ddof=1)) if len(ess) > 1 else None,
              "reference": ref}
    if res_ref or res_ref_error:
        report["reference_residue_populations"] = (
            {k: {"value": v.value, "stderr": v.stderr} for k, v in res_ref.items()} if res_ref else {"error": res_ref_error})
    print(json.dumps(report, indent=None if args.json else 2, default=float))
    return report


if __name__ == "__main__":
    main()
