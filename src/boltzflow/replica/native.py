"""Parallel tempering with the native batched energy: many independent ladders as one batch.

openmmtools runs one ladder of replicas, each an OpenMM Context; a peptide's backbone states then
decorrelate over tens of picoseconds (the alanine tetrapeptide's residue-state indicators had a
statistical inefficiency of 14-63 ps at a 300-700 K ladder), so one run holds tens of independent
samples and two runs of hours disagree. Here ``ladders`` independent ladders of ``replicas``
temperatures run BAOAB Langevin dynamics together with the native energy
(:class:`boltzflow.training.tempering.TemperingChains`, the engine of the energy recipe's training
data), so a run holds ``ladders`` times as many independent samples, and the ladders themselves give
honest error bars: a population's standard error is the spread of the per-ladder means
(:func:`boltzflow.estimators.block_average` with one block per ladder), with no autocorrelation
estimate needed once the burn-in has erased the common start.

    from boltzflow.replica.native import NativeTemperingConfig, run_native_tempering
    samples = run_native_tempering(system, energy, NativeTemperingConfig(ladders=128, rounds=6000), "runs/pt")

The run checkpoints its whole state (chains, RNG, kept frames) every ``checkpoint_every`` rounds
(``native_tempering.pt``, written atomically); ``resume=True`` continues it bitwise, also with a
larger ``rounds``. Frames whose isomer (cis/trans amides, handedness) differs from the input
structure's are counted and left out (``keep``), so populations are those of the input
isomer, the distribution a generator with ``fixed_torsions = "isomer"`` models.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError, InputError

STATE_FILE = "native_tempering.pt"


@dataclass(frozen=True)
class NativeTemperingConfig:
    """ladders: independent ladders integrated as one batch; replicas: temperatures per ladder,
    geometric from the system temperature to t_max (K); rounds: swap rounds in all, each of
    steps_per_swap BAOAB steps of timestep_fs (fs) with friction_per_ps (1/ps); burnin_rounds: rounds
    discarded before the first kept frame; stride_rounds: a frame of the system temperature is kept
    every this many rounds in every ladder; minimize_steps: L-BFGS iterations on the input structure
    first; seed: velocities, noise and swaps (two runs with different seeds are independent);
    checkpoint_every: rounds between checkpoints."""

    ladders: int = 128
    replicas: int = 8
    t_max: float = 1000.0
    rounds: int = 6000
    steps_per_swap: int = 50
    burnin_rounds: int = 1500
    stride_rounds: int = 15
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    minimize_steps: int = 200
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self):
        if min(self.ladders, self.replicas, self.rounds, self.steps_per_swap, self.stride_rounds,
               self.checkpoint_every) < 1 or self.burnin_rounds < 0 or self.minimize_steps < 0:
            raise ConfigError("native tempering needs ladders, replicas, rounds, steps_per_swap, stride_rounds, "
                              "checkpoint_every >= 1 and burnin_rounds, minimize_steps >= 0")
        if self.ladders < 2:
            raise ConfigError("native tempering needs at least 2 ladders (--ladders): its error bars are the spread "
                              "between them")
        if self.rounds < self.burnin_rounds + self.stride_rounds:
            raise ConfigError(f"rounds ({self.rounds}; simulate --iterations) must exceed burnin_rounds "
                              f"({self.burnin_rounds}; --burnin) by at least stride_rounds ({self.stride_rounds}; "
                              "--stride) to keep any frame")

    @property
    def frames_per_ladder(self) -> int:
        return (self.rounds - self.burnin_rounds) // self.stride_rounds

    def tempering(self):
        """The engine's :class:`~boltzflow.training.tempering.TemperingConfig`."""
        from ..training.tempering import TemperingConfig

        return TemperingConfig(ladders=self.ladders, replicas=self.replicas, t_max=self.t_max,
                               steps_per_swap=self.steps_per_swap, burnin_rounds=self.burnin_rounds,
                               frames=max(self.frames_per_ladder, 1), stride_rounds=self.stride_rounds,
                               timestep_fs=self.timestep_fs, friction_per_ps=self.friction_per_ps,
                               minimize_steps=self.minimize_steps, seed=self.seed)


#: configuration keys a resumed run may change: it is extended, checkpointed differently, or discards
#: more of its start (``burnin_rounds`` may grow by a multiple of ``stride_rounds``; the frames kept
#: before the new burn-in are dropped)
RESUMABLE_KEYS = ("rounds", "checkpoint_every", "burnin_rounds")


