"""``build_report(run_dir)``: PNG figures plus one self-contained HTML page for a run directory.

Reads what training and sampling wrote (see :mod:`boltzflow.core.rundir`): the system,
``samples/generated.npz`` (flow samples with log q, u and log weights), ``samples/reference.npz``
(reference data, with the generator's log q on it when available), ``metrics.jsonl`` and
``summary.json``. Optional: a replica-exchange run directory for the comparison table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.geometry import dihedral_of as dihedral
from ..core.protocols import is_molecular
from ..core.rundir import RunDir
from ..errors import InputError
from ..estimators.analysis import mode_fractions, sample_ess
from ..io import atomic_write_text, staged_files
from ..sampling import SampleSet
from ..systems import MolecularSystem
from ..systems.torsions import named_torsions
from . import html as H
from . import plots


def build_report(run_dir: str | Path, replica_dir: str | Path | None = None) -> Path:
    """Render plots into ``RUN_DIR/plots`` and write ``RUN_DIR/report.html``; returns its path."""
    rd = RunDir(run_dir, create=False)
    gen_path = rd.path / "samples" / "generated.npz"
    if not gen_path.is_file() and not rd.metrics_path.is_file():
        raise InputError(f"'{rd.path}' has neither samples/generated.npz nor metrics.jsonl; run `boltzflow train` "
                         "and `boltzflow sample` first")
    system = MolecularSystem.load(rd.system_dir) if (rd.system_dir / "metadata.json").is_file() else None
    gen = SampleSet.load(gen_path) if gen_path.is_file() else None
    ref_path = rd.path / "samples" / "reference.npz"
    ref = SampleSet.load(ref_path) if ref_path.is_file() else None
    try:
        summary = rd.read_summary()
    except json.JSONDecodeError as e:
        raise InputError(f"'{rd.summary_path}' is damaged ({e}); remove it (the run's files are intact) and run "
                         "`boltzflow sample` again to rewrite it") from e
    rows = [r for r in rd.read_metrics() if isinstance(r, dict)]  # a damaged line is skipped like a cut one
    comp = summary.get("comparison")
    if replica_dir is not None:  # before anything is written: a bad --replica leaves the report as it was
        comp = _compare_with_replica(system, gen, replica_dir)
    with staged_files(rd.path / "plots") as figs:  # failing part-way leaves the old plots and page as they were
        html_text = _render(rd, system, gen, ref, summary, rows, comp, figs)
    atomic_write_text(rd.path / "report.html", html_text)
    if replica_dir is not None:
        rd.update_summary(comparison=comp)
    return rd.path / "report.html"


def _render(rd, system, gen, ref, summary: dict, rows: list, comp, figs: Path) -> str:
    """The report page (figures rendered into ``figs``)."""
    sections: list[tuple[str, str]] = []

    # headline numbers
    est = summary.get("estimates", {})
    if est:
        sections.append(("Reweighted estimates", H.table([{"quantity": k, **_flat(v)} for k, v in est.items()])))
    info = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    if info:
        sections.append(("Run summary", H.table([{"key": k, "value": v} for k, v in info.items()])))

    # torsions
    if system is not None and gen is not None and gen.positions.ndim == 3:
        sections.append(("Conformations", _torsion_section(system, gen, ref, figs)))

    # energies
    if gen is not None and gen.reduced_energy is not None:
        p = plots.energy_histograms(
            gen.reduced_energy, ref.reduced_energy if ref is not None else None,
            -ref.log_q if ref is not None and ref.log_q is not None else None,
            -gen.log_q if gen.log_q is not None else None, figs / "energies.png")
        sections.append(("Energies", H.figure(p, "u_B of generated vs reference samples (left); u_G = -log q of "
                                                  "reference vs generated samples (right), felardos2023 fig. 3 style")))

    # training
    if rows:
        modes = system.modes if system is not None else None
        names = list(modes.names) if modes is not None else []
        exact = summary.get("reference_mode_fractions")
        p = plots.training_curves(rows, figs / "training.png", names, exact)
        sections.append(("Training", H.figure(p, "loss, ESS and mode fractions over training")))

    # comparison
    if comp:
        sections.append(("Flow vs replica exchange", H.table(comp if isinstance(comp, list) else [comp])))

    title = f"boltzflow report: {system.name if system is not None else rd.path.name}"
    return H.page(title, sections)


def _flat(v: Any) -> dict:
    if isinstance(v, dict):
        return {k: v.get(k) for k in ("value", "stderr", "ess", "ci_low", "ci_high", "n") if k in v}
    return {"value": v}


def _torsion_section(system, gen, ref, figs: Path) -> str:
    tors = named_torsions(system.topology)
    parts = []
    w = gen.normalized_weights() if gen.log_weights is not None else None
    if "phi" in tors and "psi" in tors:
        panels = []
        if ref is not None:
            panels.append(("reference", dihedral(ref.positions, tors["phi"]), dihedral(ref.positions, tors["psi"]), None))
        gphi, gpsi = dihedral(gen.positions, tors["phi"]), dihedral(gen.positions, tors["psi"])
        panels.append(("generated", gphi, gpsi, None))
        if w is not None:
            panels.append(("reweighted", gphi, gpsi, w))
        p = plots.ramachandran(panels, figs / "ramachandran.png")
        parts.append(H.figure(p, "Ramachandran free-energy surfaces: reference vs generated vs reweighted"))
    elif is_molecular(system.modes):
        atoms = system.modes.atoms
        sets = []
        if ref is not None:
            sets.append(("reference", dihedral(ref.positions, atoms), None))
        ang = dihedral(gen.positions, atoms)
        sets.append(("generated", ang, None))
        if w is not None:
            sets.append(("reweighted", ang, w))
        p = plots.torsion_histogram(sets, figs / "torsion.png", name="dihedral " + "-".join(map(str, atoms)))
        parts.append(H.figure(p, "torsion histogram: reference vs generated vs reweighted"))
    if system.modes is not None:
        rows = []
        for label, ss, lw in (("reference", ref, None), ("generated", gen, None), ("reweighted", gen, gen.log_weights)):
            if ss is None or (label == "reweighted" and lw is None):
                continue
            rows.append({"samples": label, **mode_fractions(system.modes, ss.positions, lw)})
        parts.append(H.table(rows))
    return "\n".join(parts)


def _compare_with_replica(system, gen, replica_dir) -> list[dict]:
    """Rows of the report's comparison table: n, Kish ESS and mode fractions of the replica-exchange
    samples and the reweighted generator (:mod:`boltzflow.estimators.analysis`)."""
    rp = Path(replica_dir)
    path = rp / "samples.npz" if rp.is_dir() else rp
    rep = SampleSet.load(path)
    if system is None or system.modes is None:
        raise InputError("a comparison needs a system with modes (alanine-dipeptide, butane, or a prepared system)")
    system.check_coordinates(rep.positions[:1], f"--replica samples '{path}'")
    rows = []
    for label, ss in (("replica exchange", rep), ("flow (reweighted)", gen)):
        if ss is None:
            continue
        rows.append({"sampler": label, "n": len(ss), "ess": sample_ess(ss),
                     **mode_fractions(system.modes, ss.positions, ss.log_weights)})
    return rows
