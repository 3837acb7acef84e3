"""Trainer on a real molecule: butane (CHARMM), native energy, MolecularGenerator, every loss."""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.core.rundir import RunDir
from boltzflow.energy import Energy
from boltzflow.errors import ConfigError
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


def test_rwml_with_resample_move_counts_the_moves_and_resumes(butane, tmp_path):
    """An rwml stage whose pool moves its frames by HMC in the generator's internal coordinates: the moves'
    energy-and-force evaluations are counted, and a killed run resumes to the same parameters."""
    from boltzflow.sampling.pool import PoolConfig

    system, data, energy = butane

    def make():
        torch.manual_seed(0)
        return build_generator(system, GeneratorConfig(pipeline="internal-all", representation="internal", blocks=1,
                                                        hidden=16), data)

    pool = PoolConfig(size=256, resample=128, clip=0.0, refresh=2, batch_size=128, power=2.0, move_fraction=1.0,
                      move_steps=2, move_leapfrog=2, move_step_size=0.05)
    cfg = TrainConfig(pretrain=StageConfig("klz", 4, 32), finetune=StageConfig("rwml", 4, 32), log_every=1,
                      optimizer=OptimConfig(lr=5e-3, schedule="constant"), checkpoint_every=6, progress=False,
                      eval_batch=16, pool=pool)
    run = RunDir(tmp_path / "a")
    s = Trainer(make(), energy, cfg, run, data).run()
    rows = [r for r in run.read_metrics() if r["stage"] == "finetune"]
    assert 0 < rows[-1]["pool_move_accept"] <= 1 and rows[-1]["pool_move_step"] > 0
    # two pools of 256 draws, each moving 128 frames by 2 transitions of 2 leapfrog steps (1 + 2 + 2
    # evaluations per frame), plus the 16 samples evaluated at each of the 8 logged steps
    assert s["energy_evals"] == 2 * (256 + 128 * 5) + 8 * 16
    # resume from the step-6 checkpoint (mid-stage, a pool in use): same final parameters
    gen_b = make()
    run_b = RunDir(tmp_path / "b")
    Trainer(gen_b, energy, cfg, run_b, data).run(max_steps=6)
    gen_c = make()
    Trainer(gen_c, energy, cfg, run_b, data).run(resume=True)
    gen_a = make()
    Trainer(gen_a, energy, cfg, RunDir(tmp_path / "c"), data).run()
    assert all(torch.equal(p, q) for p, q in zip(gen_a.parameters(), gen_c.parameters()))


def test_state_balance_draws_frames_by_state(tmp_path):
    """state_balance = 1 gives every whole-molecule combination of residue states the same share of the drawn
    frames, 0 draws uniformly; without molecular modes it is refused with a message."""
    from pathlib import Path

    import numpy as np

    from boltzflow.errors import InputError
    from boltzflow.sampling import SampleSet

    system = builtin_system("alanine-tetrapeptide")
    ref = Path(__file__).resolve().parents[2] / "systems" / "alanine-tetrapeptide" / "reference_300K.npz"
    data = torch.as_tensor(np.asarray(SampleSet.load(ref).positions[:2000], dtype=np.float64))
    _, labels, counts = np.unique(system.modes.combinations(data.numpy()), return_inverse=True, return_counts=True)
    assert len(counts) > 10  # combinations of three residues' states, not the four whole-molecule states
    assert counts.min() < 0.05 * counts.max()  # rare and common states both present: the test can fail
    gen = build_generator(system, GeneratorConfig(pipeline="internal-all", representation="internal", blocks=1,
                                                  hidden=8), data)
    n = 40_000
    for power in (0.0, 1.0):
        cfg = TrainConfig(pretrain=StageConfig("klz", 4, 64, state_balance=power), finetune=StageConfig("klz", 0, 16),
                          progress=False)
        trainer = Trainer(gen, lambda x: x.sum((1, 2)), cfg, RunDir(tmp_path / f"p{power}"), data, system.modes)
        share = np.bincount(labels[trainer._frame_indices("pretrain", n).numpy()], minlength=len(counts)) / n
        expected = np.full(len(counts), 1 / len(counts)) if power else counts / counts.sum()
        assert np.abs(share - expected).max() < 4 * np.sqrt(expected.max() / n)
        if power:
            assert "frames drawn by state" in (tmp_path / f"p{power}" / "log.txt").read_text()
    with pytest.raises(InputError, match="state_balance"):
        Trainer(gen, lambda x: x.sum((1, 2)), TrainConfig(pretrain=StageConfig("klz", 4, 64, state_balance=0.5),
                                                          finetune=StageConfig("klz", 0, 16), progress=False),
                None, data, None)
    with pytest.raises(ConfigError, match="state_balance"):
        StageConfig("klz", 4, 64, state_balance=1.5)
    with pytest.raises(ConfigError, match="draws none"):
        TrainConfig(finetune=StageConfig("l2plus", 4, 64, state_balance=0.5))
