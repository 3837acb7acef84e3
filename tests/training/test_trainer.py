"""Trainer: stages, skipped steps, checkpoints, bitwise-identical resume, config loading."""

from __future__ import annotations

import json

import pytest
import torch
from double_well_2d import data, dw_energy

from boltzflow.config import dump_toml, load_config
from boltzflow.core.rundir import RunDir
from boltzflow.errors import CheckpointError, ConfigError, InputError
from boltzflow.flows.builders import make_flow
from boltzflow.sampling.ais import AISConfig
from boltzflow.systems.modes import SignModes
from boltzflow.training.trainer import OptimConfig, ReplayConfig, StageConfig, TrainConfig, Trainer


def flow(seed: int = 0):
    torch.manual_seed(seed)  # conditioner init only
    return make_flow(2, "realnvp", blocks=1, hidden=16, seed=0)


def cfg(loss: str = "l2plus", **kw) -> TrainConfig:
    base = dict(pretrain=StageConfig(loss="klz", steps=6, batch=64), finetune=StageConfig(loss=loss, steps=10, batch=64),
                optimizer=OptimConfig(lr=3e-3, schedule="cosine", warmup_steps=2), log_every=2, checkpoint_every=4,
                progress=False, eval_batch=64, seed=11, ais=AISConfig(step_size=0.3),
                replay=ReplayConfig(enabled=(loss == "fab"), capacity=256, min_length=64))
    base.update(kw)
    return TrainConfig(**base)


