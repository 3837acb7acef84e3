"""Trainer on a real molecule: butane (CHARMM), native energy, MolecularGenerator, every loss."""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.core.rundir import RunDir
from boltzflow.energy import Energy
from boltzflow.flows.generator import GeneratorConfig, build_generator
from boltzflow.sampling.ais import AISConfig
from boltzflow.systems.builtin import builtin_system
from boltzflow.training.trainer import OptimConfig, StageConfig, TrainConfig, Trainer


@pytest.fixture(scope="module")
def butane():
    system = builtin_system("butane")
    g = torch.Generator().manual_seed(0)
    ref = torch.tensor(system.positions, dtype=torch.float64)
    data = ref + 0.003 * torch.randn(64, *ref.shape, generator=g, dtype=torch.float64)
    native = Energy(system, backend="native")
    return system, data, (lambda x: native(x.to(torch.float64)).to(x.dtype))


@pytest.mark.parametrize("loss", ["klx", "l2plus", "fab"])
def test_molecular_training_runs_every_loss(butane, tmp_path, loss):
    system, data, energy = butane
    torch.manual_seed(0)
    gen = build_generator(system, GeneratorConfig(pipeline="conditional", representation="internal", blocks=1,
                                                  hidden=16, h_blocks=1, h_hidden=16), data)
    cfg = TrainConfig(pretrain=StageConfig("klz", 8, 32), finetune=StageConfig(loss, 2, 16), log_every=1,
                      optimizer=OptimConfig(lr=5e-3, schedule="constant"),
                      checkpoint_every=2, progress=False, eval_batch=16, ais=AISConfig(step_size=1e-3))
    run = RunDir(tmp_path / loss)
    s = Trainer(gen, energy, cfg, run, data, system.modes).run()
    rows = run.read_metrics()
    assert s["step"] == 10 and rows[-1]["stage"] == "finetune"
    assert set(rows[-1]["modes"]) == {"gauche_minus", "gauche_plus", "trans"}
    assert math.isfinite(rows[-1]["u_mean"]) and 0 <= rows[-1]["ess"] <= 1
    # KLz pre-training on near-reference data must raise the data likelihood
    pre = [r for r in rows if r["stage"] == "pretrain"]
    assert pre[-1]["nll"] < pre[0]["nll"]
    assert s["skipped_steps"] == 0
    assert run.latest_checkpoint.is_file()