def run_native_tempering(system, energy: Callable[[torch.Tensor], torch.Tensor], config: NativeTemperingConfig,
                         out: str | Path, resume: bool = False, keep: Callable[[np.ndarray], np.ndarray] | None = None,
                         progress: Callable[[int, int], None] | None = None, dtype: torch.dtype = torch.float32):
    """Run (or continue) native parallel tempering of ``system`` and return the kept frames at the
    system temperature as a SampleSet (positions (n, n_atoms, 3) nm, ladder-major, time order within a
    ladder, the frames ``keep`` rejects left out; reduced_energy in kT; provenance ``decorrelated:
    False`` with ``ladders``, ``frames_per_ladder`` (kept per ladder before ``keep``) and
    ``ladder_sizes`` (frames of each ladder in the set)).

    energy: differentiable ``(b, n_atoms, 3) nm -> (b,)`` reduced energy in kT of the system;
    keep: ``(n, n_atoms, 3) -> (n,) bool``, the frames to count (e.g. the input isomer's);
    progress(round, rounds) after every round."""
    from ..sampling import SampleSet
    from ..training.tempering import TemperingChains

    out = Path(out)
    state_path = out / STATE_FILE
    saved = None
    if state_path.exists():
        if not resume:
            raise InputError(f"'{out}' already holds a native tempering run; pass --resume to continue it")
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        old = NativeTemperingConfig(**saved["config"])
        changed = [k for k in asdict(config) if k not in RESUMABLE_KEYS and getattr(old, k) != getattr(config, k)]
        if changed:
            raise InputError(f"the run in '{out}' was made with {', '.join(f'{k}={getattr(old, k)!r}' for k in changed)}; "
                             f"a resumed run may change only {', '.join(RESUMABLE_KEYS)}")
        if config.rounds < int(saved["chains"]["rounds_done"]):
            raise InputError(f"the run in '{out}' has done {saved['chains']['rounds_done']} rounds already; "
                             f"pass rounds >= that to continue it")
        grow = config.burnin_rounds - old.burnin_rounds
        if grow < 0 or grow % config.stride_rounds:
            raise InputError(f"the run in '{out}' discarded {old.burnin_rounds} burn-in rounds; a resumed run may "
                             f"discard more, by a multiple of stride_rounds ({config.stride_rounds}), not "
                             f"{config.burnin_rounds}")
        n_drop = grow // config.stride_rounds
        saved["frames"], saved["u"] = saved["frames"][n_drop:], saved["u"][n_drop:]
    elif resume:
        raise InputError(f"nothing to resume in '{out}' (no {STATE_FILE}); drop --resume to start a run")
    out.mkdir(parents=True, exist_ok=True)
    cfg = config
    x0 = torch.as_tensor(np.array(system.positions, dtype=np.float64))
    tc = cfg.tempering()
    if saved is not None:
        tc = replace(tc, minimize_steps=0)  # the saved state holds the minimised start
    t0 = time.perf_counter()
    chains = TemperingChains(energy, x0, system.masses, system.kT, system.temperature, tc, dtype=dtype)
    frames: list[torch.Tensor] = []
    us: list[torch.Tensor] = []
    wall_before = 0.0
    if saved is not None:
        chains.load_state_dict(saved["chains"])
        frames, us = list(saved["frames"]), list(saved["u"])
        wall_before = float(saved["wall_s"])
        t0 = time.perf_counter()

    def checkpoint():
        from ..io import atomic_torch_save

        atomic_torch_save(state_path, {"config": asdict(cfg), "chains": chains.state_dict(), "frames": frames,
                                       "u": us, "wall_s": wall_before + time.perf_counter() - t0,
                                       "temperature": float(system.temperature)})

    while chains.rounds_done < cfg.rounds:
        chains.run_round()
        r = chains.rounds_done
        if r > cfg.burnin_rounds and (r - cfg.burnin_rounds) % cfg.stride_rounds == 0:
            x, u = chains.cold(1)
            frames.append(x.to(torch.float32))
            us.append(u)
        if r % cfg.checkpoint_every == 0 or r == cfg.rounds:
            checkpoint()
        if progress is not None:
            progress(r, cfg.rounds)
    if not frames:
        raise InputError("no frame kept: the run has not passed its burn-in")
    pos = torch.stack(frames, 1).reshape(-1, *chains.x.shape[1:]).numpy()  # (ladders * frames, n_atoms, 3)
    red = torch.stack(us, 1).reshape(-1).numpy()
    n_frames = len(frames)
    ok = np.ones(len(pos), dtype=bool) if keep is None else np.asarray(keep(pos), dtype=bool)
    sizes = ok.reshape(cfg.ladders, n_frames).sum(1)
    wall = wall_before + time.perf_counter() - t0
    prov = {
        "sampler": "native-tempering", "system": system.name, "decorrelated": False,
        "ladders": cfg.ladders, "frames_per_ladder": n_frames, "ladder_sizes": [int(k) for k in sizes],
        "order": "ladder-major, time order within a ladder",
        "temperatures_k": [float(t) for t in chains.temperatures],
        "swap_acceptance": [float(a) for a in chains.swap_acceptance],
        "rounds": chains.rounds_done, "steps_per_swap": cfg.steps_per_swap, "timestep_fs": cfg.timestep_fs,
        "simulated_time_ns_per_replica": chains.rounds_done * cfg.steps_per_swap * cfg.timestep_fs * 1e-6,
        "reset_chains": chains.reset_chains, "other_isomer_frames": int((~ok).sum()),
        "energy_evals": int(chains.energy_evals), "wall_s": float(wall), "config": asdict(cfg),
    }
    return SampleSet(pos[ok], red[ok], None, None, float(system.temperature), prov)


def ladder_populations(samples, indicators: dict[str, Callable[[np.ndarray], np.ndarray]]) -> dict:
    """Population of every state (``indicators``: name -> (n, n_atoms, 3) -> (n,) bool) in the frames
    of a native tempering run (:func:`run_native_tempering`), with the standard error from the spread
    of the per-ladder means (one block per ladder, provenance ``ladder_sizes``).
    Returns {name: :class:`~boltzflow.estimators.Estimate`}."""
    from ..estimators import block_average

    sizes = samples.provenance.get("ladder_sizes")
    if sizes is None or len(sizes) < 2 or sum(sizes) != len(samples):
        raise InputError("ladder_populations needs the frames of a native tempering run (provenance 'ladder_sizes')")
    out = {}
    for name, fn in indicators.items():
        ind = np.asarray(fn(samples.positions), dtype=np.float64)
        out[name] = block_average(ind, block_sizes=sizes, name=name, n_bootstrap=200)
    return out


__all__ = ["NativeTemperingConfig", "run_native_tempering", "ladder_populations", "STATE_FILE"]
