"""Pareto k-hat of importance weights (known answers) and tail-aware error bars of the estimators."""

import json

import numpy as np
import pytest

from boltzflow.errors import InputError
from boltzflow.estimators import (
    batch_means_stderr,
    conformational_free_energy,
    kish_ess,
    log_z,
    pareto_k,
    pareto_k_threshold,
    population,
    population_free_energy,
    to_kj_per_mol,
)
from boltzflow.estimators.tails import heavy_tail_note, slow_convergence_note


def _gpd_log_weights(k: float, n: int, seed: int) -> np.ndarray:
    """log of n draws of a generalized Pareto distribution with shape k > 0 (scale 1, location 0)."""
    u = np.random.default_rng(seed).random(n)
    return np.log(np.expm1(-k * np.log1p(-u)) / k)  # ((1 - u)^-k - 1) / k


@pytest.mark.parametrize("k", [0.3, 0.8])
def test_pareto_k_recovers_the_shape_of_gpd_weights(k):
    ks = [pareto_k(_gpd_log_weights(k, 100_000, seed)) for seed in range(3)]
    assert all(abs(kh - k) < 0.15 for kh in ks), ks
    assert abs(np.mean(ks) - k) < 0.08, ks


def test_pareto_k_of_pareto_weights_and_scale_invariance():
    lw = -0.8 * np.log(np.random.default_rng(7).random(100_000))  # Pareto, tail index 1/0.8
    k = pareto_k(lw)
    assert abs(k - 0.8) < 0.15
    assert pareto_k(lw + 1234.5) == pytest.approx(k, abs=1e-9)
    assert pareto_k(lw - 5000.0) == pytest.approx(k, abs=1e-9)


def test_light_tails_give_small_k_and_bounded_weights_negative_k():
    rng = np.random.default_rng(3)
    assert pareto_k(rng.normal(0.0, 0.5, 100_000)) < 0.3  # lognormal weights, sigma 0.5
    assert pareto_k(rng.normal(0.0, 1.0, 100_000)) < 0.45  # lognormal, sigma 1: heavier but all moments finite
    assert abs(pareto_k(np.log(rng.exponential(size=100_000)))) < 0.1  # exponential tail: k = 0
    assert pareto_k(np.log(rng.random(100_000))) < -0.5  # uniform weights: bounded tail, k = -1


def test_constant_weights_and_edge_cases():
    assert pareto_k(np.zeros(1000)) <= 0  # no tail at all: -inf
    assert pareto_k(np.full(1000, -3.0)) <= 0
    assert np.isnan(pareto_k(np.zeros(10)))  # 10 draws: tail of 2, too few to fit
    lw = np.random.default_rng(0).normal(size=2000)
    lw_invalid = np.concatenate([lw, np.full(50, -np.inf), np.full(5, np.nan)])  # weight 0: left out
    assert pareto_k(lw_invalid) == pytest.approx(pareto_k(lw))
    with pytest.raises(InputError, match=r"\+inf"):
        pareto_k(np.array([0.0, np.inf]))
    one_dominant = np.concatenate([np.random.default_rng(1).normal(size=999), [800.0]])
    assert pareto_k(one_dominant) > 0.7  # one weight e^800 times the rest: no overflow, heavy


def test_sample_size_threshold():
    assert pareto_k_threshold(100) == pytest.approx(0.5)
    assert pareto_k_threshold(1000) == pytest.approx(1 - 1 / 3)
    assert pareto_k_threshold(100_000) == pytest.approx(0.7)


def test_batch_means_stderr_of_independent_draws():
    x = np.random.default_rng(5).normal(0.0, 2.0, 20_000)
    se = batch_means_stderr(lambda i: float(np.mean(x[i])), x.size, 20)
    assert 0.6 * 2.0 / np.sqrt(x.size) < se < 1.5 * 2.0 / np.sqrt(x.size)
    assert np.isnan(batch_means_stderr(lambda i: float(np.mean(x[i])), 15, 10))  # fewer than 2 per chunk
    with pytest.raises(InputError, match="at least 2"):
        batch_means_stderr(lambda i: 0.0, 100, 1)


def _narrow_proposal(s2: float, n: int = 20_000, seed: int = 0):
    """Samples of q = N(0, s2) for p = N(0, 1): weights exp(x^2 (1/s2 - 1) / 2) have Pareto shape 1 - s2."""
    x = np.random.default_rng(seed).normal(0.0, np.sqrt(s2), n)
    return x, -0.5 * x ** 2 + 0.5 * x ** 2 / s2


def _delta_se(a, lw):
    w = np.exp(lw - lw.max())
    w /= w.sum()
    p = np.sum(w * a)
    return float(np.sqrt(np.sum(w * w * (a - p) ** 2)))


