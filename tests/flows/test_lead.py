"""Flows autoregressive in a few lead dims (``spline_flow(lead=...)``, ``GeneratorConfig(lead="backbone")``):
q(x) = q(x_lead) q(x_rest | x_lead) holds structurally, and the lead dims of a peptide are its phi / psi."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.errors import ConfigError, InputError
from boltzflow.flows.builders import spline_flow
from boltzflow.flows.couplings import SplineCoupling
from boltzflow.flows.generator import (
    GeneratorConfig,
    backbone_lead,
    build_generator,
    load_generator,
    save_generator,
)


def _perturbed(bij, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    bij = bij.double()
    with torch.no_grad():
        for p in bij.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return bij


def test_lead_dims_depend_on_lead_latents_only_and_rest_sees_lead():
    dim, lead = 7, [1, 4, 6]
    f = _perturbed(spline_flow(dim, blocks=2, hidden=8, bins=4, bound=3.0, circular=[1, 4, 6], lead=lead,
                               lead_blocks=2))
    rest = [i for i in range(dim) if i not in lead]
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, dim, generator=g, dtype=torch.float64)
    z[:, lead] = (2 * torch.rand(32, 3, generator=g, dtype=torch.float64) - 1) * math.pi
    x, _ = f.forward(z)
    z2 = z.clone()
    z2[:, rest] += 0.5
    x2, _ = f.forward(z2)
    assert torch.equal(x[:, lead], x2[:, lead])  # the lead marginal is a flow of its own
    z3 = z.clone()
    z3[:, lead] = torch.remainder(z3[:, lead] + 0.7 + math.pi, 2 * math.pi) - math.pi
    x3, _ = f.forward(z3)
    assert (x3[:, rest] - x[:, rest]).abs().max() > 1e-3  # ...and every other dim is conditioned on it
    # layer structure: lead layers transform lead dims only and never see the rest; later layers keep lead fixed
    layers = f.layers
    for layer in layers[:4]:
        assert not bool((~layer.mask)[rest].any())
        seen = set(layer.cond_lin.tolist()) | set(layer.cond_circ.tolist())
        assert seen <= set(lead)
    for layer in layers[4:]:
        assert bool(layer.mask[lead].all())
        assert set(lead) <= set(layer.cond_circ.tolist())


def test_no_lead_keeps_the_architecture():
    a = spline_flow(6, blocks=3, hidden=8, circular=[0, 2])
    b = spline_flow(6, blocks=3, hidden=8, circular=[0, 2], lead=())
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.layers, b.layers))


def test_bad_lead_and_blind_raise():
    with pytest.raises(InputError, match="lead"):
        spline_flow(5, blocks=1, hidden=8, lead=[2])
    with pytest.raises(InputError, match="lead"):
        spline_flow(3, blocks=1, hidden=8, lead=[0, 1, 2])
    with pytest.raises(InputError, match="lead_blocks"):
        spline_flow(5, blocks=1, hidden=8, lead=[0, 1], lead_blocks=0)
    with pytest.raises(InputError, match="blind"):
        SplineCoupling(4, torch.tensor([True, False, False, False]), hidden=8, blind=[1])
    with pytest.raises(InputError, match="no dimension"):
        SplineCoupling(4, torch.tensor([True, False, False, False]), hidden=8, blind=[0])


def _dipeptide():
    from boltzflow.systems.builtin import builtin_system

    return builtin_system("alanine-dipeptide", route="psf")


def test_backbone_lead_is_phi_psi_and_generator_is_exact(tmp_path):
    from boltzflow.systems.torsions import backbone_torsions

    system = _dipeptide()
    cfg = GeneratorConfig(pipeline="internal-all", fixed_torsions="isomer", blocks=2, hidden=16, lead="backbone",
                          lead_blocks=2)
    torch.manual_seed(0)
    gen = build_generator(system, cfg).double()
    ic = gen.all_ic
    lead = backbone_lead(ic, system.topology)
    assert len(lead) == 2 and all(d in ic.circular for d in lead)
    # the lead coordinates are phi and psi up to a constant offset (the Z-matrix torsion about the same bond)
    from boltzflow.systems.modes import dihedral

    x = torch.as_tensor(np.array(system.positions))[None].double()
    x = x + 0.003 * torch.randn(16, system.n_atoms, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tors = backbone_torsions(system.topology)[0]
    z, _ = ic.inverse(x)
    for d, name in zip(lead, ("phi", "psi")):
        ref = torch.as_tensor(dihedral(x.numpy(), tors[name]))
        off = z[:, d] - ref
        resultant = math.hypot(float(torch.cos(off).mean()), float(torch.sin(off).mean()))
        assert resultant > 0.995, (name, off)  # a constant offset: circular spread near 0
    _perturbed(gen, scale=0.05)  # larger moves put bond angles outside (0, pi), where x -> z is not invertible
    xs, lq = gen.sample_and_log_prob(32, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(gen.log_prob(xs), lq, atol=1e-8)
    back = load_generator(save_generator(tmp_path / "gen.pt", gen), system).double()
    assert back.config.lead == "backbone"
    assert torch.allclose(back.log_prob(xs), lq, atol=1e-8)


def test_backbone_lead_needs_a_peptide():
    from boltzflow.systems.builtin import builtin_system

    with pytest.raises(ConfigError, match="backbone"):
        build_generator(builtin_system("butane"), GeneratorConfig(pipeline="internal-all", blocks=1, hidden=8,
                                                                  lead="backbone"))
    with pytest.raises(ConfigError, match="lead"):
        GeneratorConfig(lead="sidechain")
    with pytest.raises(ConfigError, match="lead"):
        GeneratorConfig(pipeline="hnet", representation="cartesian", lead="backbone")
