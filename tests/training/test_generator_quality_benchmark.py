"""benchmarks/generator_quality.py: the issue's JSON contract, at toy size, for both routes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import generator_quality as gq  # noqa: E402


@pytest.mark.parametrize("route", ["energy", "data"])
def test_generator_quality_quick_json(route, tmp_path, capsys):
    out = gq.main(["--route", route, "--quick", "--seeds", "0,1", "--samples", "500", "--out", str(tmp_path), "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["route"] == route and printed["system"] == "alanine-dipeptide"
    assert len(out["seeds"]) == 2 and out["ess_sd"] is not None and 0 <= out["ess_mean"] <= 1
    for s in out["seeds"]:
        assert {"seed", "ess", "phi_positive", "log_z", "energy_evals", "wall_s", "curve", "n_samples"} <= set(s)
        assert s["n_samples"] == 500 and 0 < s["ess"] <= 1
        assert {"value", "stderr"} <= set(s["phi_positive"])
        # everything counted: data generation + logged evaluation batches + the final samples
        assert s["data_energy_evals"] > 0 and s["energy_evals"] > s["data_energy_evals"] + 500
        assert s["curve"] and all({"energy_evals", "wall_s", "ess"} <= set(c) for c in s["curve"])
        cc = s["curve_checkpoints"]
        assert [c["step"] for c in cc] == [20, 40, 60] and all(0 < c["ess"] <= 1 and c["n_samples"] == 200 for c in cc)
        assert [c["energy_evals"] for c in s["curve"]] == sorted(c["energy_evals"] for c in s["curve"])
    if route == "energy":  # no reference frames were used: the data are the tempering frames
        summary = json.loads((tmp_path / "alanine-dipeptide" / "energy-seed0" / "summary.json").read_text())
        assert summary["data_tempering"]["energy_evals"] == out["seeds"][0]["data_energy_evals"]
        assert "tempering.npz" in summary["reference_path"]
    # a second call reuses the finished runs (no retraining): same ESS
    again = gq.main(["--route", route, "--quick", "--seeds", "0", "--samples", "500", "--out", str(tmp_path), "--json"])
    assert again["seeds"][0]["training_steps"] == out["seeds"][0]["training_steps"]
