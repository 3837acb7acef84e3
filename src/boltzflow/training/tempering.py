"""Training data from the energy alone: batched parallel tempering with Langevin dynamics.

The energy-trained route starts from the input structure only. Maximum likelihood needs
configurations that cover every metastable state, and straight Langevin dynamics at 300 K does not
leave the input basin on a training budget (alanine dipeptide's phi > 0 state is visited about once
per nanosecond). Parallel tempering does, and with the native energy thousands of chains are one
batched evaluation: ``ladders`` independent ladders of ``replicas`` temperatures (geometric from the
system temperature to ``t_max``) run BAOAB Langevin dynamics together, and every ``steps_per_swap``
steps neighbouring temperatures exchange configurations (Metropolis, even/odd pairs alternating;
velocities rescaled by sqrt(T_new / T_old), which keeps them Maxwell-Boltzmann at the new
temperature). Frames of the lowest (system) temperature are kept.

The frames need not carry exact populations: the generator trained on them is reweighted against
the energy, so they only have to cover the states (a short run from one structure over-represents
its basin; the reweighted estimates correct that). Every step costs one energy + gradient
evaluation per chain; ``energy_evals`` counts them all, for the route's cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .augment import _forces, _nonfinite_rows


@dataclass(frozen=True)
class TemperingConfig:
    """ladders: independent replica ladders integrated as one batch; replicas: temperatures per ladder,
    geometric from the system temperature to t_max (K); steps_per_swap: Langevin steps between swap
    attempts; burnin_rounds: swap rounds discarded before the first kept frame; frames: frames kept per
    ladder at the system temperature, one every stride_rounds rounds; timestep_fs (fs) and
    friction_per_ps (1/ps) of the BAOAB integrator; keep_replicas: frames are kept from this many of the
    coldest temperatures of each ladder (1: the system temperature only; 2 adds the next one, broader
    training data that covers minor states and tails better, see docs/pipelines.md); minimize_steps: L-BFGS iterations on the start
    structure(s) first (a PDB straight from a builder or the PDB bank can hold strained contacts that
    would blow up the first Langevin steps; 0 = off); seed: velocities, noise and swaps."""

    ladders: int = 128
    replicas: int = 8
    t_max: float = 1000.0
    steps_per_swap: int = 50
    burnin_rounds: int = 100
    frames: int = 500
    stride_rounds: int = 1
    timestep_fs: float = 1.0
    friction_per_ps: float = 5.0
    keep_replicas: int = 1
    minimize_steps: int = 200
    seed: int = 0

    def __post_init__(self):
        if min(self.ladders, self.replicas, self.steps_per_swap, self.frames, self.stride_rounds) < 1 or self.burnin_rounds < 0:
            raise ConfigError("tempering needs ladders, replicas, steps_per_swap, frames, stride_rounds >= 1 and "
                              "burnin_rounds >= 0")
        if not 1 <= self.keep_replicas <= self.replicas:
            raise ConfigError(f"tempering.keep_replicas must be between 1 and replicas ({self.replicas}), "
                              f"got {self.keep_replicas}")
        if not (self.timestep_fs > 0 and self.friction_per_ps >= 0 and math.isfinite(self.t_max)):
            raise ConfigError("tempering needs timestep_fs > 0, friction_per_ps >= 0 and a finite t_max")

    @property
    def rounds(self) -> int:
        """Swap rounds in all (burn-in + kept)."""
        return self.burnin_rounds + self.frames * self.stride_rounds

    def temperatures(self, t0: float) -> np.ndarray:
        """(replicas,) K, geometric from t0 to t_max."""
        if self.replicas == 1:
            return np.array([float(t0)])
        if not self.t_max > t0:
            raise ConfigError(f"tempering.t_max ({self.t_max} K) must be above the system temperature ({t0} K)")
        return float(t0) * (self.t_max / float(t0)) ** (np.arange(self.replicas) / (self.replicas - 1))


@dataclass
class TemperingResult:
    """positions: (ladders * keep_replicas * frames, n_atoms, 3) nm, ordered (ladder, kept
    temperature, frame): per ladder the system temperature's frames, then the next temperatures' with
    ``keep_replicas > 1``;
    reduced_energy: (n,) kT; temperatures: (replicas,) K; swap_acceptance: (replicas - 1,) per
    neighbouring pair; reset_chains: chains put back to the start after non-finite energies;
    energy_evals: energy + gradient evaluations; wall_s."""

    positions: np.ndarray
    reduced_energy: np.ndarray
    temperatures: np.ndarray
    swap_acceptance: np.ndarray
    reset_chains: int
    energy_evals: int
    wall_s: float
    info: dict = field(default_factory=dict)


class TemperingChains:
    """The state of batched parallel tempering: ``config.ladders`` ladders of ``config.replicas``
    temperatures (chain ``l * replicas + r`` is ladder l at temperature r), advanced one swap round
    at a time, with a state dict to checkpoint and resume it bitwise.

    energy: differentiable ``(b, n_atoms, 3) nm -> (b,)`` reduced energy in kT at ``temperature`` (K),
    whose kT (kJ/mol) is given; x0: (n_atoms, 3) or (m, n_atoms, 3) nm starting structures (chain c
    starts from x0[c % m], L-BFGS-minimised first when ``config.minimize_steps > 0``); masses:
    (n_atoms,) dalton. ``x`` (chains, n_atoms, 3) nm, ``u`` (chains,) kT at the system temperature."""

    def __init__(self, energy: Callable[[torch.Tensor], torch.Tensor], x0, masses, kT: float, temperature: float,
                 config: TemperingConfig, dtype: torch.dtype = torch.float32):
        x0 = x0 if isinstance(x0, torch.Tensor) else torch.as_tensor(np.array(x0, dtype=np.float64))
        if x0.dim() == 2:
            x0 = x0[None]
        if x0.dim() != 3 or x0.shape[-1] != 3:
            raise InputError(f"starting structures must have shape (n_atoms, 3) or (m, n_atoms, 3), got {tuple(x0.shape)}")
        masses = torch.as_tensor(np.asarray(masses, dtype=np.float64))
        if masses.shape != (x0.shape[1],) or not bool((masses > 0).all()):
            raise InputError("masses must be (n_atoms,) positive values in dalton")
        if not kT > 0:
            raise InputError(f"kT must be > 0, got {kT}")
        cfg = self.config = config
        self.energy, self.kT, self.dtype = energy, float(kT), dtype
        L, R = cfg.ladders, cfg.replicas
        self.energy_evals = 0
        if cfg.minimize_steps > 0:
            x0, n_min = minimize(energy, x0.to(torch.float64), cfg.minimize_steps)
            self.energy_evals += n_min
        self.temperatures = cfg.temperatures(temperature)
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        n_chain = L * R
        self.start = x0[torch.arange(n_chain) % x0.shape[0]].to(dtype).clone()
        self.x = self.start.clone()
        self.ratio = torch.as_tensor(np.tile(self.temperatures / float(temperature), L), dtype=dtype)  # T_r / T0
        self.m = masses.to(dtype)[None, :, None]
        self.sigma = torch.sqrt(self.kT * self.ratio[:, None, None] / self.m)
        self.v = self.sigma * self._noise()
        self.f, self.u = _forces(energy, self.x, self.kT)
        self.energy_evals += n_chain
        self.reset_chains = 0
        self.accepted = np.zeros(max(R - 1, 0))
        self.attempted = np.zeros(max(R - 1, 0))
        self.beta = torch.as_tensor(float(temperature) / self.temperatures, dtype=torch.float64)  # 1/kT0 units
        self.rounds_done = 0

    def _noise(self) -> torch.Tensor:
        return torch.randn(self.start.shape, generator=self.generator, dtype=self.dtype)

    def run_round(self) -> None:
        """``steps_per_swap`` BAOAB steps of every chain, then one Metropolis swap of neighbouring
        temperatures (even pairs on even rounds, odd pairs on odd rounds)."""
        cfg, energy, kT, m, sigma = self.config, self.energy, self.kT, self.m, self.sigma
        dt = cfg.timestep_fs * 1e-3
        c1 = math.exp(-cfg.friction_per_ps * dt)
        c2 = math.sqrt(max(1.0 - c1 * c1, 0.0))
        x, v, f, u = self.x, self.v, self.f, self.u
        n_chain = x.shape[0]
        kick = (0.5 * dt) / m  # v += kick * f: half a step of the force
        for _ in range(cfg.steps_per_swap):
            v = torch.addcmul(v, f, kick)
            x = x + (0.5 * dt) * v
            v = c1 * v + c2 * sigma * self._noise()
            x = x + (0.5 * dt) * v
            f, u = _forces(energy, x, kT)
            bad = _nonfinite_rows(u, f)
            if bool(bad.any()):  # an exploded chain restarts from its start structure with fresh velocities
                self.reset_chains += int(bad.sum())
                b3 = bad[:, None, None]
                x = torch.where(b3, self.start, x)
                f2, u2 = _forces(energy, x, kT)
                f = torch.where(b3, f2, f)
                u = torch.where(bad, u2, u)
                v = torch.where(b3, sigma * self._noise(), v)
                self.energy_evals += n_chain
            v = torch.addcmul(v, f, kick)
        self.energy_evals += n_chain * cfg.steps_per_swap
        if cfg.replicas > 1:
            x, v, u, f = _swap(x, v, u, f, self.rounds_done % 2, cfg.ladders, cfg.replicas, self.beta, self.ratio,
                               self.generator, self.accepted, self.attempted)
        self.x, self.v, self.f, self.u = x, v, f, u
        self.rounds_done += 1

    def cold(self, keep_replicas: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (ladders * keep_replicas, n_atoms, 3) nm and u (same,) kT of the ``keep_replicas``
        coldest temperatures of every ladder, ladder-major."""
        L, R = self.config.ladders, self.config.replicas
        idx = (torch.arange(L)[:, None] * R + torch.arange(keep_replicas)[None]).reshape(-1)
        return self.x[idx].clone(), self.u[idx].double().clone()

    @property
    def swap_acceptance(self) -> np.ndarray:
        """(replicas - 1,) acceptance of each neighbouring pair so far."""
        return np.divide(self.accepted, np.maximum(self.attempted, 1))

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bitwise (tensors, counters, the RNG state)."""
        return {"x": self.x, "v": self.v, "f": self.f, "u": self.u, "start": self.start,
                "generator": self.generator.get_state(), "rounds_done": self.rounds_done,
                "energy_evals": self.energy_evals, "reset_chains": self.reset_chains,
                "accepted": self.accepted.copy(), "attempted": self.attempted.copy()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["x"].shape) != tuple(self.x.shape):
            raise InputError(f"tempering state of shape {tuple(state['x'].shape)} does not fit "
                             f"{tuple(self.x.shape)} chains (ladders x replicas, atoms, 3)")
        self.x, self.v, self.f, self.u = (state[k].to(self.dtype) for k in ("x", "v", "f", "u"))
        self.start = state["start"].to(self.dtype)
        self.generator.set_state(state["generator"])
        self.rounds_done = int(state["rounds_done"])
        self.energy_evals = int(state["energy_evals"])
        self.reset_chains = int(state["reset_chains"])
        self.accepted = np.array(state["accepted"], dtype=np.float64)
        self.attempted = np.array(state["attempted"], dtype=np.float64)


def parallel_tempering(energy: Callable[[torch.Tensor], torch.Tensor], x0, masses, kT: float, temperature: float,
                       config: TemperingConfig, dtype: torch.dtype = torch.float32,
                       progress: Callable[[int, int], None] | None = None) -> TemperingResult:
    """Run batched parallel tempering from the configuration(s) x0 (:class:`TemperingChains`) and keep
    the frames of ``config.keep_replicas`` coldest temperatures after the burn-in.

    energy: differentiable ``(b, n_atoms, 3) nm -> (b,)`` reduced energy in kT at ``temperature`` (K),
    whose kT (kJ/mol) is given; x0: (n_atoms, 3) or (m, n_atoms, 3) nm starting structures (chain c
    starts from x0[c % m]); masses: (n_atoms,) dalton. progress(round, rounds) is called every round."""
    t_start = time.perf_counter()
    cfg = config
    chains = TemperingChains(energy, x0, masses, kT, temperature, cfg, dtype=dtype)
    frames, us = [], []
    for rnd in range(cfg.rounds):
        chains.run_round()
        if rnd >= cfg.burnin_rounds and (rnd - cfg.burnin_rounds + 1) % cfg.stride_rounds == 0:
            x, u = chains.cold(cfg.keep_replicas)
            frames.append(x)
            us.append(u)
        if progress is not None:
            progress(rnd + 1, cfg.rounds)
    pos = torch.stack(frames, 1).reshape(-1, *chains.x.shape[1:]).cpu().numpy().astype(np.float32)
    red = torch.stack(us, 1).reshape(-1).cpu().numpy()
    return TemperingResult(pos, red, chains.temperatures, chains.swap_acceptance, chains.reset_chains,
                           int(chains.energy_evals), time.perf_counter() - t_start,
                           info={"ladders": cfg.ladders, "replicas": cfg.replicas, "rounds": cfg.rounds})


def minimize(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """L-BFGS on every structure of x (m, n_atoms, 3) nm for at most ``steps`` iterations; returns the
    minimised structures (the input's where the energy did not go down or turned non-finite) and the
    energy + gradient evaluations spent."""
    x = x.detach().clone()
    with torch.no_grad():
        u0 = energy(x).double()
    xv = x.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([xv], lr=1.0, max_iter=int(steps), line_search_fn="strong_wolfe")
    calls = [0]

    def closure():
        opt.zero_grad()
        u = energy(xv).sum()
        u.backward()
        calls[0] += 1
        return u

    opt.step(closure)
    with torch.no_grad():
        u1 = energy(xv).double()
        better = torch.isfinite(u1) & (u1 <= u0)
        out = torch.where(better[:, None, None], xv.detach(), x)
    return out, (calls[0] + 2) * x.shape[0]


def _swap(x, v, u, f, parity: int, L: int, R: int, beta, ratio, g, accepted, attempted):
    """Metropolis exchange between temperatures (r, r+1) for r = parity, parity + 2, ... in every ladder."""
    lo = np.arange(parity, R - 1, 2)
    if len(lo) == 0:
        return x, v, u, f
    lo_t = torch.as_tensor(lo)
    base = (torch.arange(L) * R)[:, None]
    i = (base + lo_t[None]).reshape(-1)      # chain slots at temperature r
    j = i + 1                                # at temperature r + 1
    ud = u.double()
    b = beta[lo_t].repeat(L)
    b1 = beta[lo_t + 1].repeat(L)
    log_acc = (b - b1) * (ud[i] - ud[j])
    acc = torch.rand(len(i), generator=g, dtype=torch.float64) < torch.exp(log_acc.clamp(max=0.0))
    acc = acc & torch.isfinite(log_acc)
    np.add.at(attempted, np.tile(lo, L), 1)
    np.add.at(accepted, np.tile(lo, L)[acc.numpy()], 1)
    if bool(acc.any()):
        ia, ja = i[acc], j[acc]
        src = torch.arange(x.shape[0])
        src[ia], src[ja] = ja, ia
        x, f, u = x[src], f[src], u[src]
        scale = torch.sqrt(ratio / ratio[src]).to(v.dtype)  # velocity of the arriving chain, rescaled to T_new
        v = v[src] * scale[:, None, None]
    return x, v, u, f


__all__ = ["TemperingChains", "TemperingConfig", "TemperingResult", "parallel_tempering", "minimize"]
