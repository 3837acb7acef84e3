"""OpenMM bridge against direct OpenMM Contexts (real OpenMM, no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")

from boltzflow.energy.base import TERM_NAMES, EnergyCap  # noqa: E402
from boltzflow.energy.openmm_bridge import OpenMMEnergy  # noqa: E402
from boltzflow.energy.terms import classify_forces  # noqa: E402
from boltzflow.errors import InputError, WorkerError  # noqa: E402
from boltzflow.systems.builtin import builtin_system  # noqa: E402

CASES = [("alanine-dipeptide", "vacuum"), ("alanine-dipeptide", "obc2"), ("butane", "vacuum"), ("butane", "obc2")]


@pytest.fixture(scope="module")
def systems():
    return {c: builtin_system(*c[:1], solvent=c[1]) for c in CASES}


def direct(system, x):
    """Energy (kJ/mol) and forces of each frame with a plain OpenMM Reference Context."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    e, f = [], []
    for xi in x:
        ctx.setPositions(xi)
        st = ctx.getState(getEnergy=True, getForces=True)
        e.append(st.getPotentialEnergy()._value)
        f.append(st.getForces(asNumpy=True)._value)
    return np.array(e), np.array(f)


def frames(ms, n, seed, scale=0.015):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.tensor(ms.positions)
    return x0 + scale * torch.randn((n, *x0.shape), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_energy_and_forces_match_openmm(systems, case):
    ms = systems[case]
    x = frames(ms, 50, seed=11).requires_grad_()
    with OpenMMEnergy(ms, platform="Reference") as energy:
        u = energy(x)
        u.sum().backward()
        e_ref, f_ref = direct(ms.system, x.detach().numpy())
        u_ref = e_ref / ms.kT
        assert u.dtype == torch.float64 and u.shape == (50,)
        np.testing.assert_array_less(np.abs(u.detach().numpy() - u_ref), 1e-6 * np.abs(u_ref) + 1e-12)
        grad_ref = -f_ref / ms.kT
        err = np.linalg.norm((x.grad.numpy() - grad_ref).reshape(50, -1), axis=1)
        assert np.all(err <= 1e-6 * np.linalg.norm(grad_ref.reshape(50, -1), axis=1))
        # per-term energies sum to the total, with the expected CHARMM terms
        parts = energy.terms(x.detach())
        total = sum(parts.values())
        np.testing.assert_allclose(total.numpy(), u.detach().numpy(), rtol=1e-9)
        expected = {"bond", "urey_bradley", "angle", "torsion", "lj", "coulomb"} | ({"gb"} if case[1] == "obc2" else set())
        assert expected <= set(parts) <= set(TERM_NAMES)
        if case[0] == "alanine-dipeptide":
            assert {"cmap", "improper"} <= set(parts)


def test_classify_forces_nonbonded_split_and_ub(systems):
    ms = systems[("alanine-dipeptide", "obc2")]
    cls = classify_forces(ms.system, ms.topology)
    names = [n for _, n in cls]
    nb = [i for i, f in enumerate(ms.system.getForces()) if type(f).__name__ == "NonbondedForce"][0]
    assert (nb, "coulomb") in cls
    assert "urey_bradley" in names and "bond" in names and "gb" in names
    assert all(n in TERM_NAMES for n in names)


def test_gradient_matches_finite_differences(systems):
    ms = systems[("alanine-dipeptide", "obc2")]
    x = frames(ms, 2, seed=5).requires_grad_()
    energy = OpenMMEnergy(ms, platform="Reference")
    energy(x).sum().backward()
    h = 1e-6
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        b, a, d = (int(torch.randint(hi, (1,), generator=g)) for hi in (2, ms.n_atoms, 3))
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[b, a, d] += h
        xm[b, a, d] -= h
        fd = (energy(xp)[b] - energy(xm)[b]).item() / (2 * h)
        assert x.grad[b, a, d].item() == pytest.approx(fd, rel=1e-4, abs=1e-3)


def test_float32_input_keeps_dtype_and_matches(systems):
    ms = systems[("butane", "vacuum")]
    x = frames(ms, 4, seed=2)
    energy = OpenMMEnergy(ms, platform="Reference")
    u32 = energy(x.float())
    assert u32.dtype == torch.float32
    np.testing.assert_allclose(u32.numpy(), energy(x).numpy(), rtol=1e-5)
    assert energy(x[0]).shape == (1,)  # a single frame is promoted to batch 1
    with pytest.raises(InputError):
        energy(x[:, :5])
    with pytest.raises(InputError):
        energy(x.long())


def test_nan_input_is_flagged_with_zero_gradient_and_no_stale_value(systems):
    ms = systems[("alanine-dipeptide", "vacuum")]
    energy = OpenMMEnergy(ms, platform="CPU")
    x = frames(ms, 3, seed=4)
    good = energy.evaluate(x)
    x_bad = x.clone()
    x_bad[1, 7, 2] = float("nan")
    x_bad[2, 3, 0] = float("inf")
    x_bad.requires_grad_()
    res = energy.evaluate(x_bad)
    assert res.valid.tolist() == [True, False, False]
    assert torch.isinf(res.u[1]) and res.u[1] > 0 and torch.isinf(res.u[2])
    assert res.u[0].item() == pytest.approx(good.u[0].item(), rel=1e-6)
    res.u[res.valid].sum().backward()
    assert torch.all(x_bad.grad[1:] == 0) and torch.all(torch.isfinite(x_bad.grad))
    # the whole batch backpropagated (inf included) still gives finite, zero gradient on bad rows
    x2 = x_bad.detach().clone().requires_grad_()
    energy(x2).sum().backward()
    assert torch.all(x2.grad[1:] == 0) and torch.all(torch.isfinite(x2.grad[0]))
    # evaluating the bad frames alone never returns the previous (valid) energy
    alone = energy.evaluate(x_bad.detach()[1:2])
    assert not alone.valid[0] and torch.isinf(alone.u[0])


def test_clash_gives_finite_capped_gradient(systems):
    ms = systems[("alanine-dipeptide", "vacuum")]
    x = torch.tensor(ms.positions)[None].repeat(2, 1, 1)
    x[1, 10] = x[1, 15] + 0.005  # CB on top of the carbonyl O: huge LJ repulsion
    gmax = 50.0
    capped = OpenMMEnergy(ms, cap=EnergyCap(term_grad_max=gmax, energy_max=1e3), platform="Reference")
    plain = OpenMMEnergy(ms, platform="Reference")
    xr = x.clone().requires_grad_()
    u_plain = plain(xr)
    u_plain[1].backward()
    assert xr.grad.norm() > 1e6  # the clash is real
    xc = x.clone().requires_grad_()
    res = capped.evaluate(xc)
    assert bool(res.valid.all())
    assert 1e3 < res.u[1].item() <= 1e3 + np.log1p(u_plain[1].item() - 1e3) + 1e-9  # log-linear cap
    assert res.u[0].item() == pytest.approx(u_plain[0].item())  # below the cap: unchanged
    res.u.sum().backward()
    n_terms = len(capped.term_names)
    norms = xc.grad.reshape(2, -1).norm(dim=1)
    assert torch.all(torch.isfinite(xc.grad)) and norms[1] <= n_terms * gmax + 1e-6
    # per-term: each term's gradient of the clashing frame is capped at gmax
    for name, u_t in capped.terms(x.clone()).items():
        xt = x.clone().requires_grad_()
        capped.terms(xt)[name][1].backward()
        assert xt.grad[1].norm() <= gmax * (1 + 1e-9), name


def test_unavailable_platform_and_bad_options(systems):
    ms = systems[("butane", "vacuum")]
    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    missing = [p for p in ("CUDA", "OpenCL") if p not in names]
    if missing:
        with pytest.raises(InputError, match="not available"):
            OpenMMEnergy(ms, platform=missing[0])
    with pytest.raises(InputError):
        OpenMMEnergy(ms, platform="Metal")
    with pytest.raises(InputError):
        OpenMMEnergy(ms, n_workers=0)
    with pytest.raises(InputError):
        OpenMMEnergy(ms, platform="CPU", precision="double")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_worker_pool_matches_and_killed_worker_raises(systems):
    import signal
    import time

    ms = systems[("butane", "obc2")]
    x = frames(ms, 7, seed=8).requires_grad_()
    ref = OpenMMEnergy(ms, platform="Reference")
    u_ref = ref(x.detach())
    pool = OpenMMEnergy(ms, platform="Reference", n_workers=2, timeout=120)
    try:
        u = pool(x)
        u.sum().backward()
        np.testing.assert_allclose(u.detach().numpy(), u_ref.numpy(), rtol=1e-12)
        pids = pool.worker_pids
        assert len(pids) == 2 and all(_alive(p) for p in pids) and os.getpid() not in pids
        os.kill(pids[1], signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(WorkerError, match="worker 1"):
            pool(x.detach())
        assert not any(_alive(p) for p in pids)  # the surviving worker was shut down too
    finally:
        pool.close()
    assert pool.worker_pids == []


def test_pool_leaves_no_process_at_interpreter_exit(tmp_path):
    script = textwrap.dedent("""
        import torch
        from boltzflow.systems.builtin import builtin_system
        from boltzflow.energy.openmm_bridge import OpenMMEnergy
        if __name__ == "__main__":
            torch.set_num_threads(1)
            ms = builtin_system("butane", route="psf")
            e = OpenMMEnergy(ms, platform="Reference", n_workers=2)
            e(torch.as_tensor(ms.positions)[None].repeat(3, 1, 1))
            print("PIDS", *e.worker_pids, flush=True)
            # no close(): interpreter exit must stop the workers
    """)
    (tmp_path / "pool_exit.py").write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(tmp_path / "pool_exit.py")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    pids = [int(p) for p in out.stdout.split("PIDS", 1)[1].split()]
    assert len(pids) == 2
    assert not any(_alive(p) for p in pids)
