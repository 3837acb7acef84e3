"""Parallel scaling of boltzflow's three scale-out paths, 1 vs N ranks on one machine (CPU).

* training: data-parallel KLz (maximum likelihood) on alanine dipeptide under ``torchrun`` (DDP, gloo),
  global batch ``--batch`` (default 1024) split over the ranks: optimizer steps per second;
* sampling: ``torchrun -m boltzflow sample`` (per-rank shards, merged on rank 0): samples per second of
  the slowest shard, and Kish ESS per wall-second;
* replica exchange: ``mpiexec -n N boltzflow simulate`` (openmmtools' MPI path): iterations per
  second (skipped without mpi4py / mpiexec: ``pip install -e .[mpi]``).

Parallel efficiency of N ranks = rate(N) / (N * rate(1)). Every rank runs one thread
(``OMP_NUM_THREADS=1``), so N ranks use N cores; on a machine with other jobs running the numbers mean
nothing (the ranks wait for each other at every all-reduce). Every measurement, one rank included,
goes through its launcher, so start-up costs are alike; timings exclude start-up (warm-up steps for
training, the sampler's and the replica run's own wall-time records).

    python benchmarks/scaling.py [--quick] [--json] [--ranks 1,2] [--parts train,sample,replica]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "sample", "replica")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO / "src"), env.get("PYTHONPATH", "")] if p)
    return env


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return r


def _torchrun(n: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args], timeout)


def mpiexec_path() -> str | None:
    """mpiexec next to this Python (the [mpi] extra) or on PATH; None without mpi4py or mpiexec."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


# ---------------------------------------------------------------------------------------------
# the training worker (runs under torchrun)
# ---------------------------------------------------------------------------------------------
def train_worker(args: argparse.Namespace) -> None:
    """One rank of the training measurement: ``--warmup`` steps, then ``--steps`` timed steps."""
    import torch

    from boltzflow import distributed, pipeline
    from boltzflow.systems.builtin import builtin_system
    from boltzflow.training.trainer import StageConfig, TrainConfig, Trainer

    torch.set_num_threads(1)
    ctx = distributed.init_distributed(device="cpu")
    try:
        system = builtin_system("alanine-dipeptide")
        cfg = pipeline.demo_config(quick=args.quick)
        from dataclasses import replace

        cfg = replace(cfg, device="cpu", data=replace(cfg.data, md_frames=0, max_samples=5000))
        if args.flow:
            blocks, hidden = (int(v) for v in args.flow.lower().split("x"))
            cfg = replace(cfg, generator=replace(cfg.generator, blocks=blocks, hidden=hidden))
        ref, _ = pipeline.load_reference(system, cfg.data)
        gen, energy = pipeline.build(system, cfg, ref.positions)
        total = args.warmup + args.steps
        stage = StageConfig(loss=args.loss, steps=total, batch=args.batch)
        tc = TrainConfig(pretrain=stage if args.loss == "klz" else StageConfig(loss="klz", steps=0),
                         finetune=stage if args.loss != "klz" else StageConfig(steps=0),
                         log_every=10**9, checkpoint_every=10**9, progress=False, eval_batch=0, seed=0)
        tc = pipeline._effective_training(tc, gen)
        data = torch.as_tensor(ref.positions, dtype=torch.float32)
        trainer = Trainer(gen, energy, tc, run_dir=None, data=data, dist=ctx)
        trainer.run(max_steps=args.warmup)
        ctx.barrier()
        t0 = time.perf_counter()
        trainer.run(max_steps=args.steps)
        ctx.barrier()
        dt = time.perf_counter() - t0
        if ctx.is_main:
            Path(args.out).write_text(json.dumps({"steps": args.steps, "seconds": dt, "batch": args.batch,
                                                  "loss": args.loss, "ranks": ctx.world_size}))
    finally:
        distributed.shutdown()


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def measure_training(n: int, opts, tmp: Path, loss: str) -> dict:
    out = tmp / f"train-{loss}-{n}.json"
    _torchrun(n, [__file__, "--worker", "train", "--out", str(out), "--steps", str(opts.steps), "--warmup",
                  str(opts.warmup), "--batch", str(opts.batch), "--loss", loss] + (["--quick"] if opts.quick else [])
              + (["--flow", opts.flow] if opts.flow else []),
              opts.timeout)
    r = json.loads(out.read_text())
    return {"part": "train", "loss": loss, "ranks": n, "batch": r["batch"], "flow": opts.flow or "demo", "steps": r["steps"],
            "seconds": r["seconds"], "rate": r["steps"] / r["seconds"], "unit": "steps/s"}


def trained_run(tmp: Path, quick: bool) -> Path:
    """A small trained alanine-dipeptide run to sample from (its quality does not matter for throughput)."""
    run = tmp / "gen"
    steps = "5" if quick else "50"
    _run([sys.executable, "-m", "boltzflow", "train", "alanine-dipeptide", "-o", str(run), "--device", "cpu",
          "--pretrain-steps", steps, "--finetune-steps", "0", "--batch", "64", "--no-progress",
          "--set", "data.max_samples=2000"] + (["--set", "generator.blocks=1", "--set", "generator.hidden=32"]
                                               if quick else []), opts_timeout(quick))
    return run


def opts_timeout(quick: bool) -> float:
    return 600 if quick else 3600


