"""Energy + force evaluations per second: native torch vs the OpenMM bridge, from one run.

    python benchmarks/energy_throughput.py [--quick] [--json] [--solvent vacuum|obc2] [--min-time S]
    python benchmarks/energy_throughput.py --system alanine-tetrapeptide --baseline-source OLD.cpp --only-cpp --json

``--baseline-source OLD.cpp`` (e.g. ``git show REV:src/boltzflow/energy/native_cpu.cpp > OLD.cpp``) also times
that version of the C++ kernel, built with the same flags, in the same run (rows with ``"kernel": "cpp-baseline"``,
``ratio_cpp_over_baseline_batch_1024``); ``--only-cpp`` skips the OpenMM and torch-kernel rows.

Alanine dipeptide (shipped, CHARMM36m). Bridge (boltzflow.energy.openmm_bridge.OpenMMEnergy):
batch 1, 64, 1024 with 1 and N = os.cpu_count() workers on every available OpenMM platform.
Native (boltzflow.energy.native.NativeEnergy, analytic forces): batch 64, 1024, 8192 in float32 and
float64 on CPU (and CUDA when available): the C++ kernel (``cpu_kernel="cpp"``, boltzflow.energy.native_cpu),
and the torch kernels eager and ``compile=True`` (torch.compile; skip with --no-compile), with 1 and N
torch threads (``--threads`` picks one count; the bridge's N-worker rows
use N processes); plus the autograd path (``analytic=False``, eager) at batch 1024 for reference.
One evaluation = energy and forces (``torch.autograd.grad`` of the summed energy) of one configuration.
``ratio_native_over_openmm_batch_1024`` = best native CPU rate / best bridge rate, both at batch 1024
(``ratio_cuda_native_over_openmm_cuda_batch_1024`` likewise on CUDA when present).
``--json`` prints ``{"rows": [{"backend", "device", "batch", "dtype", "evals_per_s", ...}], "ratio_...": x}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _rate(fn, batch: int, min_time: float, repeats: int = 5) -> float:
    """Best of ``repeats`` windows of ``min_time / repeats`` s each (robust to other load on the machine)."""
    fn()  # warm-up (worker start, allocations, compilation)
    fn()
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t0
            if el >= min_time / repeats:
                break
        best = max(best, n * batch / el)
    return best


def _energy_and_forces(energy, x):
    import torch

    def run():
        xr = x.detach().requires_grad_(True)
        u = energy(xr)
        (g,) = torch.autograd.grad(u.sum(), xr)
        return g

    return run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run: fewer configurations, shorter timings")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--solvent", default="vacuum", choices=("vacuum", "obc2"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the native rows (default: both 1 and os.cpu_count(); on a shared, loaded "
                         "machine more threads oversubscribe the cores and collapse throughput)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd native rows")
    ap.add_argument("--system", default="alanine-dipeptide", help="built-in system (default alanine-dipeptide)")
    ap.add_argument("--baseline-source", default=None,
                    help="another version of native_cpu.cpp to time in the same run (built with the same flags)")
    ap.add_argument("--only-cpp", action="store_true", help="only the C++ kernel rows (and the baseline's)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per measurement (default 2.0, quick 0.5), split into 5 windows; the best window counts")
    args = ap.parse_args(argv)
    if args.baseline_source and not os.path.isfile(args.baseline_source):
        ap.error(f"--baseline-source {args.baseline_source}: no such file (e.g. git show REV:src/boltzflow/energy/native_cpu.cpp > OLD.cpp)")

    import numpy as np
    import openmm
    import torch

    from boltzflow.energy.native import NativeEnergy
    from boltzflow.energy.openmm_bridge import OpenMMEnergy
    from boltzflow.systems.builtin import builtin_system

    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 2.0)
    ms = builtin_system(args.system, args.solvent)
    rng = np.random.default_rng(0)

    def confs(batch: int, dtype=torch.float64, device="cpu"):
        x = ms.positions[None] + rng.normal(scale=0.005, size=(batch,) + ms.positions.shape)
        return torch.tensor(x, dtype=dtype, device=device)

    rows: list[dict] = []
    n_cpu = os.cpu_count() or 1
    platforms = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if args.quick:
        platforms = [p for p in platforms if p != "Reference"]
    if args.only_cpp:
        platforms = []
    bridge_batches = (1, 64, 1024)
    for plat in platforms:
        for workers in sorted({1, n_cpu}):
            kw = {"platform": plat, "n_workers": workers}
            with OpenMMEnergy(ms, **kw) as bridge:
                for batch in bridge_batches:
                    x = confs(batch)
                    rate = _rate(_energy_and_forces(bridge, x), batch, min_time)
                    device = "cuda" if plat in ("CUDA", "OpenCL") else "cpu"
                    rows.append({"backend": "openmm", "device": device, "batch": batch, "dtype": "float64",
                                 "evals_per_s": rate, "platform": plat, "workers": workers})
                    print(f"openmm  {plat:9s} workers={workers} batch={batch:5d}: {rate:12.1f} evals/s", file=sys.stderr)

    from boltzflow.energy import native_cpu

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # (device, torch.compile, analytic forces, CPU kernel)
    variants = [("cpu", False, True, "cpp")] if native_cpu.load() is not None else []
    if not variants:
        print(f"C++ kernel unavailable: {native_cpu.unavailable_reason()}", file=sys.stderr)
    baseline = None
    if args.baseline_source:
        if not variants:
            raise SystemExit("--baseline-source needs the C++ kernel")
        try:
            baseline = native_cpu.load_source(args.baseline_source)
        except RuntimeError as e:
            raise SystemExit(f"--baseline-source {args.baseline_source}: {e}") from None
        variants.append(("cpu", False, True, "cpp-baseline"))
    if not args.only_cpp:
        variants += [(d, False, True, "torch") for d in devices]
        variants += [] if args.no_compile else [(d, True, True, "torch") for d in devices]
        variants.append(("cpu", False, False, "torch"))  # autograd path, for reference
    thread_counts = [args.threads] if args.threads else sorted({1, n_cpu})
    for threads in thread_counts:
        torch.set_num_threads(max(1, threads))
        for device, compiled, analytic, kernel in variants:
            if device == "cuda" and threads != thread_counts[0]:
                continue
            native = NativeEnergy(ms, compile=compiled, analytic=analytic,
                                  cpu_kernel="cpp" if kernel == "cpp-baseline" else kernel).to(device)
            if kernel == "cpp-baseline":  # the kernel object takes the library loaded at its first call
                saved, native_cpu._lib = native_cpu._lib, baseline
                try:
                    _energy_and_forces(native, confs(8))()
                finally:
                    native_cpu._lib = saved
            for dtype in (torch.float32, torch.float64):
                batches = (1024,) if (compiled and args.quick) or not analytic else (64, 1024, 8192)
                for batch in batches:
                    x = confs(batch, dtype, device)
                    fn = _energy_and_forces(native, x)
                    if device == "cuda":
                        def fn(f=fn):  # noqa: E731 - include the device sync in the timing
                            f()
                            torch.cuda.synchronize()
                    rate = _rate(fn, batch, min_time)
                    name = str(dtype).replace("torch.", "")
                    path = "analytic" if analytic else "autograd"
                    kern = kernel if device == "cpu" else "torch"
                    rows.append({"backend": "native", "device": device, "batch": batch, "dtype": name, "evals_per_s": rate,
                                 "compiled": compiled, "path": path, "kernel": kern, "threads": threads})
                    label = "compiled" if compiled else "eager"
                    print(f"native  {device:4s} {path:8s} {kern:5s} {label:8s} {name:8s} threads={threads} batch={batch:5d}: "
                          f"{rate:12.1f} evals/s", file=sys.stderr)

    def best(backend: str, device: str | None = None, batch: int = 1024, compiled: bool | None = None,
             kernel: str | None = None) -> float:
        vals = [r["evals_per_s"] for r in rows if r["backend"] == backend and r["batch"] == batch
                and (device is None or r["device"] == device) and (compiled is None or r.get("compiled") == compiled)
                and (kernel is None or r.get("kernel") == kernel)]
        return max(vals) if vals else float("nan")

    out = {
        "rows": rows,
        "ratio_native_over_openmm_batch_1024": best("native", "cpu") / best("openmm"),
        "ratio_torch_kernels_over_openmm_batch_1024": best("native", "cpu", kernel="torch") / best("openmm"),
        "system": f"{args.system} ({args.solvent})",
        "n_cpu": n_cpu,
        "torch_threads": thread_counts,
    }
    if baseline is not None:
        out["ratio_cpp_over_baseline_batch_1024"] = best("native", "cpu", kernel="cpp") / best("native", "cpu", kernel="cpp-baseline")
        out["baseline_source"] = str(args.baseline_source)
    if "cuda" in devices and any(r["backend"] == "openmm" and r["device"] == "cuda" for r in rows):
        out["ratio_cuda_native_over_openmm_cuda_batch_1024"] = best("native", "cuda") / best("openmm", "cuda")
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"ratio native/openmm at batch 1024 (best of each): {out['ratio_native_over_openmm_batch_1024']:.1f}x "
              f"(torch kernels only: {out['ratio_torch_kernels_over_openmm_batch_1024']:.1f}x)")
        if baseline is not None:
            print(f"ratio C++ kernel / --baseline-source at batch 1024: {out['ratio_cpp_over_baseline_batch_1024']:.2f}x")
        if "ratio_cuda_native_over_openmm_cuda_batch_1024" in out:
            print(f"ratio on CUDA: {out['ratio_cuda_native_over_openmm_cuda_batch_1024']:.1f}x")
    return out


if __name__ == "__main__":
    main()
