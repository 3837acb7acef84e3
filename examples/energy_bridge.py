"""User story: "give me CHARMM36m energies and forces of my molecule as a torch function".

Evaluates alanine dipeptide (vacuum, 300 K) on perturbed conformations with the OpenMM bridge
(the truth) and the native batched torch evaluator (the fast path), per term, and compares them.

    python examples/energy_bridge.py [--quick]
"""

import argparse

import numpy as np
import torch

from boltzflow.energy import Energy
from boltzflow.systems.builtin import builtin_system


def main(quick: bool = False) -> dict:
    system = builtin_system("alanine-dipeptide")  # CHARMM36m from the shipped PDB
    rng = np.random.default_rng(0)
    n = 8 if quick else 256
    x = torch.tensor(system.positions[None] + 0.005 * rng.normal(size=(n, system.n_atoms, 3)))  # nm

    openmm_u = Energy(system, backend="openmm")  # one OpenMM Context per worker; n_workers=... for a pool
    native_u = Energy(system, backend="native")

    xo = x.clone().requires_grad_()
    u_ref = openmm_u(xo)  # (n,) kT
    f_ref = -torch.autograd.grad(u_ref.sum(), xo)[0]  # forces, kT/nm
    xn = x.clone().requires_grad_()
    u_nat = native_u(xn)
    f_nat = -torch.autograd.grad(u_nat.sum(), xn)[0]

    print(f"{n} conformations of {system.name}, u in kT at {system.temperature} K")
    print(f"  mean u: OpenMM {u_ref.mean().item():.4f}, native {u_nat.mean().item():.4f}")
    print(f"  max |du|: {(u_ref - u_nat).detach().abs().max():.2e} kT, max |dF|: {(f_ref - f_nat).abs().max():.2e} kT/nm")
    terms_ref, terms_nat = openmm_u.terms(x), native_u.terms(x)
    for name in terms_ref:
        print(f"  {name:13s} {terms_ref[name].mean():12.4f} {terms_nat[name].mean():12.4f}")
    if hasattr(openmm_u, "close"):
        openmm_u.close()
    return {"max_abs_du": float((u_ref - u_nat).detach().abs().max())}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    main(p.parse_args().quick)
