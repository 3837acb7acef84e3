"""CLI output details of issue 15: --print-config lists unset options, pymbar's import banners are
filtered, error bars from too few samples say so, hot temperatures warn, broken frames are flagged."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from boltzflow.cli import main


def test_print_config_lists_options_without_a_default(capsys):
    assert main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "[training.cap]" in text and "# energy_max = <float>" in text and "# grad_max = <float>" in text
    pre = text[text.index("[training.pretrain]"):text.index("[training.finetune]")]
    assert "# lr = <float>" in pre


def test_pymbar_import_banners_are_filtered():
    from boltzflow.cli import silence_pymbar_banner

    silence_pymbar_banner()
    log = logging.getLogger("pymbar.mbar_solvers")
    banner = logging.LogRecord(log.name, logging.WARNING, "", 0, "\n***** JAX NOT FOUND *****\n", None, None)
    other = logging.LogRecord(log.name, logging.WARNING, "", 0, "solver did not converge", None, None)
    assert not log.filter(banner) and log.filter(other)


def test_pymbar_banner_is_filtered_for_python_users_too():
    """A Python user who only imports boltzflow (no CLI) and then pymbar sees no JAX banner."""
    import subprocess
    import sys

    def run(prefix):
        code = prefix + "import logging; logging.basicConfig(level=logging.WARNING); import pymbar"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout + r.stderr

    if "JAX NOT FOUND" not in run(""):
        pytest.skip("this pymbar prints no JAX banner (JAX installed?)")
    assert "JAX" not in run("import boltzflow; ")


def test_error_bars_from_too_few_samples_say_so():
    from boltzflow.cli.common import estimate_line, format_pm
    from boltzflow.estimators import population

    assert format_pm(0.013, 0.0027) == "0.0130 +- 0.0027"
    assert "+- 0.0000" not in format_pm(0.0, 0.0) and "too few samples" in format_pm(0.0, 0.0)
    assert "too few samples" in format_pm(1.0, float("nan"))
    est = population(np.zeros(5, dtype=bool), None, name="P(x)", n_bootstrap=0)
    assert est.stderr == 0 and "too few samples" in estimate_line(est)


def test_hot_temperature_warns_but_works(tmp_path, capsys):
    assert main(["prepare", "alanine-dipeptide", "--temperature", "2000", "-o", str(tmp_path / "hot")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "2000" in err


def test_broken_frames_are_flagged():
    from boltzflow.cli.simulate import broken_frame_fraction
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("butane")
    x = np.repeat(system.positions[None], 4, axis=0)
    x[1] *= 3.0  # every bond three times as long
    assert broken_frame_fraction(system, x) == 0.25
    assert broken_frame_fraction(system, x[[0, 2]]) == 0.0


def test_energy_writers_give_null_and_nan_for_invalid_frames():
    import json

    from boltzflow.cli.energy import energies_json, energies_table

    e = np.array([1.5, np.nan, -2.25])
    terms = {"bond": np.array([0.5, np.nan, 0.0])}
    doc = json.loads(energies_json(e, e / 2, terms, 300.0, "NativeEnergy"))
    assert doc["energy_kj_mol"] == [1.5, None, -2.25] and doc["reduced_energy"][1] is None
    assert doc["terms_kj_mol"] == {"bond": [0.5, None, 0.0]} and doc["temperature_k"] == 300.0
    rows = energies_table(e, e / 2, terms).splitlines()
    assert rows[0].split() == ["frame", "energy_kJ/mol", "reduced_kT", "bond"] and len(rows) == 4
    assert rows[2].split() == ["1", "nan", "nan", "nan"] and rows[3].split()[1] == "-2.2500"


def test_train_help_lists_every_registered_loss():
    """`train --help` names the losses without importing torch; the list must follow the registry."""
    from boltzflow.cli.train import FINETUNE_LOSSES
    from boltzflow.losses import LOSSES

    assert sorted(FINETUNE_LOSSES) == sorted(LOSSES)