class Killer:
    """The real energy, but raises (a simulated crash) on call number ``at``."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("simulated kill")
        return dw_energy(x)


def params(gen) -> list[torch.Tensor]:
    return [p.detach().clone() for p in gen.parameters()]


@pytest.mark.parametrize("loss,kill_at", [("l2plus", 9), ("fab", 70)])
def test_kill_and_resume_is_bitwise_identical(tmp_path, loss, kill_at):
    c = cfg(loss)
    ref_gen = flow(0)
    ref_dir = RunDir(tmp_path / "ref")
    Trainer(ref_gen, dw_energy, c, ref_dir, data(), SignModes(0, ("negative", "positive"), "positive")).run()

    run = RunDir(tmp_path / "run")
    gen = flow(0)
    killer = Killer(kill_at)
    with pytest.raises(RuntimeError, match="simulated kill"):
        Trainer(gen, killer, c, run, data()).run()
    ckpt_step = torch.load(run.latest_checkpoint, weights_only=True)["step"]
    rows_before = run.read_metrics()
    assert 6 <= ckpt_step < 16 and max(r["step"] for r in rows_before) > ckpt_step  # rows past the checkpoint exist

    gen2 = flow(123)  # different init: everything must come from the checkpoint
    summary = Trainer(gen2, dw_energy, c, run, data(), SignModes(0, ("negative", "positive"), "positive")).run(resume=True)
    assert summary["step"] == 16
    for a, b in zip(params(ref_gen), params(gen2)):
        assert torch.equal(a, b)
    rows = run.read_metrics()
    ref_rows = ref_dir.read_metrics()
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_metrics_rows_and_summary(tmp_path):
    run = RunDir(tmp_path / "r")
    modes = SignModes(0, ("negative", "positive"), "positive")
    s = Trainer(flow(), dw_energy, cfg("klx"), run, data(), modes).run()
    rows = run.read_metrics()
    assert {r["stage"] for r in rows} == {"pretrain", "finetune"}
    last = rows[-1]
    for key in ("step", "stage", "loss", "u_mean", "u_std", "ess", "modes", "minor_fraction", "skipped_steps",
                "grad_norm", "energy_evals", "wall_s", "lr"):
        assert key in last, key
    assert 0.0 <= last["ess"] <= 1.0 and abs(sum(last["modes"].values()) - 1.0) < 1e-9
    assert last["energy_evals"] == s["energy_evals"] > 10 * 64
    saved = run.read_summary()  # one spelling per count: the loop's own under "training", no top-level copy
    assert "energy_evals" not in saved and "wall_s" not in saved and saved["training"]["energy_evals"] == s["energy_evals"]
    pre = [r for r in rows if r["stage"] == "pretrain"]
    assert all("u_mean" in r for r in pre)  # measured on an eval batch during pre-training
    assert json.loads(run.summary_path.read_text())["step"] == 16
    lrs = [r["lr"] for r in rows if r["stage"] == "finetune"]
    assert lrs[-1] < max(lrs)  # cosine decay


def test_nonfinite_loss_and_gradient_steps_are_skipped():
    gen = flow()
    c = cfg("klx", pretrain=StageConfig(loss="klz", steps=0), finetune=StageConfig(loss="klx", steps=3, batch=32))

    def all_invalid(x):
        return torch.full((x.shape[0],), float("inf")) + 0 * x.sum(-1)

    before = params(gen)
    s = Trainer(gen, all_invalid, c).run()
    assert s["skipped_steps"] == 3 and s["n_invalid"] == 3 * 32
    assert all(torch.equal(a, b) for a, b in zip(before, params(gen)))

    def nan_grad(x):  # finite energy whose gradient is NaN (sqrt at 0)
        return dw_energy(x) + torch.sqrt(x[:, 0] ** 2 - x[:, 0] ** 2)

    s = Trainer(gen, nan_grad, c).run()
    assert s["skipped_steps"] == 3
    assert all(torch.equal(a, b) for a, b in zip(before, params(gen)))
    s = Trainer(gen, dw_energy, c).run()
    assert s["skipped_steps"] == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, params(gen)))


def test_config_toml_roundtrip_and_errors(tmp_path):
    c = cfg("fab")
    p = tmp_path / "train.toml"
    p.write_text(dump_toml(c))
    assert load_config(TrainConfig, p) == c
    p.write_text(dump_toml(c) + "\n[finetune]\nbogus = 1\n")
    with pytest.raises(ConfigError):
        load_config(TrainConfig, p)
    with pytest.raises(ConfigError, match="finetune.loss"):
        load_config(TrainConfig, overrides={"finetune.loss": "nope"})
    with pytest.raises(ConfigError, match="schedule"):
        load_config(TrainConfig, overrides={"optimizer.schedule": "linear"})


def test_input_errors(tmp_path):
    with pytest.raises(InputError, match="pre-training needs reference data"):
        Trainer(flow(), dw_energy, cfg()).run()
    run = RunDir(tmp_path / "r")
    Trainer(flow(), dw_energy, cfg(finetune=StageConfig(loss="klx", steps=2, batch=16)), run, data()).run()
    with pytest.raises(CheckpointError, match="different configuration"):
        Trainer(flow(), dw_energy, cfg(seed=3), run, data()).run(resume=True)


def test_finetune_options_are_open_until_finetuning_starts(tmp_path):
    """A checkpoint at the end of pre-training resumes under a longer fine-tuning stage, exactly as a fresh
    run with that stage; once fine-tuning has begun, changing it is refused."""
    short, long = cfg("klx"), cfg("klx", finetune=StageConfig(loss="klx", steps=14, batch=64))
    ref = flow(0)
    Trainer(ref, dw_energy, long, RunDir(tmp_path / "ref"), data()).run()
    run = RunDir(tmp_path / "run")
    Trainer(flow(0), dw_energy, short, run, data()).run(max_steps=6)  # stops at the end of pre-training
    assert torch.load(run.latest_checkpoint, weights_only=True)["step"] == 6
    gen = flow(5)
    assert Trainer(gen, dw_energy, long, run, data()).run(resume=True)["step"] == 20
    for a, b in zip(params(ref), params(gen)):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="differs in: finetune"):  # now at step 20, inside fine-tuning
        Trainer(flow(0), dw_energy, short, run, data()).run(resume=True)


def test_energy_cap_is_applied_to_the_target():
    from boltzflow.training.trainer import CapConfig

    t = Trainer(flow(), dw_energy, cfg(cap=CapConfig(energy_max=0.0, grad_max=1.0)))
    x = torch.tensor([[-2.4, 0.0], [4.0, 0.0]], requires_grad=True)
    u_raw = dw_energy(x)
    u = t.energy(x)
    ud, rd = u.detach(), u_raw.detach()
    assert ud[0] == rd[0] and rd[1] > 10 and float(ud[1]) == pytest.approx(float(torch.log1p(rd[1])))
    (g,) = torch.autograd.grad(u[1], x)
    assert float(g[1].norm()) <= 1.0 + 1e-6  # per-sample gradient of the total energy capped


def _kish(gen, n=4000, seed=3):
    from boltzflow.losses.base import kish_ess

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x, lq = gen.sample_and_log_prob(n, generator=g)
    return kish_ess(-dw_energy(x) - lq)


def test_ess_guard_keeps_the_best_state_through_a_destructive_finetune(tmp_path):
    # reverse KL at a huge learning rate wrecks the flow; the guard ends the stage with the best state seen
    c = cfg("klx", pretrain=StageConfig(loss="klz", steps=150, batch=256), finetune=StageConfig(loss="klx", steps=8,
            batch=256, lr=3.0), optimizer=OptimConfig(lr=1e-2), checkpoint_every=4, grad_clip=None, ess_guard=4000)
    gen = flow()
    tr = Trainer(gen, dw_energy, c, run_dir=RunDir(tmp_path / "g"), data=data(2048))
    tr.run(max_steps=150)
    before = _kish(gen)
    tr.run()
    guard = json.loads((tmp_path / "g" / "summary.json").read_text()).get("ess_guard") or tr._guard
    assert [h["step"] for h in guard["history"]] == [150, 152, 156, 158]
    # ranked by the Pareto-smoothed Kish ESS, the plain one and the tail's k beside it
    assert all(set(h) == {"step", "ess", "ess_raw", "pareto_k"} and 0 < h["ess_raw"] <= 1 for h in guard["history"])
    assert guard["best_step"] == 150  # nothing the wrecked stage produced beat the start
    assert _kish(gen) == pytest.approx(before, rel=1e-9)
    # without the guard the same stage ends lower
    gen2 = flow()
    tr2 = Trainer(gen2, dw_energy, TrainConfig(**{**c.__dict__, "ess_guard": 0}), run_dir=None, data=data(2048))
    tr2.run()
    assert _kish(gen2) < before - 0.05


def test_finetune_is_skipped_below_finetune_min_ess_and_runs_on_resume_with_a_lower_one(tmp_path):
    from dataclasses import replace

    c = cfg("klx", finetune=StageConfig(loss="klx", steps=8, batch=64), ess_guard=2000, finetune_min_ess=0.99)
    run = RunDir(tmp_path / "run")
    gen = flow(0)
    tr = Trainer(gen, dw_energy, c, run, data())
    tr.run()
    ess = tr._guard["best_ess"]
    assert 0 < ess < 0.99  # a 6-step flow is far from the double well's Boltzmann distribution
    assert tr.finetune_skipped and tr.finished and tr.step == c.pretrain.steps < c.total_steps
    skipped = json.loads((tmp_path / "run" / "summary.json").read_text())["finetune_skipped"]
    assert skipped == {"step": c.pretrain.steps, "ess": pytest.approx(ess), "finetune_min_ess": 0.99}
    assert "fine-tuning skipped" in (tmp_path / "run" / "log.txt").read_text()
    # the same run directory, resumed with a floor below the guard's ESS, fine-tunes to the end
    tr2 = Trainer(flow(0), dw_energy, replace(c, finetune_min_ess=0.0), run, data())
    tr2.run(resume=True)
    assert not tr2.finetune_skipped and tr2.step == c.total_steps
    with pytest.raises(ConfigError, match="ess_guard"):
        replace(c, ess_guard=0)


def test_fallback_stage_replaces_finetuning_below_finetune_min_ess_and_resumes_bitwise(tmp_path):
    """Below finetune_min_ess the fallback stage (its loss, steps, lr) runs in finetune's place; a run
    killed inside it resumes to the same parameters as an uninterrupted one."""
    from dataclasses import replace

    c = cfg("klx", finetune=StageConfig(loss="klx", steps=8, batch=64), ess_guard=2000, finetune_min_ess=0.99,
            fallback=StageConfig(loss="chi2_data", steps=7, batch=64, lr=1e-3), checkpoint_every=3)
    ref = RunDir(tmp_path / "ref")
    counter = Killer(0)  # counts the energy calls, never raises
    tr = Trainer(flow(0), counter, c, ref, data())
    summary = tr.run()
    assert tr.fallback_used and not tr.finetune_skipped and tr.finished
    assert summary["step"] == summary["total_steps"] == c.pretrain.steps + 7 < c.total_steps
    assert tr.config.finetune == c.fallback
    rows = [r for r in ref.read_metrics() if r["stage"] == "finetune"]
    assert rows and all("batch_ess" in r for r in rows)  # chi2_data's own metric: the fallback's loss ran
    fb = json.loads((tmp_path / "ref" / "summary.json").read_text())["finetune_fallback"]
    assert fb["loss"] == "chi2_data" and fb["steps"] == 7 and fb["ess"] < 0.99
    assert "fine-tuning by the fallback stage" in (tmp_path / "ref" / "log.txt").read_text()

    run = RunDir(tmp_path / "run")
    gen = flow(0)
    with pytest.raises(RuntimeError, match="simulated kill"):
        # the last fallback step's call (after it: the step's metrics row and the final guard check)
        Trainer(gen, Killer(counter.calls - 2), c, run, data()).run()
    state = torch.load(run.latest_checkpoint, weights_only=False)
    assert state["fallback_used"] and c.pretrain.steps < state["step"] < c.pretrain.steps + 7
    gen2 = flow(5)
    assert Trainer(gen2, dw_energy, c, run, data()).run(resume=True)["step"] == c.pretrain.steps + 7
    for a, b in zip(params(tr.gen), params(gen2)):
        assert torch.equal(a, b)

    with pytest.raises(ConfigError, match="pool or replay"):
        replace(c, fallback=StageConfig(loss="rwml", steps=5))


def test_checkpoint_from_before_a_new_nested_option_resumes(tmp_path):
    """A checkpoint written before an option existed inside a section (here pool.data_fraction and
    pool.power) resumes under that option's default, and is refused under another value."""
    from dataclasses import replace

    from boltzflow.sampling.pool import PoolConfig

    c = cfg("klx", finetune=StageConfig(loss="klx", steps=4, batch=32))
    run = RunDir(tmp_path / "run")
    Trainer(flow(0), dw_energy, c, run, data()).run(max_steps=8)
    state = torch.load(run.latest_checkpoint, weights_only=False)
    for key in ("data_fraction", "power"):
        del state["config"]["pool"][key]
    torch.save(state, run.latest_checkpoint)
    assert Trainer(flow(0), dw_energy, c, run, data()).run(resume=True)["step"] == 10
    run = RunDir(tmp_path / "run2")
    Trainer(flow(0), dw_energy, c, run, data()).run(max_steps=8)
    other = replace(c, pool=PoolConfig(power=2.0))
    with pytest.raises(CheckpointError, match="differs in: pool"):
        Trainer(flow(0), dw_energy, other, run, data()).run(resume=True)


