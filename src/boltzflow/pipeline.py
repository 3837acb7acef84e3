"""End-to-end workflow: train a generator for a system, sample it, reweight, report.

This is the Python API behind ``boltzflow train``, ``sample`` and ``demo``; every function takes
plain objects and writes into a run directory (:class:`boltzflow.core.rundir.RunDir`)::

    from boltzflow.pipeline import RunConfig, train, sample, estimate
    from boltzflow.systems.builtin import builtin_system
    system = builtin_system("alanine-dipeptide")
    train(system, RunConfig(), "runs/adp")        # pre-train on reference data, fine-tune data-free
    gen_samples = sample("runs/adp", n=20000)      # SampleSet with log q, u and log weights
    print(estimate("runs/adp")["phi_positive"])    # reweighted population with error bar

A killed ``train`` continues with ``train(..., resume=True)`` (CLI: ``boltzflow train --resume RUN_DIR``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import dump_toml, from_dict, merge_dicts, read_config_data, to_dict
from .errors import ConfigError, InputError
from .io import atomic_write
from .sampling.mcmc_config import MCMC_METHODS, MCMCConfig


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def _generator_config_cls():
    from .flows.generator import GeneratorConfig

    return GeneratorConfig


def _train_config_cls():
    from .training.trainer import TrainConfig

    return TrainConfig


@dataclass(frozen=True)
class EnergyConfig:
    """Target energy. backend: "auto" (native torch when supported), "native" or "openmm";
    platform / n_workers: OpenMM bridge options; term_grad_max: per-term gradient cap (kT/nm, 0 = off);
    energy_max: log-linear cap of u above this many kT (0 = off)."""

    backend: str = "auto"
    platform: str = "CPU"
    n_workers: int = 1
    term_grad_max: float = 0.0
    energy_max: float = 0.0


DATA_SOURCES = ("reference", "tempering")


def _tempering_config_cls():
    from .training.tempering import TemperingConfig

    return TemperingConfig


@dataclass(frozen=True)
class DataConfig:
    """Training data. source: "reference" (frames from ``reference``) or "tempering" (no reference:
    batched parallel tempering with the target energy from the system's input structure, configured by
    the ``[tempering]`` table; the energy-trained route, every evaluation counted).
    reference: a SampleSet .npz ("" = the system's shipped reference_300K.npz);
    max_samples: use at most this many frames (0 = all); holdout: fraction kept out for evaluation
    (its log-likelihood is reported after training).

    md_frames > 0 replaces the training frames by Langevin frames at the system temperature, run with
    the target energy from every training frame (:mod:`boltzflow.training.augment`): md_frames
    frames per start, md_burnin steps before the first and md_stride steps between them, timestep
    md_timestep_fs (fs), friction md_friction (1/ps). md_temperatures (K): further temperatures at
    which every start is grown as well (the same number of frames each), for broader data: maximum
    likelihood on frames that cover the tails and the minor states better gives a generator with
    lighter-tailed weights (the samples are reweighted to the system temperature afterwards, so the
    data need not carry its exact populations). Counted in the training cost (energy evaluations,
    wall time). A few thousand frames are far too few for maximum likelihood (the flow over-fits);
    see docs/pipelines.md, "Training data".

    extra: further training frames, SampleSet .npz files of this system (e.g. Langevin frames started from a
    generator's heaviest draws), added to the training frames after the held-out split (never held out) and
    counted in the training cost by their provenance (``energy_evals``, ``wall_s``). The energy-weighted losses
    (``logvar_data``, ``chi2_data``) need frames that cover the Boltzmann distribution, not frames drawn from
    it, so frames added where the generator is too thin sharpen the fit there; maximum likelihood would fit
    their distribution instead."""

    source: str = "reference"
    reference: str = ""
    max_samples: int = 0
    holdout: float = 0.1
    md_frames: int = 0
    md_burnin: int = 400
    md_stride: int = 50
    md_timestep_fs: float = 1.0
    md_friction: float = 5.0
    md_temperatures: tuple[float, ...] = ()
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}")
        if any(not float(t) > 0 for t in self.md_temperatures):
            raise ConfigError(f"data.md_temperatures must be temperatures in K (> 0), got {list(self.md_temperatures)}")

    def augment_config(self):
        from .training.augment import LangevinAugmentConfig

        return LangevinAugmentConfig(frames_per_start=self.md_frames, burnin=self.md_burnin, stride=self.md_stride,
                                     timestep_fs=self.md_timestep_fs, friction_per_ps=self.md_friction)


@dataclass(frozen=True)
class SampleConfig:
    """Sampling after training: n samples in batches of batch_size; mcmc: flow-MCMC on top of the
    flow's draws (``[sampling.mcmc]``, :class:`~boltzflow.sampling.mcmc_config.MCMCConfig`; method
    "none" = plain reweighting)."""

    n: int = 20000
    batch_size: int = 2000
    mcmc: MCMCConfig = field(default_factory=MCMCConfig)


def _default_generator():
    """The unbiased pipeline by default: heavy atoms in internal coordinates plus the conditional
    hydrogen flow (exact all-atom density, so reweighting targets p_B; see docs/pipelines.md)."""
    from dataclasses import replace

    return replace(_generator_config_cls()(), pipeline="conditional", representation="internal")


def _default_training():
    """Trainer defaults, with the generator's penalty (alignment for Cartesian heavy atoms, which
    already carries lambda_align) switched on in both stages."""
    from dataclasses import replace

    tc = _train_config_cls()()
    return replace(tc, pretrain=replace(tc.pretrain, penalty_weight=1.0),
                   finetune=replace(tc.finetune, penalty_weight=1.0))


@dataclass(frozen=True)
class HydrogenConfig:
    """Training of the hydrogen placement network (pipeline "hnet" only), before the flow:
    steps of Adam (batch, lr) minimising u(x_C, h(x_C)) over reference heavy-atom configurations."""

    steps: int = 500
    batch: int = 64
    lr: float = 3e-4


@dataclass(frozen=True)
class RunConfig:
    """Everything `boltzflow train` needs. device: "auto" (CUDA when available) | "cpu" | "cuda";
    dtype: "float32" | "float64"; recipe: the shipped recipe the configuration started from ("" = none;
    provenance only, set by :func:`load_run_config`); init: a trained generator to start from instead of
    random weights (its run directory, a shipped generator directory or its generator.pt; made for the
    same system with the same ``[generator]`` settings, the seed aside), e.g. to continue maximum
    likelihood on new frames ("" = random initialisation)."""

    seed: int = 0
    recipe: str = ""
    init: str = ""
    device: str = "auto"
    dtype: str = "float32"
    generator: Any = field(default_factory=_default_generator)
    training: Any = field(default_factory=_default_training)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    hydrogen: HydrogenConfig = field(default_factory=HydrogenConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SampleConfig = field(default_factory=SampleConfig)
    tempering: Any = field(default_factory=lambda: _tempering_config_cls()())


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """RunConfig from a nested dict (TOML); unknown keys anywhere are an error."""
    data = dict(data)
    sub = {}
    if "generator" in data:
        sub["generator"] = from_dict(_generator_config_cls(), merge_dicts(to_dict(_default_generator()),
                                                                         data.pop("generator")), "generator")
    if "tempering" in data:
        sub["tempering"] = from_dict(_tempering_config_cls(), data.pop("tempering"), "tempering")
    if "training" in data:  # partial tables override the pipeline's training defaults
        sub["training"] = from_dict(_train_config_cls(), merge_dicts(to_dict(_default_training()), data.pop("training")),
                                    "training")
    base = from_dict(RunConfig, data)
    from dataclasses import replace

    return replace(base, **sub)


def load_run_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                    recipe: str | None = None, system=None) -> RunConfig:
    """Defaults, updated by a named recipe (:mod:`boltzflow.recipes`: "energy", "data", "peptide", or "auto":
    "data" when the TOML or overrides name reference frames, else "peptide" for a peptide ``system`` and
    "energy" otherwise; None or "none": no recipe), a TOML file and dotted-key overrides
    (``{"training.finetune.steps": 10}``), in that order."""
    from .recipes import recipe_data, resolve

    data = read_config_data(path, overrides)
    name = resolve(recipe, data, system)
    if name:
        data = merge_dicts(recipe_data(name), data)
        data.setdefault("recipe", name)
    return run_config_from_dict(data)


def recipe_config(name: str, overrides: dict[str, Any] | None = None, system=None) -> RunConfig:
    """The RunConfig of a named recipe ("energy": from the input structure alone; "data": maximum
    likelihood on reference frames; "peptide"; "auto" resolved for ``system``), with optional dotted-key
    overrides."""
    return load_run_config(None, overrides, recipe=name, system=system)


def default_config_toml() -> str:
    return dump_toml(RunConfig())


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def _dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "float64": torch.float64}[name]
    except KeyError:
        raise InputError(f"dtype must be 'float32' or 'float64', got {name!r}") from None


def make_energy(system, cfg: EnergyConfig, device=None, dtype=None):
    """The target energy module for training/sampling, on ``device``."""
    from .energy import Energy, EnergyCap

    cap = EnergyCap(term_grad_max=cfg.term_grad_max or None, energy_max=cfg.energy_max or None)
    opts: dict[str, Any] = {}
    if cfg.backend == "openmm":
        opts = {"platform": cfg.platform, "n_workers": cfg.n_workers}
    energy = Energy(system, backend=cfg.backend, cap=cap if cap.active else None, **opts)
    if device is not None and hasattr(energy, "to") and cfg.backend != "openmm":
        energy = energy.to(device=device)
    return energy


def load_reference(system, cfg: DataConfig):
    """The reference SampleSet for training (positions (n, n_atoms, 3) nm)."""
    from .sampling import SampleSet

    if cfg.reference:
        path = Path(cfg.reference)
    else:
        from .systems.builtin import builtin_dir

        try:
            path = builtin_dir(system.name) / "reference_300K.npz"
        except Exception as e:
            raise InputError(f"system {system.name!r} ships no reference data; pass data.reference = PATH "
                             "(a SampleSet .npz, e.g. from `boltzflow simulate`)") from e
    ref = SampleSet.load(path)
    system.check_coordinates(ref.positions, what=f"reference data '{path}'")
    if ref.temperature is not None and abs(ref.temperature - system.temperature) > 1e-6:
        raise InputError(f"reference data '{path}' is at {ref.temperature} K but the system is at "
                         f"{system.temperature} K")
    if cfg.max_samples and len(ref) > cfg.max_samples:
        idx = np.linspace(0, len(ref) - 1, cfg.max_samples).astype(int)
        ref = ref.subset(idx)
    return ref, path


def _split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    k = int(round(n * holdout))
    return np.sort(perm[k:]), np.sort(perm[:k])


# ---------------------------------------------------------------------------------------------
# train / sample / estimate
# ---------------------------------------------------------------------------------------------
def build(system, config: RunConfig, data_positions=None):
    """(generator, energy) for ``system`` on the configured device; ``data_positions`` (n, n_atoms, 3)
    nm fit data-dependent parts (internal-coordinate standardisation)."""
    import torch

    from .flows.generator import build_generator

    device, dtype = resolve_device(config.device), _dtype(config.dtype)
    torch.manual_seed(config.seed)  # parameter initialisation only; training draws from its own generator
    gen = build_generator(system, config.generator, data_positions).to(device=device, dtype=dtype)
    energy = make_energy(system, config.energy, device=device, dtype=dtype)
    return gen, energy


def train(system, config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool | None = None,
          max_steps: int | None = None, dist=None) -> dict[str, Any]:
    """Pre-train on reference data (KLz), then fine-tune data-free, in ``run_dir``.

    Writes config.toml, environment.json, system/, checkpoints/, metrics.jsonl, generator.pt and
    summary.json. With ``resume=True`` continues from the last checkpoint (same parameters as an
    uninterrupted run). Returns the summary dict.

    dist: a :class:`boltzflow.distributed.DistContext` (default: the initialised process group, if any):
    every rank calls ``train`` with the same arguments; the generator is trained data-parallel
    (:class:`boltzflow.training.trainer.Trainer`), rank 0 alone writes ``run_dir`` and builds cached
    training data (tempering, Langevin frames) that the other ranks then read."""
    import torch

    from . import distributed
    from .core.rundir import RunDir
    from .training.trainer import Trainer

    dist = dist or distributed.current()
    init_src = _init_source(system, config) if config.init and not resume else None  # checked before any data
    extra_x, extra_info = _extra_frames(system, config.data)
    rd = RunDir(run_dir)
    if resume and not rd.latest_checkpoint.is_file():
        raise InputError(f"nothing to resume in '{rd.path}' (no checkpoints/latest.pt); start without --resume")
    if not resume and rd.latest_checkpoint.is_file():
        raise InputError(f"'{rd.path}' already holds a training run; use --resume to continue it or choose a new -o")
    dist.barrier()  # every rank has looked before rank 0 writes
    log = rd.log if dist.is_main else (lambda message: None)
    if dist.is_main:
        rd.write_config(dump_toml(config))
        rd.write_environment()
        system.save(rd.system_dir)
    tempering = None
    if config.data.source == "tempering":
        ref, ref_path, tempering = _tempering_data(system, config, rd, dist, log)
    else:
        ref, ref_path = load_reference(system, config.data)
    train_idx, test_idx = _split(len(ref), config.data.holdout, config.seed)
    train_x, aug = ref.positions[train_idx], None
    if config.data.md_frames > 0:
        train_x, aug = distributed.rank0_first(
            dist, lambda: _augmented_data(system, config, rd, train_x, ref.reduced_energy, train_idx))
    if len(extra_x):
        train_x = np.concatenate([np.asarray(train_x, dtype=np.float32), extra_x])
        log(f"added {len(extra_x)} training frames from data.extra ({', '.join(config.data.extra)})")
    train_x, n_other = _keep_isomer(system, config, train_x)
    if n_other:
        log(f"dropped {n_other} training frames of another isomer (generator.fixed_torsions = "
            f"'{config.generator.fixed_torsions}': cis/trans amide or handedness unlike the input structure)")
    gen, energy = build(system, config, train_x)
    if init_src is not None:  # a resume restores the weights from its checkpoint
        _load_init(gen, init_src, config.init)
        log(f"starting from the weights of {config.init}")
    device, dtype = resolve_device(config.device), _dtype(config.dtype)
    data = torch.as_tensor(train_x, dtype=dtype, device=device)
    ranks = f" x {dist.world_size} ranks ({dist.backend}, data-parallel)" if dist.active else ""
    log(f"{'resuming' if resume else 'starting'} training of {system.name} on {device}{ranks} "
        f"({len(train_x)} training frames from {ref_path}"
        f"{f', Langevin from {len(train_idx)} reference frames' if aug else ''})")
    if config.recipe == "peptide" and not dist.active and not resume:
        log("the peptide recipe is sized for both cores of a 2-core machine (~5 h for the alanine tetrapeptide); "
            "one process takes 1.5-2x as long per step: `torchrun --nproc_per_node 2 -m boltzflow train ...` "
            "shares the steps, and `boltzflow train --resume RUN` can move a run onto two ranks (docs/scaling.md)")
    if config.generator.pipeline == "hnet" and not resume and config.hydrogen.steps > 0:
        from .training.hydrogen import train_hydrogen_net

        losses = train_hydrogen_net(gen.hnet, energy, data, steps=config.hydrogen.steps, batch=config.hydrogen.batch,
                                    lr=config.hydrogen.lr, seed=config.seed)
        log(f"hydrogen placement network: mean u {losses[0]:.2f} -> {losses[-1]:.2f} kT "
            f"over {config.hydrogen.steps} steps")
    holdout = _keep_isomer(system, config, ref.positions[test_idx])[0]
    trainer = Trainer(gen, energy, _effective_training(config.training, gen), run_dir=rd, data=data, modes=system.modes,
                      progress=progress, dist=dist,
                      holdout=torch.as_tensor(holdout, dtype=dtype, device=device) if len(holdout) else None)
    t0 = time.time()
    summary = trainer.run(resume=resume, max_steps=max_steps)
    if not dist.is_main:
        dist.barrier()  # rank 0 writes generator.pt and the summary
        return rd.read_summary()
    try:
        return _finish_training(system, config, rd, gen, trainer, summary, ref, ref_path, test_idx, data, aug,
                                tempering, extra_info, t0)
    finally:
        dist.barrier()


def _init_source(system, config: "RunConfig"):
    """The generator at ``config.init``, checked against ``config.generator`` before any training data is made:
    InputError unless every [generator] setting is the same (``blocks`` may be larger here: growth; ``base_tail``,
    which has no weights, may differ)."""
    from .flows.generator import load_generator

    init = config.init
    path = Path(init).expanduser()
    path = path / "generator.pt" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"init: no trained generator at '{init}' (expected a run directory with generator.pt, "
                         "or a generator.pt file)")
    src = load_generator(path, system)
    mine, theirs = to_dict(config.generator), to_dict(src.config)
    differ = sorted(k for k in set(mine) | set(theirs) if k not in ("seed", "base_tail") and mine.get(k) != theirs.get(k))
    if differ and not (differ == ["blocks"] and int(mine["blocks"]) > int(theirs["blocks"])):
        raise InputError(f"init: the generator at '{init}' has other [generator] settings ("
                         + ", ".join(f"{k} = {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in differ)
                         + "); set them to its values (generator.blocks may be larger: the added couplings start "
                         "as the identity) or start from random weights")
    return src


def _load_init(gen, src, init: str) -> None:
    """Copy the weights (and internal-coordinate standardisation) of ``src`` (from :func:`_init_source`) into
    ``gen``, growing it when ``gen`` has more blocks."""
    if int(gen.config.blocks) > int(src.config.blocks):
        _grow_from(gen, src, init)
        return
    gen.load_state_dict(src.state_dict())


def _extra_frames(system, cfg: DataConfig) -> tuple[np.ndarray, list[dict[str, Any]] | None]:
    """The frames of ``cfg.extra`` ((n, n_atoms, 3) float32 nm, all files joined) and one record per file
    (path, frames, temperature_k, energy_evals and wall_s from its provenance); ``(empty, None)`` without any.
    Frames at any temperature are accepted: the energy-weighted losses need frames that cover p."""
    from .sampling import SampleSet

    xs, info = [], []
    for f in cfg.extra:
        path = Path(f).expanduser()
        if not path.is_file():
            raise InputError(f"data.extra: no file '{f}' (expected a SampleSet .npz of this system's frames)")
        s = SampleSet.load(path)
        system.check_coordinates(s.positions, what=f"data.extra '{f}'")  # any temperature: they need only cover p
        xs.append(np.asarray(s.positions, dtype=np.float32))
        prov = s.provenance or {}
        info.append({"path": str(f), "frames": int(len(s)), "temperature_k": s.temperature,
                     "energy_evals": int(prov.get("energy_evals") or 0), "wall_s": float(prov.get("wall_s") or 0.0)})
    if not xs:
        return np.zeros((0, system.n_atoms, 3), dtype=np.float32), None
    return np.concatenate(xs), info


def _grow_from(gen, src, init: str) -> None:
    """Load ``src`` (a generator with fewer main-flow ``blocks``) into ``gen``: its couplings take ``src``'s
    weights and the couplings ``gen`` appends at the data end stay as built, the identity (zero last layers), so
    ``gen`` starts as the same density with more couplings to train."""
    import torch

    missing, unexpected = gen.load_state_dict(src.state_dict(), strict=False)
    n_old: dict[str, int] = {}
    for prefix, i in _flow_layers(src):
        n_old[prefix] = max(n_old.get(prefix, 0), i + 1)
    new = {f"{prefix}.{i}." for prefix, i in _flow_layers(gen) if i >= n_old.get(prefix, 0)}
    stray = [k for k in missing if not any(k.startswith(p) for p in new)]
    if unexpected or stray:
        raise InputError(f"init: cannot grow the generator at '{init}' into this one (keys it lacks: {stray[:3]}, "
                         f"keys this one lacks: {unexpected[:3]}); start from random weights")
    with torch.no_grad():  # the grown generator must be the same density: check it on draws of the original
        x, _ = src.sample_and_log_prob(64, generator=torch.Generator().manual_seed(0))
        gap = float((gen.log_prob(x).double() - src.log_prob(x).double()).abs().max())
    if not gap < 1e-3:
        raise InputError(f"init: growing the generator at '{init}' changed its density (by up to {gap:.3g} nats); "
                         "start from random weights or keep its generator.blocks")


def _flow_layers(gen):
    """(prefix, index) of every coupling of a generator's flows, e.g. ("all_flow.bijection.layers", 8)."""
    import re

    seen = set()
    for k in gen.state_dict():
        m = re.match(r"(.*\.bijection\.layers)\.(\d+)\.", k)
        if m and (m.group(1), int(m.group(2))) not in seen:
            seen.add((m.group(1), int(m.group(2))))
            yield m.group(1), int(m.group(2))


