"""SampleSet: the one container every sampler produces and every estimator consumes.

Flow samples, MD / replica-exchange samples and reference data all travel as SampleSets, saved
as ``.npz`` and exportable to DCD/PDB through mdtraj.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import atomic_write, numpy_file_kind

FORMAT = "boltzflow-sampleset/1"

#: version of the provenance record, written into every new file as meta "provenance_version".
#: 2: one spelling per key (below); files without a version are 1 and have their keys mapped on load.
PROVENANCE_VERSION = 2

#: the provenance keys every sampler spells the same way (others are free-form)
PROVENANCE_KEYS = {
    "sampler": "what drew the samples (replica-exchange, flow:<pipeline>, reference, ...)",
    "energy_evals": "single-configuration energy evaluations spent drawing these samples",
    "wall_s": "wall time spent drawing these samples, s",
    "training_energy_evals": "energy evaluations spent training the sampler (generators)",
    "training_wall_s": "wall time spent training the sampler, s",
}

#: older spellings (provenance version 1) -> the key of version 2
PROVENANCE_ALIASES = {
    "energy_evaluations": "energy_evals",
    "sampling_energy_evaluations": "energy_evals",
    "wall_time_s": "wall_s",
    "sampling_wall_time_s": "wall_s",
    "training_energy_evaluations": "training_energy_evals",
    "train_energy_evals": "training_energy_evals",
    "training_wall_time_s": "training_wall_s",
    "train_wall_s": "training_wall_s",
}


def upgrade_provenance(provenance: dict, version: int) -> dict:
    """A provenance record of ``version`` in the current spelling: old keys renamed (a key already
    in the new spelling wins over its alias)."""
    if version >= PROVENANCE_VERSION:
        return dict(provenance)
    out = {k: v for k, v in provenance.items() if k not in PROVENANCE_ALIASES}
    for old, new in PROVENANCE_ALIASES.items():
        if old in provenance and new not in out:
            out[new] = provenance[old]
    return out


@dataclass(frozen=True, eq=False)
class SampleSet:
    """Samples of one thermodynamic state.

    positions: (n, n_atoms, 3) nm (molecules) or (n, dim) (toy targets), float32/float64.
    reduced_energy: (n,) u(x) in kT at ``temperature`` (+inf where the energy was invalid), or None.
    log_q: (n,) log density of the sampler at the samples (flows) or None (MD / replica exchange).
    log_weights: (n,) log importance weights towards the Boltzmann distribution, or None
        (unweighted, i.e. already Boltzmann-distributed). For flows: -u - log_q.
    temperature: K (None for toy targets in reduced units).
    provenance: dict (sampler, cost, run directory, system fingerprint, command...); the keys in
        :data:`PROVENANCE_KEYS` have one spelling across samplers, versioned by :data:`PROVENANCE_VERSION`.
    """

    positions: np.ndarray
    reduced_energy: np.ndarray | None = None
    log_q: np.ndarray | None = None
    log_weights: np.ndarray | None = None
    temperature: float | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        pos = np.asarray(self.positions)
        if pos.ndim not in (2, 3):
            raise InputError(f"SampleSet positions must be (n, n_atoms, 3) or (n, dim), got shape {pos.shape}")
        if not np.issubdtype(pos.dtype, np.floating) and not np.issubdtype(pos.dtype, np.integer):
            raise InputError(f"SampleSet positions must be real numbers (nm), got dtype {pos.dtype}")
        object.__setattr__(self, "positions", pos)
        n = pos.shape[0]
        for name in ("reduced_energy", "log_q", "log_weights"):
            v = getattr(self, name)
            if v is not None:
                try:
                    v = np.asarray(v, dtype=np.float64).reshape(-1)
                except (TypeError, ValueError) as e:
                    raise InputError(f"SampleSet {name} must be real numbers, got {np.asarray(v).dtype}") from e
                if v.shape != (n,):
                    raise InputError(f"SampleSet {name} must have shape ({n},), got {v.shape}")
                object.__setattr__(self, name, v)

    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def weighted(self) -> bool:
        return self.log_weights is not None

    def normalized_weights(self) -> np.ndarray:
        """(n,) self-normalised importance weights (uniform when unweighted); -inf log weights -> 0."""
        if self.log_weights is None:
            return np.full(len(self), 1.0 / max(len(self), 1))
        lw = np.where(np.isfinite(self.log_weights), self.log_weights, -np.inf)
        if not np.any(np.isfinite(lw)):
            return np.zeros(len(self))
        w = np.exp(lw - np.max(lw))
        return w / w.sum()

    def check_finite(self, what: str = "samples") -> "SampleSet":
        """``self``, or InputError when a frame that carries weight (all frames of an unweighted set;
        frames with a finite log weight otherwise) has NaN/inf positions."""
        n = len(self)
        bad = ~np.isfinite(self.positions.reshape(n, -1)).all(axis=1) if n else np.zeros(0, dtype=bool)
        if self.log_weights is not None:
            bad &= np.isfinite(self.log_weights)
        if bad.any():
            raise InputError(f"{what}: {int(bad.sum())} of {n} frames have NaN/inf positions (first: frame "
                             f"{int(np.flatnonzero(bad)[0])}); remove them (SampleSet.subset) and try again")
        return self

    def subset(self, idx) -> "SampleSet":
        def take(a):
            return None if a is None else a[idx]

        return replace(self, positions=self.positions[idx], reduced_energy=take(self.reduced_energy),
                       log_q=take(self.log_q), log_weights=take(self.log_weights))

    @staticmethod
    def concatenate(sets: list["SampleSet"]) -> "SampleSet":
        if not sets:
            raise InputError("cannot concatenate an empty list of SampleSets")

        def cat(name):
            vals = [getattr(s, name) for s in sets]
            return None if any(v is None for v in vals) else np.concatenate(vals)

        return SampleSet(np.concatenate([s.positions for s in sets]), cat("reduced_energy"), cat("log_q"),
                         cat("log_weights"), sets[0].temperature, dict(sets[0].provenance))

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` atomically."""
        arrays: dict[str, Any] = {"positions": self.positions}
        for name in ("reduced_energy", "log_q", "log_weights"):
            v = getattr(self, name)
            if v is not None:
                arrays[name] = v
        meta = {"format": FORMAT, "temperature": self.temperature, "provenance_version": PROVENANCE_VERSION,
                "provenance": self.provenance}
        arrays["meta_json"] = np.array(json.dumps(meta, default=str))
        return atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "SampleSet":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"sample file '{p}' not found")
        if numpy_file_kind(p) != "npz":
            raise InputError(f"'{p}' is not a readable .npz SampleSet (not an .npz file at all); SampleSets are "
                             "written by boltzflow: SampleSet.save, `boltzflow sample`, `boltzflow simulate`")
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # np.load raises many types on corrupt files
            raise InputError(f"'{p}' is not a readable .npz SampleSet ({e})") from e
        if "positions" not in data:
            raise InputError(f"'{p}' has no 'positions' array; it is not a boltzflow SampleSet")
        try:
            meta = json.loads(str(data.pop("meta_json"))) if "meta_json" in data else {}
        except json.JSONDecodeError as e:
            raise InputError(f"'{p}' has a damaged 'meta_json' record ({e}); it was not written by boltzflow") from e
        provenance = upgrade_provenance(meta.get("provenance", {}), int(meta.get("provenance_version", 1)))
        return cls(
            positions=data["positions"],
            reduced_energy=data.get("reduced_energy"),
            log_q=data.get("log_q"),
            log_weights=data.get("log_weights"),
            temperature=meta.get("temperature"),
            provenance=provenance,
        )

    def to_mdtraj(self, topology):
        """mdtraj.Trajectory of the positions; ``topology`` is an OpenMM or mdtraj Topology."""
        import mdtraj

        if self.positions.ndim != 3:
            raise InputError("only molecular SampleSets (n, n_atoms, 3) can be exported as trajectories")
        top = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
        return mdtraj.Trajectory(self.positions.astype(np.float32), top)

    def export(self, path: str | Path, topology) -> Path:
        """Write positions as DCD or PDB (by suffix) through mdtraj."""
        p = check_export_path(path)
        traj = self.to_mdtraj(topology)
        p.parent.mkdir(parents=True, exist_ok=True)
        traj.save(str(p))
        return p


#: trajectory formats :meth:`SampleSet.export` writes (by suffix)
EXPORT_SUFFIXES = (".dcd", ".pdb", ".xtc", ".h5")


def check_export_path(path: str | Path) -> Path:
    """``path`` as a Path if its suffix is a trajectory format SampleSet.export writes, else InputError."""
    p = Path(path)
    if p.suffix.lower() not in EXPORT_SUFFIXES:
        raise InputError(f"unsupported trajectory format '{p.suffix or p.name}'; use "
                         f"{', '.join(EXPORT_SUFFIXES[:-1])} or {EXPORT_SUFFIXES[-1]}")
    return p
