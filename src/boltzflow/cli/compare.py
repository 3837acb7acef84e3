"""``boltzflow compare``: a replica-exchange run and a generator's samples, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .common import add_overwrite, add_verb, has_error_bar, print_json

if TYPE_CHECKING:
    from ..core.sampleset import SampleSet
    from ..estimators.analysis import SamplerResult
    from ..systems import MolecularSystem

# The API is imported inside the functions: `boltzflow --help` and every other verb start without
# loading torch, OpenMM or matplotlib (the CLI's start-up imports numpy only).

EXAMPLE = """\
  boltzflow compare --replica runs/adp-pt --samples runs/adp-flow/samples/generated.npz \\
      --system alanine-dipeptide -o runs/compare-adp
  boltzflow compare --replica runs/butane-pt --samples gen.npz --system butane --json --target-stderr 0.002

Reports for each sampler: mode populations (replica exchange: block errors on the target-state
series; generator: self-normalised importance weights), the minor mode's conformational dF,
Ramachandran KL(replica || generator) on a 64x64 phi/psi grid (or a 64-bin torsion histogram for
systems without phi/psi), reduced-energy statistics, ESS, and the cost (energy evaluations, wall
time from provenance) to reach --target-stderr on the minor-mode population, extrapolated as
cost * (stderr / target)^2. The generator's weights get their Pareto k: above 0.7 they are heavy-tailed,
a warning says its error bars may be too small, and each stderr is the larger of the delta-method and
batch-means (10 chunks) errors. With -o OUT_DIR the plots and compare.json go there (a new or empty folder, or
an earlier comparison; --overwrite for any other); without -o nothing is written.
"""


def register(sub) -> None:
    p = add_verb(sub, "compare", "compare a replica-exchange run with a generator's samples", EXAMPLE, run)
    p.add_argument("--replica", required=True, metavar="RUN_DIR", help="run directory of `boltzflow simulate` "
                   "(or a SampleSet .npz)")
    p.add_argument("--samples", required=True, metavar="GEN_SAMPLES.npz", help="generator SampleSet (with log weights)")
    p.add_argument("--system", required=True, help="system directory or built-in name")
    p.add_argument("--target-stderr", type=float, default=0.005,
                   help="standard error on the minor-mode population to cost out (default 0.005)")
    p.add_argument("-o", "--output", metavar="OUT_DIR", help="directory for plots and compare.json (default: none)")
    add_overwrite(p, "OUT_DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


#: compare.json format 2 spells costs as SampleSet provenance does (``energy_evals``, ``wall_s``,
#: ``training_energy_evals``, ``training_wall_s``, ``*_to_target``); format 1 (no "format" key) spelled them
#: ``energy_evaluations``, ``wall_time_s``, ...
COMPARE_FORMAT = 2


def compare(replica: str | Path, generated: SampleSet, system: MolecularSystem, target_stderr: float = 0.005,
            seed: int = 0, plot_dir: str | Path | None = None) -> dict[str, Any]:
    """The comparison as a dict (see module docstring); writes plots into ``plot_dir`` if given. The numbers
    come from :func:`boltzflow.estimators.analysis.compare_samplers`; this function formats them."""
    from ..core.sampleset import SampleSet
    from ..estimators import analysis
    from ..replica import state_populations
    from ..replica.exchange import storage_path

    if not target_stderr > 0:
        raise InputError(f"--target-stderr must be > 0, got {target_stderr}")
    modes = system.modes
    if modes is None:
        raise InputError(f"system {system.name!r} declares no modes; compare needs them (alanine-dipeptide, butane)")
    rp = Path(replica)
    ref_path = rp / "samples.npz" if rp.is_dir() else rp
    ref = SampleSet.load(ref_path).check_finite(f"replica samples '{ref_path}'")
    gen = generated
    for label, ss in (("replica", ref), ("generator", gen)):
        system.check_coordinates(ss.positions[:1], f"{label} sample positions")
    storage = storage_path(rp) if rp.is_dir() else None
    ref_pops = None
    if storage is not None and storage.is_file():  # the replica run's own target-state series: block errors
        ind = {nm: (lambda x, i=i: modes.assign(x) == i) for i, nm in enumerate(modes.names)}
        ref_pops = state_populations(storage, ind, n_blocks=analysis.N_BLOCKS, seed=seed)
    res = analysis.compare_samplers(system.topology, modes, ref, gen, target_stderr,
                                    temperature_k=ref.temperature or system.temperature, seed=seed,
                                    reference_populations=ref_pops)
    r, g = res.reference, res.generator
    out: dict[str, Any] = {"format": COMPARE_FORMAT, "system": system.name, "temperature_k": res.temperature_k, "minor_mode": res.minor,
                           "target_stderr": target_stderr}
    out["replica_exchange"] = _side(r, {"statistical_inefficiency": (ref.provenance or {}).get("statistical_inefficiency"),
                                        "energy": r.energy})
    out["generator"] = _side(g, {"ess_fraction": float(g.summary.ess / len(gen)),
                                 "populations_unweighted": res.generator_unweighted,
                                 "training_energy_evals": g.cost.training_energy_evals,
                                 "training_wall_s": g.cost.training_wall_s,
                                 "energy": g.energy, "energy_unweighted": res.energy_unweighted})
    out[res.kl.name] = {"reweighted": res.kl.reweighted, "unweighted": res.kl.unweighted}
    if plot_dir is not None:
        (rx, ry), (gx, gy) = res.kl.ref_angles, res.kl.gen_angles
        out["plots"] = _plots(Path(plot_dir), rx, ry, gx, gy, gen.normalized_weights(), ref, gen, res.kl.name)
    return out


def _side(s: SamplerResult, extra: dict[str, Any]) -> dict[str, Any]:
    """One sampler's part of compare.json (keys as documented in the module docstring)."""
    m = s.summary
    k = m.pareto_k
    d = {"n": m.n, "ess": m.ess, "population_error": s.note,
         "pareto_k": k if k == k and abs(k) < float("inf") else None, "tail_warning": m.tail_note or None,
         "populations": {k: v.to_dict() for k, v in m.populations.items()},
         "dF": m.dF.to_dict() if m.dF is not None else None, "dF_kj_mol": m.dF_kj_mol,
         "energy_evals": s.cost.energy_evals, "wall_s": s.cost.wall_s,
         "energy_evals_to_target": s.energy_evals_to_target, "wall_s_to_target": s.wall_s_to_target}
    d.update(extra)
    return d


