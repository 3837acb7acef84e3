"""Flow-MCMC through the `sample` verb, the TOML config and the Python API, and the benchmark's JSON
contract at --quick size (shipped alanine-dipeptide generator, native energy)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from boltzflow.cli import main
from boltzflow.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "systems" / "alanine-dipeptide" / "generators" / "energy"
sys.path.insert(0, str(ROOT / "benchmarks"))
import flow_mcmc as bench  # noqa: E402


@pytest.fixture()
def run(tmp_path):
    dest = tmp_path / "adp"
    shutil.copytree(SHIPPED, dest)
    return dest


def test_sample_verb_imh_chains_over_the_same_draws(run, capsys):
    assert main(["sample", str(run), "-n", "800", "--mcmc", "imh", "--chains", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["mcmc"]
    assert m["method"] == "imh" and m["chains"] == 4 and m["energy_evals"] == 800  # no extra evaluations
    assert 0.4 < m["accept_rate"] < 1.0
    assert {"phi_negative", "phi_positive"} <= set(m["estimates"])
    from boltzflow.sampling import SampleSet

    gen = SampleSet.load(run / "samples" / "generated.npz")
    imh = SampleSet.load(run / "samples" / "imh.npz")
    assert imh.log_weights is None and len(imh) == 4 * (200 - 20)
    # every chain state is one of the flow's draws, with its energy
    rows = {tuple(np.round(p[0], 5)): u for p, u in zip(gen.positions, gen.reduced_energy)}
    assert all(np.isclose(rows[tuple(np.round(p[0], 5))], u) for p, u in zip(imh.positions[:50], imh.reduced_energy[:50]))
    summary = json.loads((run / "summary.json").read_text())
    assert "estimates_imh" in summary and "estimates" in summary


def test_toml_config_and_python_api(run):
    from boltzflow import pipeline
    from boltzflow.sampling.mcmc_config import MCMCConfig

    cfg = pipeline.load_run_config(overrides={"sampling.mcmc.method": "mala", "sampling.mcmc.chains": 4})
    assert cfg.sampling.mcmc == MCMCConfig(method="mala", chains=4)
    assert "[sampling.mcmc]" in pipeline.default_config_toml()
    with pytest.raises(ConfigError):
        pipeline.load_run_config(overrides={"sampling.mcmc.method": "gibbs"})
    s = pipeline.sample_mcmc(run, MCMCConfig(method="mala", chains=4, burnin=2, candidates=2), n=8)
    assert len(s) == 8 and s.provenance["decorrelated"] is False and (run / "samples" / "mala.npz").is_file()
    est = pipeline.estimate(run, which="mala")
    assert abs(est["phi_negative"].value + est["phi_positive"].value - 1) < 1e-9
    with pytest.raises(InputError):
        pipeline.estimate(run, which="../generated")
    with pytest.raises(InputError):
        pipeline.sample_mcmc(run, MCMCConfig(), n=8)


def test_benchmark_quick_json(capsys, tmp_path):
    out = bench.main(["--quick", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (tmp_path / "a.json").write_text(json.dumps(printed))
    pooled = bench.main(["--pool", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--json"])
    assert pooled["replicates"] == 4 and set(pooled["gain"]) == {"phi_positive", "u"}
    assert printed["methods"].keys() == {"reweighting", "imh", "mala", "snf"}
    rw, imh = out["methods"]["reweighting"], out["methods"]["imh"]
    assert rw["energy_evals"] == imh["energy_evals"] == 1000  # IMH reuses the draws
    assert 0 < rw["kish_ess_fraction"] <= 1 and 0 < imh["accept_rate"] < 1
    assert 0 < out["reference"]["phi_positive"]["value"] < 0.1  # the minor mode is rare, and seen
    for k in ("phi_positive", "u"):
        assert set(out["gain"][k]) == {"n_eff_per_eval_replicates", "n_eff_per_eval_in_run", "replicates_ci95"}
        assert len(rw[k]["values"]) == 2
    assert out["methods"]["mala"]["energy_evals"] > 8 * 8  # every energy+gradient evaluation counted
    assert out["methods"]["snf"]["energy_evals"] == 100 * (2 * 2 + 1)


def test_paired_gain_interval_brackets_a_known_variance_ratio():
    rng = np.random.default_rng(0)
    rw, imh = rng.normal(0, 2.0, 400), rng.normal(0, 1.0, 400)  # variance ratio 4
    lo, hi = bench.paired_gain_interval(list(rw), list(imh))
    assert lo < 4 < hi and hi / lo < 1.8
    assert all(x != x for x in bench.paired_gain_interval([1.0, 2.0], [1.0, 2.0]))