def _summary_of(run_dir: Path) -> dict[str, Any] | None:
    """A run (or shipped generator) directory's summary.json, or None without one."""
    import json

    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def _trained_cost(run_dir: Path) -> dict[str, Any] | None:
    """``{"energy_evals", "wall_s"}`` a trained run (or shipped generator) directory's summary.json records for
    its training, or None without a summary."""
    s = _summary_of(run_dir)
    if s is None:
        return None
    return {"energy_evals": int(s.get("energy_evals_training") or 0), "wall_s": float(s.get("training_wall_s") or 0.0)}


def _init_dir(init: str) -> Path:
    """The directory of the ``init`` generator (a run directory or its generator.pt)."""
    path = Path(init).expanduser()
    return path if path.is_dir() else path.parent


def _init_cost(init: str) -> dict[str, Any]:
    """What training the ``init`` generator cost, added to this run's: ``{"path", "energy_evals", "wall_s"}``
    (zeros, with ``"unknown": True``, when it has no summary.json next to its generator.pt)."""
    cost = _trained_cost(_init_dir(init))
    return {"path": str(init), **(cost or {"energy_evals": 0, "wall_s": 0.0, "unknown": True})}


def _init_data(init: str) -> dict[str, Any]:
    """The ``data_tempering`` / ``data_augmentation`` / ``data_extra`` records of the ``init`` generator's summary.json
    (empty without one): frames it was trained on, whose cost its own cost already holds."""
    s = _summary_of(_init_dir(init)) or {}
    return {k: s[k] for k in ("data_tempering", "data_augmentation", "data_extra") if s.get(k)}


