"""`boltzflow report`: plots and a self-contained HTML page for a run directory."""

from __future__ import annotations

from .common import add_verb

EXAMPLE = """\
  boltzflow report runs/adp                       # writes runs/adp/report.html and runs/adp/plots/*.png
  boltzflow report runs/adp --replica runs/adp-pt # add the flow vs replica-exchange comparison table
"""


def register(sub) -> None:
    p = add_verb(sub, "report", "render plots and an HTML report of a run directory", EXAMPLE, run)
    p.add_argument("run_dir", help="run directory of `boltzflow train` / `sample`")
    p.add_argument("--replica", metavar="RE_DIR", help="replica-exchange run (or its samples.npz) to compare with")


def run(args) -> int:
    from ..reports.report import build_report

    path = build_report(args.run_dir, args.replica)
    print(path)
    return 0
