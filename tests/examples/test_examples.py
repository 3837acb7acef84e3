"""Every example script runs at toy size (--quick)."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REF = EXAMPLES.parent / "systems" / "alanine-dipeptide" / "reference_300K.npz"


def _run(name, *args):
    old = sys.argv
    sys.argv = [name, "--quick", *args]
    try:
        return runpy.run_path(str(EXAMPLES / name), run_name="not_main")["main"](True, *[])
    finally:
        sys.argv = old


def test_energy_bridge_example():
    res = _run("energy_bridge.py")
    assert res["max_abs_du"] < 1e-4


def test_train_double_well_example():
    res = _run("train_double_well.py")
    assert set(res) == {"exact", "klx", "l2plus"}
    assert 0 <= res["l2plus"] <= 1


@pytest.mark.skipif(not REF.is_file(), reason="shipped reference data missing")
def test_reweighting_example():
    res = _run("reweighting_free_energies.py")
    assert 0 <= res["population"] <= 1 and res["stderr"] > 0


@pytest.mark.skipif(not REF.is_file(), reason="shipped reference data missing")
def test_replica_comparison_example(tmp_path):
    mod = runpy.run_path(str(EXAMPLES / "replica_comparison.py"), run_name="not_main")
    rows = mod["main"](True, None, str(tmp_path / "pt"))
    assert len(rows) == 2 and all(0 <= r[0] <= 1 for r in rows.values())
