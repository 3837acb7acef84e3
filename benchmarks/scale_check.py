"""Scale check: what a larger molecule costs (memory and time) from sequence to weighted samples.

    python benchmarks/scale_check.py --sequence GYDPETGTWG --json               # chignolin, OBC2 (default)
    python benchmarks/scale_check.py --sequence GYDPETGTWG --quick --json       # toy sizes, for the tests
    python benchmarks/scale_check.py --system runs/chignolin-system --json      # an already prepared system

Runs the path a chemist runs on their own peptide, at reduced length, in one process, and times
each phase:

1. **prepare**: ``boltzflow.systems.sequence.from_sequence`` (PeptideBuilder + pdbfixer + CHARMM36m,
   ``--solvent``, minimised); skipped with ``--system``.
2. **energy**: energy + forces of ``--energy-batch`` perturbed copies of the structure (0.01 nm noise)
   with the native energy (``backend="auto"``: native when it compiles every force, else the OpenMM
   bridge; ``backend`` says which) and of 8 of them with the OpenMM bridge (CPU platform, one thread, in
   this process), wall and CPU seconds per 1 000 evaluations each; ``parity_max_abs_kT``: the largest
   |u_native - u_OpenMM| on those 8 configurations (OpenMM CPU platform, mixed precision: ~1e-7
   relative; the float64 parity against the Reference platform is tests/systems/test_chignolin.py).
3. **train**: the ``energy`` recipe (:mod:`boltzflow.recipes`: parallel tempering from the input
   structure, maximum likelihood, reverse KL with the path gradient) with a short tempering (4 ladders
   x 8 temperatures, ``--tempering-rounds`` rounds kept) and ``--ml-steps`` + ``--klx-steps`` steps at the
   recipe's batch sizes, 512 / 1 024 (``--batch`` overrides both), no ESS guard; per-step seconds of each
   stage between its first and last record in the training log (evaluation batches of 256 samples every
   5 steps included).
4. **sample**: ``--samples`` samples with energies and log weights (``pipeline.sample``), seconds per 1 000.

Every phase reports wall and CPU seconds (``time.process_time``, all threads of this process): on a
shared machine wall time grows with the other load, CPU time hardly. Training's per-step CPU times
come from stamping each new line of the training log with the CPU clock (:class:`MetricsClock`).
``peak_rss_mb`` is the process's peak resident memory (``getrusage``, monotone) after each phase, so a
phase's own peak is at most its value; CUDA runs add ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated``).
``--json`` prints one object: ``{"sequence", "solvent", "n_atoms", "n_heavy", "n_residues_with_states",
"device", "threads", "prepare": {"wall_s", "cpu_s"}, "energy": {...}, "train": {...}, "sample": {...},
"peak_rss_mb": {...}}``. The ESS of such a short run is not meaningful and is reported only as a sanity
number. Set ``OMP_NUM_THREADS`` / ``OPENMM_CPU_THREADS`` to the cores you mean to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from energy_throughput import _energy_and_forces  # noqa: E402

QUICK = {"ml_steps": 4, "klx_steps": 4, "batch": 16, "samples": 64, "energy_batch": 8, "tempering_rounds": 4,
         "eval_batch": 16, "log_every": 2, "min_time": 0.2}
#: configurations per timed OpenMM bridge call (it evaluates them one by one)
BRIDGE_BATCH = 8
FULL = {"ml_steps": 30, "klx_steps": 10, "batch": None, "samples": 1000, "energy_batch": 256, "tempering_rounds": 10,
        "eval_batch": 256, "log_every": 5, "min_time": 3.0}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux ``ru_maxrss`` is in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MetricsClock:
    """Stamps every new line of a training run's metrics.jsonl with this process's CPU time
    (``time.process_time``), polling from a thread every ``poll_s`` seconds while training runs in the
    main thread. The log itself records wall time only, which on a shared machine measures the other
    load more than the step."""

    def __init__(self, path: Path, poll_s: float = 0.02):
        import threading

        self.path, self.poll_s = path, poll_s
        self.cpu: list[float] = []  # CPU time at which line i was first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.poll_s)

    def _poll(self) -> None:
        try:
            n = self.path.read_text().count("\n") if self.path.is_file() else 0
        except OSError:
            return
        now = time.process_time()
        while len(self.cpu) < n:
            self.cpu.append(now)

    def __enter__(self) -> "MetricsClock":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stage_step_seconds(metrics: Path, cpu: list[float] | None = None) -> dict[str, dict]:
    """``{stage: {"steps", "s_per_step", "cpu_s_per_step", "energy_evals_per_step", "loss"}}`` from a run's
    metrics.jsonl: wall time (the log's), CPU time (``cpu[i]``: :class:`MetricsClock` stamp of line i) and
    energy evaluations between the first and the last record of each stage, over the steps between them."""
    rows: dict[str, list[tuple[int, dict]]] = {}
    for i, line in enumerate(metrics.read_text().splitlines()):
        r = json.loads(line)
        rows.setdefault(r.get("stage", "?"), []).append((i, r))
    out = {}
    for stage, rs in rows.items():
        (ia, a), (ib, b) = rs[0], rs[-1]
        n = int(b["step"]) - int(a["step"])
        if n <= 0:
            continue
        cps = (cpu[ib] - cpu[ia]) / n if cpu is not None and len(cpu) > ib else None
        out[stage] = {"steps": n, "s_per_step": (float(b["wall_s"]) - float(a["wall_s"])) / n, "cpu_s_per_step": cps,
                      "energy_evals_per_step": (int(b["energy_evals"]) - int(a["energy_evals"])) / n,
                      "loss": b.get("loss_name")}
    return out


def seconds_per_eval(fn, batch: int, min_time: float) -> tuple[float, float]:
    """(wall, CPU) seconds per configuration of ``fn()`` (one call = ``batch`` configurations), over calls
    for at least ``min_time`` s after two warm-up calls. CPU time (``time.process_time``: this process, all
    threads) does not grow when other processes share the cores; wall time does."""
    fn()
    fn()
    n, w0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        n += 1
        wall = time.perf_counter() - w0
        if wall >= min_time:
            break
    return wall / (n * batch), (time.process_time() - c0) / (n * batch)


def energy_phase(system, batch: int, min_time: float, seed: int = 0) -> dict:
    """Seconds (wall and CPU) per 1 000 energy + force evaluations with the native energy
    (``backend="auto"``) and the OpenMM bridge (CPU platform, one thread, in this process), and their
    largest difference in kT on ``batch`` perturbed copies (0.01 nm) of the system's structure."""
    import numpy as np
    import torch

    from boltzflow.energy import Energy
    from boltzflow.energy.native import unsupported_forces

    g = torch.Generator().manual_seed(seed)
    x0 = torch.tensor(np.array(system.positions), dtype=torch.float32)[None]
    x = x0 + 0.01 * torch.randn((batch, *x0.shape[1:]), generator=g)
    missing = unsupported_forces(system.system)
    auto = Energy(system, backend="auto")
    bridge = Energy(system, backend="openmm", platform="CPU", n_workers=1)
    nb = min(batch, BRIDGE_BATCH)  # OpenMM evaluates one configuration at a time: a few suffice
    try:
        with torch.no_grad():
            diff = float((auto(x[:nb].double()) - bridge(x[:nb].double())).abs().max()) if not missing else 0.0
        w_auto, c_auto = seconds_per_eval(_energy_and_forces(auto, x), batch, min_time)
        w_omm, c_omm = seconds_per_eval(_energy_and_forces(bridge, x[:nb]), nb, min_time)
    finally:
        bridge.close()
        if missing:
            auto.close()
    return {"backend": "openmm" if missing else "native", "unsupported_forces": missing, "batch": batch,
            "dtype": "float32", "native_s_per_1000": 1000 * w_auto, "native_cpu_s_per_1000": 1000 * c_auto,
            "openmm_s_per_1000": 1000 * w_omm, "openmm_cpu_s_per_1000": 1000 * c_omm,
            "native_over_openmm_speed_cpu": c_omm / c_auto if c_auto > 0 else None, "parity_max_abs_kT": diff}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sequence", default="GYDPETGTWG", help="peptide sequence (default chignolin GYDPETGTWG)")
    ap.add_argument("--system", help="an already prepared system directory or built-in name (skips prepare)")
    ap.add_argument("--solvent", default="obc2", choices=("vacuum", "obc2"), help="default obc2 (implicit solvent)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (seconds), same JSON")
    ap.add_argument("--ml-steps", type=int, help="maximum-likelihood steps (default 30; --quick 4)")
    ap.add_argument("--klx-steps", type=int, help="reverse-KL path-gradient steps (default 10; --quick 4)")
    ap.add_argument("--batch", type=int, help="batch of both stages (default: the recipe's, 512 / 1024)")
    ap.add_argument("--samples", type=int, help="samples drawn after training (default 1000; --quick 64)")
    ap.add_argument("--energy-batch", type=int, help="configurations per energy call (default 256; --quick 8)")
    ap.add_argument("--tempering-rounds", type=int, help="parallel-tempering rounds kept (default 10; --quick 4)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training and sampling)")
    ap.add_argument("--out", help="run directory (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true", help="print the JSON only")
    args = ap.parse_args(argv)

    import torch

    from boltzflow import pipeline
    from boltzflow.errors import InputError

    size = dict(QUICK if args.quick else FULL)
    for key in ("ml_steps", "klx_steps", "batch", "samples", "energy_batch", "tempering_rounds"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    for key in ("ml_steps", "klx_steps", "samples", "energy_batch", "tempering_rounds"):
        if size[key] < 1:
            raise InputError(f"--{key.replace('_', '-')} must be >= 1, got {size[key]}")
    report: dict = {"device": args.device, "threads": torch.get_num_threads(), "quick": bool(args.quick),
                    "peak_rss_mb": {"start": peak_rss_mb()}}
    t0 = time.time()
    if args.system:
        from boltzflow.cli.common import load_system

        system = load_system(args.system)
        report["prepare"] = {"wall_s": None, "from": args.system}
    else:
        from boltzflow.systems.sequence import from_sequence

        c0 = time.process_time()
        system = from_sequence(args.sequence, solvent=args.solvent)
        report["prepare"] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    report["peak_rss_mb"]["prepare"] = peak_rss_mb()
    modes = system.modes
    report.update(sequence=system.metadata.get("sequence", args.sequence), name=system.name,
                  solvent=system.solvent, n_atoms=int(system.n_atoms),
                  n_heavy=len(system.heavy_indices),
                  n_residues_with_states=len(getattr(modes, "residues", ())))
    if not args.json:
        print(f"prepared {system.name}: {system.n_atoms} atoms ({report['n_heavy']} heavy)", file=sys.stderr)

    report["energy"] = energy_phase(system, size["energy_batch"], size["min_time"])
    report["peak_rss_mb"]["energy"] = peak_rss_mb()
    if not args.json:
        e = report["energy"]
        print(f"energy + forces per 1000 (CPU s): native {e['native_cpu_s_per_1000']:.3g}, "
              f"OpenMM {e['openmm_cpu_s_per_1000']:.3g}; "
              f"parity {e['parity_max_abs_kT']:.2g} kT", file=sys.stderr)

    ov = {"device": args.device, "training.ess_guard": 0, "training.keep_checkpoints": False,
          "training.pretrain.steps": size["ml_steps"], "training.finetune.steps": size["klx_steps"],
          "training.log_every": size["log_every"], "training.checkpoint_every": size["ml_steps"] + size["klx_steps"],
          "training.eval_batch": size["eval_batch"], "training.progress": False,
          "tempering.burnin_rounds": 2, "tempering.frames": size["tempering_rounds"],
          "sampling.n": size["samples"], "sampling.batch_size": min(size["samples"], 1000)}
    if args.quick:
        ov.update({"tempering.ladders": 4, "tempering.replicas": 4, "tempering.steps_per_swap": 10,
                   "tempering.minimize_steps": 20, "generator.blocks": 1, "generator.hidden": 32})
    else:
        ov.update({"tempering.ladders": 4})
    if size["batch"]:
        ov.update({"training.pretrain.batch": size["batch"], "training.finetune.batch": size["batch"]})
    cfg = pipeline.recipe_config("energy", ov)
    with tempfile.TemporaryDirectory(prefix="boltzflow-scale-") as tmp:
        run = Path(args.out) if args.out else Path(tmp) / "run"
        t0, c0 = time.time(), time.process_time()
        with MetricsClock(run / "metrics.jsonl") as clock:
            summary = pipeline.train(system, cfg, run, progress=False)
        train_wall, train_cpu = time.time() - t0, time.process_time() - c0
        report["peak_rss_mb"]["train"] = peak_rss_mb()
        temp = summary.get("data_tempering") or {}
        stages = stage_step_seconds(run / "metrics.jsonl", clock.cpu)
        report["train"] = {
            "recipe": "energy", "wall_s": train_wall, "cpu_s": train_cpu,
            "steps": int(summary.get("training_steps", 0)),
            "ml_batch": cfg.training.pretrain.batch, "klx_batch": cfg.training.finetune.batch,
            "ml": stages.get("pretrain"), "klx_path": stages.get("finetune"),
            "tempering": {"wall_s": temp.get("wall_s"), "energy_evals": temp.get("energy_evals"),
                          "frames": temp.get("frames"), "swap_acceptance": temp.get("swap_acceptance"),
                          "ladders": cfg.tempering.ladders, "replicas": cfg.tempering.replicas},
            "n_parameters": None}
        _, _, gen, _ = pipeline.load_trained(run, "cpu")
        report["train"]["n_parameters"] = int(sum(p.numel() for p in gen.parameters()))
        del gen
        t0, c0 = time.time(), time.process_time()
        s = pipeline.sample(run, n=size["samples"], batch_size=min(size["samples"], 1000), device=args.device,
                            progress=False)
        wall, cpu = time.time() - t0, time.process_time() - c0
        import numpy as np

        from boltzflow.estimators import kish_ess

        ok = np.isfinite(s.reduced_energy)
        report["sample"] = {"n": len(s), "wall_s": wall, "s_per_1000": 1000.0 * wall / len(s),
                            "cpu_s": cpu, "cpu_s_per_1000": 1000.0 * cpu / len(s),
                            "fraction_finite_energy": float(ok.mean()),
                            "kish_ess_fraction": float(kish_ess(s.log_weights).value / len(s))}
        report["peak_rss_mb"]["sample"] = peak_rss_mb()
    if args.device.startswith("cuda") and torch.cuda.is_available():
        report["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    report["command"] = "python benchmarks/scale_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    print(json.dumps(report, indent=None if args.json else 2, default=float))
    return report


if __name__ == "__main__":
    main()
