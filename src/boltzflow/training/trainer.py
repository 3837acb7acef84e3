"""The Trainer: maximum-likelihood pre-training on data, then data-free fine-tuning with any loss.

Usage::

    cfg = load_config(TrainConfig, "train.toml")            # or TrainConfig(...)
    trainer = Trainer(gen, energy, cfg, run_dir=RunDir("runs/x"), data=x_ref, modes=system.modes)
    summary = trainer.run(resume=True)                      # continues a killed run if a checkpoint exists

Steps are numbered globally: steps ``[0, pretrain.steps)`` are pre-training, the next
``finetune.steps`` fine-tuning; each stage gets a fresh Adam optimizer and learning-rate schedule.
All randomness comes from the trainer's own ``torch.Generator`` (seeded by ``config.seed``), so
a resumed run is bitwise identical to an uninterrupted one. Steps whose loss or gradient norm is
not finite are skipped (no parameter update) and counted.

Data-parallel training (``dist``, a :class:`boltzflow.distributed.DistContext` from ``torchrun``):
the generator is wrapped in torch's ``DistributedDataParallel`` (gradients averaged over ranks) and
each global batch of ``batch`` is split into contiguous shards, one per rank
(:func:`boltzflow.distributed.shard_bounds`). Pre-training draws the *global* batch's data indices
from the shared generator (the same on every rank) and each rank takes its shard, so the loss
curve equals the one-process curve up to floating-point summation order. Data-free losses draw
their samples (and run their AIS chains, and fill their replay buffer) per rank from a per-rank
generator; batch statistics inside a loss (L2+'s K, KLz-df's self-normalised weights) are then
per shard, as batch norm is under DDP. A step is skipped on every rank when any rank's loss is not
finite. Rank 0 alone writes the run directory; checkpoints hold every rank's random state, so a
resume on the same number of ranks is bitwise; on another number each rank's sample stream starts anew
(refused when a pool or replay buffer is split over the ranks).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config import to_dict
from ..distributed import SINGLE, DistContext
from ..errors import CheckpointError, ConfigError, InputError
from ..flows.nn import conditioner_precision, cpu_has_native_bfloat16
from ..sampling.ais import AISConfig, AnnealedImportanceSampler
from ..sampling.pool import PoolConfig, ReweightedPool
from .checkpoints import load_checkpoint, save_checkpoint
from .progress import format_postfix, progress_bar

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """Adam. lr: peak learning rate; schedule: "cosine" (decays to lr * min_lr_factor over the
    stage) or "constant"; warmup_steps: linear warm-up at the start of each stage."""

    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_factor: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule {self.schedule!r} unknown; choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError("optimizer.warmup_steps must be >= 0")


@dataclass(frozen=True)
class StageConfig:
    """One training stage. loss: a name in boltzflow.losses.LOSSES ("klz" for pre-training);
    steps: optimizer steps (0 skips the stage); batch: samples per step;
    penalty_weight: multiplies mean(gen.penalty(x)) (the MolecularGenerator's Cartesian alignment
    penalty already includes lambda_align = 10, so 1.0 applies felardos2023's setting; 0 = off);
    lr: overrides optimizer.lr for this stage when set; weight_power (loss "chi2_data" only): the
    exponent of the frames' importance weights, 1 = chi-square divergence, 0 = maximum likelihood;
    ml_fraction (losses "chi2_data" and "logvar_data"): the share of each step's gradient from plain maximum
    likelihood on the same frames (0 = chi-square / log-variance only); state_balance (stages that draw
    training frames: pre-training, and fine-tuning by a loss of ``boltzflow.losses.DATA_LOSSES``): frames are
    drawn with probability proportional to n_s ** -state_balance, n_s the number of training frames in the
    frame's conformational state (for peptides the combination of every residue's backbone state, else the
    system's modes), so 0 draws uniformly (plain maximum likelihood) and 1 gives every state the same share of
    the gradient; rare states then get more of the flow's capacity (and more of its mass) than their Boltzmann
    weight asks for (docs/peptides.md); cycles (fine-tuning only): the relative lengths of the stage's warm-restart
    cycles, e.g. (20, 8, 16) splits 44 000 steps into 20 000 + 8 000 + 16 000 (and any other ``steps`` in the same
    proportions; empty: one cycle). At each cycle's start the stage starts over from the best state the ESS guard
    has seen (the current one without a guard), with a fresh Adam, a fresh moving average and the schedule's
    warm-up and cosine over the cycle, as a run given ``init`` = the run so far would (measured on alanine
    tetrapeptide: docs/peptides.md)."""

    loss: str = "l2plus"
    steps: int = 0
    batch: int = 256
    penalty_weight: float = 0.0
    lr: float | None = None
    weight_power: float = 1.0
    ml_fraction: float = 0.0
    state_balance: float = 0.0
    cycles: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "cycles", tuple(float(c) for c in self.cycles))
        if not all(c > 0 and math.isfinite(c) for c in self.cycles):
            raise ConfigError(f"cycles are the relative lengths of the stage's warm-restart cycles, all > 0 "
                              f"(e.g. [20, 8, 16]; empty: one cycle), got {list(self.cycles)}")
        if not 0.0 <= self.state_balance <= 1.0:
            raise ConfigError(f"state_balance must be in [0, 1] (0: frames drawn uniformly, 1: every state the same "
                              f"share), got {self.state_balance}")
        if not 0.0 <= self.weight_power <= 1.0:
            raise ConfigError(f"weight_power must be in [0, 1] (1: chi-square divergence, 0: maximum likelihood), "
                              f"got {self.weight_power}")
        if not 0.0 <= self.ml_fraction <= 1.0:
            raise ConfigError(f"ml_fraction must be in [0, 1] (the share of maximum likelihood in the "
                              f"gradient of chi2_data / logvar_data; 0: none), got {self.ml_fraction}")

    @property
    def restarts(self) -> tuple[int, ...]:
        """Steps into the stage where a new cycle starts (``cycles`` scaled to ``steps``; cycles that round to no
        step merge with the next)."""
        total, acc, out = sum(self.cycles), 0.0, []
        for c in self.cycles[:-1]:
            acc += c
            r = round(acc / total * self.steps)
            if 0 < r < self.steps and (not out or r > out[-1]):
                out.append(r)
        return tuple(out)


@dataclass(frozen=True)
class ReplayConfig:
    """Prioritised replay buffer for FAB (ignored by other losses)."""

    enabled: bool = False
    capacity: int = 10000
    min_length: int = 1000


@dataclass(frozen=True)
class CapConfig:
    """Energy regularisation applied by the trainer to the target u(x) (kT).

    energy_max: log-linear cap of u above this value; grad_max: cap on the per-sample norm of
    du/dx (kT/nm) of the total energy. For per-term capping build the energy with
    ``boltzflow.energy.Energy(system, cap=EnergyCap(term_grad_max=...))`` instead."""

    energy_max: float | None = None
    grad_max: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the generator, energy and data.

    ess_guard > 0 protects the fine-tuning stage: before its first step and at every checkpoint the
    Kish ESS of ``ess_guard`` fresh samples (of their Pareto-smoothed weights: less luck) is measured,
    and the stage ends with the generator state that had the highest ESS (the pre-fine-tuning one included), so
    fine-tuning never lowers it on those draws (fresh draws can still score the chosen state lower: docs/peptides.md).
    Large samples matter: batches of ~1e3 miss the heavy tail of the weights.

    finetune_min_ess (needs ess_guard > 0): when the guard's Kish ESS fraction of the maximum-likelihood
    generator is below it, the ``fallback`` stage runs instead of ``finetune`` (or, with fallback.steps = 0,
    the run ends there; resuming with a lower value fine-tunes after all). Measured: energy-based
    fine-tuning took alanine dipeptide from 0.44-0.59 to 0.63-0.81, and lowered alanine tetrapeptide's ESS
    from every start tried (0.03, 0.1, 0.23; reverse KL also from 0.44), costing ~1 300 s each time, while ``chi2_data`` on the
    training frames raised it (0.11 -> 0.21 on 4e5 draws; docs/peptides.md, "Fitting the tail") and
    ``logvar_data`` more (0.29 -> 0.33 where chi2_data gave 0.30; "The log-variance of the weights on the frames").
    fallback: the stage run in ``finetune``'s place below ``finetune_min_ess`` (never with
    finetune_min_ess = 0); its loss must not need a pool or replay buffer (not "rwml" or "fab").

    holdout_guard protects the maximum-likelihood stage from over-fitting: when the Trainer has held-out
    frames, their mean negative log-likelihood is measured at every checkpoint of pre-training, and the
    stage ends with the state where it was lowest (measured on alanine tetrapeptide, 128 000 frames, 8 x 256
    flow: the held-out NLL trails the training one by 0.4 nats after 4 epochs, 0.7 after 12).
    divergence_nats (0 = off): when a check's held-out NLL lies more than this above the best so far, the
    maximum likelihood has diverged (a run of the tetrapeptide at peak lr 2e-3 under two ranks jumped from
    -432.2 to -304.6 between two checks): the stage goes back to the best state, with a fresh Adam and half
    the learning rate for the rest of the stage, and goes on; logged, and counted in summary.json.

    ema (0 = off): decay per step of an exponential moving average of the generator's parameters, e.g. 0.9995
    (an average over ~2 000 steps); each stage keeps its own average and ends with it. When on, the holdout
    guard scores the averaged parameters (and logs the raw ones' NLL beside them), so does the ESS guard, and
    a run stopped early saves the averaged ones. The losses draw their samples from the raw parameters. It may
    be switched on or changed at a resume: the average then starts from the resumed parameters."""

    pretrain: StageConfig = StageConfig(loss="klz", steps=0, batch=256)
    finetune: StageConfig = StageConfig(loss="l2plus", steps=1000, batch=256)
    optimizer: OptimConfig = OptimConfig()
    grad_clip: float | None = 100.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: bool = False
    progress: bool = True
    eval_batch: int = 1024
    ess_guard: int = 0
    finetune_min_ess: float = 0.0
    fallback: StageConfig = StageConfig(loss="logvar_data", steps=0, batch=512, lr=2e-5, ml_fraction=0.5)
    holdout_guard: bool = True
    divergence_nats: float = 5.0
    ema: float = 0.0
    ais: AISConfig = AISConfig()
    replay: ReplayConfig = ReplayConfig()
    pool: PoolConfig = PoolConfig()
    cap: CapConfig = CapConfig()
    #: precision of the flow's conditioner networks in training steps (and the pools drawn inside them):
    #: "float32" or "bfloat16" (autocast; ~25 % faster steps of the 8 x 256 flow on an AMX CPU core; the
    #: ESS guard and every reweighted sample stay float32; flows.nn.conditioner_precision)
    conditioner_dtype: str = "float32"

    def __post_init__(self):
        from ..flows.nn import CONDITIONER_DTYPES
        from ..losses import DATA_LOSSES, LOSSES

        if self.conditioner_dtype not in CONDITIONER_DTYPES:
            raise ConfigError(f"conditioner_dtype must be one of {', '.join(CONDITIONER_DTYPES)}, got {self.conditioner_dtype!r}")

        if self.pretrain.cycles:
            raise ConfigError("pretrain.cycles: warm restarts are for fine-tuning (finetune.cycles); maximum "
                              "likelihood's holdout guard already keeps its best state")
        if self.pretrain.loss != "klz":
            raise ConfigError(f"pretrain.loss must be 'klz' (maximum likelihood on data), got {self.pretrain.loss!r}")
        if self.finetune.loss not in LOSSES:
            raise ConfigError(f"finetune.loss {self.finetune.loss!r} unknown; choose one of {', '.join(LOSSES)}")
        if self.fallback.loss not in LOSSES:
            raise ConfigError(f"fallback.loss {self.fallback.loss!r} unknown; choose one of {', '.join(LOSSES)}")
        for name, st in (("pretrain", self.pretrain), ("finetune", self.finetune), ("fallback", self.fallback)):
            if st.steps < 0 or st.batch < 1:
                raise ConfigError(f"{name}.steps must be >= 0 and {name}.batch >= 1")
        for name, st in (("finetune", self.finetune), ("fallback", self.fallback)):
            if st.state_balance > 0 and st.loss not in DATA_LOSSES:
                raise ConfigError(f"{name}.state_balance acts on the training frames a stage draws; {name}.loss "
                                  f"{st.loss!r} draws none: set it to 0 (or use one of {', '.join(DATA_LOSSES)})")
        if self.fallback.steps > 0 and self.fallback.loss in ("rwml", "fab"):
            raise ConfigError(f"fallback.loss {self.fallback.loss!r} needs a pool or replay buffer set up before "
                              "training; choose another loss (e.g. logvar_data) or use it as finetune.loss")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("log_every and checkpoint_every must be >= 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError("grad_clip must be > 0 (or omitted for no clipping)")
        if not self.divergence_nats >= 0:
            raise ConfigError(f"divergence_nats is a held-out NLL rise in nats per frame (0 = off), got {self.divergence_nats}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema is a decay per step in [0, 1) (0 = off; e.g. 0.9995), got {self.ema}")
        if not 0.0 <= self.finetune_min_ess < 1.0:
            raise ConfigError(f"finetune_min_ess is a Kish ESS fraction in [0, 1), got {self.finetune_min_ess}")
        if self.finetune_min_ess > 0 and self.finetune.steps > 0 and self.ess_guard < 1:
            raise ConfigError("finetune_min_ess needs the ESS guard to measure the start of fine-tuning: "
                              "set training.ess_guard (e.g. 100000) or finetune_min_ess = 0")

    @property
    def total_steps(self) -> int:
        return self.pretrain.steps + self.finetune.steps


#: fine-tuning losses that train on frames with their energies: their stage logs the held-out frames' fit
ENERGY_DATA_LOSSES = ("chi2_data", "logvar_data")

#: at most this many held-out frames are scored by the holdout guard (an even subsample of more)
HOLDOUT_MAX = 10_000

#: config keys that may differ between a checkpoint and the resuming run
_RESUME_FREE_KEYS = ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batch", "conditioner_dtype",
                     "ema")
#: options that act only once fine-tuning has begun: a checkpoint written at or before the end of
#: pre-training resumes under other values of them (e.g. a longer fine-tuning stage from the same
#: maximum-likelihood generator)
_FINETUNE_KEYS = ("finetune", "ess_guard", "finetune_min_ess", "fallback", "ais", "replay", "pool")


def _fill_defaults(theirs: dict[str, Any], defaults: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """A checkpoint's config dict with the options added after it was written (in ``keys`` or inside
    its sections) set to their defaults, so an old checkpoint compares equal to a default config."""
    out = dict(theirs)
    for k in keys:
        if k not in out:
            out[k] = defaults.get(k)
        elif isinstance(out[k], dict) and isinstance(defaults.get(k), dict):
            out[k] = _fill_defaults(out[k], defaults[k], set(defaults[k]))
    return out


@dataclass
class _Counters:
    skipped_steps: int = 0
    rollbacks: int = 0
    energy_evals: int = 0
    n_invalid: int = 0
    wall_s: float = 0.0


class Trainer:
    """Trains ``gen`` (generator protocol: sample_and_log_prob, log_prob, penalty, parameters)
    towards ``exp(-energy(x))``.

    gen: the generator (a torch Module); energy: callable ``x -> (batch,)`` reduced energy in kT
    (+inf for invalid samples); config: :class:`TrainConfig`; run_dir: where metrics.jsonl,
    checkpoints/ and summary.json go (None: keep nothing on disk, no checkpoints);
    data: ``(n, ...)`` reference configurations for pre-training (nm; passed through
    ``gen.prepare_data`` when the generator has it); modes: an object with
    ``fractions(x) -> {name: fraction}`` and ``minor`` (e.g. SignModes / TorsionModes);
    dist: the distributed context (None: one process); every rank builds its Trainer with the
    same generator initialisation, data, configuration and run_dir, and calls :meth:`run`.
    """

    def __init__(self, gen, energy: Callable[[torch.Tensor], torch.Tensor], config: TrainConfig | None = None,
                 run_dir=None, data: torch.Tensor | None = None, modes=None, progress: bool | None = None,
                 dist: DistContext | None = None, holdout: torch.Tensor | None = None):
        self.gen = gen
        self.config = config or TrainConfig()
        self.run_dir = run_dir
        self.modes = modes
        self._energy = energy
        self.dist = dist or SINGLE
        #: True on the process that writes run_dir (rank 0)
        self.writes = run_dir is not None and self.dist.is_main
        self.show_progress = (self.config.progress if progress is None else progress) and self.dist.is_main
        p = next(iter(gen.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None else torch.get_default_dtype()
        if data is not None and hasattr(gen, "prepare_data"):
            data = gen.prepare_data(data)  # molecular generators: centre + align into the generator's frame
        self.data = None if data is None else torch.as_tensor(data).to(self.device, self.dtype)
        if self.data is not None and self.data.shape[0] == 0:
            raise InputError("training data is empty; pass at least one configuration or set pretrain.steps = 0")
        if holdout is not None and len(holdout) > HOLDOUT_MAX:  # evenly spread subsample bounds the check's cost
            holdout = holdout[torch.linspace(0, len(holdout) - 1, HOLDOUT_MAX).long()]
        if holdout is not None and len(holdout) and hasattr(gen, "prepare_data"):
            holdout = gen.prepare_data(holdout)
        #: held-out frames (n, ...) of the maximum-likelihood stage's holdout guard, or None
        self.holdout = None if holdout is None or len(holdout) == 0 else torch.as_tensor(holdout).to(self.device, self.dtype)
        #: reduced energies (n,) of the held-out frames, computed at the first held-out fit (:meth:`_holdout_fit`)
        self._holdout_u: torch.Tensor | None = None
        self.rng = torch.Generator(device=self.device).manual_seed(int(self.config.seed))
        #: draws of the generator's samples: the shared rng in one process, a per-rank stream under DDP
        self.sample_rng = self.rng
        self._ddp = None
        if self.dist.active:
            self.sample_rng = torch.Generator(device=self.device).manual_seed(
                _rank_seed(int(self.config.seed), self.dist.rank))
            self._ddp = _wrap_ddp(self, self.dist)
        self.step = 0
        self.counters = _Counters()
        self.ais = AnnealedImportanceSampler(self.config.ais)
        self.buffer = None
        #: the importance-resampled pool of reweighted maximum likelihood (finetune.loss = "rwml"); under DDP
        #: every rank draws its share of pool.size and pool.resample with its own stream
        self.pool = None
        if self.config.finetune.loss == "rwml":
            pc, world = self.config.pool, self.dist.world_size
            mover = None
            if max(pc.move_fraction, pc.move_fraction_final or 0.0) > 0:
                from ..flows.latent import internal_map

                mover = internal_map(self.gen)
            self.pool = ReweightedPool(replace(pc, size=-(-pc.size // world), resample=-(-pc.resample // world),
                                               resample_final=None if pc.resample_final is None
                                               else -(-pc.resample_final // world)), mover=mover)
        if self.config.finetune.loss == "fab" and self.config.replay.enabled:
            from ..sampling.replay import PrioritisedReplayBuffer

            self.buffer = PrioritisedReplayBuffer(self.config.replay.capacity, self.config.replay.min_length)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._opt_stage: str | None = None
        self.last_row: dict[str, Any] = {}
        #: metric rows logged by this Trainer object (in memory; the run directory has them all)
        self.history: list[dict[str, Any]] = []
        #: ESS guard of the fine-tuning stage: {"best_ess", "best_step", "best_state", "history"} or None
        self._guard: dict[str, Any] | None = None
        #: holdout guard of pre-training: {"best_nll", "best_step", "best_state", "history"} or None
        self._holdout: dict[str, Any] | None = None
        #: True when fine-tuning was skipped (the guard's ESS below ``finetune_min_ess``)
        self.finetune_skipped = False
        #: True once the ``fallback`` stage has replaced ``finetune`` (the guard's ESS below ``finetune_min_ess``)
        self.fallback_used = False
        #: moving average of the trainable parameters of the current stage (``config.ema`` > 0): {name: tensor}
        #: and the number of updates it has seen; None when off, or between a stage's end and the next one's first step
        self._ema: dict[str, torch.Tensor] | None = None
        self._ema_updates = 0
        #: per stage, the cumulative distribution over training frames of ``state_balance`` > 0 (float64, (n,))
        self._frame_cdf: dict[str, torch.Tensor] = {}
        from ..losses import DATA_LOSSES

        for stage in ("pretrain", "finetune"):
            st = self._stage_cfg(stage)
            draws_frames = stage == "pretrain" or st.loss in DATA_LOSSES
            if st.state_balance > 0 and st.steps > 0 and draws_frames and self.data is not None:
                self._frame_cdf[stage] = self._balanced_cdf(st.state_balance, stage)

    @property
    def finished(self) -> bool:
        """Whether training is over: every step taken, or fine-tuning skipped by ``finetune_min_ess``."""
        return self.step >= self.config.total_steps or self.finetune_skipped

    # -- energy ------------------------------------------------------------------------------
    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """The (optionally capped) target energy ``u(x): (batch,)`` in kT."""
        from ..energy.base import cap_gradient, log_linear_cap

        cap = self.config.cap
        u = self._energy(cap_gradient(x, cap.grad_max) if cap.grad_max is not None else x)
        return log_linear_cap(u, cap.energy_max)

    # -- stages ------------------------------------------------------------------------------
    def stage_of(self, step: int) -> str:
        """"pretrain" for global steps [0, pretrain.steps), else "finetune"."""
        return "pretrain" if step < self.config.pretrain.steps else "finetune"

    def _stage_cfg(self, stage: str) -> StageConfig:
        return self.config.pretrain if stage == "pretrain" else self.config.finetune

    def _setup_stage(self, stage: str) -> None:
        """Fresh Adam + schedule for ``stage``."""
        oc = self.config.optimizer
        st = self._stage_cfg(stage)
        lr = st.lr if st.lr is not None else oc.lr
        self.optimizer = torch.optim.Adam(self.gen.parameters(), lr=lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)
        bounds = (0, *st.restarts, max(st.steps, 1))

        def factor(s: int) -> float:
            i = max(j for j in range(len(bounds) - 1) if bounds[j] <= s) if s >= 0 else 0
            s, n_steps = s - bounds[i], bounds[i + 1] - bounds[i]  # within the cycle (the stage without restarts)
            if oc.warmup_steps and s < oc.warmup_steps:
                return (s + 1) / oc.warmup_steps
            if oc.schedule == "constant":
                return 1.0
            t = min(max(s - oc.warmup_steps, 0) / max(n_steps - oc.warmup_steps, 1), 1.0)
            return oc.min_lr_factor + (1 - oc.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self._opt_stage = stage

    # -- checkpoints -------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: their sample streams, AIS step sizes, replay buffers."""
        return {"sample_rng": self.sample_rng.get_state(), "torch_rng": torch.get_rng_state(),
                "ais": self.ais.state_dict(), "buffer": self.buffer.state_dict() if self.buffer is not None else None,
                "pool": self.pool.state_dict() if self.pool is not None else None}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs; under DDP a collective (every rank must call it), with every
        rank's own state under "ranks"."""
        ranks = self.dist.all_gather_object(self._rank_state()) if self.dist.active else None
        return {
            "model": self.gen.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "opt_stage": self._opt_stage,
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "stage": self.stage_of(max(self.step - 1, 0)),
            "counters": dict(vars(self.counters)),
            "config": to_dict(self.config),
            "ais": self.ais.state_dict(),
            "buffer": self.buffer.state_dict() if self.buffer is not None else None,
            "pool": self.pool.state_dict() if self.pool is not None else None,
            "guard": self._guard,
            "holdout_guard": self._holdout,
            "world_size": self.dist.world_size,
            "ranks": ranks,
            "fallback_used": self.fallback_used,
            "ema": None if self._ema is None else {"params": {k: v.detach().cpu().clone() for k, v in self._ema.items()},
                                                   "updates": self._ema_updates},
        }

    def save_checkpoint(self) -> None:
        if self.run_dir is None:
            return
        state = self.state_dict()  # a collective under DDP: before the rank check
        if not self.writes:
            return
        keep = self.run_dir.checkpoint_dir / f"step_{self.step:08d}.pt" if self.config.keep_checkpoints else None
        save_checkpoint(self.run_dir.latest_checkpoint, state, keep_copy=keep)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (CheckpointError when it belongs to another configuration)."""
        if state.get("fallback_used") and not self.fallback_used:
            self._switch_to_fallback()  # the checkpoint's config is the switched one
        free = _RESUME_FREE_KEYS
        if int(state["step"]) <= int(state["config"].get("pretrain", {}).get("steps", 0)):
            free = free + _FINETUNE_KEYS  # fine-tuning has not started: its options are still open
        mine = {k: v for k, v in to_dict(self.config).items() if k not in free}
        theirs = {k: v for k, v in state["config"].items() if k not in free}
        theirs = _fill_defaults(theirs, to_dict(TrainConfig()), set(mine))
        half = int(state["config"].get("pretrain", {}).get("steps", 0)) + int(
            state["config"].get("finetune", {}).get("steps", 0)) // 2
        if "pool" in mine and int(state["step"]) <= half:
            # the stage's first half: the pool's second-half options are still open
            mine["pool"] = {k: v for k, v in mine["pool"].items() if k not in PoolConfig.FINAL_KEYS}
            theirs["pool"] = {k: v for k, v in theirs["pool"].items() if k not in PoolConfig.FINAL_KEYS}
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise CheckpointError(f"checkpoint was written with a different configuration (differs in: "
                                  f"{', '.join(diff)}); use the original config or a new run directory")
        theirs_world = int(state.get("world_size", 1))
        #: another number of processes than the checkpoint's: parameters, optimizer, data order and EMA carry
        #: over (they are the same on every rank); each rank's sample stream starts anew from (seed, rank, step)
        regrouped = theirs_world != self.dist.world_size
        if regrouped and (self.pool is not None or self.buffer is not None):
            held = "reweighted maximum likelihood's pool" if self.pool is not None else "the replay buffer"
            raise CheckpointError(f"checkpoint was written by {theirs_world} process(es) but this run has "
                                  f"{self.dist.world_size}, and {held} is split over the processes; resume with "
                                  f"the same number (torchrun --nproc_per_node {theirs_world}, or one process for 1)")
        try:
            self.gen.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint model does not match this generator: {e}") from e
        if state["opt_stage"] is not None:
            self._setup_stage(state["opt_stage"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.counters = _Counters(**state["counters"])
        self.ais.load_state_dict(state["ais"])
        self._guard = state.get("guard")
        self._holdout = state.get("holdout_guard")
        ema = state.get("ema")  # kept only while this run averages (config.ema > 0); else the average starts anew
        if ema is not None and self.config.ema > 0:
            self._ema = {k: v.to(self.device) for k, v in ema["params"].items()}
            self._ema_updates = int(ema["updates"])
        if self.buffer is not None and state.get("buffer") is not None:
            self.buffer.load_state_dict(state["buffer"])
        pool_state = state.get("pool")
        if regrouped:
            if self.dist.active:  # a fresh stream per rank, distinct from the streams of steps before
                seed = _rank_seed(int(self.config.seed), self.dist.rank, self.step)
                self.sample_rng.manual_seed(seed)
                torch.manual_seed(seed)
            if self.writes and self.run_dir is not None:
                self.run_dir.log(f"resuming a run of {theirs_world} process(es) on {self.dist.world_size}: same "
                                 f"parameters, optimizer and data order; each rank's sample stream starts anew")
        elif state.get("ranks"):
            mine = state["ranks"][self.dist.rank]
            self.sample_rng.set_state(mine["sample_rng"])
            torch.set_rng_state(mine["torch_rng"])
            self.ais.load_state_dict(mine["ais"])
            if self.buffer is not None and mine.get("buffer") is not None:
                self.buffer.load_state_dict(mine["buffer"])
            pool_state = mine.get("pool", pool_state)
        if self.pool is not None:
            self.pool.load_state_dict(pool_state, self.gen, self.energy)  # draws the same pool again

    def resume(self) -> int:
        """Load run_dir/checkpoints/latest.pt and drop metric rows written after it. Returns the step."""
        if self.run_dir is None:
            raise InputError("cannot resume without a run directory")
        state = load_checkpoint(self.run_dir.latest_checkpoint, map_location=self.device)
        self.load_state_dict(state)
        self.dist.barrier()  # every rank has read the checkpoint before rank 0 writes again
        if self.writes:
            self.run_dir.truncate_metrics(self.step)
            self.run_dir.log(f"resumed from step {self.step}")
        return self.step

    # -- one step ----------------------------------------------------------------------------
    def _balanced_cdf(self, power: float, stage: str) -> torch.Tensor:
        """Cumulative probabilities ``(n_frames,)`` (float64) of drawing each training frame: ``n_s ** -power``
        for a frame in state s, normalised (``StageConfig.state_balance``)."""
        if self.modes is None or not getattr(self.modes, "molecular", False):
            raise InputError(f"{stage}.state_balance > 0 needs the system's conformational states (molecular modes) "
                             "to balance the training frames; this system declares none: set it to 0")
        # peptides: the combination of every residue's backbone state; other molecules: their modes
        label_of = getattr(self.modes, "combinations", self.modes.assign)
        labels = np.concatenate([np.asarray(label_of(self.data[i:i + 65_536].detach().cpu().double().numpy()),
                                            dtype=np.int64) for i in range(0, self.data.shape[0], 65_536)])
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        p = counts[inverse].astype(np.float64) ** -power
        p /= p.sum()
        shares = np.bincount(inverse, weights=p)
        if self.writes:
            rare = counts < 0.01 * len(labels)
            self.run_dir.log(f"{stage}: frames drawn by state (state_balance {power}): {len(counts)} states; "
                             f"those under 1 % of the frames ({int(counts[rare].sum())} frames) get "
                             f"{shares[rare].sum():.3f} of the draws instead of {counts[rare].sum() / len(labels):.3f}")
        cdf = torch.as_tensor(np.cumsum(p), device=self.device)
        cdf[-1] = 1.0
        return cdf

    def _frame_indices(self, stage: str, n: int) -> torch.Tensor:
        """``(n,)`` indices of training frames for one global batch, from the shared stream (the same on every
        rank): uniform, or by ``state_balance``."""
        cdf = self._frame_cdf.get(stage)
        if cdf is None:
            return torch.randint(0, self.data.shape[0], (n,), generator=self.rng, device=self.device)
        u = torch.rand(n, generator=self.rng, device=self.device, dtype=torch.float64)
        return torch.searchsorted(cdf, u).clamp_(max=self.data.shape[0] - 1)

    def _loss(self, stage: str):
        from ..losses import DATA_LOSSES, chi2_data, get_loss, klz, logvar_data, rwml
        from ..losses.fab import fab

        st = self._stage_cfg(stage)
        lo, hi = self.dist.shard(st.batch)  # this rank's part of the global batch ([0, batch) in one process)
        if stage == "finetune" and st.loss in DATA_LOSSES and self.data is None:
            raise InputError(f"finetune.loss {st.loss!r} needs data; pass data= or choose a data-free loss")
        if stage == "pretrain" or st.loss in DATA_LOSSES:
            # the global batch's indices from the shared stream (the same on every rank), then this rank's shard
            idx = self._frame_indices(stage, st.batch)[lo:hi]
            if stage == "finetune" and st.loss == "chi2_data":
                return chi2_data(self.gen, self.energy, self.data[idx], power=st.weight_power,
                                 ml_fraction=st.ml_fraction, generator=self.sample_rng, penalty_weight=st.penalty_weight)
            if stage == "finetune" and st.loss == "logvar_data":
                return logvar_data(self.gen, self.energy, self.data[idx], ml_fraction=st.ml_fraction,
                                   generator=self.sample_rng, penalty_weight=st.penalty_weight)
            return klz(self.gen, self.data[idx], generator=self.sample_rng, penalty_weight=st.penalty_weight)
        if st.loss == "fab":
            return fab(self.gen, self.energy, hi - lo, self.ais, self.buffer, generator=self.sample_rng,
                       penalty_weight=st.penalty_weight)
        if st.loss == "rwml":
            pc = self.config.pool
            if self.pool is not None and pc.has_final:  # the stage's second half: the *_final options
                late = self.step - self.config.pretrain.steps >= self.config.finetune.steps // 2
                self.pool.late = late
                self.pool.clip = float(pc.clip_final if late and pc.clip_final is not None else pc.clip)
            anchor = None
            k = int(round(pc.data_fraction * st.batch))
            if k > 0:
                if self.data is None:
                    raise InputError("pool.data_fraction > 0 needs training frames (data=...); set it to 0")
                # like pre-training: the global indices from the shared stream, then this rank's shard
                idx = torch.randint(0, self.data.shape[0], (k,), generator=self.rng, device=self.device)
                klo, khi = self.dist.shard(k)
                anchor = self.data[idx[klo:khi]]
            n_pool = (hi - lo) - (0 if anchor is None else anchor.shape[0])
            return rwml(self.gen, self.energy, n_pool, self.pool, generator=self.sample_rng,
                        penalty_weight=st.penalty_weight, anchor=anchor)
        return get_loss(st.loss)(self.gen, self.energy, hi - lo, generator=self.sample_rng,
                                 penalty_weight=st.penalty_weight)

    def train_step(self) -> tuple[Any, float, bool]:
        """One optimizer step at ``self.step``; returns (LossOutput, grad_norm, applied)."""
        stage = self.stage_of(self.step)
        if self._opt_stage != stage:
            self._setup_stage(stage)
        self.optimizer.zero_grad(set_to_none=True)
        with conditioner_precision(self.gen, self.config.conditioner_dtype):
            if self._ddp is None:
                out = self._loss(stage)
            else:
                backward_loss, out = self._ddp(stage)  # DDP's forward: the loss on this rank's shard
        if self._ddp is None:
            ok = bool(torch.isfinite(out.loss)) and out.loss.requires_grad
            self.counters.energy_evals += int(out.energy_evals)
            self.counters.n_invalid += int(out.metrics.get("n_invalid", 0))
        else:
            mine_ok = bool(torch.isfinite(out.loss)) and out.loss.requires_grad
            bad, evals, invalid = self.dist.all_reduce_sum([0.0 if mine_ok else 1.0, out.energy_evals,
                                                            out.metrics.get("n_invalid", 0)])
            ok = bad == 0
            self.counters.energy_evals += int(evals)
            self.counters.n_invalid += int(invalid)
            backward_loss.backward()  # every rank, so DDP's gradient all-reduce completes; skipped below when not ok
        applied = False
        grad_norm = float("nan")
        if ok:
            if self._ddp is None:
                out.loss.backward()
            params = [p for p in self.gen.parameters() if p.grad is not None]
            clip = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
            gn = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
            grad_norm = float(gn)
            if math.isfinite(grad_norm):
                self.optimizer.step()
                applied = True
                if self.config.ema > 0:
                    self._ema_update()
        if not applied:
            self.counters.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule, deliberately
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.step += 1
        return out, grad_norm, applied

    # -- metrics -----------------------------------------------------------------------------
    def _sample_metrics(self, out, stage: str) -> dict[str, Any]:
        """u statistics, ESS and mode fractions on the loss's own samples, or on a fresh batch
        (pre-training) drawn with a generator seeded from (seed, step) so logging never changes training."""
        from ..losses.base import sample_stats

        m: dict[str, Any] = {}
        x, log_w = out.samples, out.log_w
        if x is None and self.config.eval_batch > 0:
            g = torch.Generator(device=self.device).manual_seed(int(self.config.seed) * 1_000_003 + self.step)
            with torch.no_grad():
                x, log_q = self.gen.sample_and_log_prob(self.config.eval_batch, generator=g)
                u = self.energy(x)
            self.counters.energy_evals += x.shape[0]
            _, log_w, stats = sample_stats(u, log_q)
            m.update(stats)
        if x is not None and self.modes is not None:
            fr = self.modes.fractions(x)
            m["modes"] = fr
            minor = getattr(self.modes, "minor", None)
            if minor in fr:
                m["minor_fraction"] = fr[minor]
                if log_w is not None and torch.isfinite(log_w).any():
                    w = torch.softmax(log_w.double(), 0).cpu().numpy()
                    names = list(getattr(self.modes, "names", fr.keys()))
                    lab = self.modes.assign(x)
                    m["minor_fraction_rw"] = float(w[lab == names.index(minor)].sum())
        return m

    def _global_metrics(self, out, stage: str) -> dict[str, Any]:
        """The loss's metrics over the global batch: per-rank values averaged with the shard sizes as
        weights (the loss: the global-batch mean), counts summed. A collective under DDP."""
        if not self.dist.active:
            return dict(out.metrics)
        keys = sorted(k for k, v in out.metrics.items() if isinstance(v, (int, float)))
        lo, hi = self.dist.shard(self._stage_cfg(stage).batch)
        share = (hi - lo) / self._stage_cfg(stage).batch
        sums = self.dist.all_reduce_sum([float(out.metrics[k]) * (1.0 if k == "n_invalid" else share) for k in keys])
        merged = dict(out.metrics)
        merged.update(zip(keys, sums))
        return merged

    def _row(self, out, stage: str, grad_norm: float, t0: float) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "stage": stage, "loss_name": self._stage_cfg(stage).loss}
        row.update(self._global_metrics(out, stage))
        if self.dist.is_main:  # diagnostics on rank 0's samples (or its fresh evaluation batch)
            row.update(self._sample_metrics(out, stage))
        row.update({
            "skipped_steps": self.counters.skipped_steps,
            "grad_norm": grad_norm,
            "energy_evals": self.counters.energy_evals,
            "wall_s": self.counters.wall_s + (time.perf_counter() - t0),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        })
        if self.dist.active:
            row["world_size"] = self.dist.world_size
        return row

    # -- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
        """Train to ``config.total_steps`` (or at most ``max_steps`` more steps); returns the summary.

        resume: continue from run_dir's latest checkpoint when there is one."""
        if resume and self.run_dir is not None and self.run_dir.latest_checkpoint.is_file():
            self.resume()  # may put the fallback stage in finetune's place (self.config)
        elif self.writes and self.step == 0:
            from ..config import dump_toml

            if not self.run_dir.config_path.exists():  # a caller (pipeline.train) may have written the full run config
                self.run_dir.write_config(dump_toml(self.config))
            self.run_dir.write_environment()
            if self.run_dir.metrics_path.exists():
                self.run_dir.truncate_metrics(-1)
        if self.config.pretrain.steps > 0 and self.step < self.config.pretrain.steps and self.data is None:
            raise InputError("pre-training needs reference data (data=...); or set pretrain.steps = 0")
        cfg = self.config
        total = cfg.total_steps
        limit = math.inf if max_steps is None else self.step + max_steps
        end = min(total, limit)
        if end > self.step:
            self._warn_slow_bfloat16()
            if self.dist.active and self._ddp is None:  # released by an earlier run(); a collective
                self._ddp = _wrap_ddp(self, self.dist)
        bar = progress_bar(total, initial=self.step, desc="train", enabled=self.show_progress)
        t0 = time.perf_counter()
        try:
            while self.step < end:
                stage = self.stage_of(self.step)
                if stage == "finetune" and cfg.ess_guard > 0 and self._guard is None:
                    self._guard_check()  # the state fine-tuning starts from
                    if self._guard["best_ess"] < cfg.finetune_min_ess:
                        if cfg.fallback.steps == 0:
                            self._skip_finetune()
                            break
                        self._switch_to_fallback(log=True)
                        cfg = self.config
                        total = cfg.total_steps
                        end = min(total, limit)
                        if hasattr(bar, "total"):
                            bar.total = total
                out, grad_norm, _ = self.train_step()
                stage_end = self.step == cfg.pretrain.steps or self.step == total
                restart = stage == "finetune" and self.step - cfg.pretrain.steps in cfg.finetune.restarts
                nll_holdout = nll_raw = None
                held_fit: dict[str, float] | None = None
                checkpoint_step = self.step % cfg.checkpoint_every == 0 or stage_end or restart
                if stage == "pretrain" and cfg.holdout_guard and self.holdout is not None and checkpoint_step:
                    nll_holdout, nll_raw = self._holdout_check()
                if (stage == "finetune" and self._stage_cfg(stage).loss in ENERGY_DATA_LOSSES
                        and self.holdout is not None and checkpoint_step):
                    held_fit = self._holdout_fit()
                if self.step % cfg.log_every == 0 or stage_end or self.step == 1 or nll_holdout is not None or held_fit:
                    row = self._row(out, stage, grad_norm, t0)
                    if nll_holdout is not None:
                        row["nll_holdout"] = nll_holdout
                    if nll_raw is not None:
                        row["nll_holdout_raw"] = nll_raw
                    row.update(held_fit or {})
                    self.last_row = row
                    self.history.append(row)
                    if self.writes:
                        self.run_dir.append_metrics(row)
                    bar.set_postfix(format_postfix(row))
                if stage == "pretrain" and stage_end:
                    self._ema_finish()
                    if nll_holdout is not None:
                        self._holdout_restore()  # before the checkpoint: a resume continues from the restored state
                if stage == "finetune" and cfg.ess_guard > 0 and checkpoint_step:
                    self._guard_check()
                if stage == "finetune" and self.step == total:
                    self._ema_finish()
                    if cfg.ess_guard > 0:
                        self._guard_restore()
                if restart:
                    self._warm_restart()
                if self.run_dir is not None and (checkpoint_step or self.step == end):
                    self._checkpoint(t0)
                    t0 = time.perf_counter()
                if stage_end and self.writes:
                    self.run_dir.update_summary(**{f"{stage}_final": self.last_row})
                bar.update(1)
        finally:
            bar.close()
            # the DDP wrapper holds the process group: let it go now, not whenever the trainer goes (a frame kept by
            # a cached exception can keep the trainer until interpreter exit, after the group is destroyed, and a
            # gloo group torn down then aborted the process: "terminate called without an active exception")
            self._ddp = None
        self.counters.wall_s += time.perf_counter() - t0
        summary = {
            "step": self.step, "total_steps": total, "stage": self.stage_of(max(self.step - 1, 0)),
            "skipped_steps": self.counters.skipped_steps, "rollbacks": self.counters.rollbacks,
            "energy_evals": self.counters.energy_evals,
            "n_invalid": self.counters.n_invalid, "wall_s": self.counters.wall_s, "last": self.last_row,
        }
        if self.writes:
            # the loop's own costs only under "training" (summary.json's costs: core/rundir.py)
            top = {k: v for k, v in summary.items() if k not in ("energy_evals", "wall_s")}
            self.run_dir.update_summary(**top, training=summary)
        return summary

    # -- parameter averaging (config.ema) -----------------------------------------------------
    def _ema_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(k, p) for k, p in self.gen.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def _ema_update(self) -> None:
        """After an applied step: avg <- d avg + (1 - d) theta with d = min(ema, (1 + n) / (10 + n))
        after n updates: early on the average spans the last ~n / 9 steps (a short or fresh run is not averaged
        with its first, poor parameters), later 1 / (1 - ema) steps."""
        named = self._ema_named()
        if self._ema is None:
            self._ema = {k: p.detach().clone() for k, p in named}
            self._ema_updates = 0
        n = self._ema_updates
        d = min(float(self.config.ema), (1 + n) / (10 + n))
        torch._foreach_lerp_([self._ema[k] for k, _ in named], [p.detach() for _, p in named], 1.0 - d)
        self._ema_updates = n + 1

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside the block the generator holds the averaged parameters (a no-op without an average)."""
        if self._ema is None:
            yield
            return
        raw = {k: p.detach().clone() for k, p in self._ema_named()}
        self._put_params(self._ema)
        try:
            yield
        finally:
            self._put_params(raw)

    @torch.no_grad()
    def _put_params(self, values: dict[str, torch.Tensor]) -> None:
        """Copy ``values`` ({name: tensor}) into the generator's trainable parameters."""
        for k, p in self._ema_named():
            p.copy_(values[k])

    @torch.no_grad()
    def _ema_finish(self, label: str | None = None) -> None:
        """End of a stage: the generator takes the averaged parameters and the average is dropped (the next
        stage starts its own)."""
        if self._ema is None:
            return
        self._put_params(self._ema)
        if self.writes:
            stage = label or ("pre-training" if self.stage_of(self.step - 1) == "pretrain" else "fine-tuning")
            self.run_dir.log(f"{stage} ends with the moving average of its parameters (ema {self.config.ema:g}, "
                             f"{self._ema_updates} updates)")
        self._ema = None

    # -- guards --------------------------------------------------------------------------------
    @torch.no_grad()
    def _holdout_nll(self) -> float:
        """Mean negative log-likelihood (nats per frame) of the held-out frames under the current parameters."""
        was_training = self.gen.training
        self.gen.eval()
        bs = max(1, int(self.config.eval_batch))
        lq = torch.cat([self.gen.log_prob(self.holdout[i:i + bs]) for i in range(0, len(self.holdout), bs)]).double()
        self.gen.train(was_training)
        lq = lq[torch.isfinite(lq)]
        return float(-lq.mean()) if len(lq) else math.inf

    @torch.no_grad()
    def _holdout_fit(self) -> dict[str, float]:
        """Fit of the held-out frames under the averaged parameters, logged at the checkpoints of a fine-tuning
        stage that trains on frames with their energies (``chi2_data``, ``logvar_data``): ``nll_holdout`` and
        ``var_log_w_holdout``, the variance of ``log w = -u - log q`` over the frames (what ``logvar_data``
        lowers; for log-normal weights the Kish ESS fraction is ``exp(-variance)``). A diagnostic without the
        ESS guard's sampling noise, blind to where q puts mass that no frame covers."""
        bs = max(1, int(self.config.eval_batch))
        was_training = self.gen.training
        self.gen.eval()
        with self.averaged():
            lq = torch.cat([self.gen.log_prob(self.holdout[i:i + bs]) for i in range(0, len(self.holdout), bs)])
        self.gen.train(was_training)
        if self._holdout_u is None:  # the frames are fixed: their energies once per run
            self._holdout_u = torch.cat([self.energy(self.holdout[i:i + bs])
                                         for i in range(0, len(self.holdout), bs)]).double()
        lw = -self._holdout_u - lq.double()
        ok = torch.isfinite(lw)
        nll, var = float(-lq.double()[ok].mean()), float(lw[ok].var())
        if self.writes:
            self.run_dir.log(f"held-out frames at step {self.step}: NLL {nll:.3f}, variance of log w {var:.4f} "
                             f"({int(ok.sum())} frames)")
        return {"nll_holdout": nll, "var_log_w_holdout": var}

    def _holdout_check(self) -> tuple[float, float | None]:
        """Held-out NLL of the generator (its averaged parameters when ``config.ema`` > 0) and of the raw
        parameters (None without an average); keep a copy of the state when it is the lowest so far. Every
        rank computes it on the same frames (no collective)."""
        raw = self._holdout_nll() if self._ema is not None else None
        h = self._holdout or {"best_nll": math.inf, "best_step": None, "best_state": None, "history": []}
        with self.averaged():
            nll = self._holdout_nll()
            if nll < h["best_nll"]:
                h.update(best_nll=nll, best_step=self.step,
                         best_state={k: v.detach().cpu().clone() for k, v in self.gen.state_dict().items()})
        h["history"].append({"step": self.step, "nll": nll, **({} if raw is None else {"nll_raw": raw})})
        self._holdout = h
        if self.writes:
            also = "" if raw is None else f" with the averaged parameters, {raw:.3f} raw"
            self.run_dir.log(f"holdout guard at step {self.step}: NLL of {len(self.holdout)} held-out frames "
                             f"{nll:.3f}{also} (best {h['best_nll']:.3f} at step {h['best_step']})")
        div = self.config.divergence_nats
        if div > 0 and h["best_state"] is not None and not nll <= h["best_nll"] + div:
            self._rollback(h, nll)
        return nll, raw

    @torch.no_grad()
    def _rollback(self, h: dict[str, Any], nll: float) -> None:
        """Maximum likelihood diverged (held-out NLL ``nll`` > best + ``divergence_nats``): back to the best
        state, a fresh Adam, half the learning rate for the rest of the stage; the moving average restarts
        there. Every rank decides alike (same parameters, same frames)."""
        self.gen.load_state_dict(h["best_state"])
        self.optimizer.state.clear()
        self.scheduler.base_lrs = [b * 0.5 for b in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.5
        if self._ema is not None:
            self._ema = {k: p.detach().clone() for k, p in self._ema_named()}
            self._ema_updates = 0
        self.counters.rollbacks += 1
        h["history"][-1]["rolled_back_to"] = h["best_step"]
        if self.writes:
            lr = self.optimizer.param_groups[0]["lr"]
            self.run_dir.log(f"maximum likelihood diverged: held-out NLL {nll:.3f} at step {self.step}, over "
                             f"{self.config.divergence_nats:g} nats above the best {h['best_nll']:.3f} (step "
                             f"{h['best_step']}); restored that state with a fresh optimizer and half the learning "
                             f"rate (now {lr:.3g}) and went on (rollback {self.counters.rollbacks})")
            self.run_dir.update_summary(rollbacks=self.counters.rollbacks)

    def _holdout_restore(self) -> None:
        """End of pre-training: put back the state of lowest held-out NLL (over-fitting undone)."""
        h = self._holdout
        if h and h["best_state"] is not None:
            self._restore_best(h, "holdout_guard", f"holdout guard: restored the generator of step {h['best_step']} "
                               f"(held-out NLL {h['best_nll']:.3f}; later maximum likelihood over-fitted the training frames)")
            h["best_state"] = None  # the stage is over: checkpoints need not carry the copy

    def _warn_slow_bfloat16(self) -> None:
        """Warn (and log) when bfloat16 conditioners would be emulated on this CPU (~5-10x slower than float32)."""
        if self.config.conditioner_dtype != "bfloat16" or self.device.type != "cpu" or cpu_has_native_bfloat16() is not False:
            return
        msg = ("training.conditioner_dtype = 'bfloat16' on a CPU without native bfloat16 (no AVX512-BF16 or AMX "
               "among its flags): torch emulates it, and training steps run ~5x slower than in float32 "
               "(measured: 3.2 s against 0.57 s per step of the tetrapeptide's 8 x 128 flow); "
               "set training.conditioner_dtype=float32 (it may change at a resume)")
        warnings.warn(msg, stacklevel=2)
        if self.writes:
            self.run_dir.log(msg)

    def _guard_check(self) -> None:
        """Kish ESS of ``ess_guard`` samples; keep a copy of the state when it is the best so far.

        Every check draws the same latent variables (common random numbers): the Kish ESS of a sample
        is dominated by its few largest weights, so checks on fresh draws differ by luck (measured on
        alanine dipeptide: 0.03-0.69 between neighbouring checkpoints) and picking their maximum picks
        luck; on common draws neighbouring generators are compared on the same configurations.

        The guard ranks by the Kish ESS of the Pareto-smoothed weights (``core.weights.pareto_smooth``):
        with Pareto k ~0.5 (the peptides) a handful of draws hold most of sum w^2, and which of them a
        sample of 1e5 contains decides its plain Kish ESS (measured on alanine tetrapeptide: one generator's
        guard values 0.27 / 0.31 / 0.21 / 0.15 / 0.15 over 2 000 steps of fine-tuning, and the step it chose
        scored 0.10 on 4e5 other draws against 0.24 for a step it scored 0.15). The plain value and k are
        logged beside it."""
        from ..core.weights import kish_ess, pareto_smooth
        from ..losses.base import sample_stats

        seed = int(self.config.seed) * 7_919 + 1  # the same draws at every check (per rank under DDP)
        g = torch.Generator(device=self.device).manual_seed(_rank_seed(seed, self.dist.rank) if self.dist.active else seed)
        n = int(self.config.ess_guard)
        lo, hi = self.dist.shard(n)  # each rank draws its shard; the ESS is taken over all of them
        lws = []
        was_training = self.gen.training
        self.gen.eval()
        with torch.no_grad(), self.averaged():  # with training.ema the averaged parameters are the stage's result
            for s in range(0, hi - lo, 4096):
                x, log_q = self.gen.sample_and_log_prob(min(4096, hi - lo - s), generator=g)
                lws.append(sample_stats(self.energy(x), log_q)[1])
            best_state = {k: v.detach().cpu().clone() for k, v in self.gen.state_dict().items()}
        self.gen.train(was_training)
        self.counters.energy_evals += n
        if self.dist.active:
            per_rank = self.dist.all_gather_object([t.cpu() for t in lws])
            lws = [t.to(self.device) for rank_lws in per_rank for t in rank_lws]
        lw = torch.cat(lws).detach().cpu().double().numpy() if lws else np.zeros(0)
        smoothed, k = pareto_smooth(lw)  # one Pareto fit gives both the smoothed weights and k
        ess = kish_ess(smoothed) / lw.size if lw.size else 0.0
        raw = kish_ess(lw) / lw.size if lw.size else 0.0
        guard = self._guard or {"best_ess": -1.0, "best_step": None, "best_state": None, "history": []}
        guard["history"].append({"step": self.step, "ess": ess, "ess_raw": raw,
                                 "pareto_k": k if math.isfinite(k) else None})
        if ess > guard["best_ess"]:
            guard.update(best_ess=ess, best_step=self.step, best_state=best_state)
        self._guard = guard
        if self.writes:
            self.run_dir.log(f"ESS guard at step {self.step}: Kish ESS {ess:.4f} of {n} samples, Pareto-smoothed "
                             f"(plain {raw:.4f}, Pareto k {k:.2f}; best {guard['best_ess']:.4f} at step {guard['best_step']})")

    def _skip_finetune(self) -> None:
        """End the run before fine-tuning: the guard's ESS (the same on every rank) is below ``finetune_min_ess``."""
        self.finetune_skipped = True
        ess, floor = self._guard["best_ess"], self.config.finetune_min_ess
        if self.writes:
            self.run_dir.log(f"fine-tuning skipped: Kish ESS {ess:.4f} (Pareto-smoothed) of the maximum-likelihood generator is below "
                             f"training.finetune_min_ess = {floor:g}, where energy-based fine-tuning has lowered the ESS "
                             f"(docs/pipelines.md); to fine-tune anyway: boltzflow train --resume {self.run_dir.path} --set training.finetune_min_ess=0")
            self.run_dir.update_summary(finetune_skipped={"step": self.step, "ess": ess, "finetune_min_ess": floor})

    def _switch_to_fallback(self, log: bool = False) -> None:
        """Below ``finetune_min_ess``: the ``fallback`` stage takes ``finetune``'s place (steps, loss, lr)."""
        cfg = self.config
        self.config = replace(cfg, finetune=cfg.fallback)
        self.fallback_used = True
        self._frame_cdf.pop("finetune", None)
        if cfg.fallback.state_balance > 0 and self.data is not None:
            self._frame_cdf["finetune"] = self._balanced_cdf(cfg.fallback.state_balance, "fallback")
        self.pool = None  # the fallback's loss needs neither (checked in TrainConfig)
        self.buffer = None
        if log and self.writes:
            ess = self._guard["best_ess"]
            fb = cfg.fallback
            self.run_dir.log(f"fine-tuning by the fallback stage: Kish ESS {ess:.4f} (Pareto-smoothed) of the maximum-likelihood generator is "
                             f"below training.finetune_min_ess = {cfg.finetune_min_ess:g}, where {cfg.finetune.loss} has lowered "
                             f"the ESS (docs/pipelines.md); running {fb.steps} steps of {fb.loss} instead")
            self.run_dir.update_summary(finetune_fallback={"step": self.step, "ess": ess, "finetune_min_ess": cfg.finetune_min_ess,
                                                           "loss": fb.loss, "steps": fb.steps})

    def _guard_restore(self) -> None:
        """End of fine-tuning: put back the best state the guard saw."""
        g = self._guard
        if g and g["best_state"] is not None:
            self._restore_best(g, "ess_guard", f"ESS guard: restored the generator of step {g['best_step']} "
                               f"(Kish ESS {g['best_ess']:.4f}; later fine-tuning did not beat it)")

    @torch.no_grad()
    def _warm_restart(self) -> None:
        """At a step of ``finetune.restarts``: the stage starts over from the best state the ESS guard has seen
        (the averaged parameters without a guard), with a fresh Adam and moving average; the schedule's
        warm-up and cosine start over by themselves (``_setup_stage``). Every rank does the same."""
        self._ema_finish(label="the fine-tuning cycle")
        g = self._guard
        if g and g["best_state"] is not None and g["best_step"] != self.step:
            self.gen.load_state_dict(g["best_state"])
        self.optimizer.state.clear()
        if self.writes:
            at = "" if not g else f" from the generator of step {g['best_step']} (Kish ESS {g['best_ess']:.4f})"
            nxt = [r for r in self.config.finetune.restarts if r > self.step - self.config.pretrain.steps]
            end = self.config.pretrain.steps + (nxt[0] if nxt else self.config.finetune.steps)
            self.run_dir.log(f"warm restart of fine-tuning at step {self.step}{at}: a fresh optimizer, warm-up and "
                             f"cosine to step {end}")

    def _restore_best(self, record: dict[str, Any], summary_key: str, message: str) -> None:
        """Load a guard record's best state unless it is the current step's; log ``message`` when it was
        restored and write the record (without the state) under ``summary_key`` in summary.json."""
        restored = record["best_step"] != self.step
        if restored:
            self.gen.load_state_dict(record["best_state"])
        if self.writes:
            if restored:
                self.run_dir.log(message)
            self.run_dir.update_summary(**{summary_key: {**{k: v for k, v in record.items() if k != "best_state"},
                                                         "restored": restored}})

    def _checkpoint(self, t0: float) -> None:
        self.counters.wall_s += time.perf_counter() - t0
        self.save_checkpoint()


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed of rank ``rank``'s own stream, derived from the run's seed (distinct per rank, reproducible);
    ``step`` > 0: the stream of a run resumed at that step on another number of processes."""
    import numpy as np

    key = [int(seed) % 2**63, int(rank)] + ([int(step)] if step else [])
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] % 2**63)


class _StageLoss(torch.nn.Module):
    """The Trainer's loss as a module, so that DistributedDataParallel sees a forward: ``forward(stage)``
    returns ``(backward_loss, LossOutput)`` where backward_loss is the loss, or, when it is not finite,
    ``0 * sum(parameters)`` (every rank must run a backward for DDP's gradient all-reduce)."""

    def __init__(self, trainer: "Trainer"):
        super().__init__()
        self.gen = trainer.gen
        # a weak reference: no sub-module, and no cycle trainer -> DDP -> trainer, so the DDP wrapper (and the
        # process group it holds) goes as soon as the trainer does, not at some later garbage collection after
        # the group is destroyed (a gloo group torn down at interpreter exit aborted the process)
        self._trainer = weakref.ref(trainer)

    def forward(self, stage: str):
        trainer = self._trainer()
        if trainer is None:
            raise RuntimeError("the Trainer of this DDP loss no longer exists")
        out = trainer._loss(stage)
        if bool(torch.isfinite(out.loss)) and out.loss.requires_grad:
            return out.loss, out
        zero = sum((p.sum() * 0.0 for p in self.gen.parameters() if p.requires_grad), torch.zeros((), device=out.loss.device))
        return zero, out


def _wrap_ddp(trainer: "Trainer", dist: DistContext):
    """DistributedDataParallel around the trainer's loss (gloo on CPU, NCCL with one GPU per rank)."""
    from torch.nn.parallel import DistributedDataParallel

    module = _StageLoss(trainer)
    dev = trainer.device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
