"""benchmarks/tail_frames.py: Langevin frames from a generator's heaviest draws, usable as data.extra."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from boltzflow import pipeline
from boltzflow.sampling import SampleSet

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tail_frames import main as tail_frames  # noqa: E402


def test_tail_frames_start_from_the_heaviest_draws_and_feed_data_extra(tmp_path):
    from boltzflow.systems.builtin import builtin_system

    gen_dir = ROOT / "systems" / "alanine-dipeptide" / "generators" / "energy"
    out = tmp_path / "tail.npz"
    info = tail_frames([str(gen_dir), "-o", str(out), "-n", "2000", "--top", "0.01", "--frames", "2",
                        "--burnin", "5", "--stride", "5"])
    assert info["starts"] == 20 and info["frames"] == 40 - 2 * info["dropped_chains"]
    lo, hi = info["start_log_w_above_median"]
    assert hi >= lo > 0  # the top 1 % lie above the median log weight
    assert info["energy_evals"] == 2000 + 20 * (1 + 5 + 2 * 5)  # ranking draws + first forces + Langevin steps
    s = SampleSet.load(out)
    assert len(s) == info["frames"] and s.temperature == 300.0 and np.isfinite(s.reduced_energy).all()
    x, rec = pipeline._extra_frames(builtin_system("alanine-dipeptide"), pipeline.DataConfig(extra=(str(out),)))
    assert x.shape == (info["frames"], 22, 3) and rec[0]["energy_evals"] == info["energy_evals"]
    with pytest.raises(SystemExit, match="exists"):
        tail_frames([str(gen_dir), "-o", str(out)])