def test_heavy_tailed_population_is_flagged_and_its_error_not_smaller():
    x, lw = _narrow_proposal(0.15)  # tail shape 0.85 (k-hat ~0.74 on 2e4 draws: the tail converges slowly)
    est = population(x > 1, lw, name="P(x>1)", n_bootstrap=100)
    assert est.pareto_k > 0.7 and not est.reliable
    assert est.extra["stderr_delta"] == pytest.approx(_delta_se((x > 1).astype(float), lw))
    assert est.stderr >= est.extra["stderr_delta"]
    assert est.stderr == max(est.extra["stderr_delta"], est.extra["stderr_batch_means"])
    assert est.extra["n_batches"] >= 10 and "Pareto k > 0.7" in est.extra["stderr_method"]
    assert est.ci_low <= est.value - 1.959 * est.stderr or est.ci_low == 0.0
    assert est.ci_high >= est.value + 1.959 * est.stderr
    d = est.to_dict()
    json.dumps(d)
    assert d["reliable"] is False and d["pareto_k"] == pytest.approx(est.pareto_k)
    assert {"stderr_delta", "stderr_batch_means", "stderr_method"} <= set(d)
    assert est.tail_note.startswith(f"weights heavy-tailed (Pareto k = {est.pareto_k:.2f} > 0.7)")
    assert "error bar unreliable" in str(est)
    # the free energies and log Z from the same weights carry the same flag
    for e in (log_z(lw, n_bootstrap=50), conformational_free_energy(x <= 1, x > 1, lw, n_bootstrap=50),
              population_free_energy(est), kish_ess(lw)):
        assert e.pareto_k == pytest.approx(est.pareto_k) and not e.reliable, e.name
    lz = log_z(lw, n_bootstrap=50)
    assert lz.stderr >= lz.extra["stderr_delta"]
    dF = conformational_free_energy(x <= 1, x > 1, lw, n_bootstrap=50, temperature_k=300.0)
    assert dF.stderr >= dF.extra["stderr_delta"]
    kj = to_kj_per_mol(dF, 300.0)
    factor = kj.value / dF.value
    assert kj.extra["stderr_batch_means"] == pytest.approx(dF.extra["stderr_batch_means"] * factor)
    assert kj.pareto_k == dF.pareto_k


def test_light_tailed_population_is_unflagged_and_unchanged():
    x, lw = _narrow_proposal(0.8)  # true k = 0.2
    est = population(x > 1, lw, name="P(x>1)", n_bootstrap=100)
    assert est.pareto_k < 0.5 and est.reliable and est.tail_note == ""
    assert est.stderr == pytest.approx(_delta_se((x > 1).astype(float), lw), rel=1e-12)
    assert est.method == "snis" and "stderr_delta" not in est.extra
    d = est.to_dict()
    assert d["reliable"] is True and d["stderr_method"] == "delta method" and "stderr_batch_means" not in d
    unweighted = population(x > 1, None, n_bootstrap=0)
    assert np.isnan(unweighted.pareto_k) and unweighted.reliable
    assert set(unweighted.to_dict()) == {"name", "value", "stderr", "ess"}


def test_heavy_tail_note_wording():
    assert heavy_tail_note(0.83) == ("weights heavy-tailed (Pareto k = 0.83 > 0.7): the error bar may be too small; "
                                     "draw more samples or improve the generator")
    assert heavy_tail_note(0.7) == "" and heavy_tail_note(float("nan")) == ""
    assert "Pareto k = 0.60 in (0.5, 0.7]" in slow_convergence_note(0.6) and "too small" in slow_convergence_note(0.6)
    assert slow_convergence_note(0.5) == slow_convergence_note(0.75) == slow_convergence_note(float("nan")) == ""


def _toy_set(path, s2: float):
    from boltzflow.sampling import SampleSet

    rng = np.random.default_rng(11)
    x = rng.normal(0.0, np.sqrt(s2), (20_000, 2))
    log_q = np.sum(-0.5 * x ** 2 / s2 - 0.5 * np.log(2 * np.pi * s2), 1)
    u = 0.5 * np.sum(x ** 2, 1)
    return SampleSet(x, u, log_q, -u - log_q).save(path)


def test_sample_estimates_record_pareto_k(tmp_path):
    from boltzflow.estimators.analysis import sample_estimates
    from boltzflow.sampling import SampleSet

    res = sample_estimates(SampleSet.load(_toy_set(tmp_path / "h.npz", 0.1)), n_bootstrap=0)
    assert res.pareto_k > 0.7 and "heavy-tailed" in res.warning
    assert res.estimates["log_Z"].pareto_k == res.pareto_k
    res = sample_estimates(SampleSet.load(_toy_set(tmp_path / "l.npz", 0.8)), n_bootstrap=0)
    assert res.pareto_k < 0.7 and res.warning == ""


def test_cli_estimate_shows_pareto_k_and_warns(tmp_path, capsys):
    from boltzflow.cli import main

    heavy = _toy_set(tmp_path / "heavy.npz", 0.1)  # weights exp(|x|^2 (1/s2 - 1) / 2): Pareto, shape 1 - s2 = 0.9
    assert main(["estimate", str(heavy), "--population", "x[0]>1", "--json", "--bootstrap", "50"]) == 0
    cap = capsys.readouterr()
    res = {e["name"]: e for e in json.loads(cap.out)}
    assert res["P(x[0]>1)"]["pareto_k"] > 0.7 and res["P(x[0]>1)"]["reliable"] is False
    assert res["P(x[0]>1)"]["stderr"] >= res["P(x[0]>1)"]["stderr_delta"]
    assert res["log_Z"]["reliable"] is False
    assert cap.err.count("warning: weights heavy-tailed (Pareto k = ") == 1
    assert main(["estimate", str(heavy), "--population", "x[0]>1", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "Pareto k" in out and "!" in out
    assert out.count("warning: weights heavy-tailed") == 1 and "draw more samples or improve the generator" in out
    light = _toy_set(tmp_path / "light.npz", 0.8)
    assert main(["estimate", str(light), "--population", "x[0]>1", "--bootstrap", "50"]) == 0
    cap = capsys.readouterr()
    assert "Pareto k" in cap.out and "warning" not in cap.out + cap.err and "note:" not in cap.out
    medium = _toy_set(tmp_path / "medium.npz", 0.3)  # shape 0.7 (k-hat 0.57 here): infinite variance, said
    assert main(["estimate", str(medium), "--population", "x[0]>1", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and out.count("note: weights have infinite variance (Pareto k = ") == 1
