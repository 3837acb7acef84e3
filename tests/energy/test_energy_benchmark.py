"""benchmarks/energy_throughput.py: the issue's JSON contract (rows + ratio at batch 1024), at tiny sizes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import energy_throughput as et  # noqa: E402


def test_energy_benchmark_json_shape_and_ratio(capsys):
    threads = torch.get_num_threads()
    try:
        out = et.main(["--quick", "--no-compile", "--threads", "1", "--min-time", "0.02", "--json"])
    finally:
        torch.set_num_threads(threads)
    rows = out["rows"]
    for r in rows:
        assert {"backend", "device", "batch", "dtype", "evals_per_s"} <= set(r) and r["evals_per_s"] > 0
    native = {(r.get("kernel"), r["dtype"], r["batch"]) for r in rows if r["backend"] == "native" and r["path"] == "analytic"}
    for kernel in ("cpp", "torch"):
        for dtype in ("float32", "float64"):
            assert {(kernel, dtype, b) for b in (64, 1024, 8192)} <= native
    assert {r["batch"] for r in rows if r["backend"] == "openmm"} == {1, 64, 1024}
    ratio = out["ratio_native_over_openmm_batch_1024"]
    assert math.isfinite(ratio) and ratio > 1.0  # native beats the bridge even in a noisy 20 ms window
    assert '"ratio_native_over_openmm_batch_1024"' in capsys.readouterr().out


def test_energy_benchmark_times_a_baseline_kernel_source_in_the_same_run(tmp_path):
    """--baseline-source builds another kernel source and times it beside the current one (same source here:
    both rows present, a finite ratio); --only-cpp leaves out the bridge and the torch kernels."""
    src = Path(__file__).resolve().parents[2] / "src" / "boltzflow" / "energy" / "native_cpu.cpp"
    old = tmp_path / "old.cpp"
    old.write_text(src.read_text() + "\n// baseline copy\n")  # another source text: built as its own library
    threads = torch.get_num_threads()
    try:
        out = et.main(["--only-cpp", "--threads", "1", "--min-time", "0.02", "--baseline-source", str(old)])
    finally:
        torch.set_num_threads(threads)
    kernels = {r["kernel"] for r in out["rows"]}
    assert kernels == {"cpp", "cpp-baseline"} and all(r["backend"] == "native" for r in out["rows"])
    assert math.isfinite(out["ratio_cpp_over_baseline_batch_1024"]) and out["ratio_cpp_over_baseline_batch_1024"] > 0
