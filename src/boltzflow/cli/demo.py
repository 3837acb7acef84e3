"""`boltzflow demo`: the main job on alanine dipeptide, end to end."""

from __future__ import annotations

from .common import (
    add_distributed,
    add_overwrite,
    add_verb,
    distributed_context,
    format_pm,
    has_error_bar,
    main_rank_only,
    print_json,
)

EXAMPLE = """\
  boltzflow demo                      # ~13 min on 2 CPU cores (Kish ESS ~47 % of 1e5 samples); uses a GPU when present
  boltzflow demo -o runs/demo2 --json
  boltzflow demo --quick              # toy-size smoke run (about a minute)
  torchrun --nproc_per_node 2 -m boltzflow demo -o runs/demo-ddp   # data-parallel training and sampling
Re-running with the same -o resumes a killed demo.
"""


def register(sub) -> None:
    p = add_verb(sub, "demo", "train, sample, reweight and report on alanine dipeptide (the README's main job)",
                 EXAMPLE, run)
    p.add_argument("-o", "--output", default="runs/demo", help="run directory (default runs/demo)")
    add_overwrite(p, "the run directory (a folder that holds other files or another kind of run)")
    p.add_argument("--quick", action="store_true", help="toy-size run for smoke tests")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_distributed(p)


def run(args) -> int:
    from ..io import check_output_dir
    from ..pipeline import demo

    dist = distributed_context(args)
    check_output_dir(args.output, "training run", args.overwrite)
    with main_rank_only(dist, args.output):
        res = demo(args.output, quick=args.quick, device=args.device, progress=False if args.no_progress else None,
                   dist=dist)
    if not dist.is_main:
        return 0
    if args.json:
        print_json(res)
        return 0
    p, r = res["phi_positive"], res["reference"]
    print("boltzflow demo: alanine dipeptide, CHARMM36m, vacuum, 300 K")
    ci = f"(95% CI {p['ci_low']:.4f}..{p['ci_high']:.4f}), " if has_error_bar(p["stderr"]) else ""
    print(f"  P(phi > 0), reweighted generator : {format_pm(p['value'], p['stderr'])} {ci}ESS {p['ess']:.0f}")
    print(f"  P(phi > 0), replica exchange ref : {format_pm(r['value'], r['stderr'])}")
    print(f"  energy evaluations {res['energy_evals']}, wall time {res['wall_s']:.0f} s")
    print(f"  report: {res['report']}")
    for w in res.get("warnings", []):
        print(f"  warning: {w}")
    return 0