def _data_cost(aug: dict | None, tempering: dict | None, init: dict | None,
               init_data: dict[str, Any], extra: list[dict] | None = None) -> tuple[int, float]:
    """(energy evaluations, wall s) a run's training data and its ``init`` generator cost, each counted once:
    Langevin growth (``aug``), tempering frames or ``data.extra`` files (``extra``: one record per file) the init
    generator was itself trained on (``init_data``, from :func:`_init_data`) are already inside the init's cost."""
    own = [d for d, key in ((aug, "data_augmentation"), (tempering, "data_tempering")) if d and init_data.get(key) != d]
    own += [d for d in extra or () if d not in (init_data.get("data_extra") or ())]
    parts = [*own, init] if init else own
    return sum(int(d["energy_evals"]) for d in parts), sum(float(d["wall_s"]) for d in parts)


def _finish_training(system, config, rd, gen, trainer, summary, ref, ref_path, test_idx, data, aug, tempering,
                     extra, t0) -> dict[str, Any]:
    """Rank 0's end of :func:`train`: generator.pt, held-out log-likelihood, summary.json."""
    from .flows.generator import save_generator

    finished = trainer.finished
    with trainer.averaged():  # stopped during maximum likelihood with training.ema: the averaged parameters
        save_generator(rd.path / "generator.pt", gen)
        fit = _fit_report(gen, data, _keep_isomer(system, config, ref.positions[test_idx])[0], config)
    rd.log(f"training {'finished' if finished else 'stopped'} at step {trainer.step} after {time.time() - t0:.1f} s")
    ref_modes = None
    if system.modes is not None:
        ref_modes = system.modes.fractions(ref.positions)
    rd.log("log-likelihood per frame: training data {train:.2f}, held-out reference frames {holdout:.2f} "
           "(a large gap means over-fitting)".format(**fit) if fit else "no held-out frames")
    init = _init_cost(config.init) if config.init else None
    data_evals, data_wall = _data_cost(aug, tempering, init, _init_data(config.init) if config.init else {}, extra)
    rd.update_summary(init=init, system=system.name, temperature_k=system.temperature, pipeline=config.generator.pipeline,
                      recipe=config.recipe, training_steps=trainer.step, training_finished=finished,
                      reference_path=str(ref_path), reference_mode_fractions=ref_modes,
                      energy_evals_training=int(trainer.counters.energy_evals) + data_evals,
                      training_wall_s=float(trainer.counters.wall_s) + data_wall,
                      data_augmentation=aug, data_tempering=tempering, data_extra=extra, log_likelihood=fit,
                      skipped_steps=int(trainer.counters.skipped_steps), training=summary)
    return rd.read_summary()


