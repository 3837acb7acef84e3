"""Named recipes load and train; an exported generator samples wherever it is copied."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from boltzflow import pipeline
from boltzflow.errors import ConfigError, InputError
from boltzflow.recipes import names
from boltzflow.sampling import SampleSet

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from generator_quality import QUICK  # noqa: E402


def test_recipes_load_and_differ_in_their_data():
    assert names() == ["data", "energy", "peptide"]
    energy, data = pipeline.recipe_config("energy"), pipeline.recipe_config("data")
    assert energy.data.source == "tempering" and data.data.source == "reference" and data.data.md_frames > 0
    for cfg in (energy, data):
        assert cfg.generator.pipeline == "internal-all" and cfg.generator.fixed_torsions == "isomer"
        assert not cfg.generator.whiten and cfg.training.pretrain.steps > 0
    # below the ESS floor the energy recipe fine-tunes with logvar_data on its frames; the data recipe stops there
    assert energy.training.finetune_min_ess > 0 and energy.training.fallback.loss == "logvar_data"
    assert energy.training.fallback.steps > 0 and data.training.fallback.steps == 0
    over = pipeline.recipe_config("energy", {"training.pretrain.steps": 7})
    assert over.training.pretrain.steps == 7 and over.tempering == energy.tempering
    with pytest.raises(ConfigError, match="unknown recipe"):
        pipeline.recipe_config("nope")
    # the peptide recipe: the shipped tetrapeptide generator's flow and stages, fine-tuning whatever the start
    pep = pipeline.recipe_config("peptide")
    assert pep.generator.lead == "backbone" and pep.data.source == "tempering" and pep.tempering.keep_replicas == 1
    assert pep.training.finetune.loss == "logvar_data" and pep.training.finetune_min_ess == 0.0
    assert pep.training.pretrain.state_balance > 0 and pep.training.fallback.steps == 0


def test_peptide_recipe_trains_a_tetrapeptide_at_toy_size(tmp_path):
    from boltzflow.systems.builtin import builtin_system

    cfg = pipeline.recipe_config("peptide", {**QUICK, "generator.lead_blocks": 1})
    summary = pipeline.train(builtin_system("alanine-tetrapeptide"), cfg, tmp_path / "run", progress=False)
    assert summary["training_finished"] and summary["data_tempering"]["energy_evals"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["loss_name"] for r in rows if r["stage"] == "finetune"} == {"logvar_data"}
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "frames drawn by state" in log  # state_balance acted
    assert "torchrun --nproc_per_node 2" in log  # one process: the log points at both cores
    # the recipe's three logvar_data cycles, scaled to the toy stage's 20 steps: restarts at its steps 9 and 13
    assert "warm restart of fine-tuning at step 49" in log and "warm restart of fine-tuning at step 53" in log


def test_energy_recipe_trains_from_the_structure_and_export_samples_anywhere(tmp_path):
    from boltzflow.cli import main
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-dipeptide")
    cfg = pipeline.recipe_config("energy", QUICK)
    run = tmp_path / "run"
    summary = pipeline.train(system, cfg, run, progress=False)
    temp = summary["data_tempering"]
    assert temp["energy_evals"] > 0 and summary["energy_evals_training"] >= temp["energy_evals"]
    assert summary["reference_path"].endswith("tempering.npz")
    dest = pipeline.export_generator(run, tmp_path / "shipped", note="# test generator\n")
    assert not (dest / "checkpoints").exists() and not (dest / "data").exists()
    assert (dest / "README.md").read_text().startswith("# test generator")
    with pytest.raises(InputError, match="not empty"):
        pipeline.export_generator(run, dest)
    # the CLI verb, storing the weights in half precision: half the file, the same flow up to rounding
    (tmp_path / "note.md").write_text("# half\n")
    assert main(["export", str(run), str(tmp_path / "half"), "--weights-dtype", "float16",
                 "--note", str(tmp_path / "note.md")]) == 0
    half = tmp_path / "half"
    assert (half / "generator.pt").stat().st_size < 0.7 * (dest / "generator.pt").stat().st_size
    assert json.loads((half / "summary.json").read_text())["exported_weights_dtype"] == "float16"
    assert main(["export", str(run), str(tmp_path / "half")]) == 2  # never overwrites
    assert main(["export", str(run), str(tmp_path / "q8"), "--weights-dtype", "int8"]) == 0
    assert (tmp_path / "q8" / "generator.pt").stat().st_size < 0.8 * (half / "generator.pt").stat().st_size
    moved = tmp_path / "elsewhere" / "gen"
    shutil.copytree(dest, moved)
    shutil.copytree(half, tmp_path / "elsewhere" / "half")
    shutil.copytree(tmp_path / "q8", tmp_path / "elsewhere" / "q8")
    shutil.rmtree(run)  # nothing of the training run is needed any more
    assert main(["sample", str(moved), "-n", "300"]) == 0
    assert main(["sample", str(tmp_path / "elsewhere" / "half"), "-n", "300"]) == 0
    assert main(["sample", str(tmp_path / "elsewhere" / "q8"), "-n", "300"]) == 0
    s = SampleSet.load(moved / "samples" / "generated.npz")
    h = SampleSet.load(tmp_path / "elsewhere" / "half" / "samples" / "generated.npz")
    assert len(s) == 300 and np.isfinite(s.log_weights).all()
    # the same latent draws through the rounded flow: log q moves by rounding error only
    assert np.abs(np.asarray(h.log_q) - np.asarray(s.log_q)).max() < 0.5
    q8 = SampleSet.load(tmp_path / "elsewhere" / "q8" / "samples" / "generated.npz")
    assert np.isfinite(q8.log_weights).all() and np.abs(np.asarray(q8.log_q) - np.asarray(s.log_q)).max() < 2.0


def test_recipe_resolution():
    from boltzflow.recipes import resolve

    assert resolve("auto", {}) == "energy"  # nothing but the structure
    assert resolve("auto", {"data": {"reference": "pt/samples.npz"}}) == "data"
    assert resolve("auto", {"data": {"source": "reference"}}) == "data"
    assert resolve("auto", {"data": {"source": "tempering"}}) == "energy"
    # from the structure alone: "peptide" for peptides of >= 2 residues with phi and psi, "energy" otherwise
    from boltzflow.recipes import peptide_residues
    from boltzflow.systems.builtin import builtin_system

    tetra, di, butane = (builtin_system(n) for n in ("alanine-tetrapeptide", "alanine-dipeptide", "butane"))
    assert [peptide_residues(s) for s in (tetra, di, butane)] == [3, 1, 0]
    assert resolve("auto", {}, tetra) == "peptide" and resolve("auto", {}, di) == "energy"
    assert resolve("auto", {}, butane) == "energy"
    assert resolve("auto", {"data": {"reference": "pt/samples.npz"}}, tetra) == "data"
    assert pipeline.load_run_config(None, {}, "auto", tetra).generator.lead == "backbone"
    assert pipeline.load_run_config(None, {}, "energy", tetra).generator.lead == "none"
    assert resolve("none", {"data": {"reference": "x.npz"}}) is None and resolve(None) is None
    assert resolve("data") == "data"
    with pytest.raises(ConfigError, match="auto, none"):
        resolve("fast")


def test_cli_train_default_recipe_is_energy(tmp_path):
    """`boltzflow train SYSTEM -o RUN` with no --recipe runs the energy recipe (tempering, then both stages)."""

    from boltzflow.cli import main

    sets = [f"{k}={v}" for k, v in QUICK.items()]
    argv = ["train", "alanine-dipeptide", "-o", str(tmp_path / "r"), "--no-progress"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["recipe"] == "energy"
    assert summary["pipeline"] == "internal-all" and summary["data_tempering"]["energy_evals"] > 0
    # the recipe's two stages, both shortened by QUICK: maximum likelihood, then reweighted maximum likelihood
    assert summary["training_steps"] == QUICK["training.pretrain.steps"] + QUICK["training.finetune.steps"]
    guard = summary["ess_guard"]  # checked before fine-tuning and at its checkpoints (every 20 steps)
    assert [h["step"] for h in guard["history"]] == [40, 60] and guard["best_step"] in (40, 60)


@pytest.mark.parametrize("system,shipped", [("alanine-dipeptide", "energy"), ("alanine-tetrapeptide", "default")])
def test_shipped_generators_sample_from_a_copy(tmp_path, system, shipped):
    """The generators in systems/<name>/generators/ are self-contained: a copy samples with finite
    weights, and its reweighted draws put most mass in the states the reference has (not a broken file)."""
    from boltzflow.cli import main

    src = Path(__file__).resolve().parents[2] / "systems" / system / "generators" / shipped
    moved = tmp_path / "copy"
    shutil.copytree(src, moved)
    assert main(["sample", str(moved), "-n", "2000", "--seed", "3"]) == 0
    s = SampleSet.load(moved / "samples" / "generated.npz")
    assert len(s) == 2000 and np.isfinite(s.log_weights).all()
    w = np.exp(s.log_weights - s.log_weights.max())
    assert w.sum() ** 2 / (w ** 2).sum() > 0.02 * len(s)  # Kish ESS of a working generator, not ~1 sample
    assert not (src / "samples").exists()  # sampling the copy left the shipped directory alone
