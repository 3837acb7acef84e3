"""`boltzflow train`: maximum likelihood on data, then energy-based fine-tuning; resumable."""

from __future__ import annotations

from .common import (
    add_distributed,
    add_overwrite,
    add_verb,
    distributed_context,
    load_system,
    main_rank_only,
    print_json,
)

EXAMPLE = """\
  boltzflow train my_peptide/ -o runs/mine               # the default recipe: from the structure alone
  boltzflow train my_peptide/ -o runs/mine2 --set data.reference="runs/pt/samples.npz"   # on your frames
  boltzflow train --print-config > train.toml           # the default recipe, every option written out
  boltzflow train my_peptide/ --print-config            # the recipe auto picks for this molecule, in full
  boltzflow train alanine-dipeptide --config train.toml -o runs/adp
  boltzflow train alanine-dipeptide --recipe data -o runs/adp-data  # on the shipped reference frames
  boltzflow train alanine-dipeptide --recipe none -o runs/quick --pretrain-steps 200 --finetune-steps 500 --loss l2plus
  boltzflow train --resume runs/adp                      # continue a killed run
  boltzflow train my_peptide/ -o runs/more --set init=runs/mine2 --set data.reference=more.npz   # from mine2's weights
  boltzflow train my_system/ -o runs/x --set generator.hidden=128 --set training.optimizer.lr=5e-4
  torchrun --nproc_per_node 2 -m boltzflow train alanine-dipeptide -o runs/ddp   # data-parallel (DDP)
  torchrun --nproc_per_node 2 -m boltzflow train --resume runs/ddp                # or one process: boltzflow train --resume
  boltzflow train dw4 -o runs/dw4 --set generator.layers=6 --set training.steps=3000   # E(n)-free-form flow
"""


#: the fine-tuning losses of boltzflow.losses.LOSSES, listed here so that `--help` does not import torch
#: (tests/cli checks the two lists agree)
FINETUNE_LOSSES = ("klx_path", "rwml", "klx", "klz_df", "alpha2", "fab", "l2plus", "l2plus_nomask", "l2plus_nodetach",
                   "klz", "chi2_data", "logvar_data")


def parse_set(items: list[str] | None) -> dict:
    """``["a.b=3", "c=x"]`` -> ``{"a.b": 3, "c": "x"}`` (values parsed as TOML scalars when possible)."""
    import tomllib

    from ..errors import InputError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--set expects KEY=VALUE (e.g. training.finetune.steps=100), got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v
    return out


def register(sub) -> None:
    p = add_verb(sub, "train", "train a Boltzmann generator (maximum likelihood on data, then energy-based fine-tuning)", EXAMPLE, run)
    p.add_argument("system", nargs="?", help="system directory (from `boltzflow prepare`) or built-in name")
    p.add_argument("-o", "--output", help="run directory to create")
    add_overwrite(p, "RUN_DIR (a folder that holds other files or another kind of run)")
    p.add_argument("--recipe", default="auto",
                   help="the recipe the run starts from (--config and --set apply on top): 'energy' (no reference data: "
                   "parallel tempering from the input structure, maximum likelihood on its frames, then reweighted "
                   "maximum likelihood on importance-resampled pools of the generator's own samples), 'data' (the same on reference frames grown by Langevin dynamics), 'peptide' (peptides: a backbone-lead flow, "
                   "maximum likelihood on 300 K tempering frames, then the log-variance of the weights on them; the "
                   "shipped tetrapeptide generator's stages in one run), 'auto' (the "
                   "default: 'data' when data.reference is given, else 'peptide' for a peptide of >= 2 residues with "
                   "phi and psi, else 'energy'), or 'none' (bare defaults, every stage configured by hand)")
    p.add_argument("--config", help="TOML configuration (see --print-config)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the full default configuration and exit")
    p.add_argument("--pretrain-steps", type=int, help="maximum-likelihood (KLz) steps on the training data")
    p.add_argument("--finetune-steps", type=int, help="energy-based fine-tuning steps")
    p.add_argument("--loss", help="fine-tuning loss: " + ", ".join(FINETUNE_LOSSES))
    p.add_argument("--batch", type=int, help="batch size of both stages")
    p.add_argument("--pipeline", help="generator pipeline: conditional (unbiased), hnet (biased), internal-all")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", help="energy backend: auto, native, openmm")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_distributed(p)