def test_second_half_pool_options_are_open_until_the_half(tmp_path):
    """pool.*_final act only from the fine-tuning stage's half on: a checkpoint at or before it resumes under
    other values of them, one after it is refused."""
    from dataclasses import replace

    from boltzflow.sampling.pool import PoolConfig

    c = cfg("klx", finetune=StageConfig(loss="klx", steps=4, batch=32))  # 6 + 4 steps: the half is step 8
    late = replace(c, pool=PoolConfig(power_final=2.0, clip_final=0.0, resample_final=10))
    run = RunDir(tmp_path / "run")
    Trainer(flow(0), dw_energy, c, run, data()).run(max_steps=8)
    assert Trainer(flow(0), dw_energy, late, run, data()).run(resume=True)["step"] == 10
    run = RunDir(tmp_path / "run2")
    Trainer(flow(0), dw_energy, c, run, data()).run(max_steps=9)
    with pytest.raises(CheckpointError, match="differs in: pool"):
        Trainer(flow(0), dw_energy, late, run, data()).run(resume=True)


def _nll(gen, x) -> float:
    with torch.no_grad():
        return float(-gen.log_prob(x).double().mean())


def test_holdout_guard_undoes_overfitting_of_maximum_likelihood(tmp_path):
    """6 training frames and a 3-block spline flow at a constant learning rate: the held-out NLL falls
    within 100 steps, then rises as the flow memorises the frames (3.6 -> 6.6 nats here). The guard ends pre-training with the checkpoint of the
    lowest held-out NLL; the same run without it ends higher; a resume after the stage keeps the restored
    state; no held-out frames means no guard."""
    from dataclasses import replace

    def spline(seed=0):
        torch.manual_seed(seed)
        return make_flow(2, "spline", blocks=3, hidden=64, seed=0)

    train = data(6)
    hold = torch.stack([torch.where(torch.rand(400, generator=torch.Generator().manual_seed(9)) < 0.1, 2.4, -2.4)
                        + 0.4 * torch.randn(400, generator=torch.Generator().manual_seed(10)),
                        torch.randn(400, generator=torch.Generator().manual_seed(11))], 1)
    c = cfg("klx", pretrain=StageConfig(loss="klz", steps=600, batch=6), finetune=StageConfig(loss="klx", steps=0, batch=8),
            optimizer=OptimConfig(lr=5e-3, schedule="constant", warmup_steps=0), checkpoint_every=50, log_every=50)
    gen = spline()
    run = RunDir(tmp_path / "g")
    Trainer(gen, dw_energy, c, run_dir=run, data=train, holdout=hold).run()
    h = json.loads((tmp_path / "g" / "summary.json").read_text())["holdout_guard"]
    nlls = [r["nll"] for r in h["history"]]
    assert [r["step"] for r in h["history"]] == list(range(50, 601, 50))
    assert h["best_step"] < 600 and h["restored"]  # it did over-fit: the last check is not the best
    assert _nll(gen, hold) == pytest.approx(min(nlls), abs=1e-6)
    assert nlls[-1] > min(nlls) + 1.0
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nll_holdout"] for r in rows if "nll_holdout" in r] == pytest.approx(nlls)
    # the checkpoint written at the stage's end holds the restored generator
    gen_r = spline()
    Trainer(gen_r, dw_energy, c, run_dir=run, data=train, holdout=hold).resume()
    assert _nll(gen_r, hold) == pytest.approx(min(nlls), abs=1e-6)
    # without the guard (or without held-out frames) the stage ends with the over-fitted generator
    for kw in ({"config": replace(c, holdout_guard=False), "holdout": hold}, {"config": c, "holdout": None}):
        gen_u = spline()
        Trainer(gen_u, dw_energy, kw["config"], run_dir=None, data=train, holdout=kw["holdout"]).run()
        assert _nll(gen_u, hold) == pytest.approx(nlls[-1], abs=1e-4)


