"""MolecularGenerator on real alanine dipeptide: every pipeline x representation gives
log_prob(sample) == log_q, SampleSets with the right weights, checkpoints with fingerprint checks."""

import math

import numpy as np
import pytest
import torch

from boltzflow.errors import CheckpointError, ConfigError, InputError
from boltzflow.flows.generator import GeneratorConfig, build_generator, load_generator, save_generator

COMBOS = [("hnet", "cartesian"), ("hnet", "internal"), ("conditional", "cartesian"), ("conditional", "internal"),
          ("internal-all", "internal")]


def _system():
    from boltzflow.systems.builtin import builtin_system

    return builtin_system("alanine-dipeptide", route="psf")


def _data(system, n=48, seed=0):
    """Thermal-looking data: reference + 0.01 nm noise, random rotations/translations (n, 22, 3) float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.array(system.positions))[None] + 0.01 * torch.randn(n, system.n_atoms, 3, generator=g,
                                                                             dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]
    return x @ q.transpose(-1, -2) + torch.randn(n, 1, 3, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def ad():
    system = _system()
    return system, _data(system)


def _small(pipeline, representation, **kw):
    return GeneratorConfig(pipeline=pipeline, representation=representation, blocks=2, hidden=32, hnet_hidden=32,
                           h_blocks=2, h_hidden=32, **kw)


def _perturb(gen, seed=0):
    """Move every parameter off its identity initialisation so the checks are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("pipeline,representation", COMBOS)
def test_sample_log_prob_consistency(ad, pipeline, representation):
    system, data = ad
    torch.manual_seed(0)
    gen = build_generator(system, _small(pipeline, representation), data).double()
    _perturb(gen)
    x, log_q = gen.sample_and_log_prob(32, generator=torch.Generator().manual_seed(1))
    assert x.shape == (32, system.n_atoms, 3) and log_q.shape == (32,)
    assert torch.isfinite(log_q).all()
    assert torch.allclose(gen.log_prob(x), log_q, atol=1e-6)
    assert gen.biased == (pipeline == "hnet")
    # differentiable: the gradient reaches every parameter (h only through x, as in u(x_C, h(x_C)))
    (log_q.mean() + x.pow(2).mean() + gen.log_prob(gen.prepare_data(data[:8])).mean()).backward()
    missing = [n for n, p in gen.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # penalty: alignment for Cartesian heavy atoms only
    pen = gen.penalty(x)
    assert pen.shape == (32,)
    assert bool((pen > 0).all()) == (pipeline != "internal-all" and representation == "cartesian")


@pytest.mark.parametrize("pipeline,representation", [("internal-all", "internal"), ("conditional", "cartesian")])
def test_tailed_base_generator_scores_its_own_draws(ad, pipeline, representation):
    """generator.base_tail: the main flow's base has exponential tails; draws and densities stay consistent,
    and the density differs from the Gaussian-base generator with the same weights only by the base."""
    system, data = ad
    torch.manual_seed(0)
    gen = build_generator(system, _small(pipeline, representation, base_tail=2.0), data).double()
    _perturb(gen)
    plain = build_generator(system, _small(pipeline, representation), data).double()
    plain.load_state_dict(gen.state_dict())
    x, log_q = gen.sample_and_log_prob(64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(gen.log_prob(x), log_q, atol=1e-6)
    flow = gen.all_flow if pipeline == "internal-all" else gen.heavy_flow
    assert flow.base.tail == 2.0
    with torch.no_grad():
        diff = (gen.log_prob(x) - plain.log_prob(x)).numpy()
    assert np.ptp(diff) > 1e-3  # some draws reach the tails, where the densities differ by more than a constant


@pytest.mark.parametrize("pipeline,representation", COMBOS)
def test_float32_consistency_on_distorted_samples(ad, pipeline, representation):
    """float32 (the training dtype): log_prob(sample) == log_q to < 0.01 nats even for the distorted
    geometries of a randomly perturbed (untrained) flow."""
    system, data = ad
    torch.manual_seed(0)
    gen = build_generator(system, _small(pipeline, representation), data)
    _perturb(gen, seed=1)
    with torch.no_grad():
        x, log_q = gen.sample_and_log_prob(500, generator=torch.Generator().manual_seed(2))
        assert (gen.log_prob(x) - log_q).abs().max() < 1e-2


def test_hnet_log_prob_ignores_hydrogens_and_conditional_does_not(ad):
    system, data = ad
    x = _data(system, 4, seed=5)
    moved = x.clone()
    moved[:, torch.as_tensor(np.array(system.hydrogen_indices))] += 0.01
    for pipeline in ("hnet", "conditional"):
        gen = build_generator(system, _small(pipeline, "internal"), data).double()
        same = torch.allclose(gen.log_prob(moved), gen.log_prob(x))
        assert same == (pipeline == "hnet")


def test_internal_densities_are_rigid_invariant_and_consistent(ad):
    system, data = ad
    a = build_generator(system, _small("conditional", "internal"), data).double()
    b = build_generator(system, _small("internal-all", "internal"), data).double()
    x = _data(system, 6, seed=7)
    # untrained (identity) flows: two independent code paths give the same exact all-atom density
    assert torch.allclose(a.log_prob(x), b.log_prob(x), atol=1e-8)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))
    assert torch.allclose(b.log_prob(x @ q.T - 3.0), b.log_prob(x), atol=1e-8)