def measure_sampling(n: int, opts, run: Path) -> dict:
    from boltzflow.estimators import kish_ess
    from boltzflow.sampling import SampleSet

    _torchrun(n, ["-m", "boltzflow", "sample", str(run), "-n", str(opts.samples), "--batch-size",
                  str(opts.sample_batch), "--device", "cpu", "--json"], opts.timeout)
    s = SampleSet.load(run / "samples" / "generated.npz")
    elapsed = float(s.provenance.get("elapsed_s", s.provenance["wall_s"]))
    ess = kish_ess(s.log_weights).value if s.log_weights is not None else float("nan")
    return {"part": "sample", "ranks": n, "samples": len(s), "seconds": elapsed, "rate": len(s) / elapsed,
            "unit": "samples/s", "ess": ess, "ess_per_s": ess / elapsed}


def measure_replica(n: int, opts, tmp: Path, mpiexec: str) -> dict:
    out = tmp / f"re-{n}"
    # -bind-to core (MPICH's hydra and Open MPI both take it): one core per rank, the 1-rank baseline too.
    # Unbound, a lone rank on an idle machine runs ~7x slower: OpenMM's CPU platform hands every force
    # evaluation to a worker thread, and waking it on another (idle) core costs ~0.1 ms on a VM.
    _run([mpiexec, "-bind-to", "core", "-n", str(n), sys.executable, "-m", "boltzflow", "simulate", "alanine-dipeptide",
          "--replicas", str(opts.replicas), "--iterations", str(opts.iterations), "--steps-per-iteration",
          str(opts.re_steps), "--threads", "1", "--checkpoint-interval", str(opts.iterations), "--no-progress",
          "-o", str(out)], opts.timeout)
    cost = json.loads((out / "replica_cost.json").read_text())
    return {"part": "replica", "ranks": n, "replicas": opts.replicas, "iterations": cost["iteration"],
            "steps_per_iteration": opts.re_steps, "seconds": cost["wall_time_s"],
            "rate": cost["iteration"] / cost["wall_time_s"], "unit": "iterations/s"}


def efficiency(rows: list[dict]) -> None:
    """Add ``speedup`` and ``efficiency`` (rate(N) / (N rate(1))) to rows with a 1-rank baseline."""
    base = {(r["part"], r.get("loss"), r.get("flow")): r["rate"] for r in rows if r["ranks"] == 1}
    for r in rows:
        b = base.get((r["part"], r.get("loss"), r.get("flow")))
        if b:
            r["speedup"] = r["rate"] / b
            r["efficiency"] = r["rate"] / (r["ranks"] * b)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes (seconds of work; a smoke test, not a measurement)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)} (default all)")
    ap.add_argument("--losses", default="klz,l2plus", help="training losses to time (default klz,l2plus)")
    ap.add_argument("--batch", type=int, default=1024, help="global training batch (default 1024)")
    ap.add_argument("--flow", default="", metavar="BLOCKSxHIDDEN",
                    help="training flow size, e.g. 8x256 (the energy recipe's); default: the demo's flow")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps (default 40)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed training steps first (default 5)")
    ap.add_argument("--samples", type=int, default=100_000, help="samples drawn (default 100000)")
    ap.add_argument("--sample-batch", type=int, default=5000, help="sampling batch per rank (default 5000)")
    ap.add_argument("--replicas", type=int, default=4, help="replica-exchange replicas (default 4)")
    ap.add_argument("--iterations", type=int, default=50, help="replica-exchange iterations (default 50)")
    ap.add_argument("--re-steps", type=int, default=500, help="Langevin steps per iteration (default 500)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per launch (default 3600)")
    ap.add_argument("--worker", choices=("train",), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--loss", default="klz", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.flow and not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", opts.flow.lower()):
        ap.error(f"--flow takes BLOCKSxHIDDEN, e.g. 8x256; got {opts.flow!r}")
    if opts.worker == "train":
        train_worker(opts)
        return {}
    if opts.quick:
        opts.batch, opts.steps, opts.warmup = 64, 3, 1
        opts.samples, opts.sample_batch = 256, 128
        opts.iterations, opts.re_steps, opts.replicas = 2, 10, 2
        opts.timeout = min(opts.timeout, 600)
    ranks = [int(x) for x in opts.ranks.split(",") if x.strip()]
    parts = [p.strip() for p in opts.parts.split(",") if p.strip()]
    bad = set(parts) - set(PARTS)
    if bad:
        ap.error(f"unknown part(s) {sorted(bad)}; choose from {', '.join(PARTS)}")
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="boltzflow-scaling-") as d:
        tmp = Path(d)
        if "train" in parts:
            for loss in [x.strip() for x in opts.losses.split(",") if x.strip()]:
                for n in ranks:
                    rows.append(measure_training(n, opts, tmp, loss))
        if "sample" in parts:
            run = trained_run(tmp, opts.quick)
            for n in ranks:
                rows.append(measure_sampling(n, opts, run))
        if "replica" in parts:
            mpiexec = mpiexec_path()
            if mpiexec is None:
                skipped["replica"] = "mpi4py / mpiexec not installed (pip install -e .[mpi])"
            else:
                for n in ranks:
                    if n > opts.replicas:
                        skipped[f"replica-{n}"] = f"{n} ranks > {opts.replicas} replicas"
                        continue
                    rows.append(measure_replica(n, opts, tmp, mpiexec))
    efficiency(rows)
    result = {"rows": rows, "skipped": skipped, "quick": bool(opts.quick), "cpu_count": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0], "wall_s": time.time() - t_all}
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        for r in rows:
            eff = f"  efficiency {100 * r['efficiency']:.0f} %" if "efficiency" in r and r["ranks"] > 1 else ""
            what = r["part"] + (f" ({r['loss']})" if r.get("loss") else "")
            print(f"{what:18s} {r['ranks']} rank(s): {r['rate']:10.3f} {r['unit']}{eff}")
        for k, v in skipped.items():
            print(f"{k}: skipped ({v})")
    return result


if __name__ == "__main__":
    main()
