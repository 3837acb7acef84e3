"""Analyse independent parallel-tempering runs of a peptide and write its shipped reference file.

    python scripts/peptide_reference.py alanine-tetrapeptide runs/tetra-pt-a runs/tetra-pt-b \
        -o systems/alanine-tetrapeptide/reference_300K.npz --json runs/tetra-reference.json

For each run (a directory of ``boltzflow simulate``): iterations, wall time, neighbour swap acceptance,
equilibration and statistical inefficiency of the target-state reduced energy (pymbar), the mean
reduced energy and the populations of every backbone state (whole molecule and per residue,
``PeptideModes.indicators()``) from the target-state series with block errors (10 contiguous blocks,
``boltzflow.replica.state_populations``), with each indicator's statistical inefficiency. Then the
runs are compared (z = difference / combined block error) and combined (equal-weight mean, error
sqrt(sum se^2) / n_runs). The output file holds the target-state frames of all runs subsampled by
the energy's statistical inefficiency (``extract_samples``: equilibration discarded, every g-th
frame), time order within each run, run after run; it is flagged ``decorrelated: False`` because the
backbone states decorrelate much more slowly than the energy, so estimators use block errors on it.
Prints markdown tables for REFERENCE.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def swap_acceptance(run: Path) -> list[float]:
    """Neighbour swap acceptance (state i <-> i+1) over the whole run."""
    import netCDF4

    from boltzflow.replica import storage_path

    ds = netCDF4.Dataset(str(storage_path(run)), "r")
    try:
        last = int(ds.variables["last_iteration"][0])
        acc = np.asarray(ds.variables["accepted"][1:last + 1], dtype=np.float64).sum(0)
        prop = np.asarray(ds.variables["proposed"][1:last + 1], dtype=np.float64).sum(0)
    finally:
        ds.close()
    k = acc.shape[0]
    return [float((acc[i, i + 1] + acc[i + 1, i]) / max(prop[i, i + 1] + prop[i + 1, i], 1.0)) for i in range(k - 1)]


def analyse_run(run: Path, modes) -> dict:
    from boltzflow.estimators.blocks import block_average, detect_equilibration, statistical_inefficiency
    from boltzflow.replica import read_replica, state_populations

    data = read_replica(run)
    x, u = data.state_series(0)
    t0, g, n_eff = detect_equilibration(u)
    ind = modes.indicators()
    pops = state_populations(run, ind, n_blocks=10)
    g_ind = {}
    for name, fn in ind.items():
        s = np.asarray(fn(x[t0:]), dtype=np.float64)
        g_ind[name] = float(statistical_inefficiency(s)) if 0 < s.mean() < 1 else float("nan")
    e = block_average(u[t0:], n_blocks=10, name="u")
    return {
        "run": str(run),
        "n_iterations": int(data.n_iterations),
        "steps_per_iteration": int(data.steps_per_iteration),
        "timestep_fs": float(data.timestep_fs),
        "temperatures_k": [float(t) for t in data.temperatures],
        "wall_time_s": float(data.wall_time_s),
        "swap_acceptance": swap_acceptance(run),
        "equilibration_iterations": int(t0),
        "statistical_inefficiency": float(g),
        "mean_reduced_energy": [float(e.value), float(e.stderr)],
        "populations": {k: [float(v.value), float(v.stderr)] for k, v in pops.items()},
        "indicator_statistical_inefficiency": g_ind,
    }


def combine(runs: list[dict]) -> dict:
    out = {}
    for name in runs[0]["populations"]:
        vals = np.array([r["populations"][name][0] for r in runs])
        ses = np.array([r["populations"][name][1] for r in runs])
        mean = float(vals.mean())
        se = float(math.sqrt(float(np.sum(ses ** 2)))) / len(runs)
        d = {"value": mean, "stderr": se}
        if len(runs) == 2:
            den = math.sqrt(float(np.sum(ses ** 2)))
            d["z_between_runs"] = float((vals[0] - vals[1]) / den) if den > 0 else (0.0 if vals[0] == vals[1] else float("inf"))
        out[name] = d
    return out


def write_reference(runs: list[Path], out: Path, system) -> dict:
    from boltzflow.core.sampleset import SampleSet
    from boltzflow.replica import extract_samples

    sets = [extract_samples(r) for r in runs]
    prov = {"sampler": "replica-exchange", "system": system.name, "fingerprint": system.fingerprint(),
            # every g-th frame by the reduced energy's g, but the backbone states decorrelate far more slowly
            # (indicator g up to tens of iterations): flag the frames as correlated so that estimate / compare
            # use block errors over them (frames of each run in time order, run after run)
            "decorrelated": False, "subsampled": "every g-th iteration, g of the target-state reduced energy",
            "runs": [s.provenance for s in sets], "n_frames_per_run": [len(s) for s in sets]}
    for key in ("energy_evals", "energy_evaluations", "wall_s", "wall_time_s", "n_iterations"):
        vals = [s.provenance.get(key) for s in sets]
        if all(isinstance(v, (int, float)) for v in vals):
            prov[key] = type(vals[0])(sum(vals))
    prov["statistical_inefficiency"] = float(max(s.provenance["statistical_inefficiency"] for s in sets))
    ss = SampleSet(positions=np.concatenate([s.positions for s in sets]).astype(np.float32),
                   reduced_energy=np.concatenate([s.reduced_energy for s in sets]),
                   temperature=sets[0].temperature, provenance=prov)
    from boltzflow.replica.energies import reduced_energies

    k = np.linspace(0, len(ss) - 1, min(20, len(ss))).astype(int)
    u = reduced_energies(system, ss.positions[k].astype(np.float64), temperature_k=ss.temperature)
    check = float(np.max(np.abs(u - ss.reduced_energy[k])))
    ss.save(out)
    return {"file": str(out), "n_frames": len(ss), "n_frames_per_run": prov["n_frames_per_run"],
            "bytes": out.stat().st_size, "energy_check_max_abs_kT": check, "energy_check_frames": int(k.size)}


def markdown(system, runs: list[dict], comb: dict) -> str:
    lines = ["| | " + " | ".join(Path(r["run"]).name for r in runs) + " |", "|---|" + "---|" * len(runs)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in runs) + " |")

    row("iterations", lambda r: f"{r['n_iterations']} x {r['steps_per_iteration']} steps x {r['timestep_fs']:g} fs "
        f"= {r['n_iterations'] * r['steps_per_iteration'] * r['timestep_fs'] * 1e-6:.3f} ns per replica")
    row("wall time (sampling)", lambda r: f"{r['wall_time_s']:.0f} s")
    row("neighbour swap acceptance", lambda r: f"{min(r['swap_acceptance']):.2f} - {max(r['swap_acceptance']):.2f}")
    row("equilibration discarded", lambda r: f"{r['equilibration_iterations']} iterations")
    row("statistical inefficiency (300 K u)", lambda r: f"g = {r['statistical_inefficiency']:.1f} iterations")
    row("mean reduced energy", lambda r: f"{r['mean_reduced_energy'][0]:.2f} +- {r['mean_reduced_energy'][1]:.2f} kT")
    lines += ["", "| state | " + " | ".join(Path(r["run"]).name + " (block error; g of the indicator)" for r in runs)
              + " | combined | z (run a - run b) |", "|---|" + "---|" * (len(runs) + 2)]
    labels = {f"res{r[0]}": r[1] for r in system.modes.residues}
    for name in comb:
        res = name.split("_", 1)[0]
        label = f"{name} ({labels[res]})" if res in labels else f"**{name}**"
        cells = [f"{r['populations'][name][0]:.4f} +- {r['populations'][name][1]:.4f} "
                 f"(g {r['indicator_statistical_inefficiency'][name]:.0f})" for r in runs]
        c = comb[name]
        z = f"{c['z_between_runs']:+.1f}" if "z_between_runs" in c else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {c['value']:.4f} +- {c['stderr']:.4f} | {z} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("system", help="built-in name or system directory")
    ap.add_argument("runs", nargs="+", help="run directories of boltzflow simulate")
    ap.add_argument("-o", "--output", help="write the combined decorrelated frames here (.npz)")
    ap.add_argument("--json", help="write the analysis as JSON here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from boltzflow.cli.common import load_system

    system = load_system(args.system)
    if system.modes is None or not hasattr(system.modes, "indicators"):
        raise SystemExit(f"{system.name} has no peptide modes")
    runs = [analyse_run(Path(r), system.modes) for r in args.runs]
    res = {"system": system.name, "runs": runs, "combined": combine(runs)}
    if args.output:
        res["file"] = write_reference([Path(r) for r in args.runs], Path(args.output), system)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(markdown(system, runs, res["combined"]))
    if "file" in res:
        print(f"\nwrote {res['file']['file']}: {res['file']['n_frames']} frames {res['file']['n_frames_per_run']}, "
              f"{res['file']['bytes'] / 1e6:.2f} MB; u recomputed on {res['file']['energy_check_frames']} frames "
              f"agrees to {res['file']['energy_check_max_abs_kT']:.1e} kT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
