"""Helpers shared by CLI verbs: system resolution, JSON output, argument types."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..units import HOT_TEMPERATURE_K
from ..units import check_temperature as _check_temperature

EXAMPLE_FORMATTER = argparse.RawDescriptionHelpFormatter


def add_verb(sub, name: str, help: str, example: str, func) -> argparse.ArgumentParser:
    """Add a sub-parser with a one-line help and a worked example in its epilog."""
    p = sub.add_parser(name, help=help, description=help, epilog="Example:\n" + example,
                       formatter_class=EXAMPLE_FORMATTER)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    p.set_defaults(func=func)
    return p


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    """The --overwrite flag of a verb that writes ``what``."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"write {what} even where that replaces an existing file or mixes with what a folder "
                        "already holds (not needed to rewrite the verb's own earlier output)")


def check_temperature(value: float, option: str) -> float:
    """``value`` (K) if finite and positive (:func:`boltzflow.units.check_temperature`), else InputError;
    warns on stderr above HOT_TEMPERATURE_K."""
    t = _check_temperature(value, option, warn=False)
    if t > HOT_TEMPERATURE_K:
        print(f"warning: {option} {t:g} K is above {HOT_TEMPERATURE_K:g} K: bonds break and the force field is not "
              "meant for it; check the structures", file=sys.stderr)
    return t


NO_ERROR_BAR = "+- ? (too few samples for an error bar)"


def has_error_bar(stderr: float | None) -> bool:
    """Whether ``stderr`` is a usable error bar: finite and > 0 (0 comes from too few samples, e.g.
    all of them in one state, not from a known value)."""
    return stderr is not None and stderr == stderr and 0 < stderr < float("inf")


def format_pm(value: float, stderr: float | None, digits: int = 4) -> str:
    """``value +- stderr`` with ``digits`` decimals, or the value and a note when there is no error bar."""
    if not has_error_bar(stderr):
        return f"{value:.{digits}f} {NO_ERROR_BAR}"
    return f"{value:.{digits}f} +- {stderr:.{digits}f}"


def estimate_line(est) -> str:
    """One Estimate as a line: ``name = value +- stderr unit (n=..., ESS ...)``, saying so when
    the samples are too few for an error bar or the weights heavy-tailed (Pareto k > 0.7)."""
    unit = f" {est.unit}" if est.unit and est.unit != "probability" else ""
    ess = f", ESS {est.ess:.0f}" if est.ess == est.ess else ""
    k = getattr(est, "pareto_k", float("nan"))
    tail = "" if getattr(est, "reliable", True) else f", Pareto k {k:.2f} > 0.7: the error bar may be too small"
    pm = f"+- {est.stderr:.2g}" if has_error_bar(est.stderr) else NO_ERROR_BAR
    return f"{est.name} = {est.value:.4g} {pm}{unit} (n={est.n}{ess}{tail})"


def print_json(obj: Any) -> None:
    from ..io import _json_default

    json.dump(obj, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")


def load_system(spec: str):
    """A system directory written by `boltzflow prepare`, or a built-in name (alanine-dipeptide, butane)."""
    from ..errors import InputError
    from ..systems import MolecularSystem

    p = Path(spec)
    if p.is_dir() and (p / "metadata.json").is_file():
        try:
            return MolecularSystem.load(p)
        except InputError:
            raise
        except Exception as e:  # json, XML and OpenMM errors from damaged files
            raise InputError(f"system directory '{p}' is damaged ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                             "make it again with `boltzflow prepare`") from e
    try:
        from ..systems.builtin import BUILTIN_SYSTEMS, builtin_system
    except ImportError:  # pragma: no cover
        BUILTIN_SYSTEMS, builtin_system = (), None
    if spec in BUILTIN_SYSTEMS:
        return builtin_system(spec)
    raise InputError(
        f"'{spec}' is neither a system directory (made by `boltzflow prepare`) nor a built-in system "
        f"({', '.join(BUILTIN_SYSTEMS)})"
    )


def add_distributed(p: argparse.ArgumentParser) -> None:
    """The --dist-backend option of a verb that runs data-parallel under torchrun."""
    p.add_argument("--dist-backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="under torchrun: process-group backend (auto: NCCL with one GPU per rank when the run uses "
                        "CUDA, else gloo); ignored in one process")


def distributed_context(args: argparse.Namespace):
    """The :class:`boltzflow.distributed.DistContext` of this process: joins torchrun's process group
    when launched by torchrun with several processes, else the one-process context."""
    from .. import distributed

    return distributed.init_distributed(backend=getattr(args, "dist_backend", "auto"),
                                        device=getattr(args, "device", None) or "auto")


def main_rank_only(dist, path):
    """undone_on_input_error(path) on rank 0 (the rank that writes), a no-op elsewhere."""
    import contextlib

    from ..io import undone_on_input_error

    return undone_on_input_error(path, keep_if=("checkpoints/latest.pt",)) if dist.is_main else contextlib.nullcontext()