@pytest.mark.parametrize("loss", ["chi2_data", "logvar_data"])
def test_data_energy_finetune_weights_the_frames_and_needs_them(tmp_path, loss):
    """Fine-tuning with the chi-square divergence (chi2_data) or the log-variance (logvar_data) on the data
    frames after maximum likelihood raises the generator's Kish ESS on the double well; both need frames, and
    weight_power and ml_fraction are checked."""
    c = cfg(loss, pretrain=StageConfig(loss="klz", steps=150, batch=256),
            finetune=StageConfig(loss=loss, steps=150, batch=512, lr=2e-3), optimizer=OptimConfig(lr=1e-2),
            checkpoint_every=50)
    gen = flow()
    tr = Trainer(gen, dw_energy, c, run_dir=RunDir(tmp_path / "c"), data=data(4096), holdout=data(1024)[512:])
    tr.run(max_steps=150)
    before = _kish(gen)
    tr.run()
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in rows if r["stage"] == "finetune"]
    metric = "batch_ess" if loss == "chi2_data" else "var_log_w"  # the loss's own metric: it ran
    assert late and all(0 < r[metric] and r["energy_evals"] > 0 for r in late)
    # the held-out frames' fit is logged at each of the stage's checkpoints (steps 200, 250, 300)
    held = [r for r in late if "var_log_w_holdout" in r]
    assert [r["step"] for r in held] == [200, 250, 300] and all(r["var_log_w_holdout"] > 0 for r in held)
    if loss == "logvar_data":
        assert held[-1]["var_log_w_holdout"] < held[0]["var_log_w_holdout"]
    assert _kish(gen) > before + 0.02, (before, _kish(gen))
    with pytest.raises(InputError, match="needs data"):
        Trainer(flow(), dw_energy, cfg(loss, pretrain=StageConfig(loss="klz", steps=0, batch=64))).run()
    with pytest.raises(ConfigError, match="weight_power"):
        load_config(TrainConfig, overrides={"finetune.weight_power": 2.0})
    with pytest.raises(ConfigError, match="ml_fraction"):
        load_config(TrainConfig, overrides={"finetune.ml_fraction": -0.1})
    assert load_config(TrainConfig, overrides={"finetune.ml_fraction": 0.5}).finetune.ml_fraction == 0.5