def _keep_isomer(system, config: RunConfig, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Frames of x in the isomer the generator models (:meth:`MolecularGenerator.same_isomer`) and how
    many were dropped; all of them when the generator fixes no torsions."""
    if config.generator.fixed_torsions == "none" or len(x) == 0:
        return x, 0
    from .flows.generator import MolecularGenerator

    keep = MolecularGenerator(system, config.generator).same_isomer(x)
    return x[keep], int((~keep).sum())


def native_energy_and_isomer(system):
    """(energy, keep) for runs of the native batched energy outside training (``boltzflow simulate
    --method native-tempering``): the system's native energy (``(b, n_atoms, 3) nm -> (b,)`` kT;
    :class:`~boltzflow.energy.UnsupportedForceError` names a force it lacks) and ``keep(x) -> (n,) bool``,
    the frames in the input structure's isomer (what a generator with ``fixed_torsions = "isomer"``
    models; all frames for a system without internal coordinates)."""
    from dataclasses import replace

    from .flows.generator import GeneratorConfig, MolecularGenerator

    energy = make_energy(system, replace(EnergyConfig(), backend="native", term_grad_max=0.0, energy_max=0.0))
    gen = MolecularGenerator(system, GeneratorConfig(pipeline="internal-all", fixed_torsions="isomer", blocks=1,
                                                     hidden=8, depth=1))
    return energy, gen.same_isomer


def _effective_training(tc, gen):
    """The training configuration with the penalty weights zeroed when the generator has no penalty
    (internal coordinates): the losses would otherwise draw a batch from the flow every step only to
    add 0 (about a third of a KLz step)."""
    from dataclasses import replace

    if getattr(gen, "has_penalty", True):
        return tc
    return replace(tc, pretrain=replace(tc.pretrain, penalty_weight=0.0), finetune=replace(tc.finetune, penalty_weight=0.0))


def _tempering_data(system, config: RunConfig, rd, dist=None, log=None):
    """Training frames from the energy alone (``data.source = "tempering"``): batched parallel tempering
    from the system's input structure (:mod:`boltzflow.training.tempering`), cached in the run directory
    (``data/tempering.npz``) so a resumed run trains on the same frames. Returns (SampleSet, path, info).

    Under torchrun (``dist`` active; every rank calls this) the ladders are shared out: rank r runs its
    :func:`~boltzflow.distributed.shard_bounds` share of ``tempering.ladders`` with seed ``tempering.seed +
    100003 r`` and writes ``data/tempering.part-R-of-N.npz``; rank 0 joins the parts in rank order into
    ``tempering.npz`` (energy evaluations summed, wall time the slowest rank's) and every rank reads it."""
    from dataclasses import replace

    import torch

    from .distributed import SINGLE
    from .sampling import SampleSet
    from .training.tempering import parallel_tempering

    dist = dist or SINGLE
    log = log or rd.log
    path = rd.path / "data" / "tempering.npz"
    dist.barrier()  # a rank that finds the cache finds it on every rank
    if path.is_file():
        data = SampleSet.load(path)
        return data, path, dict(data.provenance.get("tempering", {}))
    tc = config.tempering
    lo, hi = dist.shard(tc.ladders)
    if hi <= lo:
        raise InputError(f"{dist.world_size} ranks share {tc.ladders} tempering ladders: give every rank at least one "
                         f"(tempering.ladders >= {dist.world_size}) or launch fewer ranks")
    part_cfg = replace(tc, ladders=hi - lo, seed=tc.seed + 100003 * dist.rank) if dist.active else tc
    device = resolve_device(dist.device if dist.active else config.device)
    energy = make_energy(system, replace(config.energy, term_grad_max=0.0, energy_max=0.0), device=device)
    x0 = torch.as_tensor(np.array(system.positions, dtype=np.float64), device=device)
    log(f"parallel tempering from the input structure: {tc.ladders} ladders x {tc.replicas} temperatures "
        f"({system.temperature:g} - {tc.t_max:g} K), {tc.rounds} rounds of {tc.steps_per_swap} steps"
        + (f", shared by {dist.world_size} ranks" if dist.active else ""))
    err = None
    try:
        res = parallel_tempering(energy, x0, system.masses, system.kT, system.temperature, part_cfg,
                                 dtype=_dtype(config.dtype))
    except Exception as e:  # re-raised below, after telling the other ranks
        if not dist.active:
            raise
        err, res = e, None
    if dist.active and not dist.all_true(err is None):
        if err is not None:
            raise err
        raise InputError("parallel tempering failed on another rank (its message is in that rank's output)")
    part = {"positions": res.positions, "reduced_energy": res.reduced_energy, "energy_evals": int(res.energy_evals),
            "wall_s": float(res.wall_s), "reset_chains": int(res.reset_chains), "ladders": hi - lo,
            "swap_acceptance": [float(a) for a in res.swap_acceptance]}
    if dist.active:
        part_path = path.with_name(f"tempering.part-{dist.rank:03d}-of-{dist.world_size:03d}.npz")
        part_path.parent.mkdir(parents=True, exist_ok=True)
        SampleSet(res.positions, res.reduced_energy, None, None, system.temperature,
                  {"sampler": "parallel-tempering part", "part": {k: v for k, v in part.items()
                                                                  if k not in ("positions", "reduced_energy")}}
                  ).save(part_path)
        dist.barrier()
        if dist.is_main:
            sets = [SampleSet.load(path.with_name(f"tempering.part-{r:03d}-of-{dist.world_size:03d}.npz"))
                    for r in range(dist.world_size)]
            meta = [s.provenance["part"] for s in sets]
            n_lad = np.array([m["ladders"] for m in meta], dtype=np.float64)
            part = {"positions": np.concatenate([s.positions for s in sets]),
                    "reduced_energy": np.concatenate([s.reduced_energy for s in sets]),
                    "energy_evals": int(sum(m["energy_evals"] for m in meta)),
                    "wall_s": float(max(m["wall_s"] for m in meta)),
                    "reset_chains": int(sum(m["reset_chains"] for m in meta)),
                    "swap_acceptance": [float(v) for v in np.average(
                        np.array([m["swap_acceptance"] for m in meta]), axis=0, weights=n_lad)]}
    if dist.is_main:
        info = {"frames": int(len(part["positions"])), "energy_evals": part["energy_evals"], "wall_s": part["wall_s"],
                "reset_chains": part["reset_chains"], "temperatures_k": [float(t) for t in res.temperatures],
                "swap_acceptance": part["swap_acceptance"], "mean_u": float(np.mean(part["reduced_energy"])),
                "config": to_dict(tc), "ranks": dist.world_size}
        data = SampleSet(part["positions"], part["reduced_energy"], None, None, system.temperature,
                         {"sampler": "parallel-tempering (boltzflow.training.tempering)",
                          "energy_evals": info["energy_evals"], "wall_s": info["wall_s"], "tempering": info})
        path.parent.mkdir(parents=True, exist_ok=True)
        data.save(path)
        for r in range(dist.world_size if dist.active else 0):
            path.with_name(f"tempering.part-{r:03d}-of-{dist.world_size:03d}.npz").unlink(missing_ok=True)
        acc = info["swap_acceptance"]
        log(f"parallel tempering: {info['frames']} frames at {system.temperature:g} K"
            f"{' and the next ' + str(tc.keep_replicas - 1) + ' temperature(s)' if tc.keep_replicas > 1 else ''} in "
            f"{info['wall_s']:.1f} s ({info['energy_evals']} energy evaluations; swap acceptance "
            f"{min(acc, default=1):.2f}-{max(acc, default=1):.2f}; {info['reset_chains']} chains reset); mean u "
            f"{info['mean_u']:.2f} kT")
    dist.barrier()  # tempering.npz is written
    data = SampleSet.load(path)
    return data, path, dict(data.provenance.get("tempering", {}))


def _augmented_data(system, config: RunConfig, rd, x_train: np.ndarray, ref_u, train_idx):
    """Langevin frames from the training frames (``config.data.md_*``), cached in the run directory
    (``data/augmented.npz``) so a resumed run trains on the same frames. Returns (positions, info)."""
    import json
    from dataclasses import replace

    import torch

    from .training.augment import langevin_augment

    path = rd.path / "data" / "augmented.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["positions"], json.loads(str(f["info"]))
    device = resolve_device(config.device)
    energy = make_energy(system, replace(config.energy, term_grad_max=0.0, energy_max=0.0), device=device)
    g = torch.Generator(device=device).manual_seed(int(config.seed) + 7919)
    x0 = torch.as_tensor(np.asarray(x_train), dtype=_dtype(config.dtype), device=device)
    t0 = float(system.temperature)
    positions, per_t, evals, wall, dropped = [], [], 0, 0.0, 0
    for temp in (t0, *(float(t) for t in config.data.md_temperatures)):
        # at temperature T: energy u * T0 / T in units of kT(T) = kT * T / T0, so the forces stay
        # -grad U and the noise is that of T
        scale = t0 / temp
        res = langevin_augment((lambda x, s=scale: energy(x) * s) if scale != 1.0 else energy, x0, system.masses,
                               system.kT / scale, config.data.augment_config(), generator=g, dtype=_dtype(config.dtype))
        positions.append(res.positions)
        evals, wall, dropped = evals + int(res.energy_evals), wall + float(res.wall_s), dropped + int(res.dropped_chains)
        per_t.append({"temperature_k": temp, "frames": int(len(res.positions)),
                      "mean_u": float(np.mean(res.reduced_energy) / scale) if len(res.positions) else None})
    pos = np.concatenate(positions)
    if len(pos) == 0:
        raise InputError("Langevin augmentation dropped every chain (non-finite energies); check the reference data")
    u_ref = None if ref_u is None else float(np.mean(np.asarray(ref_u)[train_idx]))
    info = {"starts": int(len(x_train)), "frames": int(len(pos)), "energy_evals": evals,
            "wall_s": wall, "dropped_chains": dropped,
            "mean_u_reference": u_ref, "mean_u_langevin": per_t[0]["mean_u"], "temperatures": per_t,
            "config": {k: getattr(config.data, k) for k in ("md_frames", "md_burnin", "md_stride", "md_timestep_fs",
                                                            "md_friction")}
            | {"md_temperatures": [float(t) for t in config.data.md_temperatures]}}
    atomic_write(path, lambda fh: np.savez(fh, positions=pos, info=json.dumps(info)))
    ref_txt = f"; mean u {u_ref:.2f} kT on the reference frames" if u_ref is not None else ""
    temps = ", ".join(f"{p['frames']} at {p['temperature_k']:g} K (mean u {p['mean_u']:.2f} kT)"
                      for p in per_t if p["mean_u"] is not None)
    rd.log(f"Langevin augmentation: {info['frames']} frames from {info['starts']} starts in {wall:.1f} s "
           f"({evals} energy evaluations, {dropped} chains dropped): {temps}{ref_txt}")
    return pos, info


def _fit_report(gen, data, holdout, config: RunConfig, n: int = 2000) -> dict[str, float] | None:
    """Mean log q per frame on (a subsample of) the training data and on the held-out reference frames."""
    import torch

    if holdout is None or len(holdout) == 0:
        return None
    p = next(gen.parameters())
    bs = max(1, int(config.sampling.batch_size))

    def mean_logq(x):
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            x = gen.prepare_data(x)
            lq = torch.cat([gen.log_prob(x[i:i + bs]) for i in range(0, len(x), bs)]).double()
        lq = lq[torch.isfinite(lq)]
        return float(lq.mean()) if len(lq) else float("nan")

    idx = np.linspace(0, len(data) - 1, min(len(data), n)).astype(int)
    gen.eval()
    try:
        return {"train": mean_logq(data[torch.as_tensor(idx)]), "holdout": mean_logq(holdout), "n_holdout": len(holdout)}
    finally:
        gen.train()


def load_trained(run_dir: str | Path, device: str | None = None):
    """(system, config, generator, energy) of a trained run directory."""
    from .core.rundir import RunDir
    from .flows.generator import load_generator
    from .systems import MolecularSystem

    rd = RunDir(run_dir, create=False)
    if not (rd.path / "generator.pt").is_file():
        raise InputError(f"'{rd.path}' has no trained generator (generator.pt); run `boltzflow train` first")
    system = MolecularSystem.load(rd.system_dir)
    config = load_run_config(rd.config_path)
    dev = resolve_device(device or config.device)
    gen = load_generator(rd.path / "generator.pt", system)
    gen = gen.to(device=dev, dtype=_dtype(config.dtype)).eval()
    energy = make_energy(system, config.energy, device=dev)
    return system, config, gen, energy


#: what a shipped generator keeps of its training run (no checkpoints, training data or samples)
EXPORTED = ("config.toml", "generator.pt", "summary.json", "metrics.jsonl", "environment.json", "log.txt", "system")


def export_generator(run_dir: str | Path, dest: str | Path, note: str = "", weights_dtype: str | None = None) -> Path:
    """Copy a trained run's self-contained part (:data:`EXPORTED`: config, weights, system, summary, training
    log and metrics; a few MB) to ``dest``, a new directory: ``boltzflow sample DEST -n N`` works on it
    wherever it is copied. ``note`` (markdown: how it was made) goes into DEST/README.md.
    ``weights_dtype="float16"`` stores the flow's parameters rounded to half precision (half the size;
    "int8": weight matrices per row in int8, a quarter; each a slightly different generator, so measure the
    exported one's ESS, e.g. with ``boltzflow sample DEST``)."""
    import shutil

    from .core.rundir import RunDir
    from .flows.checkpoint import WEIGHT_DTYPES

    if weights_dtype not in WEIGHT_DTYPES:
        raise InputError(f"weights_dtype {weights_dtype!r} unknown; choose one of {WEIGHT_DTYPES}")

    rd = RunDir(run_dir, create=False)
    if not (rd.path / "generator.pt").is_file():
        raise InputError(f"'{rd.path}' has no trained generator (generator.pt); train it first")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InputError(f"'{dest}' already exists and is not empty; choose a new destination")
    dest.mkdir(parents=True, exist_ok=True)
    for name in EXPORTED:
        src = rd.path / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    if weights_dtype is not None:
        from .flows.generator import load_generator, save_generator
        from .systems import MolecularSystem

        gen = load_generator(rd.path / "generator.pt", MolecularSystem.load(rd.system_dir))
        save_generator(dest / "generator.pt", gen, weights_dtype=weights_dtype)
        RunDir(dest, create=False).update_summary(exported_weights_dtype=weights_dtype)
    if note:
        (dest / "README.md").write_text(note)
    return dest


def mix_generators(run_dirs, dest: str | Path, weights=None, note: str = "") -> Path:
    """A run directory ``dest`` (new or empty) whose generator is the mixture ``sum_k pi_k q_k`` of the trained
    generators in ``run_dirs`` (run or shipped-generator directories of one system; at least 2):
    config.toml and system/ of the first, generator.pt (:class:`~boltzflow.flows.generator.GeneratorMixture`),
    summary.json with the components and their summed training cost (frames shared by components are counted
    once per component), ``note`` in README.md. ``weights``: mixture probabilities (default equal).
    ``boltzflow sample DEST`` draws from it; each draw costs one density pass per component."""
    import shutil

    from .core.rundir import RunDir
    from .flows.generator import GeneratorMixture, load_generator, save_generator
    from .systems import MolecularSystem

    dirs = [RunDir(r, create=False) for r in run_dirs]
    if len(dirs) < 2:
        raise InputError(f"a mixture needs at least 2 trained generators, got {len(dirs)}")
    for rd in dirs:
        if not (rd.path / "generator.pt").is_file():
            raise InputError(f"'{rd.path}' has no trained generator (generator.pt); train it first")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InputError(f"'{dest}' already exists and is not empty; choose a new destination")
    system = MolecularSystem.load(dirs[0].system_dir)
    mix = GeneratorMixture([load_generator(rd.path / "generator.pt", system) for rd in dirs], weights)
    parts = []
    for rd, w in zip(dirs, mix.weights):
        parts.append({"path": str(rd.path.resolve()), "weight": w,
                      **(_trained_cost(rd.path) or {"energy_evals": 0, "wall_s": 0.0})})
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(dirs[0].config_path, dest / "config.toml")
    shutil.copytree(dirs[0].system_dir, dest / "system")
    save_generator(dest / "generator.pt", mix)
    out = RunDir(dest, create=False)
    out.update_summary(system=system.name, temperature_k=system.temperature, mixture=parts,
                       energy_evals_training=sum(p["energy_evals"] for p in parts),
                       training_wall_s=sum(p["wall_s"] for p in parts))
    out.log(f"mixture of {len(parts)} generators: " + ", ".join(f"{p['path']} ({p['weight']:.3g})" for p in parts))
    if note:
        (dest / "README.md").write_text(note)
    return dest


def sample(run_dir: str | Path, n: int | None = None, batch_size: int | None = None, device: str | None = None,
           seed: int = 1, progress: bool = True, shard: tuple[int, int] | None = None, dist=None,
           mcmc: MCMCConfig | None = None):
    """Draw ``n`` samples from a trained run; writes samples/generated.npz (with log q, u and log weights)
    and samples/reference.npz (reference data with the generator's log q, for reports). Returns the
    generated SampleSet.

    shard: ``(i, N)`` draws only shard i of N of the ``n`` samples, with its own seed
    (:mod:`boltzflow.sampling.shards`), into samples/generated.shard-III-of-NNN.npz (for batch-scheduler
    arrays; :func:`merge_samples` joins them). dist: under torchrun (default: the initialised process
    group) every rank draws its shard and rank 0 merges them into generated.npz, returned on rank 0
    (the other ranks return their shard).

    mcmc: flow-MCMC to run as well (default: the run's ``sampling.mcmc``); unless its method is "none",
    :func:`sample_mcmc` writes samples/METHOD.npz (IMH on these same draws, no extra energy evaluations)."""
    import torch

    from . import distributed
    from .core.rundir import RunDir
    from .sampling import SampleSet
    from .sampling.shards import shard_name, shard_seed

    dist = dist or distributed.current()
    if shard is not None and dist.active:
        raise InputError("--shard and torchrun both split the sample; use one of them")
    if dist.active:
        shard = (dist.rank, dist.world_size)
    rd = RunDir(run_dir, create=False)
    system, config, gen, energy = load_trained(rd.path, device or (dist.device if dist.active else None))
    mcmc = config.sampling.mcmc if mcmc is None else mcmc
    if mcmc.method != "none" and shard is not None:
        raise InputError("flow-MCMC (sampling.mcmc) runs in one process; drop --shard / torchrun or set method 'none'")
    n = int(config.sampling.n if n is None else n)
    bs = int(config.sampling.batch_size if batch_size is None else batch_size)
    if n < 1 or bs < 1:
        raise InputError("the number of samples and the batch size must be >= 1")
    index, count = shard if shard is not None else (0, 1)
    lo, hi = distributed.shard_bounds(n, index, count)
    if hi <= lo:
        raise InputError(f"shard {index}/{count} of {n} samples is empty; use at most {n} shards")
    seed_i = shard_seed(seed, index, count)
    t0 = time.time()
    g = torch.Generator(device=next(gen.parameters()).device).manual_seed(seed_i)
    with torch.no_grad():
        samples = gen.sample(hi - lo, energy=energy, batch_size=bs, generator=g)
    wall = time.time() - t0
    prov = dict(samples.provenance)
    trained = rd.read_summary()
    prov.update(sampler=f"flow:{config.generator.pipeline}", run_dir=str(rd.path), wall_s=wall, energy_evals=hi - lo,
                training_energy_evals=trained.get("energy_evals_training"),
                training_wall_s=trained.get("training_wall_s"),
                fingerprint=system.fingerprint(), biased=bool(getattr(gen, "biased", False)))
    if shard is not None:
        prov["shard"] = {"index": index, "count": count, "n_total": n, "seed": seed_i, "base_seed": int(seed)}
    samples = SampleSet(samples.positions, samples.reduced_energy, samples.log_q, samples.log_weights,
                        system.temperature, prov)
    if shard is None:
        samples.save(rd.samples_dir / "generated.npz")
    else:
        samples.save(rd.samples_dir / shard_name("generated", index, count))
    if dist.active:
        dist.barrier()  # every shard file is written
        if not dist.is_main:
            dist.barrier()
            return samples
        try:
            samples = merge_samples(rd.path, remove_shards=True)
            _write_reference_logq(rd, system, config, gen, energy, bs)
        finally:
            dist.barrier()
        return samples
    if index == 0:
        _write_reference_logq(rd, system, config, gen, energy, bs)
    what = f"shard {index}/{count} ({hi - lo} of {n} configurations, seed {seed_i})" if shard else f"{n} configurations"
    rd.log(f"sampled {what} in {wall:.1f} s")
    if mcmc.method != "none":
        _run_mcmc(rd, system, gen, energy, mcmc, n, bs, seed, samples if mcmc.method == "imh" else None)
    return samples


def sample_mcmc(run_dir: str | Path, mcmc: MCMCConfig | None = None, n: int | None = None,
                batch_size: int | None = None, device: str | None = None, seed: int = 1):
    """Flow-MCMC on a trained run (Python side of ``boltzflow sample RUN --mcmc METHOD``): ``n`` samples of
    ``mcmc`` (default: the run's ``sampling.mcmc``) with the trained generator and the target energy,
    written to samples/METHOD.npz (IMH: chains over n fresh flow draws; mala / hmc: latent-space chains;
    snf: path-weighted samples; see :mod:`boltzflow.sampling.flow_mcmc`). Returns the SampleSet;
    ``estimate(run_dir, which=METHOD)`` gives its populations with block errors."""
    from .core.rundir import RunDir

    rd = RunDir(run_dir, create=False)
    system, config, gen, energy = load_trained(rd.path, device)
    mcmc = config.sampling.mcmc if mcmc is None else mcmc
    if mcmc.method == "none":
        raise InputError("no flow-MCMC method chosen; pass MCMCConfig(method='imh') (CLI: --mcmc imh)")
    n = int(config.sampling.n if n is None else n)
    bs = int(config.sampling.batch_size if batch_size is None else batch_size)
    return _run_mcmc(rd, system, gen, energy, mcmc, n, bs, seed, None)


def _run_mcmc(rd, system, gen, energy, mcmc: MCMCConfig, n: int, bs: int, seed: int, proposals):
    import torch

    from .flows.latent import latent_map
    from .sampling import SampleSet
    from .sampling.flow_mcmc import run_flow_mcmc

    if n < 1 or bs < 1:
        raise InputError("the number of samples and the batch size must be >= 1")
    g = torch.Generator(device=next(gen.parameters()).device).manual_seed(int(seed) + 7919)
    s = run_flow_mcmc(latent_map(gen), energy, mcmc, n, generator=g, proposals=proposals, batch_size=bs, seed=seed)
    prov = dict(s.provenance)
    prov.update(run_dir=str(rd.path), fingerprint=system.fingerprint(), biased=bool(getattr(gen, "biased", False)),
                mcmc=to_dict(mcmc))
    s = SampleSet(s.positions, s.reduced_energy, s.log_q, s.log_weights, system.temperature, prov)
    s.save(rd.samples_dir / f"{mcmc.method}.npz")
    rate = prov.get("accept_rate")
    rd.log(f"flow-MCMC {mcmc.method}: {len(s)} configurations, {prov.get('energy_evals')} energy evaluations"
           + (f", acceptance {rate:.3f}" if isinstance(rate, float) and rate == rate else "")
           + f" -> samples/{mcmc.method}.npz")
    return s


def merge_samples(run_dir: str | Path, remove_shards: bool = False):
    """Join a run's sample shards (samples/generated.shard-*-of-N.npz, from ``sample(shard=...)``) into
    samples/generated.npz; all N shards must be there. Returns the merged SampleSet (Python side of
    ``boltzflow merge RUN_DIR``)."""
    from .core.rundir import RunDir
    from .sampling import SampleSet
    from .sampling.shards import merge_sample_sets, shard_files

    rd = RunDir(run_dir, create=False)
    files = shard_files(rd.path / "samples", "generated")
    if not files:
        raise InputError(f"'{rd.path / 'samples'}' has no shards (generated.shard-*-of-*.npz); run "
                         "`boltzflow sample RUN --shard i/N` first")
    merged = merge_sample_sets([SampleSet.load(p) for p in files])
    merged.save(rd.samples_dir / "generated.npz")
    if remove_shards:
        for p in files:
            p.unlink()
    rd.log(f"merged {len(files)} shards into samples/generated.npz ({len(merged)} configurations)")
    return merged


def _write_reference_logq(rd, system, config: RunConfig, gen, energy, bs: int) -> None:
    """samples/reference.npz: the reference data with the generator's log q and u, for the u_G histogram."""
    import torch

    from .sampling import SampleSet

    try:
        ref, _ = load_reference(system, config.data)
    except InputError:
        ref = None
    if ref is not None:
        idx = np.linspace(0, len(ref) - 1, min(len(ref), 5000)).astype(int)
        x = torch.as_tensor(ref.positions[idx], dtype=next(gen.parameters()).dtype,
                            device=next(gen.parameters()).device)
        with torch.no_grad():
            x = gen.prepare_data(x)  # Cartesian heavy atoms: centred and aligned like the training data
            logq = torch.cat([gen.log_prob(x[i:i + bs]) for i in range(0, len(x), bs)]).double().cpu().numpy()
            u = torch.cat([energy(x[i:i + bs]) for i in range(0, len(x), bs)]).double().cpu().numpy()
        SampleSet(ref.positions[idx], u, logq, None, system.temperature,
                  {"sampler": "reference", "log_q": "generator"}).save(rd.samples_dir / "reference.npz")


def estimate(run_dir: str | Path, seed: int = 0, which: str = "generated") -> dict[str, Any]:
    """Reweighted mode populations, ESS, log Z and dF(rest->minor) of a run's generated samples
    (:func:`boltzflow.estimators.analysis.sample_estimates`); stored in summary.json under "estimates" and
    returned as ``{name: Estimate}``. which: samples/WHICH.npz (e.g. a flow-MCMC method's "imh": block
    errors over its chains, stored under "estimates_imh")."""
    from .core.rundir import RunDir
    from .estimators.analysis import sample_estimates
    from .sampling import SampleSet
    from .systems import MolecularSystem

    if which != "generated" and which not in MCMC_METHODS[1:]:
        raise InputError(f"unknown samples {which!r}: 'generated' or a flow-MCMC method ({', '.join(MCMC_METHODS[1:])})")
    rd = RunDir(run_dir, create=False)
    path = rd.path / "samples" / f"{which}.npz"
    if not path.is_file():
        how = f" --mcmc {which}" if which != "generated" else ""
        raise InputError(f"'{rd.path}' has no samples/{which}.npz; run `boltzflow sample {rd.path}{how}` first")
    s = SampleSet.load(path)
    system = MolecularSystem.load(rd.system_dir)
    res = sample_estimates(s, system.modes, temperature_k=system.temperature, seed=seed)
    for note in res.notes:  # a mode without weighted samples: dF undefined, say so in the log
        rd.log(note)
    out: dict[str, Any] = dict(res.estimates)
    key = "estimates" if which == "generated" else f"estimates_{which}"
    rd.update_summary(**{key: {k: v.to_full_dict() for k, v in out.items()}})
    return out


# ---------------------------------------------------------------------------------------------
# the demo: the README's main job
# ---------------------------------------------------------------------------------------------
def demo_config(quick: bool = False) -> RunConfig:
    """The demo's configuration: alanine dipeptide, the ``data`` recipe (:mod:`boltzflow.recipes`)
    sized for <= 20 minutes on 2 CPU cores: one spline flow over all-atom internal coordinates
    (improper torsions standardised, no whitening; 4 blocks x 128), maximum likelihood on the
    shipped reference frames grown by Langevin dynamics at 300 K and 356 K (``data.md_frames = 20``,
    ``data.md_temperatures = [356.0]``), 4 000 steps of batch
    512, then 1 000 steps of reverse KL with the path gradient (``klx_path``, batch 1 024, lr 1e-4)
    under the ESS guard (the stage ends at the checkpoint of highest Kish ESS on 20 000 samples, the
    maximum-likelihood one included), then 100 000 samples. The data recipe's reweighted maximum
    likelihood at demo size (3 000 steps, pools of 5e5) was measured too and not adopted: its weights'
    alpha_L tail made the 1e5-sample readout unstable (docs/pipelines.md). ``quick`` is a toy-size
    version (seconds) for smoke tests."""
    from dataclasses import replace

    cfg = recipe_config("data")
    tr = cfg.training
    tr = replace(tr, pretrain=replace(tr.pretrain, steps=4000, batch=512),
                 finetune=replace(tr.finetune, loss="klx_path", steps=1000, batch=1024, lr=1e-4),
                 ess_guard=20_000, log_every=100, checkpoint_every=250)
    gen = replace(cfg.generator, blocks=4, hidden=128)
    cfg = replace(cfg, training=tr, generator=gen, sampling=SampleConfig(n=100_000, batch_size=5000))
    if quick:
        tr = replace(tr, pretrain=replace(tr.pretrain, steps=20, batch=64), finetune=replace(tr.finetune, steps=10, batch=64),
                     log_every=5, checkpoint_every=10, eval_batch=128, ess_guard=500, finetune_min_ess=0.0)
        return replace(cfg, training=tr, generator=_quick_generator(gen), sampling=SampleConfig(n=500, batch_size=250),
                       data=replace(cfg.data, max_samples=2000, md_frames=2, md_burnin=10, md_stride=5))
    return cfg


def _quick_generator(gcfg):
    from dataclasses import fields, replace

    small = {}
    names = {f.name for f in fields(gcfg)}
    for key, val in (("blocks", 1), ("hidden", 32), ("h_blocks", 1), ("h_hidden", 32), ("hnet_hidden", 32)):
        if key in names:
            small[key] = val
    return replace(gcfg, **small)


def reference_population(system, data_cfg: DataConfig | None = None) -> dict[str, Any]:
    """The minor-mode population of the shipped reference data with a block-averaged error bar
    (:func:`boltzflow.estimators.analysis.block_population`)."""
    from .estimators.analysis import block_population

    ref, path = load_reference(system, data_cfg or DataConfig())
    lab = system.modes.assign(ref.positions)
    minor = list(system.modes.names).index(system.modes.minor)
    est = block_population(lab == minor, system.modes.minor)
    return {"value": est.value, "stderr": est.stderr, "n": len(ref), "source": str(path),
            "sampler": ref.provenance.get("sampler", ref.provenance.get("method", "replica exchange"))}


def reliability_warnings(estimates: dict[str, Any]) -> list[str]:
    """Plain-language warnings about reweighted estimates: too few effective samples
    (:data:`boltzflow.estimators.analysis.MIN_ESS`)."""
    from .estimators.analysis import too_few_effective_samples

    ess = estimates.get("ess")
    if ess is None or not np.isfinite(ess.value) or not too_few_effective_samples(ess.value):
        return []
    return [f"the effective sample size is {ess.value:.0f} of {ess.n} samples: reweighted numbers rest on a handful "
            "of samples and their error bars are not trustworthy. Train longer (training.pretrain.steps, "
            "training.finetune.steps), on a GPU, or compare the energy histograms in the report."]


def demo(run_dir: str | Path = "runs/demo", quick: bool = False, device: str = "auto", progress: bool | None = None,
         config: RunConfig | None = None, dist=None) -> dict[str, Any]:
    """The main job: prepare alanine dipeptide (vacuum, 300 K), train on the shipped reference data
    (grown by Langevin dynamics; data-free fine-tuning only if ``config`` asks, see
    :func:`demo_config`), sample, reweight, report. Re-running with the same
    ``run_dir`` resumes a killed demo. Returns the JSON-able result of ``boltzflow demo --json``.
    Under torchrun (``dist``, default: the initialised process group) training and sampling are
    data-parallel; rank 0 estimates and reports, and every rank returns its result."""
    from dataclasses import replace

    from . import distributed
    from .core.rundir import RunDir
    from .systems.builtin import builtin_system

    t0 = time.time()
    dist = dist or distributed.current()
    system = builtin_system("alanine-dipeptide", solvent="vacuum", temperature=300.0)
    cfg = config or demo_config(quick)
    cfg = replace(cfg, device=device)
    rd = RunDir(run_dir)
    summary = rd.read_summary()
    if not summary.get("training_finished"):
        resume = rd.latest_checkpoint.is_file()
        if resume:
            cfg = load_run_config(rd.config_path, {"device": device})
        summary = train(system, cfg, rd.path, resume=resume, progress=progress, dist=dist)
    s = sample(rd.path, cfg.sampling.n, cfg.sampling.batch_size, device=None if dist.active else device,
               progress=progress is not False, dist=dist)
    return distributed.on_rank0(dist, lambda: _demo_result(rd, system, cfg, s, t0))


def _demo_result(rd, system, cfg: RunConfig, s, t0: float) -> dict[str, Any]:
    """The demo's estimates, report and result (rank 0)."""
    from .reports.report import build_report

    est = estimate(rd.path)
    ref = reference_population(system, cfg.data)
    rd.update_summary(reference_population=ref)
    report = build_report(rd.path)
    minor = est[system.modes.minor]
    wall = time.time() - t0
    result = {
        "phi_positive": {"value": minor.value, "stderr": minor.stderr, "ess": est["ess"].value if "ess" in est else None,
                         "ci_low": minor.ci_low, "ci_high": minor.ci_high},
        "reference": {"value": ref["value"], "stderr": ref["stderr"]},
        "n_samples": len(s),
        "ess_fraction": (est["ess"].value / len(s)) if "ess" in est else None,
        "energy_evals": int(rd.read_summary().get("energy_evals_training", 0)) + len(s),
        "wall_s": wall,
        "report": str(report),
        "warnings": reliability_warnings(est),
    }
    rd.update_summary(demo=result)
    return result