def test_prepare_data_aligns_cartesian(ad):
    system, data = ad
    gen = build_generator(system, _small("hnet", "cartesian"), data).double()
    y = gen.prepare_data(data)
    assert torch.allclose(y[:, gen.heavy].mean(1), torch.zeros(len(y), 3, dtype=torch.float64), atol=1e-10)
    assert gen.penalty(y).max() < gen.penalty(data).max()
    assert torch.allclose(torch.cdist(y, y), torch.cdist(data, data), atol=1e-10)


def test_sample_set_weights(ad):
    system, data = ad
    gen = build_generator(system, _small("conditional", "cartesian"), data).double()
    heavy = torch.as_tensor(np.array(system.heavy_indices))
    energy = lambda x: 100.0 * (x[:, heavy] ** 2).sum((-1, -2))  # noqa: E731  (any callable in kT)
    ss = gen.sample(50, energy=energy, batch_size=16, generator=torch.Generator().manual_seed(3))
    assert ss.positions.shape == (50, system.n_atoms, 3)
    x = torch.as_tensor(ss.positions, dtype=torch.float64)
    assert np.allclose(ss.reduced_energy, energy(x).numpy(), rtol=1e-5)
    assert np.allclose(ss.log_weights, -ss.reduced_energy - ss.log_q)
    assert np.allclose(gen.log_prob(x).detach().numpy(), ss.log_q, atol=1e-3)  # float32 positions
    assert ss.temperature == system.temperature and ss.provenance["biased"] is False
    plain = gen.sample(5)
    assert plain.log_weights is None and plain.reduced_energy is None
    with pytest.raises(InputError):
        gen.sample(0)


def test_mirror_images_of_untrained_internal_flow(ad):
    system, data = ad
    gen = build_generator(system, _small("hnet", "internal"), data).double()
    x, _ = gen.sample_and_log_prob(200, generator=torch.Generator().manual_seed(4))
    frac = gen.mirror_images(x).mean()
    # uniform torsions at initialisation: the CA improper is flipped about half the time
    assert 0.3 < frac < 0.7
    assert not gen.mirror_images(data).any()


def test_checkpoint_round_trip_and_fingerprint(ad, tmp_path):
    system, data = ad
    torch.manual_seed(0)
    gen = build_generator(system, _small("conditional", "internal"), data)
    _perturb(gen)
    x = gen.prepare_data(data[:5]).float()
    path = save_generator(tmp_path / "gen.pt", gen)
    back = load_generator(path, system)
    assert back.config == gen.config
    assert torch.allclose(back.log_prob(x), gen.log_prob(x))
    with pytest.raises(CheckpointError):
        load_generator(path, system.with_temperature(350.0))


def test_config_validation():
    from boltzflow.config import from_dict

    with pytest.raises(ConfigError):
        GeneratorConfig(pipeline="magic")
    with pytest.raises(ConfigError):
        GeneratorConfig(representation="internal", flow="realnvp")
    with pytest.raises(ConfigError):
        from_dict(GeneratorConfig, {"pipeline": "hnet", "blocs": 3})
    assert GeneratorConfig(representation="internal").heavy_kind == "spline"
    assert GeneratorConfig().heavy_kind == "realnvp"
    assert math.isclose(GeneratorConfig().max_rotation, math.pi / 3)


def test_bad_coordinates(ad):
    system, data = ad
    gen = build_generator(system, _small("hnet", "cartesian"))
    with pytest.raises(InputError):
        gen.log_prob(torch.zeros(2, 5, 3))


@pytest.mark.parametrize("pipeline,representation", [("hnet", "cartesian"), ("conditional", "internal"),
                                                     ("internal-all", "internal")])
