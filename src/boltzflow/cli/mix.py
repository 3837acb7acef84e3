"""`boltzflow mix`: one generator from several trained ones of a system, as their mixture."""

from __future__ import annotations

from .common import add_verb

EXAMPLE = """\
  boltzflow mix runs/tetra-a runs/tetra-b -o runs/tetra-mix      # q = (q_a + q_b) / 2, exact density
  boltzflow mix runs/a runs/b runs/c -o runs/abc --weights 2,1,1  # mixture probabilities 0.5, 0.25, 0.25
  boltzflow sample runs/tetra-mix -n 100000                       # each draw is scored by every component
"""


def register(sub) -> None:
    p = add_verb(sub, "mix", "combine trained generators of one system into their mixture (a new run directory)",
                 EXAMPLE, run)
    p.add_argument("run_dirs", nargs="+", metavar="RUN", help="trained run (or shipped generator) directories, >= 2")
    p.add_argument("-o", "--output", required=True, help="new (or empty) directory for the mixture")
    p.add_argument("--weights", default=None, help="comma-separated mixture weights, one per RUN (default: equal)")
    p.add_argument("--note", metavar="FILE.md", help="markdown saying how it was made -> OUTPUT/README.md")


def run(args) -> int:
    from pathlib import Path

    from .. import pipeline
    from ..errors import InputError

    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as e:
            raise InputError(f"--weights {args.weights!r}: give numbers separated by commas, e.g. 1,1") from e
        if len(weights) != len(args.run_dirs):
            raise InputError(f"--weights has {len(weights)} numbers for {len(args.run_dirs)} runs")
    note = ""
    if args.note:
        if not Path(args.note).is_file():
            raise InputError(f"--note {args.note}: no such file")
        note = Path(args.note).read_text()
    dest = pipeline.mix_generators(args.run_dirs, args.output, weights=weights, note=note)
    print(f"mixture of {len(args.run_dirs)} generators -> {dest}; sample it with `boltzflow sample {dest} -n N`")
    return 0
