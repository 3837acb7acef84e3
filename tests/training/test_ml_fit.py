"""A training run's held-out fit: the holdout guard scores held-out frames at every pre-training checkpoint,
and benchmarks/ml_fit.py turns checkpoints into nats (held-out NLL, both KL divergences, Kish ESS)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow import pipeline
from boltzflow.sampling import SampleSet

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generator_quality import QUICK  # noqa: E402
from ml_fit import main as ml_fit  # noqa: E402


def test_holdout_guard_in_a_data_run_and_ml_fit_in_nats(tmp_path):
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-dipeptide")
    ref = SampleSet.load(ROOT / "systems" / "alanine-dipeptide" / "reference_300K.npz")
    ref.subset(np.arange(0, 400)).save(tmp_path / "train.npz")
    ref.subset(np.arange(len(ref) - 300, len(ref))).save(tmp_path / "test.npz")  # frames the run never sees
    over = {**QUICK, "data.reference": str(tmp_path / "train.npz"), "data.holdout": 0.2, "data.md_frames": 0,
            "training.finetune.steps": 0, "training.keep_checkpoints": True}
    run = tmp_path / "run"
    summary = pipeline.train(system, pipeline.recipe_config("data", over), run, progress=False)
    guard = summary["holdout_guard"]
    assert [h["step"] for h in guard["history"]] == [20, 40]
    assert guard["best_nll"] == min(h["nll"] for h in guard["history"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "nll_holdout" in r] == [20, 40]

    out = ml_fit([str(run), "--test", str(tmp_path / "test.npz"), "-n", "2000", "--json"])
    assert [c["step"] for c in out["checkpoints"]] == [20, 40]
    _, _, gen, energy = pipeline.load_trained(run)  # generator.pt: the guard's choice
    best = next(c for c in out["checkpoints"] if c["step"] == guard["best_step"])
    x = torch.as_tensor(SampleSet.load(tmp_path / "test.npz").positions, dtype=torch.float32)
    with torch.no_grad():
        assert best["nll_test"] == pytest.approx(float(-gen.log_prob(x).double().mean()), abs=1e-3)
        assert out["mean_u_test"] == pytest.approx(float(energy(x).double().mean()), rel=1e-6)
    for c in out["checkpoints"]:
        # both divergences are positive (an undertrained flow: by far more than the estimates' noise), and the
        # identities hold: KL(p||q) = -E_p[u] - log Z + NLL
        assert c["kl_p_q"] > 1.0 and c["kl_q_p"] > 1.0 and 0.0 < c["kish"] <= 1.0
        assert c["kl_p_q"] == pytest.approx(-out["mean_u_test"] - c["log_z"] + c["nll_test"], abs=1e-9)
        assert math.isfinite(c["log_z"])


def test_init_starts_from_a_trained_generator(tmp_path):
    """RunConfig.init: a run that starts from another run's generator holds its density before any step, and
    continues training from it; other [generator] settings are refused with the differing key named, except
    ``base_tail`` (no weights): a run may give the init's flow a tailed base."""
    from boltzflow.errors import InputError
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-dipeptide")
    ref = SampleSet.load(ROOT / "systems" / "alanine-dipeptide" / "reference_300K.npz")
    ref.subset(np.arange(0, 400)).save(tmp_path / "a.npz")
    ref.subset(np.arange(400, 800)).save(tmp_path / "b.npz")  # new frames for the continued run
    x = torch.as_tensor(ref.positions[-300:], dtype=torch.float32)
    over = {**QUICK, "data.reference": str(tmp_path / "a.npz"), "data.holdout": 0.2, "data.md_frames": 0,
            "training.finetune.steps": 0}
    pipeline.train(system, pipeline.recipe_config("data", over), tmp_path / "a", progress=False)
    nll = {}
    grown = {"generator.blocks": QUICK["generator.blocks"] + 2}  # 2 more coupling blocks, appended as the identity
    for name, steps, more in (("a", None, {}), ("b0", 0, {}), ("b", 20, {}), ("fresh", 20, {}), ("g0", 0, grown),
                              ("g", 20, grown), ("t0", 0, {"generator.base_tail": 3.0})):
        if steps is not None:
            init = {} if name == "fresh" else {"init": str(tmp_path / "a")}
            cfg = pipeline.recipe_config("data", {**over, **init, **more, "data.reference": str(tmp_path / "b.npz"),
                                                  "training.pretrain.steps": steps, "seed": 3})
            pipeline.train(system, cfg, tmp_path / name, progress=False)
        gen = pipeline.load_trained(tmp_path / name)[2]
        with torch.no_grad():
            nll[name] = float(-gen.log_prob(x).double().mean())
    assert nll["b0"] == pytest.approx(nll["a"], abs=1e-6)  # seed 3 would have given other weights
    assert nll["b"] < nll["a"] < nll["fresh"]  # 20 more steps improve on a; 20 from random weights do not reach it
    assert nll["g0"] == pytest.approx(nll["a"], abs=1e-4)  # the grown flow starts as a's density ...
    assert nll["g"] < nll["a"]  # ... and trains on from it
    t0 = pipeline.load_trained(tmp_path / "t0")[2]
    assert t0.all_flow.base.tail == 3.0 and t0.config.base_tail == 3.0
    assert nll["t0"] != nll["a"] and nll["t0"] == pytest.approx(nll["a"], abs=0.1)  # a's density, tails aside
    g = pipeline.load_trained(tmp_path / "g")[2]
    assert len(g.all_flow.bijection.layers) == len(pipeline.load_trained(tmp_path / "a")[2].all_flow.bijection.layers) + 4
    shrink = pipeline.recipe_config("data", {**over, "init": str(tmp_path / "g"), "training.pretrain.steps": 0})
    with pytest.raises(InputError, match="blocks = 3 there, 1 here"):
        pipeline.train(system, shrink, tmp_path / "bad0", progress=False)
    bad = pipeline.recipe_config("data", {**over, "init": str(tmp_path / "a" / "generator.pt"), "generator.hidden": 16})
    with pytest.raises(InputError, match="hidden"):
        pipeline.train(system, bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()  # refused before the run directory (and any training data) was made
    with pytest.raises(InputError, match="no trained generator"):
        pipeline.train(system, pipeline.recipe_config("data", {**over, "init": str(tmp_path / "nowhere")}),
                       tmp_path / "bad2", progress=False)


def test_frames_an_init_generator_was_trained_on_are_counted_once():
    """A run that starts from another's generator on the same tempering frames (their records equal) adds
    only the init's cost; new frames are added on top."""
    temp = {"frames": 10, "energy_evals": 1000, "wall_s": 5.0}
    init = {"path": "a", "energy_evals": 1500, "wall_s": 9.0}  # a's cost: its frames (1 000) and its training
    assert pipeline._data_cost(None, temp, init, {"data_tempering": dict(temp)}) == (1500, 9.0)
    assert pipeline._data_cost(None, temp, init, {}) == (2500, 14.0)  # other frames: both
    assert pipeline._data_cost(None, temp, None, {}) == (1000, 5.0)
    aug = {"frames": 3, "energy_evals": 7, "wall_s": 1.0}
    assert pipeline._data_cost(aug, temp, init, {"data_tempering": {**temp, "frames": 11}}) == (2507, 15.0)


def test_extra_frames_join_the_training_data_and_count_in_its_cost(tmp_path):
    """data.extra: the frames of a SampleSet file are added to the training frames (not the held-out ones),
    their provenance's evaluations and wall time count in the training cost, and a bad file is refused before
    the run directory is made."""
    from boltzflow.errors import InputError
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-dipeptide")
    ref = SampleSet.load(ROOT / "systems" / "alanine-dipeptide" / "reference_300K.npz")
    ref.subset(np.arange(0, 400)).save(tmp_path / "a.npz")
    extra = ref.subset(np.arange(400, 450))
    SampleSet(extra.positions, extra.reduced_energy, None, None, extra.temperature,
              {"sampler": "test", "energy_evals": 123, "wall_s": 2.5}).save(tmp_path / "extra.npz")
    over = {**QUICK, "data.reference": str(tmp_path / "a.npz"), "data.holdout": 0.2, "data.md_frames": 0,
            "training.finetune.steps": 0, "training.pretrain.steps": 2}
    plain = pipeline.train(system, pipeline.recipe_config("data", over), tmp_path / "plain", progress=False)
    more = pipeline.train(system, pipeline.recipe_config("data", {**over, "data.extra": [str(tmp_path / "extra.npz")]}),
                          tmp_path / "more", progress=False)
    assert more["data_extra"] == [{"path": str(tmp_path / "extra.npz"), "frames": 50, "temperature_k": 300.0,
                                   "energy_evals": 123, "wall_s": 2.5}]
    assert more["energy_evals_training"] == plain["energy_evals_training"] + 123
    assert "320 training frames" in (tmp_path / "plain" / "log.txt").read_text()
    assert "370 training frames" in (tmp_path / "more" / "log.txt").read_text()  # 400 - 80 held out + 50
    assert pipeline._data_cost(None, None, None, {"data_extra": more["data_extra"]}, more["data_extra"]) == (0, 0.0)
    for bad, message in (("nowhere.npz", "no file"), ("a.npz", None)):
        if message is None:  # frames of another system
            SampleSet(np.zeros((3, 5, 3), dtype=np.float32)).save(tmp_path / "other.npz")
            bad, message = "other.npz", "data.extra"
        cfg = pipeline.recipe_config("data", {**over, "data.extra": [str(tmp_path / bad)]})
        with pytest.raises(InputError, match=message):
            pipeline.train(system, cfg, tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists()
