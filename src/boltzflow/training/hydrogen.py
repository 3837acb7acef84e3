"""Training and judging the hydrogen placement network (felardos2023 sec. 3.2, appendix E).

* :func:`train_hydrogen_net`: minimise mean u(x_C, h(x_C)) over heavy-atom configurations.
* :func:`minimize_hydrogens`: reference minimiser, heavy atoms fixed (torch L-BFGS on any
  differentiable energy, or OpenMM's LocalEnergyMinimizer with massless = frozen heavy atoms).
* :func:`hydrogen_gap`: how close h gets to the minimiser (hydrogen RMSD, energy gap in kT).
* :func:`biased_population`: appendix-E eq. 32, the population of a region under the biased
  target p_bar(x_C) ~ p_B(x_C, h(x_C)) that an ``hnet`` pipeline converges to.

``energy`` is any callable ``(batch, n_atoms, 3) nm tensor -> (batch,) kT`` differentiable in x
(e.g. :func:`boltzflow.energy.Energy`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import InputError

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def _full_coordinates(hnet, data) -> torch.Tensor:
    """(n, n_atoms, 3) float tensor from full-atom or heavy-only (n, n_heavy, 3) data."""
    x = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
    if x.dim() != 3 or x.shape[-1] != 3:
        raise InputError(f"heavy-atom data must have shape (n, n_atoms or n_heavy, 3) nm, got {tuple(x.shape)}")
    n_heavy = int(hnet.heavy.shape[0])
    if x.shape[1] == n_heavy and n_heavy != hnet.n_atoms:
        x = x.new_zeros(x.shape[0], hnet.n_atoms, 3).index_copy(1, hnet.heavy.to(x.device), x)
    elif x.shape[1] != hnet.n_atoms:
        raise InputError(f"heavy-atom data must have {hnet.n_atoms} (all) or {n_heavy} (heavy) atoms, got {x.shape[1]}")
    return x


def train_hydrogen_net(hnet, energy: EnergyFn, heavy_data, steps: int = 1000, batch: int = 64, lr: float = 1e-3,
                       seed: int = 0) -> list[float]:
    """Train ``hnet`` (:class:`~boltzflow.flows.hydrogen.HydrogenNet`) by minimising mean u(x_C, h(x_C)).

    heavy_data: (n, n_atoms, 3) or (n, n_heavy, 3) nm heavy-atom configurations (hydrogens ignored).
    Non-finite energies are dropped from the batch mean. Returns the per-step mean energy (kT).
    """
    if steps < 0 or batch < 1 or not lr > 0:
        raise InputError(f"need steps >= 0, batch >= 1, lr > 0; got steps={steps}, batch={batch}, lr={lr}")
    dtype = next(hnet.parameters()).dtype
    x = _full_coordinates(hnet, heavy_data).to(dtype)
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(hnet.parameters(), lr=lr)
    history: list[float] = []
    for _ in range(int(steps)):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        u = energy(hnet(x[idx]))
        ok = torch.isfinite(u)
        if not bool(ok.any()):
            raise InputError("every energy in the batch is non-finite; check the heavy-atom data (clashes?)")
        loss = u[ok].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


def minimize_hydrogens(system, x, energy: EnergyFn | None = None, steps: int = 200, method: str = "lbfgs",
                       tolerance: float = 1e-3) -> torch.Tensor:
    """Minimise the energy over hydrogen positions with heavy atoms fixed.

    x: (n, n_atoms, 3) nm start; returns (n, n_atoms, 3) float64 with heavy atoms unchanged.
    method "lbfgs": torch L-BFGS (strong Wolfe) on ``energy`` per configuration, at most ``steps``
    iterations, stop when the largest hydrogen gradient component < ``tolerance`` kT/nm.
    method "openmm": OpenMM LocalEnergyMinimizer on the System with heavy-atom masses set to 0 (OpenMM keeps
    massless particles fixed), tolerance in kJ/mol/nm, ``steps`` max iterations (0 = until converged);
    ``energy`` is not used.
    """
    x_np = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = torch.as_tensor(np.array(system.check_coordinates(x_np, "coordinates to minimise"), dtype=np.float64))
    hyd = torch.as_tensor(np.array(system.hydrogen_indices))
    if method == "openmm":
        return torch.as_tensor(_minimize_openmm(system, x.numpy(), steps, tolerance))
    if method != "lbfgs":
        raise InputError(f"unknown minimiser {method!r}; choose 'lbfgs' or 'openmm'")
    if energy is None:
        raise InputError("minimize_hydrogens(method='lbfgs') needs an energy callable (or use method='openmm')")
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        xh = xb[:, hyd].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([xh], lr=1.0, max_iter=int(steps), tolerance_grad=tolerance, tolerance_change=1e-12,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            u = energy(xb.index_copy(1, hyd, xh)).sum()
            u.backward()
            return u

        opt.step(closure)
        out.append(xb.index_copy(1, hyd, xh.detach()))
    return torch.cat(out)


def _minimize_openmm(system, x: np.ndarray, steps: int, tolerance: float) -> np.ndarray:
    import copy

    import openmm
    import openmm.unit as unit

    sys_ = copy.deepcopy(system.system)
    for i in system.heavy_indices:
        sys_.setParticleMass(int(i), 0.0)
    integ = openmm.VerletIntegrator(0.001)
    ctx = openmm.Context(sys_, integ, openmm.Platform.getPlatformByName("Reference"))
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        ctx.setPositions(x[b] * unit.nanometer)
        openmm.LocalEnergyMinimizer.minimize(ctx, tolerance, int(steps))
        out[b] = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return out


def hydrogen_gap(hnet, system, x, energy: EnergyFn, steps: int = 200) -> dict:
    """How close ``h`` places hydrogens to their energy minimum on configurations x (n, n_atoms, 3) nm.

    The minimum is found by :func:`minimize_hydrogens` (L-BFGS, heavy atoms fixed) started both from
    h(x_C) and from x's own hydrogens; the lower energy of the two is used per configuration (so a
    wrong methyl rotamer counts in the gap). RMSD is measured to the minimum reached from h(x_C).
    Returns {"rmsd_nm": mean hydrogen RMSD h vs that minimum, "energy_gap_kT_mean", "energy_gap_kT_std",
    "n"}; gap = u(x_C, h(x_C)) - u(x_C, x_H_min) >= 0 up to minimiser tolerance.
    """
    x = _full_coordinates(hnet, x).to(torch.float64)
    with torch.no_grad():
        xh = hnet(x.to(next(hnet.parameters()).dtype)).to(torch.float64)
        uh = energy(xh)
    m1 = minimize_hydrogens(system, xh, energy, steps)
    m2 = minimize_hydrogens(system, x, energy, steps)
    with torch.no_grad():
        u1, u2 = energy(m1), energy(m2)
    umin = torch.minimum(u1, u2)
    hyd = torch.as_tensor(np.array(system.hydrogen_indices))
    # RMSD to the minimum reached from h's own placement (the other start may be a permuted rotamer)
    rmsd = torch.sqrt(((xh[:, hyd] - m1[:, hyd]) ** 2).sum(-1).mean(-1))
    gap = (uh - umin).detach()
    return {"rmsd_nm": float(rmsd.mean()), "energy_gap_kT_mean": float(gap.mean()),
            "energy_gap_kT_std": float(gap.std()) if gap.numel() > 1 else 0.0, "n": int(gap.numel())}


class PopulationEstimate(tuple):
    """``(value, stderr)`` tuple with extra attributes ``ess`` (Kish ESS fraction) and ``n``."""

    def __new__(cls, value: float, stderr: float, ess: float, n: int):
        obj = super().__new__(cls, (float(value), float(stderr)))
        obj.ess, obj.n = float(ess), int(n)
        return obj

    @property
    def value(self) -> float:
        return self[0]

    @property
    def stderr(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        return f"PopulationEstimate(value={self[0]:.6g}, stderr={self[1]:.3g}, ess={self.ess:.3g}, n={self.n})"


def biased_population(x_ref, u_fn: EnergyFn, hnet, region_mask, batch_size: int = 256,
                      h_flow=None) -> PopulationEstimate:
    """Appendix-E eq. 32: population of region M under p_bar(x_C) ~ p~_B(x_C, h(x_C)).

    x_ref: (n, n_atoms, 3) nm samples of p_B (e.g. MD / replica exchange); u_fn: energy in kT;
    region_mask: (n,) bool or a callable x -> (n,) bool. w(x) = exp(-u(h(strip_H(x))) + u(x));
    P_bar(M) = sum_M w / sum w. stderr: delta method of the self-normalised ratio,
    sqrt(sum w_i^2 (1_M(x_i) - P)^2) / sum w (assumes independent samples).

    h_flow: optional :class:`~boltzflow.flows.hydrogen.ConditionalHydrogenFlow` q(x_H | x_C) (fitted on
    *other* reference frames). Then w(x) = exp(-u(x_C, h(x_C)) + u(x)) q(x_H | x_C): importance
    sampling towards p_bar(x_C) q(x_H | x_C), whose heavy-atom marginal is p_bar, so the estimate stays
    exact while the weights lose most of the hydrogen-vibration noise of eq. 32 (which is the
    improper q = const special case). Compare ``.ess`` of both.
    """
    x = _full_coordinates(hnet, x_ref)
    mask = region_mask(x) if callable(region_mask) else region_mask
    mask = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask), dtype=torch.bool)
    if mask.shape != (x.shape[0],):
        raise InputError(f"region_mask must have shape ({x.shape[0]},), got {tuple(mask.shape)}")
    dtype = next(hnet.parameters()).dtype
    logw = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(dtype)
            lw_b = (-u_fn(hnet(xb)) + u_fn(xb)).to(torch.float64)
            if h_flow is not None:
                lw_b = lw_b + h_flow.log_prob(xb.to(next(h_flow.parameters()).dtype)).to(torch.float64)
            logw.append(lw_b)
    lw = torch.cat(logw)
    lw = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -torch.inf))
    if not bool(torch.isfinite(lw).any()):
        raise InputError("no finite weights: every reference configuration has non-finite energy")
    w = torch.exp(lw - lw.max())
    sw = w.sum()
    p = float((w * mask).sum() / sw)
    se = float(torch.sqrt((w**2 * (mask.to(w) - p) ** 2).sum()) / sw)
    ess = float(sw**2 / (w.numel() * (w**2).sum()))
    return PopulationEstimate(p, se, ess, w.numel())
