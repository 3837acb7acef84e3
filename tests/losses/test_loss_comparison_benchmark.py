"""benchmarks/loss_comparison.py: the fixed JSON shape of the issue, at tiny sizes (seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import loss_comparison as lc  # noqa: E402

TINY = ["pretrain_steps=20", "steps=10", "fab_steps=3", "batch=64", "fab_batch=32", "eval_n=500",
        "data_n=500", "blocks=1", "hidden=16"]


def test_json_shape_on_tiny_double_well(capsys):
    rc = lc.main(["--system", "double-well-12d-fab", "--json"] + [a for s in TINY for a in ("--set", s)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["system"] == "double-well-12d-fab"
    assert set(out["exact"]) == {"minor_fraction", "log_z"}
    assert out["exact"]["minor_fraction"] == pytest.approx(0.1557, abs=1e-3)
    assert set(out["results"]) == {"klx", "klz_df", "l2plus", "fab"}
    for name, r in out["results"].items():
        for key in ("minor_fraction", "ess", "log_z", "energy_evals", "wall_s"):
            assert key in r, (name, key)
        assert r["energy_evals"] > 0
    assert out["settings"]["steps"] == 10 and out["settings"]["fab_batch"] == 32


def test_overrides_are_typed_and_checked(capsys):
    sz = lc.sizes("many-well-16d", False)
    got = lc.parse_overrides(["steps=1e3", "lr=2e-4", "flow=spline", "grad_clip=0"], sz)
    assert got == {"steps": 1000, "lr": 2e-4, "flow": "spline", "grad_clip": 0.0}
    with pytest.raises(ValueError):
        lc.parse_overrides(["nope=1"], sz)
    assert lc.main(["--system", "many-well-16d", "--set", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_full_sizes_follow_the_papers():
    assert lc.sizes("double-well-12d", True)["blocks"] == 8 and lc.sizes("double-well-12d", True)["hidden"] == 64
    mol = lc.sizes("alanine-dipeptide", True)
    assert (mol["blocks"], mol["hidden"], mol["pretrain_steps"], mol["steps"]) == (24, 256, 1000, 10000)
