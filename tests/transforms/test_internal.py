"""Internal coordinates on real molecules: round trips, exact log-dets, mirror-image detection."""

import functools
import math

import numpy as np
import pytest
import torch

from boltzflow.errors import InputError
from boltzflow.transforms.internal import (
    InternalCoordinates,
    LocalFrames,
    bond_angle,
    chiral_centers,
    count_mirror_images,
    dihedral,
    mirror_image_mask,
    nerf,
)
from boltzflow.transforms.zmatrix import bond_graph, build_zmatrix, hydrogen_zmatrix


@functools.lru_cache(maxsize=None)
def _topology_positions(name):
    """(topology, positions (n, 3) nm, heavy, hydrogens, parents) of a builtin molecule."""
    from boltzflow.systems.builtin import builtin_system
    from boltzflow.systems.molecular import hydrogen_bookkeeping

    s = builtin_system(name, route="psf")
    top, pos = s.topology, np.array(s.positions)
    heavy, hyd, par = hydrogen_bookkeeping(top)
    return top, pos, heavy, hyd, par


def _conformations(pos, n, seed, noise=0.02):
    """Perturbed, randomly rotated and translated copies of pos: (n, n_atoms, 3) float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(pos)[None] + noise * torch.randn(n, *pos.shape, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]  # proper rotations
    return x @ q.transpose(-1, -2) + torch.randn(n, 1, 3, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module", params=["alanine-dipeptide", "butane"])
def molecule(request):
    return _topology_positions(request.param)


def test_nerf_inverts_geometry():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(100, 4, 3, generator=g, dtype=torch.float64)
    r = (p[:, 0] - p[:, 1]).norm(dim=-1)
    th = bond_angle(p[:, 0], p[:, 1], p[:, 2])
    ph = dihedral(p[:, 0], p[:, 1], p[:, 2], p[:, 3])
    x = nerf(p[:, 3], p[:, 2], p[:, 1], r, th, ph)
    assert torch.allclose(x, p[:, 0], atol=1e-10)


@pytest.mark.parametrize("which", ["heavy", "all"])
def test_internal_round_trip(molecule, which):
    top, pos, heavy, hyd, par = molecule
    adj = bond_graph(top)
    zm = build_zmatrix(adj, heavy if which == "heavy" else range(len(pos)))
    atoms = heavy if which == "heavy" else np.arange(len(pos))
    ic = InternalCoordinates(zm, pos[atoms])
    x = _conformations(pos, 16, seed=1)[:, atoms]
    ic.fit(x)
    z, ld_inv, rigid = ic.to_internal(x)
    assert z.shape == (16, 3 * len(atoms) - 6)
    assert torch.all(z[:, ic.circular].abs() <= math.pi)
    xr, ld_fwd = ic(z, rigid=rigid)
    assert torch.allclose(xr, x, atol=1e-9)
    assert torch.allclose(ld_inv, -ld_fwd, atol=1e-9)
    # canonical frame: same internal coordinates, different placement
    xc, _ = ic(z)
    assert torch.allclose(ic.inverse(xc)[0], z, atol=1e-9)
    assert torch.allclose(torch.cdist(xc, xc), torch.cdist(x, x), atol=1e-9)


def test_full_atom_zmatrix_covers_every_atom(molecule):
    top, pos, heavy, hyd, par = molecule
    zm = build_zmatrix(bond_graph(top), range(len(pos)))
    assert sorted(zm.order.tolist()) == list(range(len(pos)))
    placed = set()
    for i, j, k, l in zm.rows:
        for a in (j, k, l):
            assert a < 0 or a in placed
        assert len({int(a) for a in (i, j, k, l) if a >= 0}) == sum(a >= 0 for a in (i, j, k, l))
        placed.add(int(i))


def test_internal_logdet_matches_autograd_jacobian():
    top, pos, heavy, *_ = _topology_positions("alanine-dipeptide")
    ic = InternalCoordinates(build_zmatrix(bond_graph(top), heavy), pos[heavy])
    x = _conformations(pos, 3, seed=2)[:, heavy]
    ic.fit(x)
    z, _, rigid = ic.to_internal(x)
    for b in range(3):
        full = torch.cat([rigid[b], z[b]])  # 6 rigid dofs + 3m-6 internal = 3m inputs

        def f(v):
            return ic(v[6:][None], rigid=v[:6][None])[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, full)
        sign, logabs = torch.linalg.slogdet(jac)
        _, ld = ic(z[b : b + 1], rigid=rigid[b : b + 1])
        # the rigid orientation (alpha, beta) contributes the sphere measure sin(alpha)
        expected = ld[0] + torch.log(torch.sin(rigid[b, 3]))
        assert abs(logabs.item() - expected.item()) < 1e-8


def test_local_frames_round_trip_and_logdet():
    top, pos, heavy, hyd, par = _topology_positions("alanine-dipeptide")
    lf = LocalFrames(hydrogen_zmatrix(bond_graph(top), heavy, hyd, par), pos)
    x = _conformations(pos, 4, seed=3, noise=0.01)
    lf.fit(x)
    z, ld_inv = lf.inverse(x)
    x0 = x.clone()
    x0[:, hyd] = 0.0
    xr, ld_fwd = lf(z, x0)
    assert torch.allclose(xr, x, atol=1e-9)
    assert torch.allclose(ld_inv, -ld_fwd, atol=1e-9)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: lf(v[None], x0[b : b + 1])[0][0, hyd].reshape(-1), z[b])
        assert abs(torch.linalg.slogdet(jac)[1].item() - ld_fwd[b].item()) < 1e-8


def test_mirror_image_detection():
    top, pos, heavy, hyd, par = _topology_positions("alanine-dipeptide")
    adj = bond_graph(top)
    centers = chiral_centers(adj, heavy)
    names = [a.name for a in top.atoms()]
    assert [names[c] for c in centers[:, 0]] == ["CA"]
    x = _conformations(pos, 6, seed=4, noise=0.005)
    mirrored = x.clone()
    mirrored[::2] = -mirrored[::2]  # reflect every other frame through the origin
    mask = mirror_image_mask(mirrored, centers, pos)
    assert mask.tolist() == [True, False] * 3
    assert count_mirror_images(x, centers, pos) == 0
    # flipping the sign of the improper torsion that places C on CA gives the D enantiomer
    ic = InternalCoordinates(build_zmatrix(adj, heavy), pos[heavy])
    z, _, _ = ic.to_internal(x[:, heavy])
    ca = int(centers[0, 0])
    row = [r for r, (i, j, k, l) in enumerate(ic.rows.tolist()) if r >= 3 and heavy[j] == ca and heavy[l] in adj[ca]][0]
    col = 2 * ic.m - 3 + row - 3
    zd = z.clone()
    zd[:, col] = -zd[:, col]
    xd_heavy, _ = ic(zd)
    xd = x.clone()
    xd[:, heavy] = xd_heavy
    assert mirror_image_mask(xd, centers, pos).all()


def test_bad_input_raises():
    top, pos, heavy, *_ = _topology_positions("alanine-dipeptide")
    ic = InternalCoordinates(build_zmatrix(bond_graph(top), heavy), pos[heavy])
    with pytest.raises(InputError):
        ic(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(InputError):
        build_zmatrix(bond_graph(top), heavy[:2])


def _adp_all_atom():
    """(topology, positions, heavy, adjacency, all-atom Z-matrix, improper torsions) of alanine dipeptide."""
    from boltzflow.transforms.internal import improper_torsions
    from boltzflow.transforms.zmatrix import all_atom_zmatrix

    top, pos, heavy, hyd, par = _topology_positions("alanine-dipeptide")
    adj = bond_graph(top)
    zm = all_atom_zmatrix(adj, heavy, hyd, par)
    return top, pos, heavy, adj, zm, improper_torsions(zm, adj)


def _assert_round_trip_and_exact_logdet(ic, x):
    """x -> z -> x round trip, inverse log-det = -forward log-det, and the forward log-det equal to the
    3m x 3m Jacobian's (rigid dofs included, with their sphere measure). Returns z."""
    z, ld_inv, rigid = ic.to_internal(x)
    xr, ld_fwd = ic(z, rigid=rigid)
    assert torch.allclose(xr, x, atol=1e-9) and torch.allclose(ld_inv, -ld_fwd, atol=1e-9)
    full = torch.cat([rigid[0], z[0]])
    jac = torch.autograd.functional.jacobian(lambda v: ic(v[6:][None], rigid=v[:6][None])[0].reshape(-1), full)
    _, logabs = torch.linalg.slogdet(jac)
    assert abs(logabs.item() - (ld_fwd[0] + torch.log(torch.sin(rigid[0, 3]))).item()) < 1e-8
    return z


