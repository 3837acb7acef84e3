"""`boltzflow merge`: join sample shards (from `boltzflow sample --shard i/N`) into one SampleSet."""

from __future__ import annotations

from .common import add_overwrite, add_verb, estimate_line, print_json

EXAMPLE = """\
  boltzflow sample runs/adp -n 1000000 --shard 0/4    # ... one job per shard (0/4 .. 3/4), e.g. a SLURM array
  boltzflow merge runs/adp                            # -> runs/adp/samples/generated.npz, with estimates
  boltzflow merge a.npz b.npz c.npz -o all.npz        # any SampleSets of one state
"""


def register(sub) -> None:
    p = add_verb(sub, "merge", "join sample shards into one SampleSet (a run's samples/generated.npz, or -o FILE)",
                 EXAMPLE, run)
    p.add_argument("inputs", nargs="+", metavar="RUN_DIR|S.npz",
                   help="a run directory with samples/generated.shard-*-of-N.npz, or SampleSet .npz files")
    p.add_argument("-o", "--output", help="merged .npz (required for files; a run writes samples/generated.npz)")
    p.add_argument("--remove-shards", action="store_true", help="delete a run's shard files after merging")
    add_overwrite(p, "-o FILE")
    p.add_argument("--json", action="store_true", help="print the estimates (runs) or a summary (files) as JSON")


def run(args) -> int:
    from pathlib import Path

    from ..errors import InputError

    if len(args.inputs) == 1 and Path(args.inputs[0]).is_dir():
        from .. import pipeline

        if args.output:
            raise InputError("-o is for merging files; a run's shards are merged into RUN_DIR/samples/generated.npz")
        merged = pipeline.merge_samples(args.inputs[0], remove_shards=args.remove_shards)
        est = pipeline.estimate(args.inputs[0])
        if args.json:
            print_json({k: v.to_dict() for k, v in est.items()})
            return 0
        print(f"{len(merged)} samples from {merged.provenance.get('shards')} shards -> "
              f"{args.inputs[0]}/samples/generated.npz")
        for v in est.values():
            print(f"  {estimate_line(v)}")
        return 0
    from ..io import check_output_file
    from ..sampling import SampleSet
    from ..sampling.shards import merge_sample_sets

    if not args.output:
        raise InputError("merging files needs -o OUT.npz (or give one run directory)")
    for p in args.inputs:
        if Path(p).is_dir():
            raise InputError(f"'{p}' is a directory; give either one run directory or .npz files")
    out = check_output_file(args.output, args.overwrite)
    merged = merge_sample_sets([SampleSet.load(p) for p in args.inputs])
    merged.save(out)
    info = {"n": len(merged), "parts": len(args.inputs), "output": str(out)}
    if args.json:
        print_json(info)
    else:
        print(f"{len(merged)} samples from {len(args.inputs)} parts -> {out}")
    return 0
