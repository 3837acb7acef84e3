"""`boltzflow sample`: draw samples from a trained generator, with log q, energies and log weights."""

from __future__ import annotations

from .common import add_overwrite, add_verb, estimate_line, print_json

EXAMPLE = """\
  boltzflow sample runs/adp -n 20000                 # writes runs/adp/samples/generated.npz
  boltzflow sample runs/adp -n 5000 --export adp.dcd # also write the configurations as a trajectory
"""


def register(sub) -> None:
    p = add_verb(sub, "sample", "sample a trained generator and compute importance weights", EXAMPLE, run)
    p.add_argument("run_dir", help="run directory of `boltzflow train`")
    p.add_argument("-n", "--n", type=int, help="number of samples (default: config sampling.n)")
    p.add_argument("--batch-size", type=int, help="samples per batch")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--export", metavar="TRAJ", help="also write positions as .dcd/.pdb/.xtc/.h5 via mdtraj")
    add_overwrite(p, "TRAJ (RUN_DIR/samples/ is the verb's own and always rewritten)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")


def check_args(args) -> None:
    """InputError for arguments that cannot work, before anything is sampled or written."""
    from ..errors import InputError
    from ..io import check_output_file
    from ..sampling.sampleset import check_export_path

    for option, value in (("-n", args.n), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be >= 1, got {value}")
    if args.export:
        check_output_file(check_export_path(args.export), args.overwrite, "--export")


def run(args) -> int:
    from .. import pipeline

    check_args(args)
    s = pipeline.sample(args.run_dir, args.n, args.batch_size, args.device, seed=args.seed)
    est = pipeline.estimate(args.run_dir)
    if args.export:
        from ..systems import MolecularSystem
        from ..training.rundir import RunDir

        s.export(args.export, MolecularSystem.load(RunDir(args.run_dir, create=False).system_dir).topology)
    if args.json:
        print_json({k: v.to_dict() for k, v in est.items()})
    else:
        print(f"{len(s)} samples -> {args.run_dir}/samples/generated.npz")
        for v in est.values():
            print(f"  {estimate_line(v)}")
        for w in pipeline.reliability_warnings(est):
            print(f"  warning: {w}")
    return 0
