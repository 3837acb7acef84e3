"""benchmarks/scaling.py --quick: the JSON contract (rates and parallel efficiency per part), at toy size."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scaling  # noqa: E402


def check_rows(rows, part, ranks):
    got = [r for r in rows if r["part"] == part]
    assert sorted({r["ranks"] for r in got}) == ranks
    for r in got:
        assert r["rate"] > 0 and math.isfinite(r["rate"]) and r["unit"]
        assert r["efficiency"] == pytest.approx(r["rate"] / (r["ranks"] * next(
            b["rate"] for b in got if b["ranks"] == 1 and b.get("loss") == r.get("loss"))))


def test_quick_training_scaling_json(capsys):
    out = scaling.main(["--quick", "--json", "--parts", "train", "--losses", "klz"])
    check_rows(out["rows"], "train", [1, 2])
    assert '"efficiency"' in capsys.readouterr().out


@pytest.mark.slow
def test_quick_all_parts():
    out = scaling.main(["--quick", "--json"])
    check_rows(out["rows"], "train", [1, 2])
    check_rows(out["rows"], "sample", [1, 2])
    if "replica" not in out["skipped"]:
        check_rows(out["rows"], "replica", [1, 2])
