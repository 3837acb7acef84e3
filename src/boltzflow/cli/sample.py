"""`boltzflow sample`: draw samples from a trained generator, with log q, energies and log weights."""

from __future__ import annotations

from ..sampling.mcmc_config import MCMC_METHODS
from .common import add_distributed, add_overwrite, add_verb, distributed_context, estimate_line, print_json

EXAMPLE = """\
  boltzflow sample runs/adp -n 20000                 # writes runs/adp/samples/generated.npz
  boltzflow sample runs/adp -n 5000 --export adp.dcd # also write the configurations as a trajectory
  torchrun --nproc_per_node 4 -m boltzflow sample runs/adp -n 1000000   # 4 ranks, merged into generated.npz
  boltzflow sample runs/adp -n 1000000 --shard 3/8   # one job of a batch array (shard 3 of 8, its own seed)
  boltzflow merge runs/adp                           # then join the 8 shards into generated.npz
  boltzflow sample runs/adp -n 100000 --mcmc imh --chains 16   # also exact unweighted IMH chains: samples/imh.npz
  boltzflow sample systems/dw4/generators/fff -n 10000   # free-form flow of a particle system (DW4, LJ13)
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
    p.add_argument("--shard", metavar="I/N", help="draw only shard I of N of the -n samples (0 <= I < N; its own seed) "
                   "into samples/generated.shard-III-of-NNN.npz; join them with `boltzflow merge RUN_DIR`")
    p.add_argument("--mcmc", choices=MCMC_METHODS, help="flow-MCMC on top of the draws (default: config "
                   "sampling.mcmc.method): imh (independence Metropolis-Hastings over the same draws), mala / hmc "
                   "(latent-space chains), snf (latent stochastic blocks, path weights); writes samples/METHOD.npz")
    p.add_argument("--chains", type=int, help="flow-MCMC chains (default: config sampling.mcmc.chains)")
    add_distributed(p)


def check_args(args) -> None:
    """InputError for arguments that cannot work, before anything is sampled or written."""
    from ..core.sampleset import check_export_path
    from ..errors import InputError
    from ..io import check_output_file

    for option, value in (("-n", args.n), ("--batch-size", args.batch_size), ("--chains", args.chains)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be >= 1, got {value}")
    if args.export:
        check_output_file(check_export_path(args.export), args.overwrite, "--export")


def run(args) -> int:
    from .. import pipeline

    check_args(args)
    from ..training.freeform import is_particle_run

    if is_particle_run(args.run_dir):
        return _sample_particles(args)
    shard = None
    if args.shard:
        from ..sampling.shards import parse_shard

        shard = parse_shard(args.shard)
    dist = distributed_context(args)
    mcmc = _mcmc_config(args)
    s = pipeline.sample(args.run_dir, args.n, args.batch_size, args.device, seed=args.seed, shard=shard, dist=dist,
                        mcmc=mcmc)
    if not dist.is_main:
        return 0
    if shard is not None:
        from ..sampling.shards import shard_name

        print(f"{len(s)} samples (shard {shard[0]}/{shard[1]}) -> {args.run_dir}/samples/"
              f"{shard_name('generated', *shard)}; join all {shard[1]} with `boltzflow merge {args.run_dir}`")
        if args.export:
            from ..core.rundir import RunDir
            from ..systems import MolecularSystem

            s.export(args.export, MolecularSystem.load(RunDir(args.run_dir, create=False).system_dir).topology)
        return 0
    est = pipeline.estimate(args.run_dir)
    if args.export:
        from ..core.rundir import RunDir
        from ..systems import MolecularSystem

        s.export(args.export, MolecularSystem.load(RunDir(args.run_dir, create=False).system_dir).topology)
    chain = None
    if mcmc is not None and mcmc.method != "none":
        from ..core.rundir import RunDir
        from ..sampling import SampleSet

        prov = SampleSet.load(RunDir(args.run_dir, create=False).samples_dir / f"{mcmc.method}.npz").provenance
        chain = {"method": mcmc.method, "accept_rate": prov.get("accept_rate"), "energy_evals": prov.get("energy_evals"),
                 "chains": prov.get("chains"), "estimates": pipeline.estimate(args.run_dir, which=mcmc.method)}
    if args.json:
        out = {k: v.to_dict() for k, v in est.items()}
        if chain is not None:
            out["mcmc"] = {**chain, "estimates": {k: v.to_dict() for k, v in chain["estimates"].items()}}
        print_json(out)
    else:
        print(f"{len(s)} samples -> {args.run_dir}/samples/generated.npz")
        for v in est.values():
            print(f"  {estimate_line(v)}")
        for w in pipeline.reliability_warnings(est):
            print(f"  warning: {w}")
        if chain is not None:
            rate = chain["accept_rate"]
            print(f"flow-MCMC {chain['method']} -> {args.run_dir}/samples/{chain['method']}.npz "
                  f"({chain['energy_evals']} energy evaluations"
                  + (f", acceptance {rate:.3f}" if isinstance(rate, float) else "") + ")")
            for v in chain["estimates"].values():
                print(f"  {estimate_line(v)}")
    return 0


def _mcmc_config(args):
    """The run's ``sampling.mcmc`` with --mcmc / --chains applied, or None when neither is given."""
    if args.mcmc is None and args.chains is None:
        return None
    from dataclasses import replace

    from .. import pipeline
    from ..core.rundir import RunDir

    base = pipeline.load_run_config(RunDir(args.run_dir, create=False).config_path).sampling.mcmc
    kw = {k: v for k, v in (("method", args.mcmc), ("chains", args.chains)) if v is not None}
    return replace(base, **kw)


def _sample_particles(args) -> int:
    """A free-form particle run: samples with exact log q, energies and weights; Kish ESS and log Z."""
    from ..errors import InputError
    from ..estimators import kish_ess, log_z
    from ..training.freeform import sample_particles

    if args.mcmc or args.shard or args.export:
        raise InputError("--mcmc, --shard and --export are for molecular generators, not free-form particle runs")
    s = sample_particles(args.run_dir, args.n or 10000, args.seed, args.batch_size or 1000)
    est = {"ess": kish_ess(s.log_weights), "log_z": log_z(s.log_weights)}
    if args.json:
        print_json({k: v.to_dict() for k, v in est.items()})
    else:
        print(f"{len(s)} samples -> {args.run_dir}/samples/generated.npz")
        for v in est.values():
            print(f"  {estimate_line(v)}")
    return 0
