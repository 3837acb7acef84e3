"""benchmarks/kish_seeds.py: the same seeds give the same Kish ESS; seeds may be given as ranges."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kish_seeds  # noqa: E402


def test_seed_ranges_expand_and_common_seeds_repeat(capsys):
    run = str(ROOT / "systems" / "alanine-dipeptide" / "generators" / "energy")
    kish_seeds.main([run, "-n", "300", "--seeds", "1..2", "5"])
    kish_seeds.main([run, "-n", "300", "--seeds", "5"])
    a, b = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert a["seeds"] == [1, 2, 5] and b["seeds"] == [5]
    assert a["per_seed"][2] == b["per_seed"][0] and 0 < b["pooled"] <= 1  # seed 5 draws the same samples


@pytest.mark.parametrize("bad", ["3..1", "a..4", "1.5"])
def test_bad_seed_items_are_usage_errors(bad):
    with pytest.raises(SystemExit) as e:
        kish_seeds.main(["unused", "--seeds", bad])
    assert e.value.code == 2