def _plots(d: Path, rx, ry, gx, gy, wg, ref, gen, kl_name: str) -> list[str]:
    from ..reports import plots

    d.mkdir(parents=True, exist_ok=True)
    paths = []
    if ry is not None:
        p = plots.ramachandran([("replica exchange", np.radians(rx), np.radians(ry), None),
                                ("generator", np.radians(gx), np.radians(gy), None),
                                ("generator reweighted", np.radians(gx), np.radians(gy), wg)], d / "ramachandran.png")
    else:
        p = plots.torsion_histogram([("replica exchange", np.radians(rx), None), ("generator", np.radians(gx), None),
                                     ("generator reweighted", np.radians(gx), wg)], d / "torsion.png")
    paths.append(str(p))
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, u, w in (("replica exchange", ref.reduced_energy, None), ("generator", gen.reduced_energy, None),
                        ("generator reweighted", gen.reduced_energy, wg)):
        if u is None:
            continue
        ok = np.isfinite(u)
        if ok.sum() < 2 or (w is not None and not np.sum(w[ok]) > 0):
            continue
        lo, hi = np.quantile(ref.reduced_energy[np.isfinite(ref.reduced_energy)], [0.001, 0.999]) \
            if ref.reduced_energy is not None else np.quantile(u[ok], [0.001, 0.999])
        span = hi - lo
        with np.errstate(invalid="ignore", divide="ignore"):  # all weight outside the range -> empty curve
            ax.hist(u[ok], bins=60, range=(lo - 0.3 * span, hi + 0.3 * span), weights=None if w is None else w[ok],
                    density=True, histtype="step", label=label)
    ax.set_xlabel("reduced energy u (kT)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    e = d / "energies.png"
    fig.savefig(e, dpi=110)
    plt.close(fig)
    paths.append(str(e))
    return paths


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.{digits}g}"
    return str(v)


def _pm(value, stderr) -> str:
    """``value +- stderr``, or ``+- ?`` when the samples were too few for an error bar (stderr 0 or none)."""
    return f"{_fmt(value)} +- {_fmt(stderr, 2) if has_error_bar(stderr) else '? (too few samples)'}"


