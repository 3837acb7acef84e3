"""`boltzflow export`: copy a trained run's self-contained part (a shippable generator) to a new directory."""

from __future__ import annotations

from .common import add_verb

EXAMPLE = """\
  boltzflow export runs/adp shipped/adp                      # config, weights, system, summary, log, metrics
  boltzflow export runs/adp shipped/adp --weights-dtype float16 --note HOW.md   # half the size
  boltzflow export runs/adp shipped/adp8 --weights-dtype int8       # a quarter (per-row int8 matrices)
  boltzflow sample shipped/adp -n 100000                     # works wherever the directory is copied
"""


def register(sub) -> None:
    p = add_verb(sub, "export", "copy a trained run's generator (no checkpoints, data or samples) to a new directory",
                 EXAMPLE, run)
    p.add_argument("run_dir", help="a trained run directory (with generator.pt)")
    p.add_argument("dest", help="new (or empty) destination directory")
    p.add_argument("--weights-dtype", choices=["float16", "bfloat16", "int8"], default=None,
                   help="store the flow's parameters rounded to this type (float16/bfloat16: half the file; int8: "
                        "weight matrices per row, a quarter; a slightly different generator, exact log q for "
                        "itself: measure its ESS, e.g. with `boltzflow sample DEST`)")
    p.add_argument("--note", metavar="FILE.md", help="markdown saying how the generator was made -> DEST/README.md")


def run(args) -> int:
    from pathlib import Path

    from .. import pipeline
    from ..errors import InputError

    note = ""
    if args.note:
        if not Path(args.note).is_file():
            raise InputError(f"--note {args.note}: no such file")
        note = Path(args.note).read_text()
    dest = pipeline.export_generator(args.run_dir, args.dest, note=note, weights_dtype=args.weights_dtype)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"exported {args.run_dir} -> {dest} ({size / 1e6:.1f} MB); sample it with `boltzflow sample {dest} -n N`")
    return 0
