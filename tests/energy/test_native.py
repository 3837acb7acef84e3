"""Native torch energy vs OpenMM (Reference platform, float64): per term, total and forces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from parity import assert_native_matches_openmm, rel_err

from boltzflow.energy import Energy, EnergyCap
from boltzflow.energy.native import NativeEnergy, unsupported_forces
from boltzflow.errors import UnsupportedForceError

N_CONF = 100
#: the analytic path's two CPU kernels (C++ via native_cpu, torch via native_kernels)
KERNELS = pytest.mark.parametrize("kernel", ["cpp", "torch"])


def _perturbed(ms, n: int, scale: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(ms.positions[None] + rng.normal(scale=scale, size=(n,) + ms.positions.shape))


_rel = rel_err


@pytest.fixture(scope="module", params=[("alanine-dipeptide", "pdb"), ("alanine-dipeptide", "psf"), ("butane", "pdb"), ("butane", "psf")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def shipped(request):
    from boltzflow.systems.builtin import builtin_system

    name, route = request.param
    return {solv: builtin_system(name, solv, route=route) for solv in ("vacuum", "obc2")}


@pytest.mark.parametrize("solvent", ["vacuum", "obc2"])
def test_shipped_systems_match_openmm_per_term_total_and_forces(shipped, solvent):
    torch.set_num_threads(1)
    ms = shipped[solvent]
    assert unsupported_forces(ms.system) == []
    x = _perturbed(ms, N_CONF, 0.01, seed=1)
    tn = assert_native_matches_openmm(ms, x, 1e-6, label=(solvent,))
    assert set(tn) == set(NativeEnergy(ms).term_names)


def test_float32_agreement_documented(shipped):
    """float32 vs float64 native: ~1e-6..1e-5 relative on u and forces (documented bound 1e-4)."""
    torch.set_num_threads(1)
    ms = shipped["obc2"]
    e = NativeEnergy(ms)
    x64 = _perturbed(ms, 32, 0.01, seed=2).requires_grad_(True)
    x32 = x64.detach().float().requires_grad_(True)
    u64, u32 = e(x64), e(x32)
    assert u32.dtype == torch.float32
    (g64,) = torch.autograd.grad(u64.sum(), x64)
    (g32,) = torch.autograd.grad(u32.sum(), x32)
    assert float(((u32.detach().double() - u64.detach()).abs() / u64.detach().abs().clamp_min(1.0)).max()) < 1e-4
    ferr = (g32.double() - g64).flatten(1).abs().max(1).values / g64.flatten(1).abs().max(1).values
    assert float(ferr.max()) < 1e-4


def test_gradcheck_and_double_backward_float64():
    from boltzflow.systems.builtin import builtin_system

    ms = builtin_system("butane", "obc2", route="psf")
    e = NativeEnergy(ms)
    x = _perturbed(ms, 2, 0.01, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: e(y), (x,), eps=1e-6, atol=1e-5, rtol=1e-5)
    assert torch.autograd.gradgradcheck(lambda y: e(y), (x,), eps=1e-6, atol=1e-4, rtol=1e-4)


def _ala():
    from boltzflow.systems.builtin import builtin_system

    return builtin_system("alanine-dipeptide", "obc2", route="pdb")


@KERNELS
def test_degenerate_geometry_finite_values_and_gradients(kernel):
    ms = _ala()
    e = NativeEnergy(ms, cpu_kernel=kernel)
    x0 = torch.tensor(ms.positions)
    bonds = [(b[0].index, b[1].index) for b in ms.topology.bonds()]
    i, j = bonds[0]
    # (1) zero bond length: atom j on top of its bonded partner i
    xa = x0.clone()
    xa[j] = xa[i]
    # (2) collinear angle i-j-k: put k on the line through i and j
    jj = next(b for b in bonds if b[0] == j or b[1] == j and b != (i, j))
    k = jj[1] if jj[0] == j else jj[0]
    xb = x0.clone()
    xb[k] = xb[j] + (xb[j] - xb[i])
    # (3) all four atoms of a torsion collinear
    xc = x0.clone()
    xc[:4] = torch.linspace(0, 0.45, 4, dtype=torch.float64)[:, None] * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for x in (xa, xb, xc):
        xr = x[None].clone().requires_grad_(True)
        res = e.evaluate(xr)
        (g,) = torch.autograd.grad(res.u.sum(), xr)
        assert bool(res.valid.all()) and bool(torch.isfinite(res.u).all())
        assert bool(torch.isfinite(g).all())
        for name, t in e.terms(x[None]).items():
            assert bool(torch.isfinite(t).all()), name


@KERNELS
def test_non_finite_and_overflowing_inputs_are_flagged_with_zero_gradient(kernel):
    ms = _ala()
    e = NativeEnergy(ms, cpu_kernel=kernel)
    x = _perturbed(ms, 3, 0.01, seed=4)
    x[1, 5, 0] = float("nan")
    x[2, 7] = x[2, 12]  # coincident non-excluded atoms: LJ overflows in float32
    x32 = x.float().requires_grad_(True)
    res = e.evaluate(x32)
    assert res.valid.tolist() == [True, False, False]
    assert math.isinf(float(res.u[1])) and math.isinf(float(res.u[2]))
    (g,) = torch.autograd.grad(res.u[res.valid].sum() + 0.0 * res.u[~res.valid].nan_to_num(posinf=0.0).sum(), x32)
    assert bool(torch.isfinite(g).all())
    assert float(g[1:].abs().max()) == 0.0 and float(g[0].abs().max()) > 0.0


def test_caps_per_term_gradient_and_log_linear():
    ms = _ala()
    x = _perturbed(ms, 4, 0.02, seed=5).requires_grad_(True)
    plain = NativeEnergy(ms)
    cap = 5.0
    capped = NativeEnergy(ms, cap=EnergyCap(term_grad_max=cap, energy_max=10.0))
    tp, tc = plain.terms(x), capped.terms(x)
    for name in tp:
        assert torch.allclose(tp[name], tc[name])  # values unchanged
        (g,) = torch.autograd.grad(tc[name].sum(), x, retain_graph=True)
        assert float(g.flatten(1).norm(dim=1).max()) <= cap * (1 + 1e-9), name
    u = capped(x)
    raw = sum(tp.values())
    expect = torch.where(raw > 10.0, 10.0 + torch.log1p((raw - 10.0).clamp_min(0)), raw)
    assert torch.allclose(u, expect)


def _four_atom_system(force):
    import openmm

    s = openmm.System()
    for _ in range(4):
        s.addParticle(12.0)
    s.addForce(force)
    return s


def _openmm_energy_forces(system, x: np.ndarray):
    import openmm

    ctx = openmm.Context(system, openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName("Reference"))
    es, fs = [], []
    for xi in x:
        ctx.setPositions(xi)
        st = ctx.getState(getEnergy=True, getForces=True)
        es.append(st.getPotentialEnergy()._value)
        fs.append(st.getForces(asNumpy=True)._value)
    return np.array(es), np.array(fs)


def _wrap(system, n: int = 4):
    import openmm.app as app

    from boltzflow.systems.molecular import MolecularSystem

    top = app.Topology()
    res = top.addResidue("X", top.addChain())
    for k in range(n):
        top.addAtom(f"C{k}", app.element.carbon, res)
    return MolecularSystem("toy", top, system, np.zeros((n, 3)), 300.0, "vacuum", np.arange(n), np.zeros(0), np.zeros(0))


def test_cmap_grid_convention_and_wrapping_against_openmm():
    """A random CMAP map, dihedrals swept over the whole torus incl. the +-pi seam and grid points."""
    import openmm

    rng = np.random.default_rng(6)
    size = 24
    f = openmm.CMAPTorsionForce()
    f.addMap(size, rng.normal(scale=5.0, size=size * size).tolist())
    f.addTorsion(0, 0, 1, 2, 3, 1, 2, 3, 0)  # phi = dihedral(0,1,2,3), psi = dihedral(1,2,3,0)
    s = _four_atom_system(f)
    base = np.array([[0.0, 0.15, 0.0], [0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.15, 0.15, 0.0]])
    xs = []
    for ang in np.concatenate([np.linspace(-math.pi, math.pi, 49), rng.uniform(-math.pi, math.pi, 60)]):
        x = base.copy()
        x[3] = [0.15, 0.15 * math.cos(ang), 0.15 * math.sin(ang)]
        x[0] = [0.0, 0.15 * math.cos(0.7 * ang + 1.0), 0.15 * math.sin(0.7 * ang + 1.0)]
        xs.append(x)
    x = np.array(xs)
    e_ref, f_ref = _openmm_energy_forces(s, x)
    e = NativeEnergy(_wrap(s))
    xt = torch.tensor(x, requires_grad=True)
    u = e.terms(xt)["cmap"] / e.beta
    (g,) = torch.autograd.grad(u.sum(), xt)
    assert np.allclose(u.detach().numpy(), e_ref, rtol=1e-9, atol=1e-9)
    assert np.abs(-g.numpy() - f_ref).max() <= 1e-6 * np.abs(f_ref).max()


def test_gbsaobcforce_and_psf_style_nbfix_and_salt_against_openmm():
    """OpenMM's built-in GBSAOBCForce, the CharmmPsfFile NBFIX expression and OBC2 with salt (kappa > 0)."""
    import openmm
    import openmm.app as app

    from boltzflow.systems.molecular import MolecularSystem, hydrogen_bookkeeping

    ms0 = _ala()
    top = ms0.topology
    from boltzflow.systems.pdb import charmm_forcefield

    ff = charmm_forcefield("obc2")  # cached charmm36_2024.xml + implicit/obc2.xml
    salty = ff.createSystem(top, nonbondedMethod=app.NoCutoff, constraints=None, implicitSolventKappa=1.2)
    assert any("kappa=1.2" in f.getEnergyTermParameters(0)[0] for f in salty.getForces() if isinstance(f, openmm.CustomGBForce))
    # replace the GB force by a GBSAOBCForce, and the LJ table expression by the PSF one
    native_gb = openmm.System()
    for i in range(salty.getNumParticles()):
        native_gb.addParticle(salty.getParticleMass(i))
    nb = next(f for f in salty.getForces() if isinstance(f, openmm.NonbondedForce))
    gb = openmm.GBSAOBCForce()
    radii = [0.12 + 0.01 * (i % 5) for i in range(salty.getNumParticles())]
    for i in range(salty.getNumParticles()):
        gb.addParticle(nb.getParticleParameters(i)[0], radii[i], 0.8)
    for f in salty.getForces():
        if isinstance(f, openmm.CustomNonbondedForce):
            g = openmm.CustomNonbondedForce("(a/r6)^2-b/r6; r6=r^6;a=acoef(type1, type2);b=bcoef(type1, type2)")
            g.addPerParticleParameter("type")
            for t in range(2):
                nx, ny, vals = f.getTabulatedFunction(t).getFunctionParameters()
                vals = [math.sqrt(v) for v in vals] if t == 0 else list(vals)
                g.addTabulatedFunction(f.getTabulatedFunctionName(t), openmm.Discrete2DFunction(nx, ny, vals))
            for i in range(f.getNumParticles()):
                g.addParticle(f.getParticleParameters(i))
            for k in range(f.getNumExclusions()):
                g.addExclusion(*f.getExclusionParticles(k))
            native_gb.addForce(g)
        elif not isinstance(f, (openmm.CustomGBForce, openmm.CMMotionRemover)):
            native_gb.addForce(openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(f)))
    native_gb.addForce(gb)
    heavy, hyd, par = hydrogen_bookkeeping(top)
    x = _perturbed(ms0, 8, 0.01, seed=7)
    for s in (salty, native_gb):
        assert unsupported_forces(s) == []
        ms = MolecularSystem("t", top, s, ms0.positions, 300.0, "obc2", heavy, hyd, par)
        e_ref, f_ref = _openmm_energy_forces(s, x.numpy())
        xt = x.clone().requires_grad_(True)
        u = NativeEnergy(ms)(xt) / ms.beta
        (g,) = torch.autograd.grad(u.sum(), xt)
        assert np.abs(u.detach().numpy() - e_ref).max() <= 1e-6 * np.abs(e_ref).max()
        assert np.abs(-g.numpy() - f_ref).max() <= 1e-6 * np.abs(f_ref).max()


