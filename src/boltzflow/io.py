"""Crash-safe file writing and output guards.

Every file boltzflow writes goes through a temp file + rename, with the permissions the user's
umask gives a newly created file. :func:`check_output_dir` / :func:`check_output_file` refuse to
write over what a verb did not make itself (see :data:`RUN_KINDS`) unless asked to.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputError


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", suffix: str = ".tmp") -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temp file ``.<name>.<random><suffix>`` in the
    same directory, which is fsynced and renamed over ``path``. A crash leaves the old file intact
    (and at worst the temp file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp creates 0600
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _mode_for(path: Path) -> int:
    """Permissions for a file written at ``path``: those of the file it replaces, else what the umask
    gives a new file."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def numpy_file_kind(path: str | os.PathLike) -> str | None:
    """"npy" or "npz" by the file's first bytes (whatever its name), None for anything else."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head == b"\x93NUMPY":
        return "npy"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "npz"
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"object of type {type(o).__name__} is not JSON serializable")


# ---------------------------------------------------------------------------------------------
# output guards: nothing a user made is overwritten without being asked
# ---------------------------------------------------------------------------------------------
#: kind of boltzflow directory -> (files any one of which marks it, the verb that makes it); checked in order
RUN_KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    "replica-exchange run": (("replica.nc", "replica_config.json"), "simulate"),
    "native tempering run": (("native_tempering.pt",), "simulate"),
    "training run": (("config.toml", "generator.pt", "checkpoints", "metrics.jsonl"), "train"),
    "comparison": (("compare.json",), "compare"),
    "system": (("metadata.json",), "prepare"),
}


def run_kind(path: str | os.PathLike) -> str | None:
    """The kind of boltzflow directory ``path`` is (a key of :data:`RUN_KINDS`), or None."""
    p = Path(path)
    if not p.is_dir():
        return None
    for kind, (markers, _verb) in RUN_KINDS.items():
        if any((p / m).exists() for m in markers):
            return kind
    return None


def check_output_dir(path: str | os.PathLike, kind: str, overwrite: bool = False, option: str = "-o") -> Path:
    """Refuse to write a ``kind`` directory at ``path`` when it holds something else: a file, a
    non-empty folder boltzflow did not make, or another kind of boltzflow directory; ``overwrite``
    allows the last two. A new or empty folder, or one of the same kind, passes (the verb decides
    about resuming or rewriting its own outputs). Raises InputError; returns the path."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{option} '{p}' exists and is not a directory; choose another {option}")
    if not p.is_dir() or not any(p.iterdir()):
        return p
    found = run_kind(p)
    if found == kind or overwrite:
        return p
    if found is None:
        raise InputError(f"{option} '{p}' is a non-empty folder that boltzflow did not make; choose a new or empty "
                         f"{option}, or pass --overwrite to write into it")
    verb = RUN_KINDS[found][1]
    raise InputError(f"{option} '{p}' is a {found} directory (made by `boltzflow {verb}`), not a {kind} directory; "
                     f"choose another {option}, or pass --overwrite to write into it anyway")


def check_output_file(path: str | os.PathLike, overwrite: bool = False, option: str = "-o") -> Path:
    """Refuse an output file ``path`` that already exists (or is a directory) unless ``overwrite``."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{option} '{p}' is a directory; give a file name")
    if p.exists() and not overwrite:
        raise InputError(f"{option} '{p}' already exists; pass --overwrite to replace it or choose another name")
    return p


@contextlib.contextmanager
def staged_files(dest: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder next to ``dest`` for the files of one output; they land in ``dest`` (created
    if needed, each file by an atomic rename) only when the block succeeds, so a failure part-way
    leaves ``dest`` as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        dest.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def undone_on_input_error(path: str | os.PathLike, keep_if: tuple[str, ...] = ()) -> Iterator[Path]:
    """A run directory that was new (or empty) before the block is removed again (or emptied) when the
    block raises InputError, unless one of ``keep_if`` (e.g. a checkpoint) exists in it by then: bad
    input found late leaves no half-made run behind, while work that can be resumed is kept."""
    p = Path(path)
    existed = p.is_dir()
    was_empty = not existed or not any(p.iterdir())
    try:
        yield p
    except InputError:
        if was_empty and p.is_dir() and not any((p / k).exists() for k in keep_if):
            if not existed:
                shutil.rmtree(p, ignore_errors=True)
            for child in p.iterdir() if existed else ():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        raise
