"""The importance-resampled pool of reweighted maximum likelihood (sampling/pool.py), and the trainer's
"rwml" stage: resampled frames follow p, the loss moves q to p, a resumed run draws the same pool."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "losses"))
from loss_helpers import affine_flow  # noqa: E402

from boltzflow.errors import ConfigError  # noqa: E402
from boltzflow.sampling.pool import PoolConfig, ReweightedPool, clipped_log_weights  # noqa: E402

M_P, S_P = 1.5, 0.5


def u(x):
    """p = N(1.5, 0.5^2) per dimension, unnormalised (kT)."""
    return 0.5 * ((x - M_P) / S_P).pow(2).sum(-1) + 7.0


def test_clip_caps_the_largest_log_weights():
    lw = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, -math.inf], dtype=torch.float64)
    c = clipped_log_weights(lw, 0.2)  # 1 of the 5 finite values clipped at the next largest
    assert c.tolist()[:4] == [0.0, 1.0, 2.0, 3.0] and c[4] == 3.0 and c[5] == -math.inf
    assert torch.equal(clipped_log_weights(lw, 0.0), lw)
    with pytest.raises(ConfigError, match="clip"):
        PoolConfig(clip=1.0)


def test_resampled_pool_follows_the_target():
    """q = N(0, 1) (untrained affine flow) resampled towards N(1.5, 0.5^2): the pool's mean and std are p's."""
    flow = affine_flow(1)
    g = torch.Generator().manual_seed(3)
    pool = ReweightedPool(PoolConfig(size=200_000, resample=50_000, clip=0.0, refresh=5, batch_size=50_000))
    assert pool.due
    assert pool.refresh(flow, u, g) == 200_000
    x = pool.x
    assert float(x.mean()) == pytest.approx(M_P, abs=0.02) and float(x.std()) == pytest.approx(S_P, abs=0.02)
    # the Kish ESS of N(0,1) -> N(1.5, 0.5^2): E_q[w]^2 / E_q[w^2] in closed form
    # int p^2/q dx = exp(b^2 / 4a - c) sqrt(pi / a) / (sqrt(2 pi) s^2), a = 1/s^2 - 1/2, b = 2m/s^2, c = m^2/s^2
    s2 = S_P**2
    a, b, c = 1 / s2 - 0.5, 2 * M_P / s2, M_P**2 / s2
    e_w2 = math.exp(b * b / (4 * a) - c) * math.sqrt(math.pi / a) / (math.sqrt(2 * math.pi) * s2)
    assert pool.stats["kish"] == pytest.approx(1 / e_w2, rel=0.1)
    for _ in range(5):
        assert pool.batch(8, g).shape == (8, 1)
    assert pool.due  # served `refresh` batches


def test_power_two_resamples_towards_p_squared_over_q():
    """power = 2: frames follow p^2 / q. For q = N(0, 1), p = N(m, s^2): p^2/q is Gaussian with precision
    2/s^2 - 1 and mean (2m/s^2) / (2/s^2 - 1)."""
    flow = affine_flow(1)
    g = torch.Generator().manual_seed(5)
    pool = ReweightedPool(PoolConfig(size=400_000, resample=100_000, clip=0.0, power=2.0, batch_size=100_000))
    pool.refresh(flow, u, g)
    prec = 2 / S_P**2 - 1
    assert float(pool.x.mean()) == pytest.approx((2 * M_P / S_P**2) / prec, abs=0.02)
    assert float(pool.x.std()) == pytest.approx(prec**-0.5, abs=0.02)
    assert 0 < pool.stats["resample_ess"] < 400_000


def _rwml_trainer(run_dir, **pool_kw):
    """A 60-step rwml stage on the 1-D affine flow (pools of 2e4 every 20 steps, checkpoints every 10),
    the same initial flow every time."""
    from boltzflow.core.rundir import RunDir
    from boltzflow.training.trainer import OptimConfig, StageConfig, TrainConfig, Trainer

    pool = dict(size=20_000, resample=20_000, refresh=20, batch_size=10_000) | pool_kw
    cfg = TrainConfig(pretrain=StageConfig(loss="klz", steps=0), finetune=StageConfig(loss="rwml", steps=60, batch=256),
                      optimizer=OptimConfig(lr=0.1, warmup_steps=0), pool=PoolConfig(**pool),
                      checkpoint_every=10, log_every=10, progress=False, eval_batch=0, seed=2)
    torch.manual_seed(0)
    return Trainer(affine_flow(1), u, cfg, run_dir=RunDir(run_dir))


def test_trainer_rwml_stage_learns_and_resumes_exactly(tmp_path):
    def trainer(name):
        return _rwml_trainer(tmp_path / name)

    a = trainer("a")
    out = a.run()
    aff = a.gen.bijection.layers[0]
    t, log_s = float(aff.t.detach()), float(aff.s.detach())
    assert abs(t - M_P) < 0.15 and abs(log_s - math.log(S_P)) < 0.15, (t, log_s)  # from t = 0, log s = 0
    # three pools (steps 0, 20, 40), each counted once
    assert out["energy_evals"] == 3 * 20_000
    rows = a.history
    assert all(r["loss_name"] == "rwml" and 0 < r["pool_kish"] <= 1 for r in rows)

    b = trainer("b")
    b.run(max_steps=45)  # "killed" at step 45: its pool was drawn at step 40
    c = trainer("b")
    out_c = c.run(resume=True)
    assert out_c["energy_evals"] == out["energy_evals"]
    for pa, pc in zip(a.gen.parameters(), c.gen.parameters()):
        assert torch.equal(pa, pc)


def test_rwml_data_fraction_mixes_the_training_frames_into_the_target():
    """pool.data_fraction = 0.5 with frames from N(-1.5, 0.5^2): maximum likelihood on an equal mixture of
    p = N(1.5, 0.5^2) and the frames, so the affine flow's mean lands between them (1.5 without frames)."""
    from boltzflow.errors import InputError
    from boltzflow.training.trainer import OptimConfig, StageConfig, TrainConfig, Trainer

    def cfg(frac):
        return TrainConfig(pretrain=StageConfig(loss="klz", steps=0),
                           finetune=StageConfig(loss="rwml", steps=60, batch=256),
                           optimizer=OptimConfig(lr=0.1, warmup_steps=0),
                           pool=PoolConfig(size=20_000, resample=20_000, refresh=20, batch_size=10_000,
                                           data_fraction=frac),
                           log_every=10, progress=False, eval_batch=0, seed=2)

    frames = -M_P + S_P * torch.randn(4000, 1, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    tr = Trainer(affine_flow(1), u, cfg(0.5), data=frames)
    tr.run()
    t = float(tr.gen.bijection.layers[0].t.detach())
    assert abs(t) < 0.4, t
    torch.manual_seed(0)
    with pytest.raises(InputError, match="data_fraction"):
        Trainer(affine_flow(1), u, cfg(0.5)).run()
    with pytest.raises(ConfigError, match="data_fraction"):
        PoolConfig(data_fraction=1.0)


def test_final_options_act_on_the_second_half_and_resume_exactly(tmp_path):
    """pool.*_final: the pools of the stage's first half are drawn with ``clip``, ``power`` and ``resample``,
    those of the second half with ``clip_final``, ``power_final`` and ``resample_final``; a run killed in the
    second half draws its pool again with those."""
    seen = []
    draw = ReweightedPool._draw

    def spy(self, gen, energy, generator):
        seen.append((self.clip, self.settings()))
        out = draw(self, gen, energy, generator)
        assert self.x.shape[0] == self.settings()[1]
        return out

    def trainer(name):
        return _rwml_trainer(tmp_path / name, clip=0.01, clip_final=0.0, power_final=2.0, resample_final=5000)

    early, late = (0.01, (1.0, 20_000, 0.0)), (0.0, (2.0, 5000, 0.0))
    ReweightedPool._draw = spy
    try:
        a = trainer("a")
        a.run()
        assert seen == [early, early, late]  # pools at steps 0 and 20 as configured, step 40 (>= 30) late
        trainer("b").run(max_steps=45)
        seen.clear()
        c = trainer("b")
        c.run(resume=True)
        assert seen == [late]  # the step-40 pool drawn again with the second-half options
    finally:
        ReweightedPool._draw = draw
    for pa, pc in zip(a.gen.parameters(), c.gen.parameters()):
        assert torch.equal(pa, pc)
    for bad in (dict(clip_final=1.0), dict(power_final=0.0), dict(resample_final=0), dict(move_fraction_final=2.0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PoolConfig(**bad)


def test_resume_on_a_refresh_step_does_not_draw_the_used_up_pool_again(tmp_path):
    """Killed at step 40 (a checkpoint and a refresh step: the step-20 pool has served its 20 batches),
    the resumed run draws only the step-40 pool, and ends bitwise where the uninterrupted run ends."""
    def trainer(name):
        return _rwml_trainer(tmp_path / name)

    a = trainer("a")
    out = a.run()
    trainer("b").run(max_steps=40)
    draws = []
    draw = ReweightedPool._draw

    def spy(self, gen, energy, generator):
        draws.append(1)
        return draw(self, gen, energy, generator)

    ReweightedPool._draw = spy
    try:
        c = trainer("b")
        out_c = c.run(resume=True)
    finally:
        ReweightedPool._draw = draw
    assert len(draws) == 1  # the step-40 pool only
    assert out_c["energy_evals"] == out["energy_evals"]
    for pa, pc in zip(a.gen.parameters(), c.gen.parameters()):
        assert torch.equal(pa, pc)
