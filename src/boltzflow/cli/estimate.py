"""``boltzflow estimate`` (ESS, log Z, populations of a SampleSet) and ``boltzflow free-energy``
(EXP from one sample set, BAR from two, log Z difference of two generators)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_verb, print_json

EXAMPLE_ESTIMATE = """\
  boltzflow estimate runs/adp/samples/generated.npz --system alanine-dipeptide --population "phi>0"
  boltzflow estimate systems/alanine-dipeptide/reference_300K.npz --system alanine-dipeptide \\
      --population "phi>0" --population "phi<0 & psi>100" --json

Prints n, Kish ESS and log Z (weighted samples: log w = -u - log q), the populations of the
system's modes and of each --population expression (with standard errors and 95% bootstrap
intervals), and the conformational free energy of the minor mode, dF = -kT log(P_minor/P_rest).
Weighted samples also get the Pareto k of the weights' tail: above 0.7 the weights are heavy-tailed,
a warning says the error bars may be too small, and each stderr is the larger of the delta-method
and batch-means (10 chunks) errors.
Population grammar: 'phi>0', 'psi<-100', 'phi<0 & psi>100', 'mode=phi_positive',
'dihedral(4,6,8,14)>0', 'x[0]>0' (angles in degrees).
"""

EXAMPLE_FREE_ENERGY = """\
  # EXP: vacuum samples reweighted to implicit solvent (same coordinates, another System)
  boltzflow free-energy samples_vacuum.npz --system runs/adp-vac/system --to runs/adp-obc2/system
  # EXP: 300 K samples to 350 K (same System, another temperature)
  boltzflow free-energy reference_300K.npz --system alanine-dipeptide --to-temperature 350
  # BAR from samples of both states (+ EXP both ways, + log Z difference when both are weighted)
  boltzflow free-energy gen_vac.npz --system runs/adp-vac/system --to runs/adp-obc2/system \\
      --samples-b gen_obc2.npz --json