def test_improper_torsions_are_the_substituent_torsions():
    top, pos, heavy, adj, zm, fixed = _adp_all_atom()
    # 19 torsions: phi, psi, two peptide omegas and three methyl rotors stay periodic; the 12 others place
    # a second substituent of an atom (chirality at CA, carbonyl O, amide H, methyl siblings)
    assert len(zm.rows) - 3 == 19 and len(fixed) == 12
    for q in fixed:
        i, j, k, l = zm.rows[q + 3]
        assert int(l) in adj[int(j)] and int(i) in adj[int(j)]


def test_fixed_torsions_round_trip_logdet_and_no_mirror_images():
    top, pos, heavy, adj, zm, fixed = _adp_all_atom()
    ic = InternalCoordinates(zm, pos, atoms=np.arange(len(pos)), fixed_torsions=fixed)
    x = _conformations(pos, 32, seed=3, noise=0.01)
    ic.fit(x)
    assert len(ic.circular) == 7 and len(ic.fixed) == 12 and not set(ic.circular) & set(ic.fixed)
    assert torch.all(ic.fixed_std < 0.5)
    z = _assert_round_trip_and_exact_logdet(ic, x)
    assert z[:, ic.fixed].abs().max() < 6  # standardised deviations, not angles
    # standard-normal fixed coordinates never flip the chiral centre
    zs = z[:1].repeat(2000, 1)
    zs[:, ic.fixed] = torch.randn(2000, len(ic.fixed), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xs, _ = ic(zs)
    assert count_mirror_images(xs, chiral_centers(adj, heavy), pos) == 0


def test_whitening_decorrelates_and_keeps_the_exact_logdet():
    top, pos, heavy, adj, zm, fixed = _adp_all_atom()
    ic = InternalCoordinates(zm, pos, atoms=np.arange(len(pos)), fixed_torsions=fixed, whiten=True)
    x = _conformations(pos, 400, seed=4, noise=0.01)
    ic.fit(x)
    z = ic.to_internal(x)[0]
    c = torch.cov(z[:, ic.white_idx].T)
    assert torch.allclose(c, torch.eye(len(c), dtype=c.dtype), atol=1e-4)  # whitened on the fitting data (+1e-6 I)
    _assert_round_trip_and_exact_logdet(ic, x)


def test_amide_torsions_are_the_peptide_bonds():
    from boltzflow.transforms.internal import amide_torsions

    top, pos, heavy, adj, zm, _ = _adp_all_atom()
    names = [a.name for a in top.atoms()]
    elements = [a.element.symbol for a in top.atoms()]
    found = amide_torsions(zm, adj, elements)
    bonds = {frozenset((names[int(zm.rows[q + 3][1])], names[int(zm.rows[q + 3][2])])) for q in found}
    # the ACE-ALA and ALA-NME peptide bonds (CHARMM names CY-N and C-NT), nothing else
    assert {frozenset(("CY", "N")), frozenset(("C", "NT"))} <= bonds
    assert all(b in ({"CY", "N"}, {"C", "NT"}) for b in map(set, bonds))
