"""Training of E(n)-free-form flows on particle systems (DW4, LJ13, LJ55) from reference frames.

:func:`train_freeform` runs Adam on :func:`~boltzflow.flows.freeform.fff_loss` over minibatches of
CoM-free frames ``(n, n_particles, n_spatial)``, with gradient clipping and a one-cycle learning-rate
schedule (draxler2024 C.2.3), into a run directory::

    RUN_DIR/config.toml      the ParticleRunConfig ([generator] kind = "freeform", [training])
    RUN_DIR/checkpoints/latest.pt   model + optimiser + scheduler + RNG state (atomic; resumable)
    RUN_DIR/metrics.jsonl    loss parts, learning rate, wall time every ``log_every`` steps
    RUN_DIR/generator.pt     the trained flow (config + state dict; :func:`load_freeform`)
    RUN_DIR/summary.json     steps, wall and process CPU time (``step_cpu_ms``: CPU time per step, the
                             cost measure that does not depend on what else the machine runs), data size

A killed run continues from its last checkpoint with ``resume=True`` and the same configuration (a
larger ``training.steps`` extends it; the one-cycle schedule then stretches over the new total); the
minibatch stream is drawn from a ``torch.Generator`` saved in the checkpoint, so a resumed run draws
what the uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import dump_toml, from_dict, read_config_data
from ..core.rundir import RunDir
from ..errors import ConfigError, InputError
from ..flows.freeform import FreeFormConfig, FreeFormFlow, fff_loss
from ..systems.particles import PARTICLE_SYSTEMS, particle_target
from .checkpoints import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class FreeFormTrainConfig:
    """Adam on the free-form loss: ``steps`` of minibatch ``batch``, peak learning rate ``lr`` with a
    one-cycle schedule (``schedule = "onecycle"``) or constant (``"constant"``), gradient-norm clip
    ``clip`` (0 = off), checkpoint every ``checkpoint_every`` steps, metrics every ``log_every``."""

    steps: int = 2000
    batch: int = 256
    lr: float = 1e-3
    schedule: str = "onecycle"
    clip: float = 1.0
    checkpoint_every: int = 200
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in ("onecycle", "constant"):
            raise ConfigError(f"training.schedule must be 'onecycle' or 'constant', got {self.schedule!r}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ConfigError("training needs steps >= 1, batch >= 1 and lr > 0")


@dataclass(frozen=True)
class ParticleGeneratorConfig(FreeFormConfig):
    """``[generator]`` of a particle run: ``kind = "freeform"`` (the only kind for particle systems)
    plus the :class:`~boltzflow.flows.freeform.FreeFormConfig` fields."""

    kind: str = "freeform"

    def __post_init__(self):
        super().__post_init__()
        if self.kind != "freeform":
            raise ConfigError(f"particle systems ({', '.join(PARTICLE_SYSTEMS)}) have generator.kind 'freeform', "
                              f"got {self.kind!r}")

    def flow_config(self) -> FreeFormConfig:
        return FreeFormConfig(layers=self.layers, hidden=self.hidden, features=self.features,
                              recon_weight=self.recon_weight, hutchinson=self.hutchinson)


@dataclass(frozen=True)
class ParticleRunConfig:
    """A free-form flow run on a particle system (``boltzflow train dw4 --config fff.toml``):
    ``system`` (dw4 | lj13 | lj55), ``data`` (training frames .npy; "" = ``systems/<system>/reference_train.npy``),
    ``max_samples`` (0 = all), ``dtype``."""

    system: str = "dw4"
    data: str = ""
    max_samples: int = 0
    dtype: str = "float32"
    generator: ParticleGeneratorConfig = field(default_factory=ParticleGeneratorConfig)
    training: FreeFormTrainConfig = field(default_factory=FreeFormTrainConfig)

    def __post_init__(self):
        if self.system not in PARTICLE_SYSTEMS:
            raise ConfigError(f"system must be one of {', '.join(PARTICLE_SYSTEMS)}, got {self.system!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")


def load_particle_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ParticleRunConfig:
    """ParticleRunConfig from a TOML file and dotted-key overrides; unknown keys are an error."""
    return from_dict(ParticleRunConfig, read_config_data(path, overrides))


def particle_shape(system: str) -> tuple[int, int]:
    """``(n_particles, n_spatial)`` of a particle system."""
    t = particle_target(system)
    return int(t.n_particles), int(t.n_spatial)  # type: ignore[attr-defined]


def build_freeform(config: ParticleRunConfig) -> FreeFormFlow:
    n, d = particle_shape(config.system)
    torch.manual_seed(config.training.seed)  # parameter initialisation only
    flow = FreeFormFlow(n, d, config.generator.flow_config())
    return flow.to(getattr(torch, config.dtype))


def default_data_path(system: str) -> Path:
    """``systems/<system>/reference_train.npy`` of the repository (made by scripts/particle_reference.py)."""
    return Path(__file__).resolve().parents[3] / "systems" / system / "reference_train.npy"


def load_frames(path: str | Path, system: str) -> np.ndarray:
    """Frames ``(n, n_particles, n_spatial)`` (or flat ``(n, n d)``) from a .npy file, CoM removed, float64."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"particle data '{p}' not found; make it with `python scripts/particle_reference.py {system}`")
    n, d = particle_shape(system)
    x = np.load(p).astype(np.float64)
    if x.ndim == 2 and x.shape[1] == n * d:
        x = x.reshape(-1, n, d)
    if x.ndim != 3 or x.shape[1:] != (n, d):
        raise InputError(f"'{p}' holds shape {x.shape}; {system} needs (frames, {n}, {d})")
    return x - x.mean(1, keepdims=True)