def test_unsupported_forces_are_named_and_auto_falls_back_to_openmm():
    import openmm

    ms = _ala()
    s = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(ms.system))
    s.addForce(openmm.CustomTorsionForce("k*cos(theta)"))  # not a harmonic improper
    s.getForce(s.getNumForces() - 1).addPerTorsionParameter("k")
    s_ext = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(s))
    s_ext.addForce(openmm.CustomExternalForce("x^2"))
    missing = unsupported_forces(s_ext)
    assert len(missing) == 2
    assert "CustomTorsionForce" in missing[0] and "CustomExternalForce" in missing[1]
    from dataclasses import replace

    ms2 = replace(ms, system=s)
    with pytest.raises(UnsupportedForceError, match="CustomTorsionForce.*backend='openmm'"):
        Energy(ms2, backend="native")
    auto = Energy(ms2, backend="auto", platform="Reference")
    try:
        assert type(auto).__name__ == "OpenMMEnergy"
    finally:
        auto.close()
    assert isinstance(Energy(ms, backend="auto"), NativeEnergy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    ms = _ala()
    e = NativeEnergy(ms)
    x = _perturbed(ms, 64, 0.01, seed=8)
    u_cpu = e(x)
    u_gpu = e.to("cuda")(x.cuda()).cpu()
    assert _rel(u_gpu, u_cpu) < 1e-10


def _user_peptide_pdb(path, mutate: str | None, strip_caps: bool) -> str:
    """A peptide PDB made with pdbfixer from the shipped ACE-ALA-NME: optional mutation, optional cap removal."""
    import io

    import openmm.app as app
    from pdbfixer import PDBFixer

    fx = PDBFixer(filename="systems/alanine-dipeptide/alanine-dipeptide.pdb")
    if strip_caps:
        m = app.Modeller(fx.topology, fx.positions)
        m.delete([r for r in m.topology.residues() if r.name in ("ACE", "NME")])
        buf = io.StringIO()
        app.PDBFile.writeFile(m.topology, m.positions, buf, keepIds=True)
        buf.seek(0)
        fx = PDBFixer(pdbfile=buf)
    if mutate:
        res = next(r for r in fx.topology.residues() if r.name == "ALA")
        fx.applyMutations([f"ALA-{res.id}-{mutate}"], res.chain.id)
    fx.findMissingResidues()
    fx.missingResidues = {}
    fx.findMissingAtoms()
    fx.addMissingAtoms()
    fx.addMissingHydrogens(7.0)
    with open(path, "w") as f:
        app.PDBFile.writeFile(fx.topology, fx.positions, f)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["capped-his", "zwitterion-ser"])
