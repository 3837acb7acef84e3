"""How far a generator is from the Boltzmann distribution, in nats, from its training checkpoints: the
held-out negative log-likelihood of equilibrium frames, both KL divergences and the Kish ESS.

    python benchmarks/ml_fit.py RUN --test TEST.npz --json                        # every kept checkpoint
    python benchmarks/ml_fit.py RUN --test TEST.npz --checkpoints 6000,10000 -n 40000 --json

``RUN``: a training run directory (``checkpoints/step_*.pt``, as ``keep_checkpoints`` leaves them).
``TEST.npz``: a SampleSet of equilibrium frames at the system's temperature that the run did not train on
(e.g. one replica-exchange run's frames when training used another's). Per checkpoint:

* ``nll_test``: mean -log q(x) over the test frames (nats per frame);
* with ``-n N > 0`` also, from N generator samples with their energies: ``log_z`` (importance-sampling
  estimate of log Z, biased low), ``kish`` (Kish ESS fraction), ``kl_p_q`` = -E_p[u] - log Z - E_p[log q]
  (the forward KL that maximum likelihood minimises; E_p[u] over the test frames), and ``kl_q_p`` =
  E_q[u + log q] + log Z over the samples below their 99th percentile of u + log q (clashes excluded).

For log-normal weights Kish ESS = exp(-2 KL), so the ESS a generator can reach is read off its KL:
0.4 needs KL(p||q) of about 0.46 nats.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch


def checkpoint_steps(run: Path) -> dict[int, Path]:
    """{step: path} of the run's kept checkpoints (checkpoints/step_XXXXXXXX.pt)."""
    out = {}
    for p in sorted((run / "checkpoints").glob("step_*.pt")):
        m = re.fullmatch(r"step_(\d+)\.pt", p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def main(argv=None) -> dict:
    from boltzflow.core.rundir import RunDir
    from boltzflow.core.sampleset import SampleSet
    from boltzflow.errors import InputError
    from boltzflow.pipeline import build, load_run_config
    from boltzflow.systems import MolecularSystem
    from boltzflow.training.checkpoints import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="training run directory with checkpoints/step_*.pt")
    ap.add_argument("--test", required=True, help="SampleSet .npz of equilibrium frames the run did not train on")
    ap.add_argument("--checkpoints", help="comma-separated steps (default: every kept checkpoint)")
    ap.add_argument("-n", type=int, default=0, help="generator samples per checkpoint for log Z, KLs and Kish ESS (0: NLL only)")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the JSON only")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(a.run)
    rd = RunDir(run, create=False)
    system = MolecularSystem.load(rd.system_dir)
    config = load_run_config(rd.config_path)
    gen, energy = build(system, config, None)
    test = SampleSet.load(a.test)
    system.check_coordinates(test.positions, what=f"test frames '{a.test}'")
    x = torch.as_tensor(test.positions, dtype=next(gen.parameters()).dtype)
    x = x[torch.as_tensor(gen.same_isomer(x))]
    if len(x) == 0:
        raise InputError(f"no frame of '{a.test}' is of the generator's isomer")
    steps = checkpoint_steps(run)
    if a.checkpoints:
        want = [int(s) for s in a.checkpoints.split(",")]
        missing = [s for s in want if s not in steps]
        if missing:
            raise InputError(f"no kept checkpoint for step(s) {missing} in {run / 'checkpoints'}; kept: {sorted(steps)}")
        steps = {s: steps[s] for s in want}
    if not steps:
        raise InputError(f"{run / 'checkpoints'} holds no step_*.pt (train with training.keep_checkpoints = true)")
    bs = a.batch
    with torch.no_grad():
        u_test = torch.cat([energy(x[i:i + bs]) for i in range(0, len(x), bs)]).double()
    rows = []
    for step, path in sorted(steps.items()):
        gen.load_state_dict(load_checkpoint(path)["model"])
        gen.eval()
        with torch.no_grad():
            lq_test = torch.cat([gen.log_prob(x[i:i + bs]) for i in range(0, len(x), bs)]).double()
            row = {"step": step, "nll_test": float(-lq_test.mean())}
            if a.n > 0:
                g = torch.Generator().manual_seed(a.seed)
                lw, uq = [], []
                for i in range(0, a.n, bs):
                    xs, lq = gen.sample_and_log_prob(min(bs, a.n - i), generator=g)
                    u = energy(xs).double()
                    lw.append(-u - lq.double())
                    uq.append(u + lq.double())
                lw, uq = torch.cat(lw), torch.cat(uq)
                lw = lw[torch.isfinite(lw)]
                log_z = float(torch.logsumexp(lw, 0) - math.log(len(lw)))
                w = torch.exp(lw - lw.max())
                uq = uq[torch.isfinite(uq)]
                uq = uq[uq <= torch.quantile(uq, 0.99)]
                row.update(n=len(lw), log_z=log_z, kish=float(w.sum() ** 2 / (w * w).sum() / len(lw)),
                           kl_p_q=float(-u_test.mean() - log_z - lq_test.mean()), kl_q_p=float(uq.mean() + log_z))
        rows.append(row)
        if not a.json:
            print(json.dumps(row), flush=True)
    out = {"run": str(run), "test": str(a.test), "n_test": len(x), "mean_u_test": float(u_test.mean()), "checkpoints": rows}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
