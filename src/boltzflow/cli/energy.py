"""``boltzflow energy``: energies (and per-term energies) of coordinate frames."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .common import add_overwrite, add_verb

EXAMPLE = """\
  boltzflow prepare alanine-dipeptide -o adp
  python -c "import numpy as np; from boltzflow.systems import MolecularSystem as M; \\
             np.save('frames.npy', M.load('adp').positions[None])"
  boltzflow energy adp --coords frames.npy --terms --json
  boltzflow energy adp --coords many_frames.npy -o energies.npz --terms   # arrays, fastest for many frames

FRAMES.npy holds (n_frames, n_atoms, 3) or (n_atoms, 3) coordinates in nm in the atom order of
SYSTEM_DIR/topology.pdb (a .npz with a 'positions' array, e.g. a SampleSet, works too).
--json prints {"energy_kj_mol": [...], "reduced_energy": [...], "terms_kj_mol": {term: [...]}};
frames OpenMM cannot evaluate give null.
-o ENERGIES.npy writes the energies in kJ/mol, (n_frames,) float64, NaN for frames that cannot be
evaluated; -o ENERGIES.npz writes energy_kj_mol, reduced_energy, valid, temperature_k and, with
--terms, term_<name>_kj_mol arrays. An existing file is replaced only with --overwrite.
"""

CHUNK = 1024


def register(sub) -> None:
    p = add_verb(sub, "energy", "evaluate CHARMM energies (kJ/mol and kT) of coordinate frames", EXAMPLE, run)
    p.add_argument("system", metavar="SYSTEM_DIR", help="system directory (boltzflow prepare) or built-in name")
    p.add_argument("--coords", required=True, metavar="FRAMES.npy", help="(n, n_atoms, 3) coordinates in nm")
    p.add_argument("--backend", choices=("auto", "native", "openmm"), default="auto",
                   help="energy backend (default auto: native torch if it supports the System, else OpenMM)")
    p.add_argument("--platform", default="CPU", help="OpenMM platform for --backend openmm (CPU, Reference, CUDA, OpenCL)")
    p.add_argument("--terms", action="store_true", help="also report per-term energies")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-o", "--output", metavar="ENERGIES.npy|.npz", help="write the energies as numpy arrays")
    add_overwrite(p, "ENERGIES")


def read_frames(path: str | Path) -> np.ndarray:
    """Frames from .npy (or .npz with 'positions'), float64; InputError when missing/unreadable/non-finite."""
    from ..errors import InputError
    from ..io import numpy_file_kind

    p = Path(path)
    if not p.is_file():
        raise InputError(f"coordinate file '{p}' not found")
    if numpy_file_kind(p) is None:
        raise InputError(f"could not read '{p}': not a numpy .npy/.npz file; save the coordinates with numpy.save")
    try:
        if numpy_file_kind(p) == "npz":
            with np.load(p, allow_pickle=False) as z:
                if "positions" not in z:
                    raise InputError(f"'{p}' has no 'positions' array (keys: {', '.join(z.files)})")
                x = np.asarray(z["positions"])
        else:
            x = np.load(p, allow_pickle=False)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"could not read '{p}' as a numpy .npy/.npz array: {type(e).__name__}: {e}") from e
    dtype = np.asarray(x).dtype
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"'{p}' must hold real numbers (coordinates in nm), got dtype {dtype}")
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise InputError(f"'{p}' holds no coordinates (shape {x.shape}); give at least one frame")
    bad = ~np.isfinite(x).reshape(len(x) if x.ndim == 3 else 1, -1).all(axis=1)
    if bad.any():
        raise InputError(f"'{p}' has NaN/inf coordinates (frame {int(np.flatnonzero(bad)[0])}); "
                         "remove or fix those frames")
    return x


def _make_energy(system, backend: str, platform: str):
    from ..energy import Energy

    if backend == "openmm":
        return Energy(system, backend="openmm", platform=platform)
    try:
        return Energy(system, backend=backend)
    except ImportError:
        if backend == "native":
            raise
        return Energy(system, backend="openmm", platform=platform)


def evaluate_frames(energy, x: np.ndarray, terms: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(u (n,) kT, valid (n,) bool, {term: (n,) kT}) of frames ``x`` (n, n_atoms, 3) nm, evaluated in
    chunks of CHUNK frames straight into preallocated float64 arrays."""
    import torch

    n = len(x)
    u, valid, per_term = np.empty(n), np.empty(n, dtype=bool), {}
    with torch.no_grad():
        for s in range(0, n, CHUNK):
            xt = torch.from_numpy(x[s:s + CHUNK])
            e = s + len(xt)
            res = energy.evaluate(xt)
            u[s:e] = res.u.cpu().numpy()
            valid[s:e] = res.valid.cpu().numpy()
            if terms:
                for name, v in energy.terms(xt).items():
                    per_term.setdefault(name, np.empty(n))[s:e] = v.cpu().numpy()
    return u, valid, per_term


