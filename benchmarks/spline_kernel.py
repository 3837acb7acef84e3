"""Speed of the fused CPU spline kernel (``flows/spline_cpu.cpp``) against the torch implementation of the
same spline, and optionally against another version of the kernel's source, measured in the same run.

    python benchmarks/spline_kernel.py --json
    git show 61ff456:src/boltzflow/flows/spline_cpu.cpp > /tmp/old.cpp
    python benchmarks/spline_kernel.py --baseline-source /tmp/old.cpp --json     # before / after a change

Times one call on ``n`` elements (default 512 x 60: a batch of 512 through one coupling of the
tetrapeptide's 120 internal coordinates) with K bins, for the bounded (kind 0) and the circular (kind 1)
spline, with the derivatives a training step needs ("train": values and Jacobians, then the backward's
two multiplies) and without ("sample": values only). One thread; the figures are the minimum over
``--repeats`` calls (the machine may be shared). Prints ``{"n", "bins", "results": [{"kind", "mode",
"kernel_ms", "torch_ms", "speedup_vs_torch", "baseline_ms", "speedup_vs_baseline"}]}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import torch


def _best(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def _load_baseline(source: Path) -> ctypes.CDLL:
    from boltzflow.energy.native_cpu import build_shared_library, find_compiler

    cxx = find_compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler: cannot build --baseline-source")
    lib = ctypes.CDLL(str(build_shared_library(cxx, source)))
    for name in ("bf_rq_spline_f64", "bf_rq_spline_f32"):
        f = getattr(lib, name)
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_double,
                      ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                      ctypes.c_int] + [ctypes.c_void_p] * 6
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("-n", type=int, default=512 * 60, help="elements per call (default 30 720)")
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--baseline-source", type=Path, default=None,
                    help="another version of spline_cpu.cpp to time in the same run (built with the same flags)")
    ap.add_argument("--json", action="store_true", help="print the JSON only")
    a = ap.parse_args(argv)
    if a.n < 1 or a.bins < 2 or a.repeats < 1:
        ap.error("-n >= 1, --bins >= 2 and --repeats >= 1 are needed")
    from boltzflow.flows import spline_cpu
    from boltzflow.flows import splines as S

    torch.set_num_threads(1)
    lib = spline_cpu.load()
    if lib is None:
        raise SystemExit("the spline kernel is not available (no compiler, or BOLTZFLOW_CPU_KERNEL=0)")
    base = _load_baseline(a.baseline_source) if a.baseline_source else None
    g = torch.Generator().manual_seed(0)
    results = []
    for circular in (False, True):
        n_par = 3 * a.bins if circular else 3 * a.bins - 1
        x = (torch.rand(a.n, generator=g) * 2 - 1) * 3.0
        p = 1.5 * torch.randn(a.n, n_par, generator=g)
        for mode in ("train", "sample"):
            def run(use_kernel: bool):
                def f():
                    xx, pp = (x.clone().requires_grad_(), p.clone().requires_grad_()) if mode == "train" else (x, p)
                    if use_kernel:
                        y, ld = S.packed_rq_spline(xx, pp, circular, 5.0, False)
                    else:
                        w, h, d = pp[..., :a.bins], pp[..., a.bins:2 * a.bins], pp[..., 2 * a.bins:]
                        y, ld = (S.circular_rq_spline(xx, w, h, d) if circular
                                 else S.unconstrained_rq_spline(xx, w, h, d, 5.0))
                    if mode == "train":
                        (y.sum() + ld.sum()).backward()
                return f

            with torch.set_grad_enabled(mode == "train"):
                row = {"kind": "circular" if circular else "bounded", "mode": mode,
                       "kernel_ms": 1e3 * _best(run(True), a.repeats),
                       "torch_ms": 1e3 * _best(run(False), max(3, a.repeats // 5))}
                if base is not None:
                    saved = spline_cpu._lib
                    spline_cpu._lib = base
                    try:
                        row["baseline_ms"] = 1e3 * _best(run(True), a.repeats)
                    finally:
                        spline_cpu._lib = saved
                    row["speedup_vs_baseline"] = row["baseline_ms"] / row["kernel_ms"]
            row["speedup_vs_torch"] = row["torch_ms"] / row["kernel_ms"]
            row["ns_per_element"] = 1e6 * row["kernel_ms"] / a.n
            results.append(row)
    out = {"n": a.n, "bins": a.bins, "threads": 1, "results": results,
           "command": "python benchmarks/spline_kernel.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if not a.json:
        for r in results:
            b = f", baseline {r['baseline_ms']:.2f} ms ({r['speedup_vs_baseline']:.2f}x)" if "baseline_ms" in r else ""
            print(f"{r['kind']:9s} {r['mode']:6s}: kernel {r['kernel_ms']:.2f} ms ({r['ns_per_element']:.0f} ns/element), "
                  f"torch {r['torch_ms']:.2f} ms ({r['speedup_vs_torch']:.1f}x){b}")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