def test_works_with_losses(ad, pipeline, representation):
    """The generator follows the losses' protocol: KLz on prepared data lowers the NLL; L2+ runs."""
    from boltzflow.losses import klz, l2plus

    system, data = ad
    torch.manual_seed(0)
    gen = build_generator(system, _small(pipeline, representation), data)
    x = gen.prepare_data(data).float()
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        out = klz(gen, x, penalty_weight=1.0, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = float(out.loss.detach()) if first is None else first
    assert float(klz(gen, x).loss.detach()) < first
    heavy = torch.as_tensor(np.array(system.heavy_indices))
    energy = lambda y: ((y[:, heavy] - x[:1, heavy]) ** 2).sum((-1, -2)) * 100.0  # noqa: E731
    out = l2plus(gen, energy, 16, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("pipeline,representation", COMBOS)
def test_has_penalty_only_where_penalty_can_be_nonzero(ad, pipeline, representation):
    system, data = ad
    gen = build_generator(system, _small(pipeline, representation), data)
    x = data[:8].float() + 0.3  # translated: a Cartesian alignment penalty is > 0 here
    pen = gen.penalty(gen._as_x(x) @ torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]))
    expected = pipeline != "internal-all" and representation == "cartesian"
    assert gen.has_penalty == expected
    assert bool((pen > 0).any()) == expected
    if expected:
        assert not build_generator(system, _small(pipeline, representation, lambda_align=0.0), data).has_penalty


@pytest.mark.parametrize("pipeline,representation", COMBOS)
def test_butane_pipelines(pipeline, representation):
    """Every pipeline also builds on butane (4 heavy atoms, terminal methyls, no chiral centre)."""
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("butane", route="psf")
    data = _data(system, 16, seed=9)
    torch.manual_seed(0)
    gen = build_generator(system, _small(pipeline, representation), data).double()
    _perturb(gen, seed=3)
    x, log_q = gen.sample_and_log_prob(64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(gen.log_prob(x), log_q, atol=1e-6)
    assert not gen.mirror_images(x).any()  # no chiral centre: never flagged


def test_isomer_generator_keeps_trans_amides_and_flags_cis_frames():
    import math as _m

    import numpy as _np

    from boltzflow.flows.generator import GeneratorConfig, MolecularGenerator
    from boltzflow.systems.builtin import builtin_system
    from boltzflow.systems.modes import dihedral as _dih

    s = builtin_system("alanine-dipeptide")
    gen = MolecularGenerator(s, GeneratorConfig(pipeline="internal-all", fixed_torsions="isomer", blocks=1, hidden=8))
    assert len(gen.all_ic.circular) == 5  # phi, psi and the three methyl rotors
    idx = {a.name: a.index for a in s.topology.atoms()}
    omega = (idx["CA"], idx["C"], idx["NT"], idx["CAT"])
    x = gen.sample(500).positions
    assert _np.all(_np.abs(_np.degrees(_dih(x, omega))) > 120)  # trans only
    assert gen.same_isomer(x).all()
    # rotate the NME cap about C-NT by 180 degrees: a cis amide, flagged
    pos = _np.array(s.positions, dtype=_np.float64)
    axis = pos[idx["NT"]] - pos[idx["C"]]
    axis /= _np.linalg.norm(axis)
    k = _np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = _np.eye(3) + _m.sin(_m.pi) * k + (1 - _m.cos(_m.pi)) * k @ k
    cis = pos.copy()
    for name in ("CAT", "HT1", "HT2", "HT3"):
        cis[idx[name]] = pos[idx["NT"]] + (pos[idx[name]] - pos[idx["NT"]]) @ rot.T
    assert list(gen.same_isomer(_np.stack([pos, cis]))) == [True, False]


def test_isomer_check_and_standardisation_fit_are_bounded_in_memory(monkeypatch):
    """same_isomer measures large data sets in chunks (same answer as one pass) and fit() uses an evenly
    spaced subset of at most about FIT_MAX frames (the standardisation of that subset, not of all)."""
    import numpy as _np

    from boltzflow.flows import generator as g
    from boltzflow.systems.builtin import builtin_system

    s = builtin_system("alanine-dipeptide")
    cfg = g.GeneratorConfig(pipeline="internal-all", fixed_torsions="isomer", blocks=1, hidden=8)
    gen = g.MolecularGenerator(s, cfg)
    x = gen.sample(40).positions
    x[::3] = x[::3, ::-1]  # scrambled atom order: other torsions, some of them outside the isomer
    whole = gen.same_isomer(x)
    assert 0 < whole.sum() < len(x)
    monkeypatch.setattr(g, "CHUNK", 7)
    assert list(gen.same_isomer(x)) == list(whole)
    monkeypatch.setattr(g, "FIT_MAX", 10)
    a = g.MolecularGenerator(s, cfg).fit(x)
    b = g.MolecularGenerator(s, cfg).fit(_np.ascontiguousarray(x[::4]))
    c = g.MolecularGenerator(s, cfg).fit(_np.ascontiguousarray(x[::3]))
    assert torch.equal(a.all_ic.std.bond_std, b.all_ic.std.bond_std)
    assert not torch.equal(a.all_ic.std.bond_std, c.all_ic.std.bond_std)
