"""Maximum likelihood of a molecular generator on a GPU machine that has torch but no OpenMM.

The CPU runs of the tetrapeptide (docs/peptides.md) are limited by the flow's own steps: ~1.5e3
sample-gradients per second and core, against the ~1e8 of the published maximum-likelihood recipe. This
script moves that part to a GPU without OpenMM, mdtraj or parmed there: ``pack`` (here, with OpenMM)
pickles the generators (their system detached), the native energy and a set of equilibrium frames;
``grow`` (there) runs BAOAB Langevin dynamics at the system temperature from every frame on the GPU with the
native energy (frames from p stay samples of p: "Langevin growth"), so the training frames are as many as
wanted; ``train`` (there) runs maximum likelihood with a moving average of the parameters on them for a
wall-time budget and writes checkpoints that ``benchmarks/kish_seeds.py RUN CKPT:ema`` measures here.

    python benchmarks/gpu_ml.py pack --run RUN [--fresh NAME:KEY=VALUE,...] --frames DATA.npz -o .gpu/bundle.pt
    python benchmarks/gpu_ml.py grow .gpu/bundle.pt -o /tmp/frames.pt [--frames-per-seed 24]
    python benchmarks/gpu_ml.py train .gpu/bundle.pt /tmp/frames.pt --variant NAME --budget 300 -o OUT

``pack`` also writes, for every ``--fresh`` variant, a run directory beside the bundle (RUN's system and
config with the new generator), so its checkpoints can be measured here. Shapes: frames (n, n_atoms, 3) nm.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- here: pack ------------------------------------------------------------------------------------
def pack(args) -> None:
    from dataclasses import replace

    from boltzflow.flows.generator import build_generator, save_generator
    from boltzflow.pipeline import load_trained

    torch.set_num_threads(1)
    system, config, gen, energy = load_trained(args.run)
    d = np.load(args.frames)
    pos = d["positions"]
    kT_per_kJ = float(energy.beta)  # 1/kT in mol/kJ
    rng = np.random.default_rng(args.seed)
    ok = np.zeros(len(pos), dtype=bool)
    for s in range(0, len(pos), 65536):
        ok[s:s + 65536] = gen.same_isomer(pos[s:s + 65536])
    idx = rng.permutation(np.flatnonzero(ok))
    hold = idx[:args.holdout]
    seeds = idx[args.holdout:args.holdout + args.seeds]
    _log(f"{ok.sum()} of {len(pos)} frames of the input isomer; {len(seeds)} seeds, {len(hold)} held out")
    x_seed = pos[np.sort(seeds)]
    x_seed = x_seed - x_seed.mean(1, keepdims=True)
    gens = {"relay": gen}
    out_dir = Path(args.output).parent
    for spec in args.fresh or []:
        name, _, kv = spec.partition(":")
        over = {}
        for item in filter(None, kv.split(",")):
            k, _, v = item.partition("=")
            over[k] = type(getattr(gen.config, k))(v) if not isinstance(getattr(gen.config, k), bool) else v == "true"
        cfg = replace(gen.config, **over)
        g = build_generator(system, cfg, data=pos[np.sort(idx[:200_000])])
        gens[name] = g
        rd = out_dir / name
        if rd.exists():
            raise SystemExit(f"{rd} exists; remove it first")
        shutil.copytree(args.run, rd, ignore=shutil.ignore_patterns("checkpoints", "data", "samples*"))
        save_generator(rd / "generator.pt", g)
        n = sum(p.numel() for p in g.parameters())
        _log(f"fresh variant {name}: {over}, {n} parameters, run directory {rd}")
    masses = np.asarray(system.masses, dtype=np.float64) if hasattr(system, "masses") else None
    if masses is None:
        raise SystemExit("system has no masses")
    reinit = {}
    for name, g in gens.items():
        # stands in for the system: same_isomer's reference structure (n_atoms, 3) nm, no OpenMM object
        g.system = SimpleNamespace(positions=np.array(system.positions, dtype=np.float64))
        # the bundle must fit the device tool's 64 MiB with the working tree: the trained generator's
        # parameters travel in float16, a fresh one's not at all (re-initialised there, see _unpack)
        reinit[name] = None if name == "relay" else {n: bool((p == 0).all()) for n, p in g.named_parameters()}
        for n, p in g.named_parameters():
            p.data = p.data.half() if name == "relay" else torch.zeros(1, dtype=torch.float16).expand(p.shape)
    bundle = {"gens": gens, "energy": energy, "seeds": torch.from_numpy(x_seed.astype(np.float16)),
              "holdout": torch.from_numpy(pos[np.sort(hold)].astype(np.float32)), "masses": torch.from_numpy(masses),
              "kT": 1.0 / kT_per_kJ, "reinit": reinit, "made_from": {"run": str(args.run), "frames": str(args.frames)}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(bundle, args.output)
    _log(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB)")


def _unpack(b: dict, name: str, seed: int):
    """The bundle's generator ``name`` with float32 parameters: the trained one's as packed, a fresh one's
    drawn anew (torch's default Linear initialisation, and zero where the packed generator had zeros: the
    conditioners' zero-initialised last layers)."""
    gen = b["gens"][name]
    zero = b["reinit"][name]
    torch.manual_seed(seed)
    for mname, m in gen.named_modules():
        for pn, p in list(m.named_parameters(recurse=False)):
            if zero is None:
                p.data = p.data.float()
            else:
                p.data = torch.empty(p.shape, dtype=torch.float32)
        if zero is not None and isinstance(m, torch.nn.Linear):
            m.reset_parameters()
            for pn, p in m.named_parameters(recurse=False):
                if zero[f"{mname}.{pn}"]:
                    torch.nn.init.zeros_(p)
    return gen


# ---- there: grow ------------------------------------------------------------------------------------
def grow(args) -> None:
    """Langevin growth of the bundle's seed frames on the device (:func:`boltzflow.training.augment.langevin_augment`,
    every chain in one batch): frames of p stay samples of p."""
    from boltzflow.training.augment import LangevinAugmentConfig, langevin_augment

    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    b = torch.load(args.bundle, map_location="cpu", weights_only=False)
    energy = b["energy"].to(dev)
    x0 = b["seeds"].to(dev, torch.float32)
    if dev.type == "cuda":
        energy.chunk_size = max(int(energy.chunk_size), int(x0.shape[0]))  # one batch of every chain
    cfg = LangevinAugmentConfig(frames_per_start=args.frames_per_seed, burnin=args.burnin, stride=args.stride,
                                timestep_fs=args.timestep_fs, friction_per_ps=args.friction, batch=int(x0.shape[0]))
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    res = langevin_augment(energy, x0, b["masses"].numpy(), float(b["kT"]), cfg, generator=gen)
    torch.save(torch.from_numpy(res.positions), args.output)
    _log(f"grow: {len(res.positions)} frames ({cfg.steps} steps of {x0.shape[0]} chains, {res.dropped_chains} "
         f"dropped) in {res.wall_s:.0f} s, {res.wall_s / max(cfg.steps, 1) * 1e3:.1f} ms per step, mean u "
         f"{res.reduced_energy.mean():.2f} kT -> {args.output}")


# ---- there: train -----------------------------------------------------------------------------------
def train(args) -> None:
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    b = torch.load(args.bundle, map_location="cpu", weights_only=False)
    gen = _unpack(b, args.variant, args.seed).to(dev)
    frames = torch.load(args.frames, map_location="cpu")
    seeds = b["seeds"].to(torch.float32)
    x = torch.cat([frames, seeds]) if args.with_seeds else frames
    # the seeds are of the input isomer and a few ps at the system temperature cannot invert a chiral centre
    # or an amide: checked on a subsample (the full check takes ~40 s of one core per million frames)
    sub = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:20000]]
    other = 1.0 - float(np.mean(gen.same_isomer(sub.numpy())))
    _log(f"{args.variant}: {x.shape[0]} training frames; share of another isomer in 20 000 of them: {other:.5f}")
    if other > 1e-3:
        raise SystemExit("the grown frames left the input isomer; check the integrator")
    data = gen.prepare_data(x.to(dev))
    hold = gen.prepare_data(b["holdout"].to(dev))
    params = [p for p in gen.parameters() if p.requires_grad]
    names = [n for n, p in gen.named_parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    use_graph = args.graph and dev.type == "cuda"
    if use_graph:  # the learning rate as a device tensor, so a captured optimizer step reads the current one
        opt = torch.optim.Adam(params, lr=torch.tensor(args.lr, device=dev), capturable=True)
    else:
        opt = torch.optim.Adam(params, lr=args.lr)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def holdout_nll(use_ema: bool) -> float:
        saved = None
        if use_ema:
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, ema):
                    p.copy_(e)
        gen.eval()
        with torch.no_grad():
            lq = torch.cat([gen.log_prob(hold[i:i + 4096]) for i in range(0, len(hold), 4096)]).double()
        gen.train()
        if saved is not None:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        return float(-lq.mean())

    def save(step: int, nll: float) -> None:
        """The averaged parameters as ``VARIANT.pt`` (a training checkpoint: ``"model"`` empty, ``"ema"``), split
        into ``VARIANT.partK.pt`` files of at most ~15 MB each (the device tool returns files of <= 16 MB)."""
        dt = torch.float16 if args.half else torch.float32
        ema_sd = {n: e.detach().cpu().to(dt) for n, e in zip(names, ema)}
        parts, cur, size = [], {}, 0
        for n, v in ema_sd.items():
            if cur and size + v.numel() * v.element_size() > 15e6:
                parts.append(cur)
                cur, size = {}, 0
            cur[n] = v
            size += v.numel() * v.element_size()
        parts.append(cur)
        for k, part in enumerate(parts):
            state = {"model": {}, "ema": {"params": part}, "step": step, "holdout_nll_ema": nll, "metrics": metrics,
                     "batch": args.batch, "lr": args.lr, "frames": int(data.shape[0]), "ms_per_step": per * 1e3,
                     "variant": args.variant, "part": k, "parts": len(parts)}
            name = f"{args.variant}.pt" if len(parts) == 1 else f"{args.variant}.part{k}.pt"
            tmp = out / (name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, out / name)

    nll0 = holdout_nll(False)
    _log(f"{args.variant}: held-out NLL at the start {nll0:.3f} ({len(hold)} frames)")
    metrics = [{"step": 0, "nll_holdout": nll0, "t": 0.0}]

    idx = torch.zeros(args.batch, dtype=torch.long, device=dev)
    static_loss: list[torch.Tensor] = []
    graph: list = []

    def compute() -> torch.Tensor:
        loss = -gen.log_prob(data[idx]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 100.0)
        opt.step()
        return loss.detach()

    def capture() -> None:
        """One CUDA graph of the whole step (forward, backward, clipping, Adam): the flow's step is ~2e4
        small kernels, whose launches, not the arithmetic, bound an eager step on a GPU."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                compute()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            static_loss.append(compute())
        graph.append(gr)
        _log(f"{args.variant}: captured the training step as one CUDA graph")

    def step_fn(lr: float, n: int) -> float:
        idx.copy_(torch.randint(0, data.shape[0], (args.batch,), generator=g, device=dev))
        if use_graph:
            opt.param_groups[0]["lr"].fill_(lr)
            if not graph:
                capture()
            graph[0].replay()
            loss = static_loss[0].clone()
        else:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = compute()
        d = min(args.ema, (1 + n) / (10 + n))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        run_loss.append(loss)
        return 0.0

    run_loss: list[torch.Tensor] = []
    t0 = time.perf_counter()
    warm = 40
    for n in range(warm):
        if n == 10:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t10 = time.perf_counter()
        step_fn(args.lr * (n + 1) / args.warmup, n)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    per = (time.perf_counter() - t10) / (warm - 10)
    t_left = args.budget - (time.perf_counter() - t0) - 30.0
    total = warm + max(int(t_left / (per * 1.08)), 100)
    _log(f"{args.variant}: {per * 1e3:.1f} ms per step of {args.batch}; planning {total} steps")
    evals = max(total // args.evals, 1)
    for n in range(warm, total):
        lr = args.lr * min((n + 1) / args.warmup, 0.5 * (1 + math.cos(math.pi * min(n / total, 1.0))))
        step_fn(lr, n)
        if (n + 1) % evals == 0 or n + 1 == total:
            loss = float(torch.stack(run_loss).mean())
            run_loss.clear()
            nll = holdout_nll(True)
            el = time.perf_counter() - t0
            metrics.append({"step": n + 1, "nll_holdout": nll, "nll_holdout_raw": holdout_nll(False), "t": el, "lr": lr,
                            "loss": loss})
            _log(f"{args.variant}: step {n + 1}/{total} lr {lr:.2e} held-out NLL {nll:.3f} (raw "
                 f"{metrics[-1]['nll_holdout_raw']:.3f}), training NLL {loss:.3f}, {el:.0f} s")
            save(n + 1, nll)
        if time.perf_counter() - t0 > args.budget + 60:
            _log(f"{args.variant}: over the budget, stopping at step {n + 1}")
            save(n + 1, holdout_nll(True))
            break


# ---- here: join -------------------------------------------------------------------------------------
def join(args) -> None:
    """A run directory ``-o`` with RUN's system and config and the averaged parameters of ``parts`` as its
    generator.pt (measured by ``kish_seeds.py``, sampled and exported like any run)."""
    from boltzflow.flows.generator import save_generator
    from boltzflow.pipeline import load_trained

    out = Path(args.output)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new directory")
    system, config, gen, energy = load_trained(args.run)
    params = {}
    for path in args.parts:
        params.update(torch.load(path, map_location="cpu", weights_only=False)["ema"]["params"])
    named = dict(gen.named_parameters())
    missing = set(named) - set(params)
    if missing:
        raise SystemExit(f"the parts lack {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        for k, v in params.items():
            named[k].copy_(v.float())
    shutil.copytree(args.run, out, ignore=shutil.ignore_patterns("checkpoints", "data", "samples*"))
    save_generator(out / "generator.pt", gen)
    _log(f"wrote {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--run", required=True)
    p.add_argument("--frames", required=True)
    p.add_argument("--fresh", nargs="*", help="NAME:key=value,... fresh generators of RUN's config with these changes")
    p.add_argument("--seeds", type=int, default=65536)
    p.add_argument("--holdout", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("-o", "--output", required=True)
    p = sub.add_parser("grow")
    p.add_argument("bundle")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--burnin", type=int, default=300, help="steps before the first frame")
    p.add_argument("--stride", type=int, default=100, help="steps between frames")
    p.add_argument("--frames-per-seed", type=int, default=24)
    p.add_argument("--timestep-fs", type=float, default=1.0)
    p.add_argument("--friction", type=float, default=1.0, help="1/ps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=4)
    p = sub.add_parser("train")
    p.add_argument("bundle")
    p.add_argument("frames")
    p.add_argument("--variant", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--budget", type=float, default=300.0, help="seconds of training")
    p.add_argument("--evals", type=int, default=8, help="held-out evaluations (and checkpoints) in the run")
    p.add_argument("--with-seeds", action="store_true", help="train on the seed frames as well")
    p.add_argument("--half", action="store_true", help="checkpoint the averaged parameters in float16 only")
    p.add_argument("--graph", action="store_true", help="run the training step as one captured CUDA graph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("-o", "--output", required=True)
    p = sub.add_parser("join")
    p.add_argument("--run", required=True, help="run directory of the same architecture (pack wrote one per --fresh)")
    p.add_argument("parts", nargs="+", help="VARIANT.pt or all VARIANT.partK.pt")
    p.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    {"pack": pack, "grow": grow, "train": train, "join": join}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
