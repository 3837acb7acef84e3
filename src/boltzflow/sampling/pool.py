"""An importance-resampled pool of generator samples: the training set of reweighted maximum likelihood.

Every ``refresh`` optimizer steps the pool draws ``size`` configurations from the generator q with their
reduced energies u, forms the log weights ``log w = -u - log q``, clips the largest fraction ``clip`` of
them at their (1 - clip) quantile (Schopmans & Friederich 2025 clip the top 1e-4 the same way) and
resamples ``resample`` frames with probability proportional to the clipped weights. The resampled frames
are approximately Boltzmann-distributed whatever q is, so maximum likelihood on them (the loss
``rwml``) is the forward KL to p: mass-covering, it raises q where q < p, which is where the heavy tail
of the weights comes from. A pool costs ``size`` energy evaluations (no forces) and one sampling pass.

Resume is exact without storing the frames: the pool keeps the generator parameters and the random
state it was drawn with (a few MB) and draws the same pool again after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError, InputError
from .moves import CoordinateMap


@dataclass(frozen=True)
class PoolConfig:
    """Reweighted-maximum-likelihood pool (``finetune.loss = "rwml"``).

    size: generator draws per refresh (energy evaluations); resample: frames resampled from them;
    clip: fraction of the largest log weights clipped at their (1 - clip) quantile (0 = none);
    refresh: optimizer steps between refreshes; batch_size: configurations per sampling pass;
    power: resample in proportion to ``w ** power``: 1 targets p (forward KL), 2 targets p^2 / q (the
    alpha = 2 divergence of FAB, which weighs the under-covered regions more); every power has q = p as
    its fixed point. data_fraction: share of every rwml batch taken from the training frames instead of
    the pool (maximum likelihood on them as well: they anchor regions that q under-weights so much that a
    pool rarely holds a draw there; the frames' own distribution, e.g. 300 K + 356 K tempering frames,
    is mixed into the target in that proportion). clip_final: the clip of the pools drawn in the second
    half of the rwml stage (None: ``clip`` throughout); late in training the weights' heavy tail is what
    limits a large sample's ESS, and the clip hides exactly the draws that make it (0 = unclipped).
    move_fraction: share of the resampled frames rejuvenated by ``move_steps`` HMC transitions of
    ``move_leapfrog`` leapfrog steps in the generator's internal coordinates (resample-move,
    :mod:`boltzflow.sampling.moves`; 0 = none): the many copies of a heavy draw spread over the region
    around it. move_step_size: the first pool's leapfrog step (standardised units; adapted towards
    acceptance 0.65 and carried from pool to pool). Moves cost ``move_leapfrog + 1`` energy-and-force
    evaluations per frame and transition, counted with the pool's.
    power_final, resample_final, move_fraction_final: ``power``, ``resample`` and ``move_fraction`` of
    the pools drawn in the stage's second half, like ``clip_final`` (None: the first half's value), e.g.
    the alpha = 2 target with moves once the generator is good (docs/pipelines.md)."""

    size: int = 1_000_000
    resample: int = 1_000_000
    clip: float = 1e-4
    refresh: int = 1000
    batch_size: int = 5000
    power: float = 1.0
    data_fraction: float = 0.0
    clip_final: float | None = None
    move_fraction: float = 0.0
    move_steps: int = 5
    move_leapfrog: int = 5
    move_step_size: float = 0.05
    power_final: float | None = None
    resample_final: int | None = None
    move_fraction_final: float | None = None

    #: the options that act only on the stage's second half (a checkpoint from its first half resumes
    #: under other values of them)
    FINAL_KEYS = ("clip_final", "power_final", "resample_final", "move_fraction_final")

    @property
    def has_final(self) -> bool:
        """Whether any second-half option is set."""
        return any(getattr(self, k) is not None for k in self.FINAL_KEYS)

    def __post_init__(self):
        if self.size < 1 or self.resample < 1 or self.refresh < 1 or self.batch_size < 1:
            raise ConfigError("pool.size, pool.resample, pool.refresh and pool.batch_size must be >= 1")
        if not 0.0 <= self.clip < 1.0:
            raise ConfigError(f"pool.clip must be in [0, 1), got {self.clip}")
        if self.clip_final is not None and not 0.0 <= self.clip_final < 1.0:
            raise ConfigError(f"pool.clip_final must be in [0, 1) (or unset), got {self.clip_final}")
        if not 0.0 <= self.data_fraction < 1.0:
            raise ConfigError(f"pool.data_fraction must be in [0, 1), got {self.data_fraction}")
        if not 0.0 <= self.move_fraction <= 1.0:
            raise ConfigError(f"pool.move_fraction must be in [0, 1], got {self.move_fraction}")
        if self.move_fraction_final is not None and not 0.0 <= self.move_fraction_final <= 1.0:
            raise ConfigError(f"pool.move_fraction_final must be in [0, 1] (or unset), got {self.move_fraction_final}")
        if self.power_final is not None and not self.power_final > 0:
            raise ConfigError(f"pool.power_final must be > 0 (or unset), got {self.power_final}")
        if self.resample_final is not None and self.resample_final < 1:
            raise ConfigError(f"pool.resample_final must be >= 1 (or unset), got {self.resample_final}")
        if self.move_steps < 1 or self.move_leapfrog < 1 or not self.move_step_size > 0:
            raise ConfigError("pool.move_steps and pool.move_leapfrog must be >= 1 and pool.move_step_size > 0")
        if not self.power > 0:
            raise ConfigError(f"pool.power must be > 0, got {self.power}")
        if self.size > 2**24:
            raise ConfigError(f"pool.size must be <= {2**24} (torch.multinomial's limit), got {self.size}")


def clipped_log_weights(log_w: torch.Tensor, clip: float) -> torch.Tensor:
    """``log_w: (n,)`` with its ``k = max(1, clip * n_finite)`` largest finite values set to the next
    largest (the (1 - clip) quantile); -inf stays -inf. clip = 0 (or fewer than 2 finite values) returns
    log_w unchanged."""
    ok = torch.isfinite(log_w)
    n_ok = int(ok.sum())
    if clip <= 0 or n_ok < 2:
        return log_w
    k = min(max(int(clip * n_ok), 1), n_ok - 1)
    cut = torch.topk(log_w[ok], k + 1).values[-1]
    return torch.where(ok, torch.minimum(log_w, cut), log_w)


class ReweightedPool:
    """Importance-resampled generator samples (module docstring). ``due`` says when to :meth:`refresh`;
    :meth:`batch` draws training frames ``(n, ...)`` uniformly from the resampled pool."""

    def __init__(self, config: PoolConfig | None = None, mover: CoordinateMap | None = None):
        self.config = config or PoolConfig()
        if max(self.config.move_fraction, self.config.move_fraction_final or 0.0) > 0 and mover is None:
            raise InputError("pool.move_fraction (or move_fraction_final) > 0 needs the generator's internal "
                             "coordinates (mover=...); use a generator with pipeline = 'internal-all' or set them to 0")
        #: the coordinates HMC moves run in (``move_fraction > 0``)
        self.mover = mover
        #: leapfrog step of the next pool's moves (adapted during each refresh)
        self.move_step = float(self.config.move_step_size)
        #: energy evaluations of the last refresh's moves
        self.move_evals = 0
        self.x: torch.Tensor | None = None
        #: unclipped log weights ``(size,)`` of the last refresh's fresh draws (-inf where invalid)
        self.log_weights: torch.Tensor | None = None
        self.uses = 0
        #: the clip the next :meth:`refresh` applies (``config.clip`` unless the trainer sets it)
        self.clip = float(self.config.clip)
        #: whether the next :meth:`refresh` uses the second-half options (``power_final``, ...; set by the trainer)
        self.late = False
        #: statistics of the last refresh: kish (Kish ESS fraction of the ``size`` fresh draws, unclipped),
        #: unique (distinct frames among the resampled), n_invalid, top_weight (largest normalised weight),
        #: resample_ess (effective size of the resampling distribution, 1 / sum p_i^2)
        self.stats: dict[str, float] = {}
        self._origin: dict[str, Any] | None = None

    @property
    def due(self) -> bool:
        """True when the pool is empty or has served ``refresh`` batches."""
        return self.x is None or self.uses >= self.config.refresh

    def refresh(self, gen, energy: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator | None = None) -> int:
        """Draw a new pool from ``gen`` (parameters as they are now); returns the energy evaluations (``size`` draws plus the moves' energy-and-force calls)."""
        origin = {"model": {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()},
                  "rng": generator.get_state() if generator is not None else None,
                  "clip": self.clip, "move_step": self.move_step, "late": self.late}
        self._draw(gen, energy, generator)
        self._origin = origin
        self.uses = 0
        return self.config.size + self.move_evals

    def settings(self) -> tuple[float, int, float]:
        """(power, resample, move_fraction) of the next draw: the second-half values when :attr:`late`."""
        c = self.config

        def pick(final, base):
            return base if not self.late or final is None else final

        return (float(pick(c.power_final, c.power)), int(pick(c.resample_final, c.resample)),
                float(pick(c.move_fraction_final, c.move_fraction)))

    def _draw(self, gen, energy, generator) -> None:
        from ..core.weights import kish_ess

        cfg = self.config
        was_training = gen.training
        gen.eval()
        xs, lws = [], []
        with torch.no_grad():
            for s in range(0, cfg.size, cfg.batch_size):
                x, log_q = gen.sample_and_log_prob(min(cfg.batch_size, cfg.size - s), generator=generator)
                u = energy(x)
                ok = torch.isfinite(u) & torch.isfinite(log_q)
                lws.append(torch.where(ok, -u - log_q, torch.full_like(u, -torch.inf)).double())
                xs.append(x)
        gen.train(was_training)
        x = torch.cat(xs)
        log_w = torch.cat(lws)
        ok = torch.isfinite(log_w)
        if not ok.any():
            raise RuntimeError("every sample of the reweighting pool has an invalid energy or density; "
                               "train the generator by maximum likelihood first")
        power, resample, move_fraction = self.settings()
        lw = clipped_log_weights(log_w, self.clip)
        p = torch.softmax(power * lw, 0)
        idx = torch.multinomial(p.float(), resample, replacement=True, generator=generator)
        self.x = x[idx]
        self.log_weights = log_w
        w = torch.softmax(log_w, 0)
        self.stats = {"kish": float(kish_ess(log_w)) / cfg.size, "unique": float(torch.unique(idx).numel()),
                      "n_invalid": float((~ok).sum()), "top_weight": float(w.max()),
                      "resample_ess": float(1.0 / (p.double() ** 2).sum())}
        self.move_evals = 0
        m = int(round(move_fraction * resample))
        if m > 0 and self.mover is not None:
            from .moves import hmc_move

            sel = torch.randperm(resample, generator=generator, device=self.x.device)[:m]
            res = hmc_move(self.x[sel], self.mover, energy, cfg.move_steps, self.move_step, cfg.move_leapfrog,
                           batch_size=cfg.batch_size, generator=generator)
            self.x[sel] = res.x
            self.move_step, self.move_evals = res.step_size, res.energy_evals
            self.stats.update({"move_accept": res.accept_rate, "move_step": res.step_size})

    def batch(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` frames drawn uniformly (with replacement) from the resampled pool; counts one use."""
        if self.x is None:
            raise RuntimeError("the pool is empty: call refresh(gen, energy) first")
        self.uses += 1
        idx = torch.randint(0, self.x.shape[0], (n,), generator=generator, device=self.x.device)
        return self.x[idx]

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The parameters and random state the current pool was drawn with, its use count and statistics."""
        return {"origin": self._origin, "uses": self.uses, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any] | None, gen, energy) -> None:
        """Restore a :meth:`state_dict`: the same pool is drawn again from the stored parameters and
        random state (``gen``'s own parameters are left as they are)."""
        if not state or state.get("origin") is None:
            return
        origin = state["origin"]
        self.clip = float(origin.get("clip", self.config.clip))
        self.move_step = float(origin.get("move_step", self.config.move_step_size))
        self.late = bool(origin.get("late", False))
        if int(state["uses"]) >= self.config.refresh:
            # used up (checkpoints often fall on a refresh step): the next step draws a new pool anyway, from
            # the trainer's own stream, so drawing this one again would only cost its `size` evaluations
            self.x, self.log_weights, self._origin = None, None, origin
            self.uses = int(state["uses"])
            self.stats = dict(state.get("stats", self.stats))
            self.move_step = float(self.stats.get("move_step", self.move_step))
            return
        current = {k: v.detach().clone() for k, v in gen.state_dict().items()}
        gen.load_state_dict(origin["model"])
        g = None
        if origin["rng"] is not None:
            g = torch.Generator(device=next(iter(gen.parameters())).device)
            g.set_state(origin["rng"])
        try:
            self._draw(gen, energy, g)
        finally:
            gen.load_state_dict(current)
        self._origin = origin
        self.uses = int(state["uses"])
        self.stats = dict(state.get("stats", self.stats))


__all__ = ["PoolConfig", "ReweightedPool", "clipped_log_weights"]
