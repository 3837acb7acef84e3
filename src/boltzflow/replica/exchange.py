"""Replica exchange / parallel tempering for a MolecularSystem through openmmtools.multistate.

One run directory holds::

    OUT_DIR/replica.nc             analysis storage (energies, states, positions of every replica
                                   at every iteration; MultiStateReporter NetCDF)
    OUT_DIR/replica_checkpoint.nc  checkpoint storage (positions + velocities every
                                   ``checkpoint_interval`` iterations: what a resume restarts from)
    OUT_DIR/replica.nc.snapshot, OUT_DIR/replica_checkpoint.nc.snapshot
                                   copies of both storage files taken at a checkpoint iteration
                                   (atomically: temp file + fsync + rename); a resume falls back to
                                   them when the storage is damaged
    OUT_DIR/replica_config.json    the ReplicaExchangeConfig and the system fingerprint (plus
                                   ``restored_from_snapshot`` entries when a resume used the snapshots)
    OUT_DIR/replica_cost.json      wall time spent sampling (accumulated over resumes), the iteration
                                   it was written at, and ``snapshot_iteration`` /
                                   ``snapshot_wall_time_s`` of the current snapshots
    OUT_DIR/.<file>.<random>.partial  leftover of a copy killed midway; deleted by the next run

Resuming after a kill restarts from the last checkpoint iteration (iterations after it are
recomputed). HDF5 files are not crash-safe: a kill during a write can leave ``replica.nc`` damaged
in ways openmmtools' resume does not notice (a chunk it later overwrites, or one it never reads
until the analysis fails with "NetCDF: HDF error"). So a resume never continues in a killed file
when it need not:

* snapshots of the storage's last checkpoint iteration (the usual case) are copied over the
  storage and the run continues from them; nothing is lost, openmmtools would restart there too;
* otherwise (no snapshots, or older ones) every variable of both storage files is read first
  (:func:`boltzflow.replica.storage.check_storage`); an intact storage is continued as it is, a
  damaged one is replaced by the older snapshots with a
  :class:`~boltzflow.replica.storage.StorageRestoredWarning` naming the damaged file and the
  iteration the run goes back to, or, without usable snapshots, the resume stops with a
  :class:`~boltzflow.replica.storage.StorageCorruptError` (an InputError) that says what to do.

Snapshots are taken at every checkpoint iteration while the storage is small; for storage larger
than ``SNAPSHOT_BYTES_PER_CHECKPOINT`` only every ``ceil(size / SNAPSHOT_BYTES_PER_CHECKPOINT)``-th
checkpoint is copied, which bounds the copying to about that many bytes per checkpoint interval.

MPI: launched as ``mpirun -n K boltzflow simulate ...`` with mpi4py installed (``pip install -e .[mpi]``
brings mpi4py and an MPICH with ``mpiexec`` into the environment), openmmtools (through mpiplus)
distributes the replicas over the K ranks by itself (one or more replicas per rank; K must not exceed
the number of replicas) and writes its storage from rank 0; boltzflow keeps its own file writing
(config and cost records, snapshots, restores, samples.npz) on rank 0 as well, and rank 0 decides
whether a run exists before any rank looks. Without mpi4py the run is serial. GPUs: give each rank
its own device, e.g. ``mpirun -n 4 bash -c 'CUDA_VISIBLE_DEVICES=$MPI_LOCALRANKID boltzflow simulate
... --platform CUDA'`` (MPICH; Open MPI: ``$OMPI_COMM_WORLD_LOCAL_RANK``), see docs/scaling.md.

Not bitwise reproducible: openmmtools draws Langevin noise and swap decisions from unseeded
generators.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from ..io import atomic_write_json
from ..systems.molecular import prune_unused_cmap_maps  # re-exported by boltzflow.replica
from . import storage as _storage
from .energies import openmm_platform as _platform
from .energies import reduced_energies

METHODS = ("parallel-tempering", "replica-exchange")
STORAGE_NAME = "replica.nc"
CONFIG_NAME = "replica_config.json"
COST_NAME = "replica_cost.json"  # accumulated wall time of the sampling (survives resumes)
SNAPSHOT_BYTES_PER_CHECKPOINT = 64 << 20  # larger storage is snapshotted at every ceil(size / this)-th checkpoint


@dataclass(frozen=True)
class ReplicaExchangeConfig:
    """Settings of a replica-exchange run.

    method: "parallel-tempering" (ParallelTemperingSampler, one System at many T; energies at all
        temperatures from one evaluation) or "replica-exchange" (ReplicaExchangeSampler over explicit
        ThermodynamicStates at the same ladder).
    t_min, t_max: K; the ladder is geometric with ``n_replicas`` rungs, state 0 = t_min (the target).
    n_iterations: total iterations (a resume extends a finished run up to this number).
    steps_per_iteration: Langevin steps between exchange attempts.
    timestep_fs: fs (systems are unconstrained: keep <= 1 fs for hydrogens).
    collision_rate_per_ps: Langevin friction in 1/ps. Velocities are redrawn at the replica's current
        temperature at the start of every iteration (kept velocities would carry a swapped
        configuration's hotter temperature down the ladder).
    platform: OpenMM platform name ("CPU", "CUDA", "OpenCL", "Reference") or "auto".
    threads: CPU platform threads (None = OpenMM default).
    checkpoint_interval: iterations between checkpoints (positions + velocities for resuming).
    online_analysis: run openmmtools' online MBAR (off: it is slow and we analyse afterwards).
    minimize: minimise the starting structure before the first iteration.
    """

    method: str = "parallel-tempering"
    t_min: float = 300.0
    t_max: float = 700.0
    n_replicas: int = 8
    n_iterations: int = 1000
    steps_per_iteration: int = 500
    timestep_fs: float = 1.0
    collision_rate_per_ps: float = 1.0
    platform: str = "CPU"
    threads: int | None = 1
    checkpoint_interval: int = 10
    online_analysis: bool = False
    minimize: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (0 < self.t_min <= self.t_max):
            raise ConfigError(f"need 0 < t_min <= t_max (K), got t_min={self.t_min}, t_max={self.t_max}")
        if self.n_replicas < 1 or (self.n_replicas == 1 and self.t_max != self.t_min):
            raise ConfigError(f"n_replicas must be >= 2 for a temperature ladder, got {self.n_replicas}")
        for name in ("n_iterations", "steps_per_iteration", "checkpoint_interval"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.timestep_fs > 0 or not self.collision_rate_per_ps > 0:
            raise ConfigError("timestep_fs and collision_rate_per_ps must be > 0")

    def temperatures(self) -> np.ndarray:
        """(n_replicas,) K, geometric ladder from t_min to t_max."""
        if self.n_replicas == 1:
            return np.array([float(self.t_min)])
        return np.geomspace(self.t_min, self.t_max, self.n_replicas)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def storage_path(out_dir: str | Path) -> Path:
    """The analysis NetCDF of a run directory (accepts the directory or the file itself)."""
    p = Path(out_dir)
    return p if p.suffix == ".nc" else p / STORAGE_NAME


def _quiet_openmmtools() -> None:
    # openmmtools warns "multistate API is experimental" on every reporter; pymbar warns about JAX.
    for name in ("openmmtools.multistate", "openmmtools.multistate.multistatereporter", "pymbar.mbar_solvers",
                 "pymbar.timeseries", "openmmtools.utils", "mpiplus"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _make_sampler(config: ReplicaExchangeConfig):
    from openmm import unit
    from openmmtools import mcmc, multistate

    move = mcmc.LangevinDynamicsMove(
        timestep=config.timestep_fs * unit.femtosecond,
        collision_rate=config.collision_rate_per_ps / unit.picosecond,
        n_steps=int(config.steps_per_iteration),
        # Draw fresh Maxwell-Boltzmann velocities at the replica's current temperature every iteration.
        # Without this a configuration swapped down the ladder keeps the hotter replica's velocities,
        # which a 1/ps friction barely cools within one iteration: the cold states then sample too hot
        # (alanine dipeptide "300 K" looked like ~335 K). Sampling of configurations stays exact.
        reassign_velocities=True,
    )
    cls = multistate.ParallelTemperingSampler if config.method == "parallel-tempering" else multistate.ReplicaExchangeSampler
    sampler = cls(mcmc_moves=move, number_of_iterations=int(config.n_iterations),
                  online_analysis_interval=(200 if config.online_analysis else None))
    sampler._global_citation_silence = True  # no citation banner on stdout
    _set_caches(sampler, config)
    return sampler


def _reassign_velocities(sampler) -> None:
    """Make every Langevin move of a (resumed) sampler redraw velocities each iteration."""
    moves = sampler._mcmc_moves
    for mv in (moves if isinstance(moves, (list, tuple)) else [moves]):
        if hasattr(mv, "reassign_velocities"):
            mv.reassign_velocities = True


def _set_caches(sampler, config: ReplicaExchangeConfig) -> None:
    from openmmtools import cache

    plat, props = _platform(config.platform, config.threads)
    sampler.energy_context_cache = cache.ContextCache(capacity=None, time_to_live=None, platform=plat,
                                                      platform_properties=props or None)
    sampler.sampler_context_cache = cache.ContextCache(capacity=None, time_to_live=None, platform=plat,
                                                       platform_properties=props or None)


def _same_energies(system, path: Path, n_frames: int = 4) -> bool:
    """True when ``system`` reproduces the stored reduced energies of the last stored frames (a System
    re-serialised differently, e.g. after a force-field file reordering, is still the same target)."""
    import netCDF4


    with netCDF4.Dataset(str(path), "r") as ds:
        n = int(ds.variables["states"].shape[0])
        its = list(range(max(1, n - n_frames), n))
        if not its or ds.variables["positions"].shape[2] != system.n_atoms:
            return False
        x = np.asarray(ds.variables["positions"][its, 0], dtype=np.float64)
        st = np.asarray(ds.variables["states"][its, 0], dtype=np.int64)
        e = np.asarray(ds.variables["energies"][its, 0], dtype=np.float64)
    u_stored = e[np.arange(len(its)), st]
    cfg = json.loads((path.parent / CONFIG_NAME).read_text())
    temps = np.asarray(cfg["temperatures_k"])
    u_now = np.array([reduced_energies(system, x[i:i + 1], float(temps[st[i]]), platform="Reference")[0]
                      for i in range(len(its))])
    # positions are stored as float32: allow the resulting energy noise
    return bool(np.all(np.abs(u_now - u_stored) < 1e-3 * np.maximum(1.0, np.abs(u_stored))))


def _mpi_comm():
    """The MPI communicator openmmtools uses (None when the run is serial)."""
    import mpiplus

    return mpiplus.get_mpicomm()


def mpi_comm():
    """The MPI communicator of an ``mpirun``-launched run (mpi4py's COMM_WORLD, as openmmtools uses it),
    or None when the process runs serially (no MPI launcher, or mpi4py not installed).

    Under MPI it also switches HDF5's file locking off for this process (unless the user set
    ``HDF5_USE_FILE_LOCKING``): on resume openmmtools reads the storage on every rank and then reopens it
    for appending on rank 0 without waiting for the others, so a rank still reading hits rank 0's write
    lock ("NetCDF: HDF error"; seen on a loaded machine). Rank 0 alone writes, and only after every rank
    has taken part in the first iteration, so the lock protects nothing here."""
    comm = _mpi_comm()
    if comm is not None:
        os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    return comm


def check_mpi_launch(n_replicas: int, comm=None) -> None:
    """InputError when an MPI launch cannot work: more ranks than replicas (openmmtools would leave
    ranks without a replica)."""
    comm = _mpi_comm() if comm is None else comm
    if comm is not None and comm.size > int(n_replicas):
        raise InputError(f"{comm.size} MPI ranks but only {n_replicas} replicas; start at most {n_replicas} ranks "
                         f"(mpirun -n {n_replicas}) or use more --replicas")


def _restore_snapshot(path: Path, cost_path: Path, iteration: int) -> None:
    """Copy the (checked) snapshots of ``iteration`` over the storage ``path``; rewrite the cost record
    to the snapshot's iteration and wall time."""
    _storage.restore_snapshot(path)
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {}
    if cost.get("snapshot_iteration") == iteration:
        wall = float(cost["snapshot_wall_time_s"])
    else:  # killed between writing the snapshot and the cost record: the last recorded time is closest
        wall = float(cost.get("wall_time_s", 0.0))
    atomic_write_json(cost_path, {"wall_time_s": wall, "iteration": iteration, "snapshot_iteration": iteration,
                                  "snapshot_wall_time_s": wall})


def _usable_snapshot(path: Path) -> tuple[int | None, str]:
    """(iteration of the snapshots, "") when both snapshot files read completely, else (None, why not)."""
    if not _storage.has_snapshot(path):
        names = " and ".join(p.name for p in _storage.snapshot_pair(path))
        return None, f"there are no snapshots ({names})"
    try:
        return _storage.check_storage(*_storage.snapshot_pair(path)), ""
    except _storage.StorageCorruptError as e:
        return None, f"the snapshots are unusable ({e})"


def _prepare_resume(path: Path, cost_path: Path) -> dict[str, Any]:
    """Choose what a resume continues from; restore the snapshots over the storage when they are used.

    Returns ``{"source": "snapshot" | "storage", "iteration": snapshot iteration or None,
    "problem": what was wrong with the storage or None}``. Raises StorageCorruptError when the storage
    is damaged and no usable snapshot exists."""
    snap_it, snap_why = _usable_snapshot(path)
    try:
        resume_at = _storage.resume_iteration(path)
    except _storage.StorageCorruptError:
        resume_at = None  # cannot even read last_iteration: check_storage below says what is wrong
    if snap_it is not None and snap_it == resume_at:
        _restore_snapshot(path, cost_path, snap_it)
        logging.getLogger(__name__).info("resuming %s from its snapshot of iteration %d", path, snap_it)
        return {"source": "snapshot", "iteration": snap_it, "problem": None}
    try:
        _storage.check_storage(path)
    except _storage.StorageCorruptError as e:
        if snap_it is None:
            raise _storage.StorageCorruptError(
                f"cannot resume '{path.parent}': {e}. The run was probably killed while writing it, and {snap_why}, "
                "so there is nothing to go back to (runs killed before their first checkpoint, or made by a "
                "boltzflow without snapshots, have none). Start the run again in a new -o directory (or delete "
                "this one)") from e
        _restore_snapshot(path, cost_path, snap_it)
        _warn_restored(str(e), path, snap_it, resume_at)
        return {"source": "snapshot", "iteration": snap_it, "problem": str(e)}
    if _storage.has_snapshot(path) and snap_it is None:
        warnings.warn(f"{snap_why}; the intact storage '{path}' is continued and the snapshots are replaced at "
                      "the next checkpoint", stacklevel=3)
    return {"source": "storage", "iteration": None, "problem": None}


def _warn_restored(problem: str, path: Path, snap_it: int, resume_at: int | None) -> None:
    snap_a, snap_c = _storage.snapshot_pair(path)
    lost = (f" (the storage's last checkpoint was iteration {resume_at})" if resume_at is not None
            else " (the storage's own last checkpoint cannot be read)")
    warnings.warn(f"{problem}. Restored the snapshots {snap_a.name} and {snap_c.name} of iteration {snap_it}{lost}: "
                  f"the run continues from iteration {snap_it} and recomputes the iterations after it",
                  _storage.StorageRestoredWarning, stacklevel=4)


def _load_sampler(path: Path, config: ReplicaExchangeConfig):
    """(sampler, reporter) resumed from the storage ``path`` by openmmtools."""
    from openmmtools import multistate

    cls = (multistate.ParallelTemperingSampler if config.method == "parallel-tempering"
           else multistate.ReplicaExchangeSampler)
    # under MPI openmmtools opens the storage itself (read on every rank, then append on rank 0 only);
    # opening it for appending here on every rank would collide on the HDF5 file lock
    reporter = multistate.MultiStateReporter(str(path), open_mode=None if _mpi_comm() is not None else "a")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # from_storage prints a citation banner
            sampler = cls.from_storage(reporter)
    except BaseException:
        reporter.close()
        raise
    return sampler, reporter


class _Snapshots:
    """Snapshots of the storage at checkpoint iterations: every checkpoint while the storage is at most
    SNAPSHOT_BYTES_PER_CHECKPOINT, else every ceil(size / SNAPSHOT_BYTES_PER_CHECKPOINT)-th one."""

    def __init__(self, path: Path, iteration: int | None = None, wall_time_s: float | None = None):
        self.path = path
        self.iteration, self.wall_time_s = iteration, wall_time_s
        self._skipped = None  # checkpoints passed since this process's last snapshot (None: none yet)

    def maybe_take(self, reporter, iteration: int, wall_time_s: float) -> bool:
        """Snapshot now (flushing the reporter first) unless the storage is too large for this checkpoint."""
        size = sum(p.stat().st_size for p in _storage.storage_pair(self.path))
        if self._skipped is not None and (self._skipped + 1) * SNAPSHOT_BYTES_PER_CHECKPOINT < size:
            self._skipped += 1
            return False
        reporter.sync()  # HDF5 buffers -> file, so the copies are complete
        _storage.take_snapshot(self.path)
        self._skipped = 0
        self.iteration, self.wall_time_s = int(iteration), float(wall_time_s)
        return True

    def record(self) -> dict[str, Any]:
        if self.iteration is None:
            return {}
        return {"snapshot_iteration": self.iteration, "snapshot_wall_time_s": self.wall_time_s}


def _existing_snapshots(path: Path, cost_path: Path) -> _Snapshots:
    """The snapshots a resumed run starts with: iteration from the snapshot itself, wall time from the
    cost record when that was written for the same snapshot (else the cost record's last time)."""
    if not _storage.has_snapshot(path):
        return _Snapshots(path)
    try:
        it = _storage.read_last_iteration(_storage.snapshot_path(path))
    except _storage.StorageCorruptError as e:
        warnings.warn(f"{e}; the snapshots will be replaced at the next checkpoint iteration", stacklevel=3)
        return _Snapshots(path)
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {}
    wall = cost.get("snapshot_wall_time_s") if cost.get("snapshot_iteration") == it else cost.get("wall_time_s")
    return _Snapshots(path, it, None if wall is None else float(wall))


def run_replica_exchange(system, config: ReplicaExchangeConfig, out_dir: str | Path, resume: bool = True,
                         progress: bool = True) -> Path:
    """Run (or resume) replica exchange of ``system`` (a MolecularSystem); returns the storage path.

    State 0 is ``config.t_min``. With ``resume=True`` an existing storage in ``out_dir`` made with the
    same system and ladder is continued up to ``config.n_iterations``; with ``resume=False`` an existing
    storage is an error (pick a new directory).
    """
    _quiet_openmmtools()
    import openmm
    from openmm import unit
    from openmmtools import multistate, states

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = storage_path(out)
    cfg_path = out / CONFIG_NAME
    cost_path = out / COST_NAME
    comm = _mpi_comm()
    is_root = comm is None or comm.rank == 0
    check_mpi_launch(config.n_replicas, comm)
    fingerprint = system.fingerprint()
    record = {"config": config.to_dict(), "fingerprint": fingerprint, "system": system.name,
              "temperatures_k": config.temperatures().tolist(), "n_atoms": system.n_atoms}

    if is_root:
        for leftover in _storage.remove_partial_copies(path):
            logging.getLogger(__name__).info("removed %s (a copy killed midway)", leftover)
    exists = path.exists()
    if comm is not None:  # rank 0's view: another rank could otherwise see the storage rank 0 just created
        exists = comm.bcast(exists, root=0)
    if exists:
        if not resume:
            raise InputError(f"'{path}' already exists; pass --resume to continue it or choose another -o directory")
        if not cfg_path.is_file():
            raise InputError(f"'{path}' exists but '{cfg_path}' is missing; it was not made by boltzflow simulate")
        old = json.loads(cfg_path.read_text())
        oc = old["config"]
        for key in ("method", "t_min", "t_max", "n_replicas", "steps_per_iteration", "timestep_fs"):
            if oc.get(key) != getattr(config, key):
                raise InputError(f"cannot resume '{path}' with {key}={getattr(config, key)!r}: the run used "
                                 f"{oc.get(key)!r}; use the same settings or a new -o directory")
        source: dict[str, Any] = {"source": "storage", "iteration": None, "problem": None}
        failed = None
        if is_root:
            try:
                source = _prepare_resume(path, cost_path)
            except InputError as e:
                failed = e
        if comm is not None:  # the other ranks read the storage only once rank 0 has checked/restored it
            why = comm.bcast(None if failed is None else " ".join(str(failed).split()), root=0)
            if why is not None and failed is None:
                raise InputError(f"rank 0 cannot resume: {why}")
        if failed is not None:
            raise failed
        if old.get("fingerprint") != fingerprint and not _same_energies(system, path):
            raise InputError(f"'{path}' was made for another system ({old.get('system')}, fingerprint "
                             f"{old.get('fingerprint')}, energies differ); use a new -o directory")
        try:
            sampler, reporter = _load_sampler(path, config)
        except Exception as e:
            # check_storage read everything, yet openmmtools failed (e.g. a damaged serialised state):
            # older snapshots are the way back, once; without them the original error stands
            snap_it = _usable_snapshot(path)[0] if is_root and source["source"] == "storage" else None
            if snap_it is None:
                raise
            problem = f"openmmtools could not resume from '{path}' ({type(e).__name__}: {e})"
            _restore_snapshot(path, cost_path, snap_it)
            _warn_restored(problem, path, snap_it, None)
            source = {"source": "snapshot", "iteration": snap_it, "problem": problem}
            sampler, reporter = _load_sampler(path, config)
        _set_caches(sampler, config)
        _reassign_velocities(sampler)  # runs stored before the fix kept velocities across swaps
        sampler.number_of_iterations = max(int(config.n_iterations), int(sampler.iteration))
        record["resumed_from_iteration"] = int(sampler.iteration)
        record["fingerprint_history"] = old.get("fingerprint_history", []) + (
            [old.get("fingerprint")] if old.get("fingerprint") != fingerprint else [])
        record["resume_source"] = source["source"]
        damaged = [{"iteration": source["iteration"], "problem": source["problem"]}] if source["problem"] else []
        record["restored_from_snapshot"] = old.get("restored_from_snapshot", []) + damaged
        snapshots = _existing_snapshots(path, cost_path)
    else:
        stale = [p for p in _storage.snapshot_pair(path) if p.exists()]
        if stale:
            raise InputError(
                f"'{out}' holds snapshots of an earlier run ({', '.join(p.name for p in stale)}) but no "
                f"{path.name}. To continue that run copy {_storage.snapshot_path(path).name} to {path.name} and "
                f"{_storage.snapshot_path(_storage.checkpoint_path(path)).name} to "
                f"{_storage.checkpoint_path(path).name} and pass --resume; to start a new run delete the "
                "snapshots or choose another -o directory")
        sysobj = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system.system))
        prune_unused_cmap_maps(sysobj)
        temps = config.temperatures()
        thermo = states.ThermodynamicState(sysobj, temperature=float(temps[0]) * unit.kelvin)
        sstate = states.SamplerState(system.positions * unit.nanometer)
        sampler = _make_sampler(config)
        reporter = multistate.MultiStateReporter(
            str(path), checkpoint_interval=int(config.checkpoint_interval),
            analysis_particle_indices=list(range(system.n_atoms)), position_interval=1, velocity_interval=0)
        meta = {"boltzflow_system": system.name, "boltzflow_fingerprint": fingerprint}
        if config.method == "parallel-tempering":
            sampler.create(thermo, sstate, reporter, temperatures=[float(t) * unit.kelvin for t in temps],
                           n_temperatures=len(temps), metadata=meta)
        else:
            tstates = []
            for t in temps:
                s = states.ThermodynamicState(sysobj, temperature=float(t) * unit.kelvin)
                tstates.append(s)
            sampler.create(tstates, sstate, reporter, metadata=meta)
        if config.minimize:
            sampler.minimize()
        snapshots = _Snapshots(path)
    if is_root:
        atomic_write_json(cfg_path, record)

    total = int(sampler.number_of_iterations)
    prior = json.loads(cost_path.read_text()).get("wall_time_s", 0.0) if (resume and cost_path.is_file()) else 0.0
    t_start = time.perf_counter()

    def wall_time() -> float:
        return prior + time.perf_counter() - t_start

    def save_cost() -> None:
        if is_root:
            atomic_write_json(cost_path, {"wall_time_s": wall_time(), "iteration": int(sampler.iteration),
                                          **snapshots.record()})

    bar = None
    if progress and is_root:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=int(sampler.iteration), desc=f"replica exchange {system.name}",
                   unit="it", dynamic_ncols=True)
    try:
        while sampler.iteration < total:
            sampler.run(1)
            if bar is not None:
                bar.update(1)
            if sampler.iteration % config.checkpoint_interval == 0:
                # the reporter has written this iteration's checkpoint: snapshot the storage, then record
                # the cost with the snapshot's iteration (a kill in between leaves the older, valid pair)
                if is_root:
                    snapshots.maybe_take(reporter, int(sampler.iteration), wall_time())
                save_cost()
    finally:
        save_cost()
        if bar is not None:
            bar.close()
        reporter.close()
    return path