Reports the reduced free-energy difference f_B - f_A = -log(Z_B/Z_A) (kT; dimensionless when the
temperatures differ) and, at equal temperatures, dF in kJ/mol. Samples of A may be weighted
(generator samples with log weights towards A) or Boltzmann (MD / replica exchange).
"""



def _print_json(ests) -> int:
    """The estimates as JSON on stdout, their heavy-tail warnings on stderr (stdout stays JSON); exit code 0."""
    print_json([e.to_dict() for e in ests])
    sys.stdout.flush()
    for note in tail_warnings(ests):
        print(f"warning: {note}", file=sys.stderr)
    return 0

def register(sub) -> None:
    p = add_verb(sub, "estimate", "reweighted estimates from a SampleSet: ESS, log Z, populations, dF",
                 EXAMPLE_ESTIMATE, run_estimate)
    p.add_argument("samples", metavar="SAMPLES.npz", help="SampleSet file")
    p.add_argument("--system", help="system directory or built-in name (needed for phi/psi and modes)")
    p.add_argument("--population", action="append", default=[], metavar="EXPR",
                   help="region whose population to estimate (repeatable), e.g. 'phi>0'")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples (default 500)")
    p.add_argument("--json", action="store_true", help='print [{"name","value","stderr","ess"}, ...] '
                   '(weighted samples add "pareto_k", "reliable", "stderr_method")')

    q = add_verb(sub, "free-energy", "free-energy difference between two thermodynamic states (EXP / BAR)",
                 EXAMPLE_FREE_ENERGY, run_free_energy)
    q.add_argument("samples", metavar="SAMPLES_A.npz", help="samples of state A (weighted or Boltzmann)")
    q.add_argument("--system", required=True, help="system of state A (directory or built-in name)")
    q.add_argument("--to", dest="to_system", help="system of state B (default: the same System)")
    q.add_argument("--to-temperature", type=float, help="temperature of state B, K (default: A's)")
    q.add_argument("--samples-b", help="samples of state B: adds BAR, reverse EXP and the log Z difference")
    q.add_argument("--platform", default="CPU", help="OpenMM platform for energies (default CPU)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help='print [{"name","value","stderr","ess"}, ...]')


def _load_samples(path: str):
    from ..core.sampleset import SampleSet

    return SampleSet.load(path).check_finite(f"'{path}'")


def tail_warnings(estimates) -> list[str]:
    """The distinct one-line heavy-tail warnings of ``estimates`` (Estimates with Pareto k > 0.7), in order."""
    out: list[str] = []
    for e in estimates:
        if e.tail_note and e.tail_note not in out:
            out.append(e.tail_note)
    return out


def tail_notes(estimates) -> list[str]:
    """The distinct one-line notes of ``estimates`` whose weights have 0.5 < Pareto k <= 0.7, in order."""
    from ..estimators.tails import slow_convergence_note

    out: list[str] = []
    for e in estimates:
        note = slow_convergence_note(e.pareto_k)
        if note and note not in out:
            out.append(note)
    return out


def _k(e) -> str:
    k = e.pareto_k
    if k != k:
        return "-"
    return ("-inf" if k == float("-inf") else f"{k:.2f}") + ("" if e.reliable else "!")


def _table(estimates, title: str) -> None:
    print(title)
    w = max([len(e.name) for e in estimates] + [8])
    has_k = any(e.pareto_k == e.pareto_k for e in estimates)
    kh = f"  {'Pareto k':>8}" if has_k else ""
    print(f"  {'quantity':<{w}}  {'value':>11}  {'stderr':>9}  {'95% CI':>23}  {'ESS':>9}  {'n':>7}{kh}")
    for e in estimates:
        ci = f"[{e.ci_low:.4g}, {e.ci_high:.4g}]" if e.ci_low == e.ci_low else ""
        se = "?" if e.stderr == 0 else f"{e.stderr:.3g}" if e.stderr == e.stderr else "-"
        ess = f"{e.ess:.0f}" if e.ess == e.ess else "-"
        unit = f" {e.unit}" if e.unit in ("kT", "kJ/mol") else ""
        k = f"  {_k(e):>8}" if has_k else ""
        print(f"  {e.name:<{w}}  {e.value:>11.5g}  {se:>9}  {ci:>23}  {ess:>9}  {e.n:>7}{k}{unit}")
    if any(e.stderr == 0 for e in estimates):
        print("  ? = too few samples for an error bar (they all agree); draw more samples")
    if any(not e.reliable for e in estimates):
        print("  ! = Pareto k > 0.7: stderr is the larger of the delta-method and batch-means (10 chunks) errors, "
              "and may still be too small")
    for note in tail_warnings(estimates):
        print(f"warning: {note}")
    for note in tail_notes(estimates):
        print(f"note: {note}")


def estimate_samples(samples, system=None, populations: list[str] = (), seed: int = 0, n_bootstrap: int = 500) -> list:
    """The estimates printed by ``boltzflow estimate``, as a list of Estimates (computed by
    :func:`boltzflow.estimators.analysis.sample_estimates` and :func:`~boltzflow.estimators.analysis.region_population`)."""
    from dataclasses import replace

    from ..estimators import analysis, parse_region, to_kj_per_mol

    if system is not None and samples.positions.ndim == 3:
        system.check_coordinates(samples.positions[:1], "sample positions")
    topology = system.topology if system is not None else None
    modes = system.modes if system is not None else None
    res = analysis.sample_estimates(samples, modes, temperature_k=samples.temperature, seed=seed,
                                    n_bootstrap=n_bootstrap)
    mode_names = set(modes.names) | set(analysis.residue_region_names(modes)) if modes is not None else set()
    out = []
    for key, e in res.estimates.items():
        out.append(replace(e, name=f"P({key})") if key in mode_names else e)
        if e.unit == "kT" and samples.temperature:
            out.append(to_kj_per_mol(e, samples.temperature))
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    for expr in populations:
        region = parse_region(expr, topology=topology, modes=modes)
        out.append(analysis.region_population(samples, region.indicator(samples.positions), f"P({region.name})",
                                              seed=seed, n_bootstrap=n_bootstrap))
    return out


def run_estimate(args: argparse.Namespace) -> int:
    from .common import load_system

    if args.bootstrap < 0:
        from ..errors import InputError

        raise InputError(f"--bootstrap must be >= 0 (0: no bootstrap intervals), got {args.bootstrap}")
    samples = _load_samples(args.samples)
    system = load_system(args.system) if args.system else None
    ests = estimate_samples(samples, system, args.population, seed=args.seed, n_bootstrap=args.bootstrap)
    if args.json:
        return _print_json(ests)
    prov = samples.provenance or {}
    kind = "weighted (importance sampling)" if samples.weighted else "Boltzmann (unweighted)"
    print(f"{args.samples}: {len(samples)} samples, {kind}, T = {samples.temperature} K, sampler "
          f"{prov.get('sampler', 'unknown')}")
    if "statistical_inefficiency" in prov:
        how = "decorrelated with" if prov.get("decorrelated", True) else "time-ordered frames (block errors);"
        print(f"  {how} statistical inefficiency g = {prov['statistical_inefficiency']:.2f} iterations")
    if not ests:
        print("nothing to estimate: give --system (modes) or --population EXPR")
        return 0
    _table(ests, "estimates:")
    return 0


def free_energy_estimates(samples_a, system_a, system_b, temperature_b: float, samples_b=None,
                          platform: str = "CPU", seed: int = 0) -> list:
    """EXP (A -> B) and, with ``samples_b``, EXP (B -> A), BAR and the log Z difference; list of Estimates."""
    import numpy as np

    from ..errors import InputError
    from ..estimators import bar_free_energy, exp_free_energy, log_z_difference, to_kj_per_mol
    from ..replica.energies import reduced_energies

    ta = float(samples_a.temperature or system_a.temperature)
    if samples_a.positions.ndim != 3:
        raise InputError("free-energy needs molecular samples (n, n_atoms, 3)")
    if system_b.n_atoms != system_a.n_atoms:
        raise InputError(f"states must share coordinates: A has {system_a.n_atoms} atoms, B {system_b.n_atoms}")

    def energies(ss, ta_, tb_):
        ok = np.isfinite(ss.reduced_energy) if ss.reduced_energy is not None else np.ones(len(ss), bool)
        ua = reduced_energies(system_a, ss.positions, ta_, platform)
        ub = reduced_energies(system_b, ss.positions, tb_, platform)
        ok &= np.isfinite(ua) & np.isfinite(ub)
        if not ok.any():
            raise InputError("no sample has finite energies in both states")
        return ua, ub, ok

    out = []
    ua, ub, ok = energies(samples_a, ta, temperature_b)
    lwa = samples_a.log_weights[ok] if samples_a.log_weights is not None else None
    fwd = exp_free_energy((ub - ua)[ok], lwa, name="dF_EXP(A->B)", seed=seed)
    out.append(fwd)
    if samples_b is not None:
        tb_s = float(samples_b.temperature or temperature_b)
        if abs(tb_s - temperature_b) > 1e-6:
            raise InputError(f"samples B are at {tb_s} K but state B is at {temperature_b} K; pass --to-temperature {tb_s:g}")
        ua2, ub2, ok2 = energies(samples_b, ta, temperature_b)
        lwb = samples_b.log_weights[ok2] if samples_b.log_weights is not None else None
        rev = exp_free_energy((ua2 - ub2)[ok2], lwb, name="dF_EXP(B->A)", seed=seed)
        from dataclasses import replace

        out.append(replace(rev, name="-dF_EXP(B->A)", value=-rev.value, ci_low=-rev.ci_high, ci_high=-rev.ci_low))
        out.append(bar_free_energy((ub - ua)[ok], (ua2 - ub2)[ok2], lwa, lwb, name="dF_BAR", seed=seed))
        if lwa is not None and lwb is not None:
            # generators' log weights: log w_A = -u_A - log q_A -> log Z_A; f_B - f_A = -(log Z_B - log Z_A)
            d = log_z_difference(lwa, lwb, seed=seed)
            out.append(replace(d, name="dF_logZ", value=-d.value, ci_low=-d.ci_high, ci_high=-d.ci_low, unit="kT"))
    if abs(ta - temperature_b) < 1e-9:
        out += [to_kj_per_mol(e, ta) for e in list(out) if e.unit == "kT"]
    return out


def run_free_energy(args: argparse.Namespace) -> int:
    from .common import check_temperature, load_system

    sa = _load_samples(args.samples)
    system_a = load_system(args.system)
    system_b = load_system(args.to_system) if args.to_system else system_a
    tb = (check_temperature(args.to_temperature, "--to-temperature") if args.to_temperature is not None
          else float(sa.temperature or system_a.temperature))
    if args.to_system is None and args.to_temperature is None:
        from ..errors import InputError

        raise InputError("state B equals state A; give --to SYSTEM_B and/or --to-temperature K")
    sb = _load_samples(args.samples_b) if args.samples_b else None
    ests = free_energy_estimates(sa, system_a, system_b, tb, sb, platform=args.platform, seed=args.seed)
    if args.json:
        return _print_json(ests)
    _table(ests, f"f_B - f_A (A: {Path(args.samples).name} at {sa.temperature or system_a.temperature} K; "
                 f"B: {system_b.name} at {tb:g} K):")
    return 0
