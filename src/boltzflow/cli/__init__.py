"""The ``boltzflow`` command line: thin verbs over the Python API.

Each verb lives in its own module ``boltzflow.cli.<verb>`` exposing ``register(subparsers)``,
which adds an argparse sub-parser whose ``func(args) -> int`` calls one API function.
Errors from bad input (:class:`boltzflow.errors.InputError`) print one line and exit 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .. import silence_pymbar_banner

#: (module, verbs it registers), in the order shown by --help.
VERB_MODULES = (
    "prepare",
    "energy",
    "simulate",
    "train",
    "sample",
    "merge",
    "export",
    "mix",
    "estimate",
    "compare",
    "report",
    "demo",
)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), like boltzflow's own."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="boltzflow",
        description=(
            "Train normalizing flows (Boltzmann generators) for CHARMM36m molecules in OpenMM and turn "
            "their samples into unbiased answers by reweighting."
        ),
        epilog="Run `boltzflow VERB --help` for a worked example of each verb. Start with `boltzflow demo`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # verb not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import InputError

    silence_pymbar_banner()  # already done on import of boltzflow; again in case a handler reset the filters
    # the verbs check every temperature option themselves and warn in one line (cli.common.check_temperature)
    warnings.filterwarnings("ignore", message=r".* K is above .* K: bonds break", category=UserWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_launch(args)
        return int(args.func(args) or 0)
    except InputError as e:
        if getattr(args, "debug", False):
            raise
        one_line = " ".join(str(e).split())  # messages quoting other tools' errors may span lines
        print(f"boltzflow {args.verb}: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"boltzflow {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        from .. import distributed

        distributed.shutdown()


#: verbs that run data-parallel under torchrun (the others run in one process, or under MPI: simulate)
TORCHRUN_VERBS = ("train", "sample", "demo")


def _check_launch(args) -> None:
    """InputError for a verb launched by torchrun with several processes that cannot use them."""
    from .. import distributed
    from ..errors import InputError

    if distributed.launched_by_torchrun() and args.verb not in TORCHRUN_VERBS:
        hint = " (replica exchange runs under MPI: mpirun -n N boltzflow simulate ...)" if args.verb == "simulate" else ""
        raise InputError(f"'{args.verb}' does not run under torchrun; launch it as one process{hint}; "
                         f"torchrun runs {', '.join(TORCHRUN_VERBS)}")


def entry() -> None:  # pragma: no cover
    sys.exit(main())
