"""benchmarks/base_tail_scan.py: the Kish ESS of a tailed base, estimated from draws of the Gaussian base, is
exact where the answer is known, and the scan runs on a shipped generator."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from base_tail_scan import frames_kish, reweighted_kish, scan, tail_delta  # noqa: E402

from boltzflow.flows.base import tailed_normal_log_prob  # noqa: E402


def test_reweighting_recovers_the_kish_of_the_tailed_proposal():
    """p is the tailed normal (a = 2) in 3 dims, q_0 = N(0, I): with tail 2 the proposal is p itself (Kish 1),
    with tail 0 the reweighted estimate is the plain one, and for another tail it matches direct draws."""
    rng = np.random.default_rng(0)
    u = rng.standard_normal((400_000, 3))
    log_p = tailed_normal_log_prob(torch.as_tensor(u), 2.0).sum(-1).numpy()
    log_w = log_p - (-0.5 * u ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert reweighted_kish(log_w, tail_delta(np.abs(u), 2.0)) == pytest.approx(1.0, abs=0.01)
    plain = float(np.exp(2 * np.log(np.exp(log_w).sum()) - np.log(np.exp(2 * log_w).sum())) / len(u))
    assert reweighted_kish(log_w, np.zeros(len(u))) == pytest.approx(plain, rel=1e-12) and plain < 0.95
    # tail 3: draws of the tailed normal itself, scored directly
    from boltzflow.flows.base import StandardNormal

    v = StandardNormal(3, tail=3.0).double().sample(400_000, generator=torch.Generator().manual_seed(1))
    lw3 = (tailed_normal_log_prob(v, 2.0) - tailed_normal_log_prob(v, 3.0)).sum(-1).numpy()
    direct = float(np.exp(2 * np.log(np.exp(lw3).sum()) - np.log(np.exp(2 * lw3).sum())) / len(v))
    assert reweighted_kish(log_w, tail_delta(np.abs(u), 3.0)) == pytest.approx(direct, abs=0.01)
    assert reweighted_kish(np.array([0.0, -np.inf, 0.0]), np.zeros(3)) == pytest.approx(1.0)


def test_scan_runs_on_the_shipped_dipeptide_generator():
    from boltzflow.pipeline import load_trained

    _, _, gen, energy = load_trained(ROOT / "systems" / "alanine-dipeptide" / "generators" / "energy")
    out = scan(gen, energy, 3000, [1], [3.0], top=3)
    assert out["n"] == 3000 and set(out["kish"]) == {"0", "3.0"}
    assert 0.0 < out["kish"]["3.0"] <= 1.0 and 0.0 < out["kish"]["0"] <= 1.0
    assert out["per_seed"][0]["0"] == pytest.approx(out["kish"]["0"], abs=1e-4)
    assert len(out["top"]) == 3 and out["top"][0]["log_w_above_median"] >= out["top"][1]["log_w_above_median"]


def test_frames_kish_is_the_p_side_estimate_of_the_generators_own_density():
    from boltzflow.core.sampleset import SampleSet
    from boltzflow.pipeline import load_trained

    _, _, gen, energy = load_trained(ROOT / "systems" / "alanine-dipeptide" / "generators" / "energy")
    x = np.asarray(SampleSet.load(ROOT / "systems" / "alanine-dipeptide" / "reference_300K.npz").positions[:500])
    out = frames_kish(gen, energy, x, log_z=-10.0, tails=[3.0], batch=128)
    with torch.no_grad():
        xt = torch.as_tensor(x, dtype=next(gen.parameters()).dtype)
        r = (-energy(xt.double()).double() - gen.log_prob(xt).double()).numpy() + 10.0
    assert out["frames"] + out["other_isomer"] == 500
    assert out["0"]["kish_p"] == pytest.approx(1.0 / np.mean(np.exp(r)), rel=1e-6)
    assert out["0"]["max_log_w_minus_log_z"] == pytest.approx(r.max(), abs=1e-3)
    assert out["3.0"]["kish_p"] > 0.0
