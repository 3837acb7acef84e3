"""Progress display for training: a tqdm bar on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from typing import Any


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int = 0, desc: str = "train", enabled: bool | None = True):
    """A tqdm bar over ``total`` steps starting at ``initial``; a no-op object when ``enabled`` is
    False or when stderr is not a terminal (logs and CI stay clean)."""
    if not enabled or not getattr(sys.stderr, "isatty", lambda: False)():
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


def format_postfix(row: dict[str, Any]) -> dict[str, str]:
    """Short strings for the bar's postfix from a metrics row."""
    out = {}
    for key in ("loss", "ess", "u_mean", "minor_fraction"):
        v = row.get(key)
        if isinstance(v, (int, float)):
            out[key] = f"{v:.3g}"
    if row.get("skipped_steps"):
        out["skipped"] = str(row["skipped_steps"])
    return out
