"""Training checkpoints: one dict per file, written atomically (temp file + fsync + rename).

A checkpoint holds everything needed to continue a run bitwise-identically: model, optimizer and
scheduler state, the trainer's torch.Generator state, step, stage, counters, AIS step sizes and the
replay buffer. ``FORMAT`` marks the layout; a file with another format is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..io import atomic_torch_save

FORMAT = "boltzflow-train-checkpoint/1"


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_copy: Path | None = None) -> Path:
    """Write ``state`` (adds the format tag) atomically to ``path``; optionally also to ``keep_copy``."""
    state = dict(state)
    state["format"] = FORMAT
    path = Path(path)
    atomic_torch_save(path, state)
    if keep_copy is not None:
        tmp = keep_copy.with_name("." + keep_copy.name + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(keep_copy)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError if missing or corrupt."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'; start the run without --resume")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {e}); "
                              "delete it to restart the run from scratch") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a boltzflow training checkpoint (format {FORMAT!r} expected)")
    return state
