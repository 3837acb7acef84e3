"""Cost of the flow's own passes: a maximum-likelihood step (forward + backward) and a sampling pass of a
trained generator, with float32 and bfloat16 conditioner networks (``training.conditioner_dtype``), and
what bf16 does to the density (log q of the same configurations, Kish ESS of the same draws).

    python benchmarks/flow_step.py systems/alanine-dipeptide/generators/energy --batch 1024 --json

One thread (``--threads``); run it on an idle core, the figures are wall-clock medians. Prints
``{"run", "batch", "threads", "float32": {"ml_step_ms", "sample_ms"}, "bfloat16": {...},
"speedup_ml_step", "speedup_sample", "log_q_diff_sd", "kish_float32", "kish_bf16_log_q", "n_kish"}``."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def main(argv=None) -> dict:
    from boltzflow import pipeline
    from boltzflow.core.weights import kish_ess
    from boltzflow.flows.nn import conditioner_precision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="trained run or shipped generator directory")
    ap.add_argument("--batch", type=int, default=1024, help="configurations per step and per sampling pass")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--kish", type=int, default=20000, help="draws for the density comparison (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    system, config, gen, energy = pipeline.load_trained(a.run)
    with torch.no_grad():
        x, _ = gen.sample_and_log_prob(a.batch, generator=torch.Generator().manual_seed(0))
    out: dict = {"run": a.run, "batch": a.batch, "threads": a.threads,
                 "parameters": sum(p.numel() for p in gen.parameters())}
    for dtype in ("float32", "bfloat16"):
        def ml_step():
            gen.zero_grad(set_to_none=True)
            with conditioner_precision(gen, dtype):
                loss = -gen.log_prob(x).mean()
            loss.backward()

        def sample():
            with torch.no_grad(), conditioner_precision(gen, dtype):
                gen.sample_and_log_prob(a.batch, generator=torch.Generator().manual_seed(1))

        gen.train()
        out[dtype] = {"ml_step_ms": _median_ms(ml_step, a.repeats)}
        gen.eval()
        out[dtype]["sample_ms"] = _median_ms(sample, a.repeats)
    out["speedup_ml_step"] = out["float32"]["ml_step_ms"] / out["bfloat16"]["ml_step_ms"]
    out["speedup_sample"] = out["float32"]["sample_ms"] / out["bfloat16"]["sample_ms"]
    if a.kish > 0:
        s = gen.sample(a.kish, energy=energy, batch_size=5000, generator=torch.Generator().manual_seed(2))
        xs = torch.from_numpy(s.positions).to(next(gen.parameters()).dtype)
        with torch.no_grad(), conditioner_precision(gen, "bfloat16"):
            lq16 = torch.cat([gen.log_prob(xs[i:i + 5000]) for i in range(0, len(xs), 5000)]).double().numpy()
        d = lq16 - s.log_q
        lw16 = -s.reduced_energy - lq16
        out.update({"log_q_diff_sd": float(np.std(d)), "log_q_diff_max": float(np.abs(d).max()),
                    "kish_float32": float(kish_ess(torch.from_numpy(s.log_weights))) / a.kish,
                    "kish_bf16_log_q": float(kish_ess(torch.from_numpy(lw16))) / a.kish, "n_kish": a.kish})
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
