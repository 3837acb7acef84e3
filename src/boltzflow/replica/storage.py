"""Crash safety of a run's NetCDF storage: full-read validation, snapshots and their restore.

HDF5 (under NetCDF-4) is not crash-safe. Kill tests (SIGKILL at random times) leave ``replica.nc``
unreadable in about 1 of 70 to 200 kills, e.g. the positions chunk of the iteration being written (beyond
``last_iteration``; openmmtools' resume rewrites that row without repairing it, and the analysis
later fails with ``RuntimeError: NetCDF: HDF error``) or ``/mcmc_moves/move0`` (openmmtools' resume
itself fails). So :func:`~boltzflow.replica.exchange.run_replica_exchange` copies both storage files
to ``replica.nc.snapshot`` / ``replica_checkpoint.nc.snapshot`` at checkpoint iterations (right
after a flush, so the copies are clean files), and a resume continues from those copies or, when
they are older than the storage's last checkpoint, reads every variable of the storage first
(:func:`check_storage`).

Every copy goes to ``.<target>.<random>.partial`` in the same directory, is fsynced and renamed over
the target: a kill mid-copy leaves the previous file intact plus a ``.partial`` leftover that
:func:`remove_partial_copies` deletes. The checkpoint file is always replaced before the analysis
file, so a kill between the two leaves a checkpoint file that is *newer* than the analysis file
(a superset of what the analysis file's last iteration needs), which is still a consistent pair.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..io import atomic_write

SNAPSHOT_SUFFIX = ".snapshot"
PARTIAL_SUFFIX = ".partial"
_READ_BLOCK_BYTES = 32 << 20  # check_storage reads big variables in blocks of about this size


class StorageCorruptError(CheckpointError):
    """A replica-exchange storage file cannot be read completely, is missing or is inconsistent."""


class StorageRestoredWarning(UserWarning):
    """A resume found the storage damaged and went back to older snapshots (iterations after them are redone)."""


def checkpoint_path(storage: Path) -> Path:
    """The checkpoint NetCDF that openmmtools pairs with ``storage`` (``replica.nc`` ->
    ``replica_checkpoint.nc``; the MultiStateReporter default)."""
    return storage.with_name(storage.stem + "_checkpoint" + storage.suffix)


def snapshot_path(file: Path) -> Path:
    """Where the snapshot of one storage file lives (``replica.nc`` -> ``replica.nc.snapshot``)."""
    return file.with_name(file.name + SNAPSHOT_SUFFIX)


def storage_pair(storage: Path) -> tuple[Path, Path]:
    """(analysis, checkpoint) storage files of a run."""
    return storage, checkpoint_path(storage)


def snapshot_pair(storage: Path) -> tuple[Path, Path]:
    """(analysis, checkpoint) snapshot files of a run."""
    return snapshot_path(storage), snapshot_path(checkpoint_path(storage))


def has_snapshot(storage: Path) -> bool:
    """True when both snapshot files of ``storage`` exist."""
    return all(p.is_file() for p in snapshot_pair(storage))


def check_storage(analysis: Path, checkpoint: Path | None = None) -> int:
    """Read every variable of both files completely and check that they belong together.

    Returns the analysis file's ``last_iteration``. Raises :class:`StorageCorruptError` naming the
    file (and variable) that could not be read, or what is inconsistent between the two files.
    """
    analysis = Path(analysis)
    checkpoint = checkpoint_path(analysis) if checkpoint is None else Path(checkpoint)
    import netCDF4

    for f in (analysis, checkpoint):
        _read_everything(f)
    try:
        with netCDF4.Dataset(str(analysis), "r") as a, netCDF4.Dataset(str(checkpoint), "r") as c:
            return _check_pair(a, c, analysis, checkpoint)
    except StorageCorruptError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # anything else going wrong here means a malformed file: say which
        raise StorageCorruptError(f"'{analysis}' and '{checkpoint}' could not be checked against each other "
                                  f"({type(e).__name__}: {e})") from e


def read_last_iteration(analysis: Path) -> int:
    """The ``last_iteration`` an analysis file records (only that value is read)."""
    import netCDF4

    try:
        with netCDF4.Dataset(str(analysis), "r") as ds:
            return int(ds.variables["last_iteration"][0])
    except MemoryError:
        raise
    except Exception as e:
        raise StorageCorruptError(f"cannot read last_iteration of '{analysis}' ({type(e).__name__}: {e})") from e


def resume_iteration(analysis: Path) -> int:
    """The checkpoint iteration openmmtools resumes ``analysis`` from: the last multiple of its
    CheckpointInterval at or before its ``last_iteration`` (only those two values are read)."""
    import netCDF4

    try:
        with netCDF4.Dataset(str(analysis), "r") as ds:
            last, interval = int(ds.variables["last_iteration"][0]), int(ds.CheckpointInterval)
    except MemoryError:
        raise
    except Exception as e:
        raise StorageCorruptError(f"cannot read last_iteration/CheckpointInterval of '{analysis}' "
                                  f"({type(e).__name__}: {e})") from e
    return last - last % interval if interval > 0 else last


def _check_pair(a, c, analysis: Path, checkpoint: Path) -> int:
    """Consistency of an analysis/checkpoint pair: what a resume from the last checkpoint reads exists."""
    for ds, f in ((a, analysis), (c, checkpoint)):
        for name in ("last_iteration", "positions"):
            if name not in ds.variables:
                raise StorageCorruptError(f"'{f}' has no variable '{name}'; it is not an openmmtools "
                                          "replica-exchange storage file")
    if getattr(a, "UUID", None) != getattr(c, "UUID", None):
        raise StorageCorruptError(f"'{analysis}' and '{checkpoint}' come from different runs (UUIDs differ)")
    last = int(a.variables["last_iteration"][0])
    n_stored = min(int(a.variables[v].shape[0]) for v in ("states", "energies", "positions") if v in a.variables)
    if last < 0 or n_stored < last + 1:
        raise StorageCorruptError(f"'{analysis}' says its last iteration is {last} but holds only {n_stored} "
                                  "iterations")
    interval = int(getattr(a, "CheckpointInterval", 0))
    if interval < 1:
        raise StorageCorruptError(f"'{analysis}' has no valid CheckpointInterval attribute")
    index = (last - last % interval) // interval  # record of the last checkpoint at or before `last`
    pos = c.variables["positions"]
    if pos.shape[0] <= index or np.ma.is_masked(pos[index]):
        raise StorageCorruptError(
            f"'{checkpoint}' lacks the checkpoint of iteration {last - last % interval} that '{analysis}' "
            f"(last iteration {last}) resumes from (it holds {pos.shape[0]} checkpoint records)")
    return last


def _read_everything(path: Path) -> None:
    """Open ``path`` and read the data of every variable of every group (what raises HDF errors)."""
    import netCDF4

    if not path.is_file():
        raise StorageCorruptError(f"'{path}' is missing")
    try:
        ds = netCDF4.Dataset(str(path), "r")
    except MemoryError:
        raise
    except Exception as e:
        raise StorageCorruptError(f"'{path}' cannot be opened ({type(e).__name__}: {e})") from e
    try:
        groups = [ds]
        while groups:
            g = groups.pop()
            groups.extend(g.groups.values())
            for name, var in g.variables.items():
                where = f"{g.path.rstrip('/')}/{name}"
                for rows in _row_blocks(var):
                    try:
                        _read(var, rows)
                    except MemoryError:
                        raise
                    except Exception as e:
                        raise StorageCorruptError(f"'{path}': variable '{where}'{_first_bad_row(var, rows)} cannot "
                                                  f"be read ({type(e).__name__}: {e})") from e
    finally:
        ds.close()


def _read(var, rows: slice) -> None:
    if var.ndim == 0:
        var.getValue()
    else:
        var[rows]


def _first_bad_row(var, rows: slice) -> str:
    """" (row i of n)" for the first unreadable row of a block that failed to read ("" if none is found)."""
    if var.ndim == 0 or var.shape[0] < 2:
        return ""
    for i in range(rows.start, rows.stop):
        try:
            var[i]
        except MemoryError:
            raise
        except Exception:  # the failure itself is reported by the caller
            return f" (row {i} of {var.shape[0]})"
    return ""


def _row_blocks(var) -> list[slice]:
    """Slices along the first dimension that read ``var`` in blocks of about _READ_BLOCK_BYTES."""
    if var.ndim == 0:
        return [slice(None)]
    n = int(var.shape[0])
    row = int(np.prod(var.shape[1:], dtype=np.int64)) * max(int(getattr(var.dtype, "itemsize", 8) or 8), 1)
    step = max(1, _READ_BLOCK_BYTES // max(row, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a fsynced ``.partial`` temp file renamed over ``dst``."""
    with open(src, "rb") as inp:
        atomic_write(dst, lambda out: shutil.copyfileobj(inp, out, 1 << 20), suffix=PARTIAL_SUFFIX)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_snapshot(storage: Path) -> float:
    """Copy both storage files to their snapshots (checkpoint file first); returns the seconds it took.

    The caller must have flushed the open reporter (``reporter.sync()``) so the files on disk are
    complete."""
    t0 = time.perf_counter()
    for src, dst in zip(reversed(storage_pair(storage)), reversed(snapshot_pair(storage))):
        _copy_atomic(src, dst)
    _fsync_dir(storage.parent)
    return time.perf_counter() - t0


def restore_snapshot(storage: Path) -> None:
    """Copy both snapshots over the storage files (checkpoint file first); the snapshots stay."""
    for dst, src in zip(reversed(storage_pair(storage)), reversed(snapshot_pair(storage))):
        _copy_atomic(src, dst)
    _fsync_dir(storage.parent)


def remove_snapshot(storage: Path) -> list[Path]:
    """Delete the snapshots of ``storage`` (a new run in a directory that still holds old ones)."""
    gone = [p for p in snapshot_pair(storage) if p.is_file()]
    for p in gone:
        p.unlink()
    return gone


def remove_partial_copies(storage: Path) -> list[Path]:
    """Delete ``.partial`` leftovers of snapshot/restore copies killed midway; returns what was removed."""
    names = {p.name for p in (*storage_pair(storage), *snapshot_pair(storage))}
    gone = sorted({p for n in names for p in storage.parent.glob(f".{n}.*{PARTIAL_SUFFIX}")})
    for p in gone:
        p.unlink()
    return gone
