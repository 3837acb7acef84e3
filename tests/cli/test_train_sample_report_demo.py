"""End-to-end CLI at toy size: train (killed + resumed), sample, estimate, report, demo --quick."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from boltzflow.cli import main

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "systems" / "alanine-dipeptide" / "reference_300K.npz"
needs_ref = pytest.mark.skipif(not REF.is_file(), reason="shipped reference data missing")

TINY = ["--recipe", "none", "--pretrain-steps", "6", "--finetune-steps", "4", "--batch", "32", "--no-progress",
        "--set", "generator.blocks=1", "--set", "generator.hidden=16", "--set", "generator.h_blocks=1",
        "--set", "generator.h_hidden=16", "--set", "generator.pipeline=\"conditional\"",
        "--set", "generator.representation=\"internal\"", "--set", "data.max_samples=500",
        "--set", "training.checkpoint_every=2", "--set", "training.log_every=2", "--device", "cpu"]


def test_print_config_is_loadable_toml(capsys, tmp_path):
    from boltzflow.pipeline import load_run_config

    assert main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.toml").write_text(text)
    cfg = load_run_config(tmp_path / "c.toml")
    # no --recipe: the default recipe, "auto", which is "energy" when no reference frames are named
    assert "[training.finetune]" in text and cfg.training.finetune.loss == "rwml"
    assert cfg.recipe == "energy" and cfg.data.source == "tempering"


def test_train_bad_input_exit_2(tmp_path, capsys):
    assert main(["train", "alanine-dipeptide"]) == 2  # no -o
    assert "-o RUN_DIR" in capsys.readouterr().err
    assert main(["train", "no-such-system", "-o", str(tmp_path / "r")]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nstepz = 3\n")
    assert main(["train", "alanine-dipeptide", "-o", str(tmp_path / "r2"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and len(err.strip().splitlines()) == 2
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["sample", str(tmp_path / "nothing")]) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2


@needs_ref
def test_train_killed_then_resumed_sample_estimate_report(tmp_path, capsys):
    run = tmp_path / "run"
    # a run stopped after 5 of 10 steps (as if killed), then resumed from the CLI
    from boltzflow import pipeline
    from boltzflow.cli import build_parser
    from boltzflow.cli.train import overrides_from_args
    from boltzflow.systems.builtin import builtin_system

    args = build_parser().parse_args(["train", "alanine-dipeptide", "-o", str(run)] + TINY)
    cfg = pipeline.load_run_config(None, overrides_from_args(args))
    s = pipeline.train(builtin_system("alanine-dipeptide"), cfg, run, progress=False, max_steps=5)
    assert not s["training_finished"] and (run / "checkpoints" / "latest.pt").is_file()
    assert main(["train", "alanine-dipeptide", "-o", str(run)] + TINY) == 2  # refuses to overwrite
    assert main(["train", "--resume", str(run), "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["training_finished"] and summary["training_steps"] == 10
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert main(["sample", str(run), "-n", "64", "--batch-size", "32", "--json", "--export", str(tmp_path / "g.pdb")]) == 0
    est = json.loads(capsys.readouterr().out)
    assert {"ess", "log_Z", "phi_positive", "phi_negative"} <= set(est)
    assert abs(est["phi_positive"]["value"] + est["phi_negative"]["value"] - 1) < 1e-9
    assert (tmp_path / "g.pdb").is_file()
    # the real sample -> compare hand-off: compare reads the costs `sample` wrote, under their one spelling
    assert main(["compare", "--replica", str(REF), "--samples", str(run / "samples" / "generated.npz"),
                 "--system", "alanine-dipeptide", "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    g, trained = cmp["generator"], json.loads((run / "summary.json").read_text())
    assert g["energy_evals"] == 64 and g["wall_s"] > 0
    assert g["training_energy_evals"] == trained["energy_evals_training"] > 0
    assert g["training_wall_s"] == trained["training_wall_s"]
    assert cmp["replica_exchange"]["energy_evals"] == 5_600_000  # shipped v1 file, mapped on load
    assert main(["report", str(run), "--replica", str(REF)]) == 0
    html = (run / "report.html").read_text()
    for png in ("ramachandran.png", "energies.png", "training.png"):
        assert (run / "plots" / png).is_file()
        assert f'data-file="{png}"' in html
    assert "Flow vs replica exchange" in html


@needs_ref
def test_demo_quick_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "boltzflow.cli", "demo", "--quick", "--json", "--no-progress",
                        "--device", "cpu", "-o", str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert set(res) >= {"phi_positive", "reference", "energy_evals", "wall_s", "report"}
    assert 0 <= res["phi_positive"]["value"] <= 1 and res["reference"]["stderr"] > 0
    assert Path(res["report"]).is_file()


@needs_ref
def test_train_process_killed_with_sigkill_resumes(tmp_path):
    """A real kill -9 in the middle of training; `train --resume` finishes the run."""
    import os
    import signal
    import time

    run = tmp_path / "killed"
    args = [a for a in TINY]
    args[args.index("--finetune-steps") + 1] = "200"  # long enough to be killed mid-way
    proc = subprocess.Popen([sys.executable, "-m", "boltzflow.cli", "train", "alanine-dipeptide", "-o", str(run)] + args,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "latest.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ckpt.is_file():
        time.sleep(0.2)
    time.sleep(0.5)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file()
    r = subprocess.run([sys.executable, "-m", "boltzflow.cli", "train", "--resume", str(run), "--no-progress", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["training_finished"] and summary["training_steps"] == 206


@needs_ref
def test_train_with_langevin_augmentation(tmp_path):
    """data.md_frames: training frames are Langevin frames from the training reference frames, cached in
    the run directory, counted in the training cost; the summary reports the held-out log-likelihood."""
    import numpy as np

    from boltzflow import pipeline
    from boltzflow.cli import build_parser
    from boltzflow.cli.train import overrides_from_args
    from boltzflow.systems.builtin import builtin_system

    run = tmp_path / "aug"
    extra = ["--set", "data.md_frames=3", "--set", "data.md_burnin=4", "--set", "data.md_stride=2",
             "--set", "data.max_samples=200"]
    args = build_parser().parse_args(["train", "alanine-dipeptide", "-o", str(run)] + TINY + extra)
    cfg = pipeline.load_run_config(None, overrides_from_args(args))
    assert cfg.data.md_frames == 3 and cfg.data.max_samples == 200
    s = pipeline.train(builtin_system("alanine-dipeptide"), cfg, run, progress=False, max_steps=5)
    aug = s["data_augmentation"]
    n_train = 200 - round(200 * cfg.data.holdout)
    assert aug["starts"] == n_train and aug["frames"] == 3 * n_train and aug["dropped_chains"] == 0
    assert aug["energy_evals"] == n_train * (4 + 3 * 2 + 1)
    assert s["energy_evals_training"] >= aug["energy_evals"] and s["training_wall_s"] >= aug["wall_s"]
    cached = np.load(run / "data" / "augmented.npz")["positions"]
    assert cached.shape == (3 * n_train, 22, 3)
    ll = s["log_likelihood"]
    assert np.isfinite(ll["train"]) and np.isfinite(ll["holdout"]) and ll["n_holdout"] == 20
    # the resumed run trains on the cached frames (same numbers) and finishes
    assert main(["train", "--resume", str(run), "--no-progress", "--json"]) == 0
    from boltzflow.core.rundir import RunDir

    s2 = RunDir(run).read_summary()
    assert s2["training_finished"] and s2["data_augmentation"] == aug
    np.testing.assert_array_equal(np.load(run / "data" / "augmented.npz")["positions"], cached)


@needs_ref
def test_langevin_growth_at_further_temperatures(tmp_path):
    """data.md_temperatures: every start is grown at the system temperature and at each further one
    (the same frames per start); the hotter frames carry the hotter potential energy (equipartition:
    about +1/2 kT(300 K) per degree of freedom from 300 to 600 K), and every evaluation is counted."""
    from boltzflow import pipeline
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-dipeptide")
    ov = {"data.md_frames": 2, "data.md_burnin": 300, "data.md_stride": 20, "data.max_samples": 60,
          "data.md_temperatures": [600.0], "training.pretrain.steps": 1, "training.finetune.steps": 0,
          "generator.blocks": 1, "generator.hidden": 16, "generator.pipeline": "internal-all"}
    cfg = pipeline.load_run_config(None, ov)
    s = pipeline.train(system, cfg, tmp_path / "hot", progress=False)
    aug = s["data_augmentation"]
    n_train = 60 - round(60 * cfg.data.holdout)
    cold, hot = aug["temperatures"]
    assert cold["temperature_k"] == 300.0 and hot["temperature_k"] == 600.0
    assert cold["frames"] == hot["frames"] == 2 * n_train and aug["frames"] == 4 * n_train
    assert aug["energy_evals"] == 2 * n_train * (300 + 2 * 20 + 1)
    # 66 degrees of freedom, near-harmonic: 33 kT more at 600 K in equilibrium (measured 28.5 after 300 fs)
    assert 15.0 < hot["mean_u"] - cold["mean_u"] < 45.0, aug
    with pytest.raises(Exception, match="md_temperatures"):
        pipeline.load_run_config(None, {"data.md_temperatures": [-1.0]})


@needs_ref
def test_internal_generator_trains_without_penalty_batches(tmp_path):
    """Internal coordinates have no alignment penalty: the trainer runs with penalty weight 0 (no extra
    flow batch per step, no 'penalty' metric) although the default config asks for 1."""
    import torch

    from boltzflow import pipeline
    from boltzflow.cli import build_parser
    from boltzflow.cli.train import overrides_from_args
    from boltzflow.systems.builtin import builtin_system

    run = tmp_path / "nopen"
    args = build_parser().parse_args(["train", "alanine-dipeptide", "-o", str(run)] + TINY)
    cfg = pipeline.load_run_config(None, overrides_from_args(args))
    assert cfg.training.pretrain.penalty_weight == 1.0 and cfg.generator.representation == "internal"
    pipeline.train(builtin_system("alanine-dipeptide"), cfg, run, progress=False, max_steps=4)
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
    assert state["config"]["pretrain"]["penalty_weight"] == 0.0 and state["config"]["finetune"]["penalty_weight"] == 0.0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("penalty" not in r for r in rows)
