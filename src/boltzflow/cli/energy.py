"""``boltzflow energy``: energies (and per-term energies) of coordinate frames."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .common import add_verb, print_json

EXAMPLE = """\
  boltzflow prepare alanine-dipeptide -o adp
  python -c "import numpy as np; from boltzflow.systems import MolecularSystem as M; \\
             np.save('frames.npy', M.load('adp').positions[None])"
  boltzflow energy adp --coords frames.npy --terms --json

FRAMES.npy holds (n_frames, n_atoms, 3) or (n_atoms, 3) coordinates in nm in the atom order of
SYSTEM_DIR/topology.pdb (a .npz with a 'positions' array, e.g. a SampleSet, works too).
--json prints {"energy_kj_mol": [...], "reduced_energy": [...], "terms_kj_mol": {term: [...]}};
frames OpenMM cannot evaluate give null.
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


def run(args: argparse.Namespace) -> int:
    import torch

    from .common import load_system

    system = load_system(args.system)
    x = system.check_coordinates(read_frames(args.coords), what=f"frames in '{args.coords}'")
    energy = _make_energy(system, args.backend, args.platform)
    kt = system.kT
    u_all, valid_all, terms_all = [], [], {}
    try:
        with torch.no_grad():
            for s in range(0, len(x), CHUNK):
                xt = torch.from_numpy(x[s:s + CHUNK])
                res = energy.evaluate(xt)
                u_all.append(res.u.double().cpu().numpy())
                valid_all.append(res.valid.cpu().numpy())
                if args.terms:
                    for name, v in energy.terms(xt).items():
                        terms_all.setdefault(name, []).append(v.double().cpu().numpy())
    finally:
        if hasattr(energy, "close"):
            energy.close()
    u = np.concatenate(u_all) if u_all else np.zeros(0)
    valid = np.concatenate(valid_all) if valid_all else np.zeros(0, dtype=bool)

    def out(a):
        return [float(v) if ok and np.isfinite(v) else None for v, ok in zip(a, valid)]

    result = {
        "energy_kj_mol": out(u * kt),
        "reduced_energy": out(u),
        "terms_kj_mol": {k: out(np.concatenate(v) * kt) for k, v in terms_all.items()},
        "temperature_k": system.temperature,
        "backend": type(energy).__name__,
    }
    if args.json:
        print_json(result)
    else:
        names = list(result["terms_kj_mol"])
        print("frame  energy_kJ/mol  reduced_kT" + "".join(f"  {n:>12s}" for n in names))
        for i in range(len(u)):
            e, r = result["energy_kj_mol"][i], result["reduced_energy"][i]
            row = f"{i:5d}  {e if e is not None else float('nan'):13.4f}  {r if r is not None else float('nan'):10.4f}"
            row += "".join(f"  {result['terms_kj_mol'][n][i] or float('nan'):12.4f}" for n in names)
            print(row)
    return 0
