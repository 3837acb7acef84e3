"""``boltzflow simulate``: replica exchange / parallel tempering reference runs."""

from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np

from .common import add_overwrite, add_verb, check_temperature, format_pm, has_error_bar, print_json

EXAMPLE = """\
  boltzflow simulate alanine-dipeptide --method parallel-tempering --t-min 300 --t-max 700 \\
      --replicas 8 --iterations 2000 -o runs/adp-pt
  # killed? continue where the last checkpoint left off (or extend with a larger --iterations):
  boltzflow simulate alanine-dipeptide --iterations 3000 -o runs/adp-pt --resume
  # several MPI ranks (pip install -e .[mpi]): openmmtools spreads the replicas over the ranks, rank 0 writes
  mpirun -n 4 boltzflow simulate butane --iterations 2000 -o runs/butane-pt
  mpirun -n 4 boltzflow simulate butane --iterations 3000 -o runs/butane-pt --resume
  # native batched tempering (no OpenMM in the loop): 128 independent ladders x 8 temperatures as one batch,
  # 6000 rounds of 50 steps; error bars from the spread between ladders. Two seeds = two independent runs:
  boltzflow simulate alanine-tetrapeptide --method native-tempering --ladders 128 --t-max 1000 \
      --iterations 6000 --steps-per-iteration 50 --seed 0 -o runs/tetra-native-a

Writes RUN_DIR/replica.nc (+ replica_checkpoint.nc, NetCDF, and their *.snapshot copies taken at
each checkpoint, which --resume falls back to when a kill damaged the storage), RUN_DIR/samples.npz
(decorrelated SampleSet of the t-min state, nm / kT) and RUN_DIR/summary.json (statistical
inefficiency, mode populations with block errors). Energies use the system's OpenMM System as is (no constraints:
keep --timestep-fs <= 1).

--method native-tempering writes RUN_DIR/native_tempering.pt (the whole state, checkpointed every
--checkpoint-interval rounds; --resume continues it, also with a larger --iterations), RUN_DIR/samples.npz
(the kept t-min frames, ladder-major; frames of another cis/trans or chiral isomer than the input
structure's get zero weight) and RUN_DIR/summary.json (populations with errors from the spread between
ladders). It needs the native energy (every force of the System implemented; docs/peptides.md).
"""