def _ema_of(steps, ema: float) -> torch.Tensor:
    """The moving average the trainer should hold after parameters ``steps`` (one tensor per step)."""
    expect = steps[0].clone()
    for n, theta in enumerate(steps[1:], start=1):
        d = min(ema, (1 + n) / (10 + n))
        expect = d * expect + (1 - d) * theta
    return expect


def test_ema_follows_its_recursion_then_ends_pretraining_and_resumes_bitwise(tmp_path):
    """training.ema: avg <- d avg + (1 - d) theta after each step with d = min(ema, (1 + n) / (10 + n)) after n
    updates; averaged() swaps it in and back; pre-training ends with it; a kill and resume mid-stage gives the
    same parameters as the uninterrupted run; switching it on at a resume is allowed."""
    from dataclasses import replace

    c = cfg("klx", pretrain=StageConfig(loss="klz", steps=8, batch=32), finetune=StageConfig(loss="klx", steps=0, batch=8),
            ema=0.9, checkpoint_every=3)
    gen = flow(0)
    tr = Trainer(gen, dw_energy, c, run_dir=None, data=data())
    after = []
    for _ in range(5):
        tr.run(max_steps=1)
        after.append(params(gen))
    with tr.averaged():
        avg = params(gen)
    assert all(torch.equal(a, b) for a, b in zip(params(gen), after[-1]))  # raw parameters back after the block
    for a, steps in zip(avg, zip(*after)):
        assert torch.allclose(a, _ema_of(steps, 0.9), atol=1e-6)
        assert not torch.allclose(a, steps[-1])
    tr.run()  # to the end of pre-training: the generator holds the average
    with tr.averaged():  # nothing left to swap in
        assert all(torch.equal(a, b) for a, b in zip(params(gen), params(gen)))

    ref = flow(0)
    Trainer(ref, dw_energy, c, RunDir(tmp_path / "ref"), data()).run()
    assert all(torch.equal(a, b) for a, b in zip(params(ref), params(gen)))
    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated kill"):
        Trainer(flow(0), Killer(4), c, run, data()).run()  # the metrics row of step 6, before its checkpoint
    assert torch.load(run.latest_checkpoint, weights_only=False)["step"] == 3
    resumed = flow(123)
    Trainer(resumed, dw_energy, c, run, data()).run(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(params(ref), params(resumed)))

    plain = RunDir(tmp_path / "plain")
    with pytest.raises(RuntimeError, match="simulated kill"):
        Trainer(flow(0), Killer(4), replace(c, ema=0.0), plain, data()).run()
    switched = flow(0)
    Trainer(switched, dw_energy, c, plain, data()).run(resume=True)  # no CheckpointError: the average starts at step 3
    assert not all(torch.equal(a, b) for a, b in zip(params(ref), params(switched)))
    with pytest.raises(ConfigError, match="ema"):
        cfg(ema=1.0)