def save_freeform(path: str | Path, flow: FreeFormFlow, config: ParticleRunConfig) -> None:
    """generator.pt: the run configuration (TOML text) and the flow's state dict."""
    from ..io import atomic_torch_save

    atomic_torch_save(path, {"kind": "freeform", "config_toml": dump_toml(config), "state_dict": flow.state_dict()})


def load_checkpointed(run_dir: str | Path) -> tuple[FreeFormFlow, ParticleRunConfig, int]:
    """(flow in eval mode, config, step) of an unfinished run: config.toml + checkpoints/latest.pt."""
    rd = RunDir(run_dir, create=False)
    if not (rd.config_path.is_file() and (rd.path / "checkpoints" / "latest.pt").is_file()):
        raise InputError(f"'{rd.path}' has neither generator.pt nor a checkpoint of a free-form run")
    config = load_particle_config(rd.config_path)
    state = load_checkpoint(rd.latest_checkpoint)
    flow = build_freeform(config)
    flow.load_state_dict(state["model"])
    return flow.eval(), config, int(state["step"])


def load_freeform(run_dir: str | Path) -> tuple[FreeFormFlow, ParticleRunConfig]:
    """(flow in eval mode, config) from a run directory holding generator.pt (or the file itself)."""
    import tomllib

    p = Path(run_dir)
    p = p / "generator.pt" if p.is_dir() else p
    if not p.is_file():
        raise InputError(f"'{p}' not found; train a free-form flow first (`boltzflow train dw4 -o RUN_DIR`)")
    blob = torch.load(p, map_location="cpu", weights_only=False)
    if blob.get("kind") != "freeform":
        raise InputError(f"'{p}' is not a free-form flow generator")
    config = from_dict(ParticleRunConfig, tomllib.loads(blob["config_toml"]))
    flow = build_freeform(config)
    flow.load_state_dict(blob["state_dict"])
    return flow.eval(), config