def register(sub) -> None:
    p = add_verb(sub, "simulate", "run replica exchange / parallel tempering and extract target-state samples",
                 EXAMPLE, run)
    p.add_argument("system", metavar="SYSTEM_DIR", help="system directory (boltzflow prepare) or built-in name")
    p.add_argument("--method", choices=("parallel-tempering", "replica-exchange", "native-tempering"),
                   default="parallel-tempering",
                   help="parallel-tempering / replica-exchange: openmmtools, one ladder of OpenMM Contexts; "
                        "native-tempering: --ladders independent ladders with the native batched energy (far "
                        "cheaper per evaluation, error bars from the spread between ladders)")
    p.add_argument("--t-min", type=float, default=None, help="lowest (target) temperature, K (default: the system's)")
    p.add_argument("--t-max", type=float, default=700.0, help="highest temperature, K (default 700)")
    p.add_argument("--replicas", type=int, default=8, help="number of replicas, geometric ladder (default 8)")
    p.add_argument("--iterations", type=int, default=None,
                   help="total exchange iterations (swap rounds) (default 1000; native-tempering 6000)")
    p.add_argument("--steps-per-iteration", type=int, default=None,
                   help="Langevin steps per iteration (default 500; native-tempering 50)")
    p.add_argument("--ladders", type=int, default=128, help="native-tempering: independent ladders (default 128)")
    p.add_argument("--burnin", type=int, default=None,
                   help="native-tempering: rounds discarded before the first kept frame (default a quarter of "
                        "--iterations)")
    p.add_argument("--stride", type=int, default=15, help="native-tempering: keep a frame every this many rounds "
                                                          "in every ladder (default 15)")
    p.add_argument("--seed", type=int, default=0, help="native-tempering: random seed (default 0); another seed is "
                                                      "an independent run")
    p.add_argument("--timestep-fs", type=float, default=1.0, help="fs (default 1.0; systems are unconstrained)")
    p.add_argument("--collision-rate", type=float, default=1.0, help="Langevin friction, 1/ps (default 1)")
    p.add_argument("--platform", default="CPU", help="OpenMM platform: CPU, CUDA, OpenCL, Reference or auto")
    p.add_argument("--threads", type=int, default=1, help="CPU platform threads (default 1). On an otherwise idle multi-core machine pin a 1-thread run to one core (`taskset -c 0 boltzflow simulate ...`; under MPI `mpiexec -bind-to core`): OpenMM hands every force evaluation to a worker thread, and waking it on an idle core made alanine dipeptide ~7x slower per step on a 2-vCPU VM (docs/scaling.md)")
    p.add_argument("--checkpoint-interval", type=int, default=10, help="iterations between checkpoints (default 10)")
    p.add_argument("--online-analysis", action="store_true", help="openmmtools online MBAR (slow; off by default)")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an existing run in RUN_DIR")
    add_overwrite(p, "RUN_DIR (a folder that holds other files; an existing run is continued with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..estimators import mode_populations
    from ..io import atomic_write_json, check_output_dir, undone_on_input_error
    from ..replica import ReplicaExchangeConfig, extract_samples, run_replica_exchange, state_populations
    from ..replica.exchange import check_mpi_launch, mpi_comm
    from .common import load_system

    if args.method == "native-tempering":
        return run_native(args)
    args.iterations = 1000 if args.iterations is None else args.iterations
    args.steps_per_iteration = 500 if args.steps_per_iteration is None else args.steps_per_iteration
    comm = mpi_comm()  # None unless launched by mpirun with mpi4py installed
    is_root = comm is None or comm.rank == 0
    check_mpi_launch(args.replicas, comm)
    out = check_output_dir(args.output, "replica-exchange run", args.overwrite)
    if (out / "replica.nc").exists() and not args.resume:
        raise InputError(f"'{out}' already holds a run; pass --resume to continue it or choose another -o directory")
    system = load_system(args.system)
    t_min = check_temperature(args.t_min if args.t_min is not None else system.temperature, "--t-min")
    t_max = check_temperature(args.t_max, "--t-max")
    if t_max == t_min and args.replicas > 1:
        raise InputError(f"--t-min equals --t-max ({t_min:g} K): all {args.replicas} replicas would run at one "
                         "temperature and exchanges would do nothing; raise --t-max or pass --replicas 1")
    if abs(t_min - system.temperature) > 1e-6:
        system = system.with_temperature(t_min)
    config = ReplicaExchangeConfig(
        method=args.method, t_min=t_min, t_max=t_max, n_replicas=int(args.replicas),
        n_iterations=int(args.iterations), steps_per_iteration=int(args.steps_per_iteration),
        timestep_fs=float(args.timestep_fs), collision_rate_per_ps=float(args.collision_rate),
        platform=args.platform, threads=args.threads, checkpoint_interval=int(args.checkpoint_interval),
        online_analysis=bool(args.online_analysis))
    if comm is not None:
        comm.barrier()  # every rank has checked -o before rank 0 writes into it
    guard = undone_on_input_error(out, keep_if=("replica.nc",)) if is_root else contextlib.nullcontext(out)
    with guard:
        out.mkdir(parents=True, exist_ok=True)
        if is_root:
            system.save(out / "system")
        storage = run_replica_exchange(system, config, out, resume=args.resume, progress=not args.no_progress)
    if not is_root:
        return 0  # rank 0 alone reads the storage back and writes samples.npz and summary.json
    samples = extract_samples(storage, state_index=0)
    samples.provenance["command"] = "boltzflow simulate " + " ".join(_argv(args))
    samples.save(out / "samples.npz")
    summary = {
        "command": samples.provenance["command"],
        "system": system.name,
        "temperature_k": t_min,
        "n_iterations": samples.provenance["n_iterations"],
        "equilibration_iterations": samples.provenance["equilibration_iterations"],
        "statistical_inefficiency": samples.provenance["statistical_inefficiency"],
        "n_samples": len(samples),
        "energy_evals": samples.provenance["energy_evals"],
        "wall_s": samples.provenance["wall_s"],
        "simulated_time_ns_per_replica": samples.provenance["n_iterations"] * config.steps_per_iteration
        * config.timestep_fs * 1e-6,
    }
    broken = broken_frame_fraction(system, samples.positions)
    if broken > 0:
        summary["broken_frame_fraction"] = broken
    if system.modes is not None:
        modes = system.modes
        ind = {nm: (lambda x, i=i: modes.assign(x) == i) for i, nm in enumerate(modes.names)}
        pops = state_populations(storage, ind, n_blocks=10)
        summary["populations_block"] = {k: v.to_full_dict() for k, v in pops.items()}
        summary["populations_decorrelated"] = {k: v.to_full_dict() for k, v in
                                               mode_populations(modes, samples.positions).items()}
    atomic_write_json(out / "summary.json", summary)
    if broken > 0:
        print(f"warning: {100 * broken:.1f}% of the samples at {t_min:g} K have a bond stretched to over "
              f"{BROKEN_BOND_FACTOR:g}x its length in the prepared structure: the molecule came apart (too hot "
              "a ladder or too long a timestep?); these samples are not usable", file=sys.stderr)
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {storage} and {out / 'samples.npz'} ({len(samples)} decorrelated samples at {t_min:g} K; "
              f"statistical inefficiency {summary['statistical_inefficiency']:.1f} iterations)")
        for k, v in summary.get("populations_block", {}).items():
            err = " (block error)" if has_error_bar(v["stderr"]) else ""
            print(f"  P({k}) = {format_pm(v['value'], v['stderr'])}{err}")
    return 0


def run_native(args: argparse.Namespace) -> int:
    """``simulate --method native-tempering`` (:func:`boltzflow.replica.native.run_native_tempering`)."""
    from ..errors import InputError
    from ..io import atomic_write_json, check_output_dir, undone_on_input_error
    from ..pipeline import native_energy_and_isomer
    from ..replica.native import STATE_FILE, NativeTemperingConfig, ladder_populations, run_native_tempering
    from .common import load_system

    out = check_output_dir(args.output, "native tempering run", args.overwrite)
    if (out / STATE_FILE).exists() and not args.resume:
        raise InputError(f"'{out}' already holds a run; pass --resume to continue it or choose another -o directory")
    system = load_system(args.system)
    t_min = check_temperature(args.t_min if args.t_min is not None else system.temperature, "--t-min")
    t_max = check_temperature(args.t_max, "--t-max")
    if abs(t_min - system.temperature) > 1e-6:
        system = system.with_temperature(t_min)
    rounds = 6000 if args.iterations is None else int(args.iterations)
    config = NativeTemperingConfig(
        ladders=int(args.ladders), replicas=int(args.replicas), t_max=t_max, rounds=rounds,
        steps_per_swap=50 if args.steps_per_iteration is None else int(args.steps_per_iteration),
        burnin_rounds=rounds // 4 if args.burnin is None else int(args.burnin), stride_rounds=int(args.stride),
        timestep_fs=float(args.timestep_fs), friction_per_ps=float(args.collision_rate), seed=int(args.seed),
        checkpoint_every=int(args.checkpoint_interval) * 20)
    if not t_max > t_min and config.replicas > 1:
        raise InputError(f"--t-max ({t_max:g} K) must be above --t-min ({t_min:g} K) with {config.replicas} replicas")
    energy, keep = native_energy_and_isomer(system)
    bar = None if args.no_progress else _progress_bar(config.rounds)
    with undone_on_input_error(out, keep_if=(STATE_FILE,)):
        out.mkdir(parents=True, exist_ok=True)
        system.save(out / "system")
        samples = run_native_tempering(system, energy, config, out, resume=args.resume, keep=keep,
                                       progress=bar)
    command = "boltzflow simulate " + " ".join(_argv(args))
    samples.provenance["command"] = command
    samples.save(out / "samples.npz")
    prov = samples.provenance
    summary = {"command": command, "system": system.name, "temperature_k": t_min, "method": "native-tempering",
               **{k: prov[k] for k in ("ladders", "frames_per_ladder", "rounds", "simulated_time_ns_per_replica",
                                       "temperatures_k", "swap_acceptance", "reset_chains", "other_isomer_frames",
                                       "energy_evals", "wall_s")},
               "n_samples": len(samples), "burnin_rounds": config.burnin_rounds, "stride_rounds": config.stride_rounds}
    broken = broken_frame_fraction(system, samples.positions)
    if broken > 0:
        summary["broken_frame_fraction"] = broken
    if system.modes is not None:
        modes = system.modes
        ind = modes.indicators() if hasattr(modes, "indicators") else {
            nm: (lambda x, i=i: modes.assign(x) == i) for i, nm in enumerate(modes.names)}
        pops = ladder_populations(samples, ind)
        summary["populations_ladders"] = {k: v.to_full_dict() for k, v in pops.items()}
    atomic_write_json(out / "summary.json", summary)
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {out / 'samples.npz'} ({len(samples)} frames at {t_min:g} K from {prov['ladders']} ladders, "
              f"{prov['simulated_time_ns_per_replica']:.3f} ns per replica; {prov['other_isomer_frames']} of another "
              f"isomer not counted)")
        for k, v in summary.get("populations_ladders", {}).items():
            print(f"  P({k}) = {format_pm(v['value'], v['stderr'])} (error between ladders)")
    return 0


def _progress_bar(total: int):
    """A progress callback (round, rounds) printing to stderr every ~2 % of the run."""
    import time

    step = max(total // 50, 1)
    t0: dict[str, float] = {}

    def cb(done: int, rounds: int) -> None:
        if not t0:
            t0.update(t=time.perf_counter(), done=done)
        if done % step == 0 or done == rounds:
            el = time.perf_counter() - t0["t"]
            rate = (done - t0["done"]) / el if el > 0 else float("nan")
            print(f"native tempering: round {done}/{rounds} ({rate:.1f} rounds/s)", file=sys.stderr, flush=True)

    return cb


#: a bond longer than this many times its length in the prepared structure marks a broken frame
BROKEN_BOND_FACTOR = 2.0


def broken_frame_fraction(system, positions: np.ndarray) -> float:
    """Fraction of frames (n, n_atoms, 3) nm with any bond over BROKEN_BOND_FACTOR x its length in
    ``system.positions`` (0 for a system without bonds in its topology)."""
    pairs = np.array([(b[0].index, b[1].index) for b in system.topology.bonds()], dtype=int).reshape(-1, 2)
    if len(pairs) == 0 or len(positions) == 0:
        return 0.0
    ref = np.linalg.norm(system.positions[pairs[:, 0]] - system.positions[pairs[:, 1]], axis=-1)
    x = np.asarray(positions, dtype=np.float64)
    d = np.linalg.norm(x[:, pairs[:, 0]] - x[:, pairs[:, 1]], axis=-1)
    return float(np.mean(np.any(d > BROKEN_BOND_FACTOR * ref, axis=1)))


def _argv(args: argparse.Namespace) -> list[str]:
    parts = [str(args.system), "--method", args.method]
    if args.t_min is not None:
        parts += ["--t-min", f"{args.t_min:g}"]
    parts += ["--t-max", f"{args.t_max:g}", "--replicas", str(args.replicas), "--iterations", str(args.iterations),
             "--steps-per-iteration", str(args.steps_per_iteration), "--timestep-fs", f"{args.timestep_fs:g}",
             "--platform", str(args.platform), "-o", str(args.output)]
    if args.method == "native-tempering":
        parts += ["--ladders", str(args.ladders), "--seed", str(args.seed), "--stride", str(args.stride)]
        if args.burnin is not None:
            parts += ["--burnin", str(args.burnin)]
    if args.resume:
        parts.append("--resume")
    return parts