def test_ema_lowers_the_held_out_nll_of_noisy_maximum_likelihood(tmp_path):
    """At a constant, large learning rate and a small batch the parameters jitter around the optimum; their
    average fits held-out frames better. The holdout guard scores the average and logs the raw NLL beside it."""
    hold = data(2000)[1000:]
    c = cfg("klx", pretrain=StageConfig(loss="klz", steps=600, batch=16), finetune=StageConfig(loss="klx", steps=0, batch=8),
            optimizer=OptimConfig(lr=3e-2, schedule="constant", warmup_steps=0), ema=0.98, checkpoint_every=100,
            log_every=100)
    gen = flow(0)
    run = RunDir(tmp_path / "e")
    Trainer(gen, dw_energy, c, run_dir=run, data=data(2000)[:1000], holdout=hold).run()
    rows = [r for r in run.read_metrics() if "nll_holdout" in r]
    assert [r["step"] for r in rows] == [100, 200, 300, 400, 500, 600]
    late = rows[3:]  # converged: the raw NLL jitters by ~0.2 nats (measured 2.48-2.71), the average's by 0.05
    avg_nll, raw_nll = (sum(r[k] for r in late) / len(late) for k in ("nll_holdout", "nll_holdout_raw"))
    assert avg_nll < raw_nll - 0.05
    h = json.loads((tmp_path / "e" / "summary.json").read_text())["holdout_guard"]
    assert _nll(gen, hold) == pytest.approx(h["best_nll"], abs=1e-6)
    assert "moving average of its parameters" in (tmp_path / "e" / "log.txt").read_text()


