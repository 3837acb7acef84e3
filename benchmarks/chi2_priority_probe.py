"""Probe: chi2_data fine-tuning with the training frames drawn in proportion to their importance weights
(prioritised) instead of uniformly, from a trained run; checkpoints to evaluate with your own draws.

    python benchmarks/chi2_priority_probe.py RUN OUT --frames RUN/data/tempering.npz --pool 100000 \\
        --refresh 100 --steps 600 --lr 3e-5 --batch 1024 --save-every 200

The gradient of chi2_data, -E_p[w grad log q] with w = p/q, is dominated by the few frames of largest w;
drawn uniformly, a batch of 1 024 frames holds a handful of them (batch Kish ESS 0.001-0.2), which limits
the learning rate. Here every ``--refresh`` steps a new pool of ``--pool`` random training frames (the run's
own train/held-out split, its isomer filter) is scored once (u and log q, no gradient), and batches are
drawn with probability pi = (1 - eps) w / sum(w) + eps / pool; each frame's loss weight is w_now / pi,
self-normalised over the batch (w_now with the current log q: an unbiased step despite the stale pool).
Nothing is written to RUN; OUT_stepN.pt files hold {"model": state_dict}. Prints one JSON row per 20 steps
({"step", "nll" of the batch, "batch_ess", "wall_s"}) and one per pool ({"pool_kish"}).
Measured (2026-12-03): from the shipped tetrapeptide generator (tlc, Kish 0.233 on 4 x 1e5 draws) at lr 3e-5:
0.221 / 0.225 after 200 / 600 steps (clipped 0.276 / 0.252 against 0.288; Pareto k 0.42-0.45 against
0.49): a shorter tail bought with the bulk (docs/peptides.md, "Capacity, not the estimator").
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch


def main(argv=None) -> None:
    from boltzflow.losses.base import kish_ess
    from boltzflow.pipeline import _keep_isomer, _split, load_trained

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("out", help="prefix of the checkpoint files OUT_stepN.pt")
    ap.add_argument("--frames", required=True, help="the run's training frames (.npz with positions in nm)")
    ap.add_argument("--pool", type=int, default=100_000)
    ap.add_argument("--refresh", type=int, default=100)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (cosine to 0)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--eps", type=float, default=0.1, help="uniform share of the sampling probabilities")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    system, config, gen, energy = load_trained(a.run, "cpu")
    gen.train()
    with np.load(a.frames) as d:
        positions = d["positions"]
        train_idx, _ = _split(len(positions), config.data.holdout, config.seed)
        x_all, _ = _keep_isomer(system, config, positions[np.sort(train_idx)])
    g = torch.Generator().manual_seed(a.seed)

    def scored(f, x, bs=5000):
        with torch.no_grad():
            return torch.cat([f(x[i:i + bs]) for i in range(0, len(x), bs)]).double()

    def new_pool():
        idx = np.sort(torch.randperm(len(x_all), generator=g)[: a.pool].numpy())
        x = gen.prepare_data(torch.as_tensor(x_all[idx], dtype=torch.float32))
        u = scored(energy, x)
        log_w = -u - scored(gen.log_prob, x)
        log_w[~torch.isfinite(log_w)] = -math.inf
        pi = (1 - a.eps) * torch.softmax(log_w, 0) + a.eps / len(x)
        print(json.dumps({"pool_kish": kish_ess(log_w)}), flush=True)  # of the pool frames' weights
        return x, u, pi

    opt = torch.optim.Adam(gen.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0))))
    t0 = time.time()
    for step in range(1, a.steps + 1):
        if (step - 1) % a.refresh == 0:
            x, u, pi = new_pool()
        b = torch.multinomial(pi, a.batch, replacement=True, generator=g)
        lq = gen.log_prob(x[b]).double()
        with torch.no_grad():
            v = torch.softmax(-u[b] - lq - torch.log(pi[b]), 0)  # w_now / pi, self-normalised
        loss = -(v * lq).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 100.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == 1:
            print(json.dumps({"step": step, "nll": float(-lq.detach().mean()), "batch_ess": float(1 / (v ** 2).sum() / len(v)),
                              "wall_s": round(time.time() - t0, 1)}), flush=True)
        if step % a.save_every == 0 or step == a.steps:
            torch.save({"model": gen.state_dict()}, f"{a.out}_step{step}.pt")


if __name__ == "__main__":
    main()