def print_table(res: dict[str, Any]) -> None:
    r, g = res["replica_exchange"], res["generator"]
    minor = res["minor_mode"]
    rows = []
    for name in r["populations"]:
        pr, pg = r["populations"][name], g["populations"][name]
        rows.append((f"P({name})", _pm(pr["value"], pr["stderr"]), _pm(pg["value"], pg["stderr"])))
    for key, label in (("dF", f"dF(rest->{minor}) kT"),):
        a, b = r[key], g[key]
        rows.append((label, _pm(a["value"], a["stderr"]) if a else "-", _pm(b["value"], b["stderr"]) if b else "-"))
    rows.append((f"dF(rest->{minor}) kJ/mol", _fmt(r["dF_kj_mol"]), _fmt(g["dF_kj_mol"])))
    kl_key = next(k for k in res if k.endswith("_kl_64x64") or k.endswith("_kl_64"))
    rows.append((f"{kl_key} vs replica", "0", f"{_fmt(res[kl_key]['reweighted'])} (raw {_fmt(res[kl_key]['unweighted'])})"))
    for label, key in (("mean u (kT)", "mean_kT"), ("std u (kT)", "std_kT")):
        rows.append((label, _fmt((r.get("energy") or {}).get(key)), _fmt((g.get("energy") or {}).get(key))))
    rows.append(("n samples", str(r["n"]), str(g["n"])))
    rows.append(("ESS", _fmt(r["ess"]), f"{_fmt(g['ess'])} ({100 * g['ess_fraction']:.1f}%)"))
    if g.get("pareto_k") is not None or r.get("pareto_k") is not None:
        def k2(v):
            return "-" if v is None else f"{v:.2f}"
        rows.append(("Pareto k of the weights", k2(r.get("pareto_k")), k2(g.get("pareto_k"))
                     + (" (> 0.7: heavy-tailed)" if g.get("tail_warning") else "")))
    rows.append(("energy evaluations", _fmt(r["energy_evals"]), _fmt(g["energy_evals"])
                 + (f" (+{_fmt(g['training_energy_evals'])} training)"
                    if g["training_energy_evals"] == g["training_energy_evals"] else "")))
    rows.append(("wall time (s)", _fmt(r["wall_s"]), _fmt(g["wall_s"])
                 + (f" (+{_fmt(g['training_wall_s'])} training)"
                    if g["training_wall_s"] == g["training_wall_s"] else "")))
    rows.append((f"evals to stderr {res['target_stderr']:g} on P({minor})", _fmt(r["energy_evals_to_target"]),
                 _fmt(g["energy_evals_to_target"])))
    rows.append((f"wall s to stderr {res['target_stderr']:g}", _fmt(r["wall_s_to_target"]),
                 _fmt(g["wall_s_to_target"])))
    w0 = max(len(x[0]) for x in rows)
    w1 = max(len(x[1]) for x in rows + [("", "replica exchange")])
    print(f"{res['system']} at {res['temperature_k']:g} K")
    print(f"  {'':<{w0}}  {'replica exchange':<{w1}}  generator")
    for a, b, c in rows:
        print(f"  {a:<{w0}}  {b:<{w1}}  {c}")
    print(f"  (replica errors: {r['population_error']}; generator errors: {g['population_error']})")
    from ..estimators.tails import slow_convergence_note

    for label, side in (("replica", r), ("generator", g)):
        if side.get("tail_warning"):
            print(f"warning: {label} {side['tail_warning']}")
        elif side.get("pareto_k") is not None and slow_convergence_note(side["pareto_k"]):
            print(f"note: {label} {slow_convergence_note(side['pareto_k'])}")


def run(args: argparse.Namespace) -> int:
    from ..core.sampleset import SampleSet
    from ..io import atomic_write_json, check_output_dir, run_kind, staged_files
    from .common import load_system

    system = load_system(args.system)
    gen = SampleSet.load(args.samples).check_finite(f"--samples '{args.samples}'")
    rp = Path(args.replica)
    if not rp.exists():
        raise InputError(f"--replica '{rp}' not found; run `boltzflow simulate SYSTEM -o {rp}` first")
    if rp.is_dir() and run_kind(rp) not in ("replica-exchange run", "native tempering run"):
        raise InputError(f"--replica '{rp}' is not a run directory of `boltzflow simulate`; give one, or a "
                         "SampleSet .npz of reference samples")
    out_dir = check_output_dir(args.output, "comparison", args.overwrite) if args.output else None
    if out_dir is None:
        res = compare(rp, gen, system, target_stderr=args.target_stderr, seed=args.seed)
    else:
        with staged_files(out_dir) as tmp:  # plots and compare.json land together, or not at all
            res = compare(rp, gen, system, target_stderr=args.target_stderr, seed=args.seed, plot_dir=tmp)
            res["plots"] = [str(out_dir / Path(p).name) for p in res.get("plots", [])]
            atomic_write_json(tmp / "compare.json", res)
    if args.json:
        print_json(res)
    else:
        print_table(res)
        if out_dir is not None:
            print(f"plots and compare.json in {out_dir}")
    return 0