def overrides_from_args(args) -> dict:
    ov = parse_set(args.set)
    for key, val in (("training.pretrain.steps", args.pretrain_steps), ("training.finetune.steps", args.finetune_steps),
                     ("training.finetune.loss", args.loss), ("training.pretrain.batch", args.batch),
                     ("training.finetune.batch", args.batch), ("generator.pipeline", args.pipeline),
                     ("device", args.device), ("seed", args.seed), ("training.seed", args.seed),
                     ("energy.backend", args.backend)):
        if val is not None:
            ov[key] = val
    return ov


def run(args) -> int:
    from .. import pipeline
    from ..errors import InputError

    if args.print_config:
        from ..config import dump_toml

        system = load_system(args.system) if args.system and args.recipe == "auto" else None
        cfg = pipeline.load_run_config(args.config, overrides_from_args(args), recipe=args.recipe, system=system)
        print(dump_toml(cfg, show_unset=True), end="")
        return 0
    from ..systems.particles import PARTICLE_SYSTEMS
    from ..training.freeform import is_particle_run

    if args.system in PARTICLE_SYSTEMS or (args.resume and is_particle_run(args.resume)):
        return _train_particles(args)
    dist = distributed_context(args)
    if args.resume:
        from ..core.rundir import RunDir
        from ..systems import MolecularSystem

        rd = RunDir(args.resume, create=False)
        if not rd.config_path.is_file():
            raise InputError(f"'{rd.path}' is not a training run directory (no config.toml)")
        config = pipeline.load_run_config(rd.config_path, overrides_from_args(args))
        system = MolecularSystem.load(rd.system_dir)
        summary = pipeline.train(system, config, rd.path, resume=True, progress=False if args.no_progress else None,
                                 dist=dist)
    else:
        if not args.system or not args.output:
            raise InputError("train needs SYSTEM and -o RUN_DIR (or --resume RUN_DIR); see `boltzflow train --help`")
        from ..io import check_output_dir

        check_output_dir(args.output, "training run", args.overwrite)
        system = load_system(args.system)
        config = pipeline.load_run_config(args.config, overrides_from_args(args), recipe=args.recipe, system=system)
        with main_rank_only(dist, args.output):
            summary = pipeline.train(system, config, args.output, progress=False if args.no_progress else None,
                                     dist=dist)
    if not dist.is_main:
        return 0
    if args.json:
        print_json(summary)
    else:
        print(f"trained {summary.get('system')}: {summary.get('training_steps')} steps, "
              f"{summary.get('energy_evals_training')} energy evaluations, {summary.get('skipped_steps')} skipped steps; "
              f"run directory {args.resume or args.output}")
    return 0


def _train_particles(args) -> int:
    """DW4 / LJ13 / LJ55: an E(n)-free-form flow (:mod:`boltzflow.training.freeform`) on the system's
    reference frames; the TOML has a top-level ``system`` and ``[generator] kind = "freeform"``."""
    from ..errors import InputError
    from ..training.freeform import load_particle_config, train_freeform

    ov = parse_set(args.set)
    for key, val in (("training.steps", args.finetune_steps), ("training.batch", args.batch),
                     ("training.seed", args.seed)):
        if val is not None:
            ov[key] = val
    if args.resume:
        config = load_particle_config(f"{args.resume}/config.toml", ov)
        summary = train_freeform(config, args.resume, resume=True)
    else:
        if not args.output:
            raise InputError("train needs -o RUN_DIR; see `boltzflow train --help`")
        from ..io import check_output_dir

        check_output_dir(args.output, "training run", args.overwrite)
        ov["system"] = args.system
        config = load_particle_config(args.config, ov)
        summary = train_freeform(config, args.output)
    if args.json:
        print_json(summary)
    else:
        print(f"trained free-form flow on {summary.get('system')}: {summary.get('training_steps')} steps, "
              f"{summary.get('training_wall_s')} s; run directory {args.resume or args.output}")
    return 0
