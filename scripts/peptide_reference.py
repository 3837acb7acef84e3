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

Runs of ``boltzflow simulate --method native-tempering`` (many independent ladders with the native
energy) are analysed the same way, with the errors from the spread between ladders
(``boltzflow.replica.native.ladder_populations``) and, in place of an indicator's g, its effective
number of independent samples p (1 - p) / se^2; the output file holds at most ``--max-frames`` of
each run's frames (every k-th frame of every ladder, ladder-major, frames of another isomer dropped),
so that contiguous blocks of the file are groups of independent ladders.
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


def is_native(run: Path) -> bool:
    from boltzflow.replica.native import STATE_FILE

    return (run / STATE_FILE).is_file()


def analyse_native_run(run: Path, modes) -> dict:
    from boltzflow.estimators.blocks import block_average
    from boltzflow.replica.native import ladder_populations
    from boltzflow.sampling import SampleSet

    s = SampleSet.load(run / "samples.npz")
    p = s.provenance
    pops = ladder_populations(s, modes.indicators())
    n_eff = {k: float(v.value * (1 - v.value) / v.stderr ** 2) if v.stderr > 0 else float("nan")
             for k, v in pops.items()}
    e = block_average(s.reduced_energy, block_sizes=p["ladder_sizes"], name="u", n_bootstrap=0)
    return {
        "run": str(run), "method": "native-tempering", "ladders": int(p["ladders"]),
        "frames_per_ladder": int(p["frames_per_ladder"]), "n_iterations": int(p["rounds"]),
        "steps_per_iteration": int(p["steps_per_swap"]), "timestep_fs": float(p["timestep_fs"]),
        "temperatures_k": p["temperatures_k"], "wall_time_s": float(p["wall_s"]),
        "energy_evals": int(p["energy_evals"]), "swap_acceptance": p["swap_acceptance"],
        "equilibration_iterations": int(p["config"]["burnin_rounds"]), "other_isomer_frames": int(p["other_isomer_frames"]),
        "n_frames": len(s), "mean_reduced_energy": [float(e.value), float(e.stderr)],
        "populations": {k: [float(v.value), float(v.stderr)] for k, v in pops.items()},
        "indicator_effective_samples": n_eff,
    }


def analyse_run(run: Path, modes) -> dict:
    if is_native(run):
        return analyse_native_run(run, modes)
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


def native_frames(run: Path, max_frames: int):
    """At most ``max_frames`` frames of a native tempering run: every k-th frame of every ladder
    (ladder-major), frames of another isomer dropped."""
    from boltzflow.sampling import SampleSet

    s = SampleSet.load(run / "samples.npz")
    p = dict(s.provenance)
    sizes = np.asarray(p["ladder_sizes"], dtype=int)
    k = max(1, math.ceil(len(s) / max_frames))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    idx = np.concatenate([st + np.arange(k - 1, n, k) for st, n in zip(starts, sizes)])
    rounds_apart = k * int(p["config"]["stride_rounds"])
    p.update(subsampled=f"every {k}-th frame of every ladder ({rounds_apart} rounds apart), ladder-major, frames of "
             "another isomer left out", frames_kept=int(idx.size), storage=str(run),
             ladder_sizes=[int(((np.arange(n) % k) == k - 1).sum()) for n in sizes])
    p.pop("config", None)
    return SampleSet(s.positions[idx], s.reduced_energy[idx], None, None, s.temperature, p)


def write_reference(runs: list[Path], out: Path, system, max_frames: int = 2000) -> dict:
    from boltzflow.core.sampleset import SampleSet
    from boltzflow.replica import extract_samples

    native = [is_native(r) for r in runs]
    if any(native) and not all(native):
        raise SystemExit("write the reference from runs of one kind (all native-tempering or all openmmtools)")
    sets = [native_frames(r, max_frames) if nat else extract_samples(r) for r, nat in zip(runs, native)]
    prov = {"sampler": "native-tempering" if native[0] else "replica-exchange", "system": system.name,
            "fingerprint": system.fingerprint(),
            # every g-th frame by the reduced energy's g, but the backbone states decorrelate far more slowly
            # (indicator g up to tens of iterations): flag the frames as correlated so that estimate / compare
            # use block errors over them (frames of each run in time order, run after run; native tempering:
            # contiguous blocks are groups of independent ladders)
            "decorrelated": False,
            "subsampled": (sets[0].provenance["subsampled"] if native[0]
                           else "every g-th iteration, g of the target-state reduced energy"),
            "runs": [s.provenance for s in sets], "n_frames_per_run": [len(s) for s in sets]}
    for key in ("energy_evals", "energy_evaluations", "wall_s", "wall_time_s", "n_iterations"):
        vals = [s.provenance.get(key) for s in sets]
        if all(isinstance(v, (int, float)) for v in vals):
            prov[key] = type(vals[0])(sum(vals))
    if not native[0]:
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
    if all(r.get("method") == "native-tempering" for r in runs):
        row("ladders x kept frames", lambda r: f"{r['ladders']} x {r['frames_per_ladder']} "
            f"({r['other_isomer_frames']} of another isomer not counted)")
        row("energy evaluations", lambda r: f"{r['energy_evals']:.3g}")
    else:
        row("statistical inefficiency (300 K u)", lambda r: f"g = {r['statistical_inefficiency']:.1f} iterations")
    row("mean reduced energy", lambda r: f"{r['mean_reduced_energy'][0]:.2f} +- {r['mean_reduced_energy'][1]:.2f} kT")
    native = all(r.get("method") == "native-tempering" for r in runs)
    what = " (error between ladders; effective samples)" if native else " (block error; g of the indicator)"
    lines += ["", "| state | " + " | ".join(Path(r["run"]).name + what for r in runs)
              + " | combined | z (run a - run b) |", "|---|" + "---|" * (len(runs) + 2)]
    labels = {f"res{r[0]}": r[1] for r in system.modes.residues}
    for name in comb:
        res = name.split("_", 1)[0]
        label = f"{name} ({labels[res]})" if res in labels else f"**{name}**"
        cells = [f"{r['populations'][name][0]:.4f} +- {r['populations'][name][1]:.4f} "
                 + (f"(n_eff {r['indicator_effective_samples'][name]:.0f})" if native else
                    f"(g {r['indicator_statistical_inefficiency'][name]:.0f})") for r in runs]
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
    ap.add_argument("--max-frames", type=int, default=2000,
                    help="native-tempering runs: at most this many frames of each run in the output (default 2000)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from boltzflow.cli.common import load_system

    system = load_system(args.system)
    if system.modes is None or not hasattr(system.modes, "indicators"):
        raise SystemExit(f"{system.name} has no peptide modes")
    runs = [analyse_run(Path(r), system.modes) for r in args.runs]
    res = {"system": system.name, "runs": runs, "combined": combine(runs)}
    if args.output:
        res["file"] = write_reference([Path(r) for r in args.runs], Path(args.output), system, args.max_frames)
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