def test_user_built_peptides_match_openmm(tmp_path, kind):
    """Capped histidine (ACE-HIS-NME: non-alanine, histidine) and a zwitterionic serine, both solvents."""
    from boltzflow.systems.pdb import from_pdb

    torch.set_num_threads(1)
    mutate, strip = {"capped-his": ("HIS", False), "zwitterion-ser": ("SER", True)}[kind]
    pdb = _user_peptide_pdb(tmp_path / f"{kind}.pdb", mutate, strip)
    for solvent in ("vacuum", "obc2"):
        ms = from_pdb(pdb, solvent)
        assert unsupported_forces(ms.system) == []
        x = _perturbed(ms, N_CONF, 0.01, seed=9)
        assert_native_matches_openmm(ms, x, 1e-6, label=(kind, solvent))


@pytest.mark.slow
def test_compiled_path_matches_eager():
    from boltzflow.systems.builtin import builtin_system

    ms = builtin_system("alanine-dipeptide", "obc2")
    eager, compiled = NativeEnergy(ms), NativeEnergy(ms, compile=True)
    x = _perturbed(ms, 16, 0.01, seed=10).requires_grad_(True)
    ue, uc = eager(x), compiled(x)
    (ge,) = torch.autograd.grad(ue.sum(), x)
    (gc,) = torch.autograd.grad(uc.sum(), x)
    assert torch.allclose(ue, uc, rtol=1e-10) and torch.allclose(ge, gc, rtol=1e-8, atol=1e-8)