def test_ema_restarts_with_each_stage_and_the_ess_guard_scores_it(tmp_path):
    """With training.ema the fine-tuning stage keeps its own average (started at its first step, not carried
    over from maximum likelihood), ends with it, and the ESS guard's best state is an averaged one."""
    c = cfg("klx", pretrain=StageConfig(loss="klz", steps=4, batch=32), finetune=StageConfig(loss="klx", steps=6, batch=32),
            ema=0.9, ess_guard=512, checkpoint_every=3)
    gen = flow(0)
    run = RunDir(tmp_path / "f")
    tr = Trainer(gen, dw_energy, c, run_dir=run, data=data())
    tr.run(max_steps=4)
    end_of_ml = params(gen)
    raws = []
    while tr.step < 9:
        tr.run(max_steps=1)
        raws.append(params(gen))
    with tr.averaged():
        avg = params(gen)
    for a, steps in zip(avg, zip(*raws)):
        assert torch.allclose(a, _ema_of(steps, 0.9), atol=1e-6)
    assert not all(torch.allclose(a, b) for a, b in zip(avg, end_of_ml))
    tr.run()
    log = (tmp_path / "f" / "log.txt").read_text()
    assert "pre-training ends with the moving average" in log and "fine-tuning ends with the moving average" in log
    g = json.loads((tmp_path / "f" / "summary.json").read_text())["ess_guard"]
    assert [h["step"] for h in g["history"]] == [4, 6, 9, 10]


def test_diverged_maximum_likelihood_rolls_back_with_half_the_learning_rate(tmp_path):
    """Parameters thrown far off after step 120 (as a diverging run's are): the check at step 150 finds the
    held-out NLL over divergence_nats above the best, restores the best state (step 100) with a fresh Adam
    and half the learning rate, logs and counts it; a resume keeps the halved rate; 0 turns it off."""
    from dataclasses import replace

    class Kicked(Trainer):
        def train_step(self):
            out = super().train_step()
            if self.step == 120:
                with torch.no_grad():
                    for p in self.gen.parameters():
                        p.add_(3.0 * torch.randn_like(p))
            return out

    def spline():
        return make_flow(2, "spline", blocks=2, hidden=32, seed=0)

    hold = data(400)
    c = cfg("klx", pretrain=StageConfig(loss="klz", steps=200, batch=64), finetune=StageConfig(loss="klx", steps=0, batch=8),
            optimizer=OptimConfig(lr=5e-3, schedule="constant", warmup_steps=0), checkpoint_every=50, log_every=50)
    gen = spline()
    run = RunDir(tmp_path / "g")
    t = Kicked(gen, dw_energy, c, run_dir=run, data=data(512), holdout=hold)
    summary = t.run()
    assert summary["rollbacks"] == 1 and t.counters.rollbacks == 1
    h = json.loads((tmp_path / "g" / "summary.json").read_text())["holdout_guard"]
    at = {r["step"]: r for r in h["history"]}
    assert at[150]["rolled_back_to"] == 100 and at[150]["nll"] > at[100]["nll"] + 5.0
    assert at[200]["nll"] < at[100]["nll"] + 1.0  # training went on from the restored state
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    assert "maximum likelihood diverged" in (tmp_path / "g" / "log.txt").read_text()
    # interrupted after the rollback and resumed: the halved rate carries over
    run2 = RunDir(tmp_path / "g2")
    Kicked(spline(), dw_energy, c, run_dir=run2, data=data(512), holdout=hold).run(max_steps=150)
    t2 = Trainer(spline(), dw_energy, c, run_dir=run2, data=data(512), holdout=hold)
    t2.run(resume=True)
    assert t2.counters.rollbacks == 1 and t2.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    # off: the kicked run goes on from where it was thrown
    t3 = Kicked(spline(), dw_energy, replace(c, divergence_nats=0.0), run_dir=None, data=data(512), holdout=hold)
    assert t3.run()["rollbacks"] == 0
    with pytest.raises(ConfigError, match="divergence_nats"):
        replace(c, divergence_nats=-1.0)


