"""A tiny data-parallel training job for the tests: ``python -m torch.distributed.run --standalone
--nproc_per_node 2 ddp_worker.py RUN_DIR OUT.json [--max-steps K] [--resume] [--loss NAME]`` (or plain
``python ddp_worker.py ...`` for one process). Trains a RealNVP flow on a 2D double well; rank 0
writes OUT.json with the logged loss curve and the final parameters."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from double_well_2d import data, dw_energy  # noqa: E402

from boltzflow import distributed  # noqa: E402
from boltzflow.core.rundir import RunDir  # noqa: E402
from boltzflow.flows.builders import make_flow  # noqa: E402
from boltzflow.sampling.pool import PoolConfig  # noqa: E402
from boltzflow.training.trainer import OptimConfig, StageConfig, TrainConfig, Trainer  # noqa: E402


def config(loss: str = "l2plus", pretrain: int = 12, finetune: int = 6) -> TrainConfig:
    return TrainConfig(pretrain=StageConfig(loss="klz", steps=pretrain, batch=128),
                       finetune=StageConfig(loss=loss, steps=finetune, batch=128, cycles=(1, 1)),  # a warm restart
                       optimizer=OptimConfig(lr=3e-3), log_every=1, checkpoint_every=4, progress=False,
                       eval_batch=64, seed=11, ess_guard=256 if finetune else 0,
                       pool=PoolConfig(size=4096, resample=4096, refresh=3, batch_size=2048))


def train(run_dir, max_steps=None, resume=False, loss="l2plus", dist=None) -> tuple[Trainer, dict]:
    torch.manual_seed(0)
    gen = make_flow(2, "realnvp", blocks=1, hidden=16, seed=0)
    trainer = Trainer(gen, dw_energy, config(loss), RunDir(run_dir), data(1024), dist=dist)
    return trainer, trainer.run(resume=resume, max_steps=max_steps)


def result(trainer: Trainer) -> dict:
    return {"rows": [{k: r[k] for k in ("step", "stage", "loss")} for r in trainer.run_dir.read_metrics()],
            "params": [p.detach().double().reshape(-1).tolist() for p in trainer.gen.parameters()],
            "energy_evals": trainer.counters.energy_evals}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--loss", default="l2plus")
    ap.add_argument("--stop-at", type=int, help="also train RUN_DIR-stopped to this step, then resume it with a "
                    "new Trainer (as after a kill) and report both")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ctx = distributed.init_distributed(device="cpu")
    try:
        out = work(a, ctx)
        # DDP wrappers hold the process group: none may outlive Trainer.run (one torn down at interpreter exit,
        # after the group, aborted the process now and then)
        out["ddp_alive"] = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        if ctx.is_main:
            with open(a.out, "w") as fh:
                json.dump(out, fh)
    finally:
        distributed.shutdown()
    return 0


def work(a: argparse.Namespace, ctx: distributed.DistContext) -> dict:
    trainer, _ = train(a.run_dir, a.max_steps, a.resume, a.loss, dist=ctx)
    out = {"full": result(trainer), "world_size": ctx.world_size}
    if a.stop_at:
        stopped = a.run_dir.rstrip("/") + "-stopped"
        train(stopped, a.stop_at, False, a.loss, dist=ctx)
        resumed, _ = train(stopped, None, True, a.loss, dist=ctx)
        out["resumed"] = result(resumed)
    return out


if __name__ == "__main__":
    sys.exit(main())
