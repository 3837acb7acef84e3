"""Run directories: everything a training / sampling / simulation run produces, in one place.

Layout::

    RUN_DIR/
      config.toml        the full configuration used (defaults filled in)
      environment.json   versions of python, torch, openmm, ... and the command line
      log.txt            human-readable log (appended)
      system/            the MolecularSystem (system.xml, topology.pdb, metadata.json)
      checkpoints/       latest.pt (+ step_XXXXXXXX.pt), written atomically
      metrics.jsonl      one JSON object per logged step (appended, flushed)
      samples/           SampleSet .npz files (generated.npz, reference.npz, ...)
      plots/             PNG figures
      report.html        self-contained report (`boltzflow report RUN_DIR`)
      summary.json       headline numbers, rewritten atomically at the end of each stage

Costs in summary.json, each named once: ``energy_evals_training`` / ``training_wall_s`` are the whole
cost of training (data generation included; the generator's samples carry them as provenance
``training_energy_evals`` / ``training_wall_s``); ``training`` holds the optimisation loop's own
``energy_evals`` / ``wall_s``, ``data_tempering`` and ``data_augmentation`` those of making the data;
``demo.energy_evals`` adds the sampling.

Nothing is lost on a crash: checkpoints and summaries are written via temp file + rename,
metrics lines are flushed as they are written.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import _json_default, atomic_write_json, atomic_write_text


class RunDir:
    """A run directory at ``path`` (created on demand)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise InputError(f"run directory '{self.path}' does not exist")

    # -- well-known paths --------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def system_dir(self) -> Path:
        return self.path / "system"

    @property
    def checkpoint_dir(self) -> Path:
        d = self.path / "checkpoints"
        d.mkdir(exist_ok=True)
        return d

    @property
    def samples_dir(self) -> Path:
        d = self.path / "samples"
        d.mkdir(exist_ok=True)
        return d

    @property
    def plots_dir(self) -> Path:
        d = self.path / "plots"
        d.mkdir(exist_ok=True)
        return d

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoint_dir / "latest.pt"

    # -- writing -------------------------------------------------------------------------
    def write_config(self, toml_text: str) -> None:
        atomic_write_text(self.config_path, toml_text)

    def write_environment(self, argv: list[str] | None = None) -> None:
        atomic_write_json(self.path / "environment.json", environment_info(argv))

    def log(self, message: str) -> None:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.path / "log.txt", "a") as fh:
            fh.write(f"[{stamp}] {message}\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows with step > after_step (used when resuming from a checkpoint)."""
        rows = [r for r in self.read_metrics() if r.get("step", -1) <= after_step]

        atomic_write_text(self.metrics_path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))

    def update_summary(self, **items: Any) -> dict[str, Any]:
        summary = self.read_summary()
        summary.update(items)
        atomic_write_json(self.summary_path, summary)
        return summary

    def read_summary(self) -> dict[str, Any]:
        if self.summary_path.is_file():
            return json.loads(self.summary_path.read_text())
        return {}


def environment_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Versions of the scientific stack and the host, for reproducibility."""
    info: dict[str, Any] = {
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": list(argv if argv is not None else sys.argv),
    }
    for mod in ("boltzflow", "torch", "openmm", "openmmtools", "numpy", "mdtraj", "pymbar", "parmed"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", getattr(getattr(m, "version", None), "version", "unknown"))
        except Exception as e:  # an import failure is itself information
            info[mod] = f"unavailable ({type(e).__name__})"
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info
