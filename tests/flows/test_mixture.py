"""GeneratorMixture: q = sum_k pi_k q_k is an exact, normalised density that reweighting can use, it saves
and loads like a generator, and `boltzflow mix` makes a run directory that `boltzflow sample` reads."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow.errors import CheckpointError, InputError
from boltzflow.flows.generator import (
    GeneratorConfig,
    GeneratorMixture,
    MolecularGenerator,
    load_generator,
    save_generator,
)
from boltzflow.systems.builtin import builtin_system

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parts():
    s = builtin_system("alanine-dipeptide")
    gens = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        g = MolecularGenerator(s, GeneratorConfig(pipeline="internal-all", blocks=1, hidden=16, seed=seed))
        for p in g.parameters():  # away from the identity initialisation: two different densities
            p.data.add_(0.05 * torch.randn_like(p))
        gens.append(g.eval())
    return s, gens


def test_mixture_density_is_the_weighted_sum_and_its_draws_are_scored_exactly(parts):
    s, (a, b) = parts
    mix = GeneratorMixture([a, b], weights=[3.0, 1.0])
    assert mix.weights == pytest.approx([0.75, 0.25])
    with torch.no_grad():
        x, lq = mix.sample_and_log_prob(400, generator=torch.Generator().manual_seed(0))
        want = torch.logaddexp(math.log(0.75) + a.log_prob(x).double(), math.log(0.25) + b.log_prob(x).double())
        assert torch.allclose(mix.log_prob(x), want, atol=1e-9)
        assert torch.allclose(lq, want, atol=2e-3)  # own component from the forward pass (float32 round trip)
        assert not torch.allclose(a.log_prob(x), b.log_prob(x), atol=0.1)  # the components differ
        # normalised: E_mix[q_a / q_mix] = 1 (importance sampling of a's total mass)
        x, lq = mix.sample_and_log_prob(4000, generator=torch.Generator().manual_seed(1))
        r = torch.exp(a.log_prob(x).double() - lq)
    assert float(r.mean()) == pytest.approx(1.0, abs=4 * float(r.std()) / math.sqrt(len(r)))
    # the same generator twice is that generator
    same = GeneratorMixture([a, a], weights=[0.3, 0.7])
    with torch.no_grad():
        assert torch.allclose(same.log_prob(x), a.log_prob(x).double(), atol=1e-5)


def test_mixture_samples_carry_weights_and_save_and_load(parts, tmp_path):
    s, (a, b) = parts
    mix = GeneratorMixture([a, b])
    from boltzflow.pipeline import EnergyConfig, make_energy

    energy = make_energy(s, EnergyConfig())
    ss = mix.sample(300, energy=energy, batch_size=128, generator=torch.Generator().manual_seed(2))
    assert ss.positions.shape == (300, s.n_atoms, 3) and ss.provenance["mixture_weights"] == [0.5, 0.5]
    with torch.no_grad():
        u = energy(torch.as_tensor(ss.positions)).double().numpy()
    np.testing.assert_allclose(ss.log_weights, -u - ss.log_q, rtol=1e-6)
    save_generator(tmp_path / "g.pt", mix)
    back = load_generator(tmp_path / "g.pt", s)
    assert isinstance(back, GeneratorMixture) and back.weights == pytest.approx([0.5, 0.5])
    x = torch.as_tensor(ss.positions)
    with torch.no_grad():
        assert torch.allclose(back.log_prob(x), mix.log_prob(x), atol=1e-9)
    with pytest.raises(CheckpointError, match="made for system"):
        load_generator(tmp_path / "g.pt", builtin_system("butane"))


def test_bad_mixtures_are_refused(parts):
    s, (a, b) = parts
    with pytest.raises(InputError, match="at least 2"):
        GeneratorMixture([a])
    with pytest.raises(InputError, match="positive"):
        GeneratorMixture([a, b], weights=[1.0, 0.0])
    other = MolecularGenerator(builtin_system("butane"), GeneratorConfig(pipeline="internal-all", blocks=1, hidden=8))
    with pytest.raises(InputError, match="same system"):
        GeneratorMixture([a, other])


def test_mix_verb_makes_a_run_directory_that_sample_reads(tmp_path, capsys):
    from boltzflow import pipeline
    from boltzflow.cli import main

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generator_quality import QUICK

    s = builtin_system("alanine-dipeptide")
    over = {**QUICK, "data.md_frames": 0, "training.finetune.steps": 0}
    for seed in (0, 1):
        pipeline.train(s, pipeline.recipe_config("data", {**over, "seed": seed}), tmp_path / f"r{seed}", progress=False)
    runs = [str(tmp_path / "r0"), str(tmp_path / "r1")]
    assert main(["mix", *runs, "-o", str(tmp_path / "mix"), "--weights", "1,3"]) == 0
    summary = json.loads((tmp_path / "mix" / "summary.json").read_text())
    assert [p["weight"] for p in summary["mixture"]] == pytest.approx([0.25, 0.75])
    parts_cost = [json.loads((tmp_path / f"r{i}" / "summary.json").read_text())["training_wall_s"] for i in (0, 1)]
    assert summary["training_wall_s"] == pytest.approx(sum(parts_cost))
    samples = pipeline.sample(tmp_path / "mix", n=200, batch_size=100, progress=False)
    assert np.isfinite(samples.log_weights).mean() > 0.9
    assert samples.provenance["training_wall_s"] == pytest.approx(sum(parts_cost))
    assert main(["mix", runs[0], "-o", str(tmp_path / "one")]) == 2
    assert main(["mix", *runs, "-o", str(tmp_path / "mix")]) == 2  # not empty: nothing overwritten
    assert main(["mix", *runs, "-o", str(tmp_path / "w"), "--weights", "1"]) == 2
    err = capsys.readouterr().err
    assert "at least 2" in err and "not empty" in err and "--weights has 1 numbers" in err


def test_mixture_scan_kish_matches_the_exact_value_of_a_gaussian_mixture():
    """benchmarks/mixture_scan.py: the stratified Kish of q_pi = pi_0 N(-1, 1) + pi_1 N(1.5, 0.5^2) for the
    target N(0, 1), from draws of each component alone, against 1 / int p^2 / q_pi by quadrature."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mixture_scan import mixture_kish, mixture_log_q

    def log_n(x, m, s):
        return -0.5 * ((x - m) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))

    comps = [(-1.0, 1.0), (1.5, 0.5)]
    rng = np.random.default_rng(0)
    n = 400_000
    draws = [rng.normal(m, s, n) for m, s in comps]
    log_q = [np.stack([log_n(x, m, s) for m, s in comps], axis=1) for x in draws]
    u = [0.5 * x**2 + 7.0 for x in draws]  # unnormalised target: the constant must not matter
    grid = np.linspace(-12, 12, 200_001)
    dx = grid[1] - grid[0]
    for pi in ([1.0, 0.0], [0.7, 0.3], [0.4, 0.6]):
        lq = mixture_log_q(np.stack([log_n(grid, m, s) for m, s in comps], axis=1), pi)
        exact = 1.0 / float(np.sum(np.exp(2 * log_n(grid, 0.0, 1.0) - lq)) * dx)
        got = mixture_kish(log_q, u, pi)
        assert got == pytest.approx(exact, rel=0.02), (pi, got, exact)
    assert mixture_kish(log_q, u, [0.7, 0.3]) > mixture_kish(log_q, u, [1.0, 0.0])  # the second helps here
    with pytest.raises(ValueError, match="summing to 1"):
        mixture_kish(log_q, u, [0.5, 0.6])