def _scheduler(opt, tc: FreeFormTrainConfig):
    if tc.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def train_freeform(config: ParticleRunConfig, run_dir: str | Path, resume: bool = False,
                   data: np.ndarray | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or continue) a free-form flow into ``run_dir``; returns the summary dict. ``data``
    (frames, CoM-free) overrides ``config.data``."""
    rd = RunDir(run_dir)
    say = log or rd.log
    tc = config.training
    if data is None:
        data = load_frames(config.data or default_data_path(config.system), config.system)
    if config.max_samples:
        data = data[: config.max_samples]
    dtype = getattr(torch, config.dtype)
    x_all = torch.as_tensor(data, dtype=dtype)
    flow = build_freeform(config)
    opt = torch.optim.Adam(flow.parameters(), lr=tc.lr)
    sched = _scheduler(opt, tc)
    g = torch.Generator().manual_seed(tc.seed)
    step, wall0, cpu0 = 0, 0.0, 0.0
    ckpt = rd.latest_checkpoint
    if resume:
        if not ckpt.is_file():
            raise InputError(f"'{rd.path}' has no checkpoint to resume from")
        state = load_checkpoint(ckpt)
        flow.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        saved = dict(state["scheduler"])
        if "_schedule_phases" in saved:  # one-cycle: the phases of the (possibly new) total number of steps
            fresh = sched.state_dict()
            saved.update(total_steps=fresh["total_steps"], _schedule_phases=fresh["_schedule_phases"])
        sched.load_state_dict(saved)
        g.set_state(state["rng"])
        step, wall0, cpu0 = int(state["step"]), float(state["wall_s"]), float(state.get("cpu_s", 0.0))
        rd.truncate_metrics(step)
        say(f"resumed at step {step}")
    else:
        rd.write_config(dump_toml(config))
        rd.write_environment()
    t0, c0, step0 = time.perf_counter(), time.process_time(), step

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"model": flow.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "rng": g.get_state(), "step": step,
                               "wall_s": wall0 + time.perf_counter() - t0,
                               "cpu_s": cpu0 + time.process_time() - c0})

    flow.train()
    skipped = 0
    while step < tc.steps:
        idx = torch.randint(0, len(x_all), (tc.batch,), generator=g)
        out = fff_loss(flow.encode, flow.decode, x_all[idx], config.generator.recon_weight, g,
                       config.generator.hutchinson)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(out.loss):
            out.loss.backward()
            if tc.clip > 0:
                torch.nn.utils.clip_grad_norm_(flow.parameters(), tc.clip)
            opt.step()
        else:
            skipped += 1
        sched.step()
        step += 1
        if step % tc.log_every == 0 or step == tc.steps:
            row = {"step": step, "loss": float(out.loss.detach()), "latent": float(out.latent), "recon": float(out.recon),
                   "lr": sched.get_last_lr()[0], "wall_s": round(wall0 + time.perf_counter() - t0, 2)}
            rd.append_metrics(row)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            checkpoint()
    flow.eval()
    save_freeform(rd.path / "generator.pt", flow, config)
    wall, cpu = wall0 + time.perf_counter() - t0, cpu0 + time.process_time() - c0
    summary = rd.update_summary(system=config.system, generator="freeform", training_steps=step,
                                training_wall_s=round(wall, 1), training_cpu_s=round(cpu, 1), n_train=len(x_all),
                                skipped_steps=skipped, energy_evals_training=0,
                                step_ms=round(1000 * wall / max(step, 1), 2),
                                step_cpu_ms=round(1000 * cpu / max(step, 1), 2), threads=torch.get_num_threads(),
                                steps_this_session=step - step0)
    say(f"trained free-form flow on {config.system}: {step} steps, {wall:.0f} s")
    return summary


def nll_of_frames(flow: FreeFormFlow, x: np.ndarray | torch.Tensor, batch: int = 500) -> dict[str, float]:
    """Mean NLL per sample of CoM-free frames in draxler2024's convention (``nll``: without the latent
    normal's constant) and normalised on the CoM-free subspace (``nll_normalized``), with the standard
    error of the mean, and the mean reconstruction error ``|g(f(x)) - x|``."""
    ref = flow._ref
    xt = torch.as_tensor(np.asarray(x), dtype=ref.dtype)
    vals, rec = [], []
    for lo in range(0, len(xt), batch):
        xb = xt[lo:lo + batch]
        vals.append(flow.nll_paper(xb).double())
        with torch.no_grad():
            rec.append((flow.decode(flow.encode(xb)) - (xb - xb.mean(1, keepdim=True))).pow(2).sum((1, 2)).sqrt())
    v = torch.cat(vals)
    const = 0.5 * flow.dof * math.log(2 * math.pi)
    return {"nll": float(v.mean()), "nll_se": float(v.std() / math.sqrt(len(v))),
            "nll_normalized": float(v.mean()) + const, "n": len(v),
            "recon_error": float(torch.cat(rec).double().mean())}


def is_particle_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a free-form particle run (its config.toml has a top-level ``system``)."""
    import tomllib

    p = Path(run_dir) / "config.toml"
    if not p.is_file():
        return False
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError:
        return False
    return data.get("system") in PARTICLE_SYSTEMS and data.get("generator", {}).get("kind") == "freeform"


def sample_particles(run_dir: str | Path, n: int = 10000, seed: int = 1, batch: int = 1000):
    """Draw ``n`` samples of a trained free-form run with exact log q, reduced energies and log weights
    ``-u - log q``; writes ``RUN_DIR/samples/generated.npz`` (a SampleSet with flat positions
    ``(n, n_particles * n_spatial)``, CoM-free) and returns it."""
    from ..core.sampleset import SampleSet

    if n < 1 or batch < 1:
        raise InputError("the number of samples and the batch size must be >= 1")
    rd = RunDir(run_dir, create=False)
    flow, config = load_freeform(rd.path)
    target = particle_target(config.system)
    g = torch.Generator().manual_seed(int(seed))
    t0 = time.perf_counter()
    xs, lqs = [], []
    for lo in range(0, n, batch):
        x, lq = flow.sample_and_log_prob(min(batch, n - lo), g)
        xs.append(x.double())
        lqs.append(lq.double())
    x = torch.cat(xs).reshape(n, -1)
    lq = torch.cat(lqs)
    with torch.no_grad():
        u = target.energy(x)
    wall = time.perf_counter() - t0
    trained = rd.read_summary()
    s = SampleSet(positions=x.numpy(), reduced_energy=u.numpy(), log_q=lq.numpy(), log_weights=(-u - lq).numpy(),
                  provenance={"sampler": "flow:freeform", "system": config.system, "run_dir": str(rd.path),
                              "energy_evals": n, "wall_s": wall, "seed": seed,
                              "training_energy_evals": trained.get("energy_evals_training"),
                              "training_wall_s": trained.get("training_wall_s")})
    s.save(rd.samples_dir / "generated.npz")
    return s