@KERNELS
@pytest.mark.parametrize("solvent", ["vacuum", "obc2"])
def test_analytic_forces_match_autograd_path(solvent, kernel):
    """The hand-derived kernels (default) against autograd through the same formulas, float64."""
    from boltzflow.systems.builtin import builtin_system

    ms = builtin_system("alanine-dipeptide", solvent)
    fast, slow = NativeEnergy(ms, cpu_kernel=kernel), NativeEnergy(ms, analytic=False)
    x = _perturbed(ms, 40, 0.03, seed=11)
    xf, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    uf, us = fast(xf), slow(xs)
    (gf,) = torch.autograd.grad(uf.sum(), xf)
    (gs,) = torch.autograd.grad(us.sum(), xs)
    assert _rel(uf, us) < 1e-12 and _rel(gf, gs) < 1e-10


@KERNELS
def test_analytic_path_gradcheck_chunks_and_no_grad_vacuum(kernel):
    from boltzflow.systems.builtin import builtin_system

    ms = builtin_system("alanine-dipeptide", "vacuum")
    e = NativeEnergy(ms, cpu_kernel=kernel)
    x = _perturbed(ms, 2, 0.01, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: e(y), (x,), eps=1e-6, atol=1e-5, rtol=1e-5)
    assert torch.autograd.gradgradcheck(lambda y: e(y), (x,), eps=1e-6, atol=1e-4, rtol=1e-4)
    # a batch split into kernel chunks equals the unsplit batch; energy-only evaluation equals it too
    x = _perturbed(ms, 37, 0.02, seed=5)
    whole = NativeEnergy(ms, cpu_kernel=kernel)
    e.chunk_size = 8
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ua, ub = e(xa), whole(xb)
    (ga,) = torch.autograd.grad(ua.sum(), xa)
    (gb,) = torch.autograd.grad(ub.sum(), xb)
    assert torch.allclose(ua, ub, rtol=1e-13) and torch.allclose(ga, gb, rtol=1e-12, atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(e(x), ub.detach(), rtol=1e-13)


@pytest.mark.slow
def test_compiled_analytic_path_matches_eager_vacuum_float32():
    from boltzflow.systems.builtin import builtin_system

    ms = builtin_system("alanine-dipeptide", "vacuum")
    eager, compiled = NativeEnergy(ms), NativeEnergy(ms, compile=True)
    x = _perturbed(ms, 64, 0.01, seed=12).float()
    x[3, 2, 1] = float("nan")
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    re, rc = eager.evaluate(xe), compiled.evaluate(xc)
    assert torch.equal(re.valid, rc.valid) and not bool(rc.valid[3])
    (ge,) = torch.autograd.grad(torch.where(re.valid, re.u, 0).sum(), xe)
    (gc,) = torch.autograd.grad(torch.where(rc.valid, rc.u, 0).sum(), xc)
    assert torch.allclose(re.u[re.valid], rc.u[rc.valid], rtol=1e-5)
    assert _rel(gc, ge) < 1e-4 and torch.isfinite(gc).all() and float(gc[3].abs().max()) == 0.0


@KERNELS
def test_analytic_torsions_any_periodicity_and_phase_with_shared_quads_against_openmm(kernel):
    """The analytic path's trig-free Fourier torsions (n = 1..6, arbitrary phases, several terms per
    dihedral) and a CMAP and an improper on the same dihedrals, total energy and forces vs OpenMM."""
    import openmm

    rng = np.random.default_rng(21)
    s = openmm.System()
    for _ in range(5):
        s.addParticle(12.0)
    tor = openmm.PeriodicTorsionForce()
    for quad in ((0, 1, 2, 3), (1, 2, 3, 4), (0, 1, 2, 3)):
        for n in range(1, 7):
            tor.addTorsion(*quad, n, float(rng.uniform(-math.pi, math.pi)), float(rng.uniform(0.1, 3.0)))
    s.addForce(tor)
    imp = openmm.CustomTorsionForce("k*min(dtheta, 2*pi-dtheta)^2; dtheta = abs(theta-theta0); pi = 3.141592653589793")
    imp.addPerTorsionParameter("k")
    imp.addPerTorsionParameter("theta0")
    imp.addTorsion(1, 2, 3, 4, [5.0, 0.4])
    s.addForce(imp)
    cm = openmm.CMAPTorsionForce()
    cm.addMap(24, rng.normal(scale=5.0, size=24 * 24).tolist())
    cm.addTorsion(0, 0, 1, 2, 3, 1, 2, 3, 4)
    s.addForce(cm)
    x = rng.normal(scale=0.15, size=(60, 5, 3))
    e_ref, f_ref = _openmm_energy_forces(s, x)
    e = NativeEnergy(_wrap(s, 5), cpu_kernel=kernel)
    assert e.analytic
    xt = torch.tensor(x, requires_grad=True)
    u = e(xt) / e.beta
    (g,) = torch.autograd.grad(u.sum(), xt)
    assert np.allclose(u.detach().numpy(), e_ref, rtol=1e-9, atol=1e-8)
    assert np.abs(-g.numpy() - f_ref).max() <= 1e-6 * np.abs(f_ref).max()


def test_cpp_kernel_blocks_threads_and_dtypes_match_torch_kernel():
    """The C++ kernel pads the last block of lanes, spreads blocks over threads, and computes
    float32 in float32: batch sizes around the block width, 1 vs 2 threads, a NaN mid-block."""
    from boltzflow.systems.builtin import builtin_system

    ms = builtin_system("alanine-dipeptide", "vacuum")
    cpp, ref = NativeEnergy(ms, cpu_kernel="cpp"), NativeEnergy(ms, cpu_kernel="torch")
    threads = torch.get_num_threads()
    try:
        for n in (1, 15, 16, 17, 33, 70):
            x = _perturbed(ms, n, 0.02, seed=n)
            if n > 10:
                x[9, 3, 2] = float("nan")
            for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
                xd = x.to(dtype)
                u_ref, valid_ref, g_ref = ref._fast_u(xd)
                for t in (1, 2):
                    torch.set_num_threads(t)
                    u, valid, g = cpp._fast_u(xd)
                    assert u.dtype == dtype and g.dtype == dtype and g.shape == x.shape
                    assert torch.equal(valid, valid_ref) and torch.equal(torch.isinf(u), ~valid)
                    assert _rel(u[valid], u_ref[valid]) < tol and _rel(g, g_ref) < tol
                    assert float(g[~valid].abs().sum()) == 0.0
                    u2, _, none = cpp._fast_u(xd, need_grad=False)
                    assert none is None and torch.equal(torch.isinf(u2), ~valid) and _rel(u2[valid], u[valid]) < tol
    finally:
        torch.set_num_threads(threads)


def test_cpp_kernel_unavailable_falls_back_or_says_why(monkeypatch):
    from boltzflow.energy import native_cpu
    from boltzflow.systems.builtin import builtin_system

    ms = builtin_system("butane", "vacuum")
    x = _perturbed(ms, 4, 0.01, seed=1)
    expected = NativeEnergy(ms, cpu_kernel="torch")(x)
    def reset():
        monkeypatch.setattr(native_cpu, "_tried", False)
        monkeypatch.setattr(native_cpu, "_lib", None)
        monkeypatch.setattr(native_cpu, "_reason", None)

    reset()  # a broken compiler: a warning that says why, then the torch kernels
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.warns(RuntimeWarning, match="building the CPU kernel failed"):
        auto = NativeEnergy(ms)(x)
    assert torch.allclose(auto, expected, rtol=1e-13)
    reset()  # switched off by the user: silent fallback; asking for it explicitly says why not
    monkeypatch.setenv("BOLTZFLOW_CPU_KERNEL", "0")
    assert torch.allclose(NativeEnergy(ms)(x), expected, rtol=1e-13)
    with pytest.raises(RuntimeError, match="kernel is unavailable: disabled by BOLTZFLOW_CPU_KERNEL=0"):
        NativeEnergy(ms, cpu_kernel="cpp")(x)
    with pytest.raises(ValueError, match="cpu_kernel must be"):
        NativeEnergy(ms, cpu_kernel="fortran")


def test_cpp_kernel_survives_pickling_and_dtype_moves():
    import pickle

    from boltzflow.systems.builtin import builtin_system

    ms = builtin_system("butane", "vacuum")
    e = NativeEnergy(ms, cpu_kernel="cpp")
    x = _perturbed(ms, 5, 0.01, seed=2)
    u = e(x)
    e2 = pickle.loads(pickle.dumps(e))
    assert torch.allclose(e2(x), u, rtol=1e-13)
    assert torch.allclose(e.float()(x.float()).double(), u, rtol=1e-5)
