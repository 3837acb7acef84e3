"""benchmarks/particle_systems.py --quick and the train / sample verbs on a free-form particle run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_quick_benchmark_json_contract_and_evaluate(tmp_path):
    import particle_systems as ps

    res = ps.run("dw4", quick=True, out_dir=str(tmp_path / "run"))
    for key in ("nll", "ess", "sample_ms", "energy_evals", "wall_s", "nll_normalized", "log_z", "paper_nll"):
        assert key in res, key
    assert math.isfinite(res["nll"]) and 0 < res["ess"] <= 1 and res["sample_ms"] > 0
    assert abs(res["nll_normalized"] - res["nll"] - 3 * math.log(2 * math.pi)) < 1e-9  # (n-1)d/2 log 2pi, n=4, d=2
    assert res["energy_evals"] == res["reference_mcmc_evals"] + res["n_eval"]
    ev = ps.evaluate_run(str(tmp_path / "run"), str(ROOT / "systems/dw4/reference_test.npy"), n=100)
    assert abs(ev["nll"] - res["nll"]) < 1e-6  # same flow, same first 100 test frames


def test_train_and_sample_verbs_choose_the_freeform_generator(tmp_path):
    from boltzflow.cli import main

    cfg = tmp_path / "fff.toml"
    cfg.write_text('[generator]\nkind = "freeform"\nlayers = 1\nhidden = 8\nfeatures = 4\n'
                   '[training]\nsteps = 4\nbatch = 16\n')
    data = str(ROOT / "systems/dw4/reference_test.npy")
    run = tmp_path / "run"
    assert main(["train", "dw4", "-o", str(run), "--config", str(cfg), "--set", f"data={json.dumps(data)}",
                 "--set", "max_samples=64", "--no-progress"]) == 0
    assert (run / "generator.pt").is_file() and 'kind = "freeform"' in (run / "config.toml").read_text()
    assert main(["train", "--resume", str(run), "--set", "training.steps=6"]) == 0
    assert json.loads((run / "summary.json").read_text())["training_steps"] == 6
    assert main(["sample", str(run), "-n", "50", "--json"]) == 0
    z = np.load(run / "samples" / "generated.npz", allow_pickle=True)
    assert z["positions"].shape == (50, 8)
    assert np.allclose(z["log_weights"], -z["reduced_energy"] - z["log_q"])