def _masked(a: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``a`` with NaN where the frame is invalid or the value non-finite."""
    return np.where(valid & np.isfinite(a), a, np.nan)


def _json_list(a: np.ndarray) -> str:
    """JSON array of ``a`` with null for NaN (C encoder on a list: no per-value Python work but the few nulls)."""
    import json

    vals = a.tolist()
    for i in np.flatnonzero(np.isnan(a)).tolist():
        vals[i] = None
    return json.dumps(vals)


def energies_json(e_kj: np.ndarray, u: np.ndarray, terms_kj: dict, temperature_k: float, backend: str) -> str:
    """The --json document; each array on one line."""
    import json

    terms = ", ".join(f"{json.dumps(k)}: {_json_list(v)}" for k, v in terms_kj.items())
    return (f'{{\n  "energy_kj_mol": {_json_list(e_kj)},\n  "reduced_energy": {_json_list(u)},\n'
            f'  "terms_kj_mol": {{{terms}}},\n  "temperature_k": {json.dumps(temperature_k)},\n'
            f'  "backend": {json.dumps(backend)}\n}}\n')


def energies_table(e_kj: np.ndarray, u: np.ndarray, terms_kj: dict) -> str:
    """The text table: frame, kJ/mol, kT and one column per term (nan where invalid)."""
    names = list(terms_kj)
    head = "frame  energy_kJ/mol  reduced_kT" + "".join(f"  {n:>12s}" for n in names)
    fmt = "%5d  %13.4f  %10.4f" + "  %12.4f" * len(names)
    cols = [range(len(u)), e_kj.tolist(), u.tolist()] + [terms_kj[n].tolist() for n in names]
    return head + "\n" + "\n".join(map(fmt.__mod__, zip(*cols))) + ("\n" if len(u) else "")


def save_energies(path: Path, e_kj: np.ndarray, u: np.ndarray, valid: np.ndarray, terms_kj: dict,
                  temperature_k: float) -> Path:
    """ENERGIES.npy (kJ/mol) or ENERGIES.npz (all arrays), written atomically."""
    from ..io import atomic_write

    if path.suffix == ".npy":
        return atomic_write(path, lambda fh: np.save(fh, e_kj))
    arrays = {"energy_kj_mol": e_kj, "reduced_energy": u, "valid": valid, "temperature_k": np.float64(temperature_k)}
    arrays.update({f"term_{k}_kj_mol": v for k, v in terms_kj.items()})
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _output_path(args: argparse.Namespace) -> Path | None:
    """-o as a Path (checked before any work), or None."""
    from ..errors import InputError
    from ..io import check_output_file

    if not args.output:
        return None
    p = Path(args.output)
    if p.suffix not in (".npy", ".npz"):
        raise InputError(f"-o '{p}' must end in .npy (energies in kJ/mol) or .npz (all arrays)")
    return check_output_file(p, args.overwrite)


def run(args: argparse.Namespace) -> int:
    import sys

    from .common import load_system

    out_path = _output_path(args)
    system = load_system(args.system)
    x = system.check_coordinates(read_frames(args.coords), what=f"frames in '{args.coords}'")
    energy = _make_energy(system, args.backend, args.platform)
    try:
        u, valid, per_term = evaluate_frames(energy, x, args.terms)
    finally:
        if hasattr(energy, "close"):
            energy.close()
    kt = system.kT
    u_out = _masked(u, valid)
    e_kj = u_out * kt
    terms_kj = {k: _masked(v, valid) * kt for k, v in per_term.items()}
    if out_path is not None:
        save_energies(out_path, e_kj, u_out, valid, terms_kj, system.temperature)
    if args.json:
        sys.stdout.write(energies_json(e_kj, u_out, terms_kj, system.temperature, type(energy).__name__))
    elif out_path is not None:
        print(f"wrote {len(u)} energies ({int((~np.isfinite(u_out)).sum())} invalid) to {out_path}")
    else:
        sys.stdout.write(energies_table(e_kj, u_out, terms_kj))
    return 0