def test_warm_restarts_start_over_from_the_guards_best_state_and_resume_bitwise(tmp_path):
    """finetune.cycles: at each restart the stage goes back to the ESS guard's best state with a fresh Adam,
    and the learning rate's warm-up and cosine start over; a run stopped at a restart resumes bitwise."""
    from dataclasses import replace

    c = cfg("klx", pretrain=StageConfig(loss="klz", steps=150, batch=256),
            finetune=StageConfig(loss="klx", steps=12, batch=256, lr=3.0, cycles=(1, 1, 1)),
            optimizer=OptimConfig(lr=1e-2, warmup_steps=2), checkpoint_every=100, grad_clip=None, ess_guard=4000)
    gen = flow()
    tr = Trainer(gen, dw_energy, c, run_dir=RunDir(tmp_path / "w"), data=data(2048))
    tr.run(max_steps=150)
    start = params(gen)
    lrs = []
    for _ in range(12):
        tr.run(max_steps=1)
        lrs.append(tr.optimizer.param_groups[0]["lr"])
        if tr.step in (154, 158):  # reverse KL at lr 3 wrecks the flow: every restart goes back to step 150's state
            assert all(torch.equal(a, b) for a, b in zip(params(gen), start)) and not tr.optimizer.state
    # the lr after each step: three cycles of warm-up (2 steps) and cosine, the next cycle's warm-up at 4 and 8
    assert lrs[0:3] == pytest.approx(lrs[4:7]) and lrs[0:3] == pytest.approx(lrs[8:11])
    assert lrs[3] == lrs[7] == pytest.approx(1.5) and lrs[0:2] == pytest.approx([3.0, 3.0]) and lrs[2] < 3.0
    guard = json.loads((tmp_path / "w" / "summary.json").read_text())["ess_guard"]
    assert [h["step"] for h in guard["history"]] == [150, 154, 158, 162] and guard["best_step"] == 150
    log = (tmp_path / "w" / "log.txt").read_text()
    assert "warm restart of fine-tuning at step 154 from the generator of step 150" in log
    assert "cosine to step 158" in log and "cosine to step 162" in log
    # without the wreck: stopped at the first restart and resumed by a new process gives the same parameters
    c2 = replace(c, finetune=replace(c.finetune, lr=3e-3), pretrain=replace(c.pretrain, steps=20))
    ref = flow()
    Trainer(ref, dw_energy, c2, run_dir=RunDir(tmp_path / "ref"), data=data(2048)).run()
    part = flow()
    Trainer(part, dw_energy, c2, run_dir=RunDir(tmp_path / "part"), data=data(2048)).run(max_steps=24)
    again = flow(5)
    Trainer(again, dw_energy, c2, run_dir=RunDir(tmp_path / "part"), data=data(2048)).run(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(params(ref), params(again)))


@pytest.mark.parametrize("cycles", [(0, 1), (1, -2), (float("inf"),)])
def test_bad_cycles_are_config_errors(cycles):
    with pytest.raises(ConfigError, match="cycles"):
        StageConfig(loss="klx", steps=12, cycles=cycles)


def test_cycles_scale_with_the_stage_and_merge_when_too_short():
    assert StageConfig(loss="klx", steps=44000, cycles=(20, 8, 16)).restarts == (20000, 28000)
    assert StageConfig(loss="klx", steps=4400, cycles=[20, 8, 16]).restarts == (2000, 2800)
    assert StageConfig(loss="klx", steps=2, cycles=(20, 8, 16)).restarts == (1,)
    assert StageConfig(loss="klx", steps=1, cycles=(20, 8, 16)).restarts == ()
    assert StageConfig(loss="klx", steps=100).restarts == ()


def test_cycles_are_for_finetuning_only():
    with pytest.raises(ConfigError, match="finetune.cycles"):
        cfg(pretrain=StageConfig(loss="klz", steps=10, cycles=(1, 1)))


@pytest.mark.parametrize("field", ["state_balance", "weight_power", "ml_fraction"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_stage_shares_outside_zero_one_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        StageConfig(loss="logvar_data", steps=10, cycles=(1, 1), **{field: value})
