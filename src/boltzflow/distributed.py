"""Running one job over several processes with torch.distributed (launched by ``torchrun``).

boltzflow has no scheduler of its own: ``torchrun`` starts the processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init_distributed` joins
the process group (gloo on CPU, NCCL on CUDA, one device per rank) and returns a :class:`DistContext`
that the trainer and the sampler use to shard work. Without torchrun (or with one process) every
function here is a no-op and :data:`SINGLE` describes the one process.

Python equivalent of ``torchrun --nproc_per_node 2 -m boltzflow train SYSTEM -o RUN``::

    # train_ddp.py, run with: torchrun --nproc_per_node 2 train_ddp.py
    from boltzflow import distributed, pipeline
    ctx = distributed.init_distributed()              # reads torchrun's environment
    pipeline.train(system, config, "runs/x", dist=ctx)

Sharding rule: a global batch of ``n`` is split into ``world_size`` contiguous shards,
:func:`shard_bounds` (sizes differ by at most one); rank ``r`` takes shard ``r``.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from .errors import InputError

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")

#: how long a rank waits for the others at a collective (data generation on rank 0 can take long)
DEFAULT_TIMEOUT_S = 6 * 3600.0


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a distributed job.

    rank: 0 .. world_size - 1 (rank 0 alone writes files); world_size: number of processes;
    local_rank: index on this node (selects the GPU); backend: "gloo" | "nccl" | "" (single process);
    device: "cpu" or "cuda:LOCAL_RANK", the device of this rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: str = "cpu"

    @property
    def active(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes (rank 0)."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's part of ``n`` items."""
        return shard_bounds(n, self.rank, self.world_size)

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.active:
            import torch.distributed as td

            td.barrier()

    def all_gather_object(self, obj: T) -> list[T]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` for one process)."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks, in float64 (on every rank)."""
        if not self.active:
            return [float(v) for v in values]
        import torch
        import torch.distributed as td

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank (a collective: every rank must call it)."""
        if not self.active:
            return bool(flag)
        return self.all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0

    def _comm_device(self) -> str:
        return self.device if self.backend == "nccl" else "cpu"


#: the one-process context (nothing distributed)
SINGLE = DistContext()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of shard ``rank`` when ``n`` items are split into ``world_size`` contiguous
    shards whose sizes differ by at most one (the first ``n % world_size`` shards are larger)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"shard {rank} of {world_size} does not exist; use 0 <= i < N")
    base, extra = divmod(int(n), world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher using its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


_CONTEXT: DistContext | None = None


def current() -> DistContext:
    """The context :func:`init_distributed` made, or one for a process group the caller initialised
    itself, else :data:`SINGLE`."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return SINGLE
    if _CONTEXT is not None:
        return _CONTEXT
    backend = str(td.get_backend())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistContext(rank=td.get_rank(), world_size=td.get_world_size(), local_rank=local, backend=backend,
                       device=f"cuda:{local}" if backend == "nccl" else "cpu")


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group torchrun set up; :data:`SINGLE` when not launched with several processes.

    backend: "auto" (NCCL when this rank gets a CUDA device, else gloo), "gloo" or "nccl";
    device: the run's device setting ("auto", "cpu", "cuda"): with CUDA, rank r uses cuda:LOCAL_RANK.
    Raises InputError (one line, exit 2 from the CLI) for impossible launches: NCCL without GPUs,
    more ranks on a node than GPUs, ranks running different boltzflow / torch versions."""
    global _CONTEXT
    import torch
    import torch.distributed as td

    if backend not in BACKENDS:
        raise InputError(f"distributed backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not launched_by_torchrun():
        return SINGLE
    if td.is_initialized():
        return current()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    want_cuda = device.startswith("cuda") or (device == "auto" and n_gpu > 0) or backend == "nccl"
    if backend == "nccl" and n_gpu == 0:
        raise InputError("backend 'nccl' needs CUDA GPUs but torch sees none on this node; use --dist-backend gloo "
                         "(CPU) or launch on GPU nodes")
    if device.startswith("cuda") and n_gpu == 0:
        raise InputError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    if want_cuda and local >= n_gpu:
        raise InputError(f"local rank {local} has no GPU (this node has {n_gpu}); start at most {n_gpu} processes "
                         "per node (torchrun --nproc_per_node)")
    if backend == "auto":
        backend = "nccl" if want_cuda else "gloo"
    dev = f"cuda:{local}" if want_cuda else "cpu"
    if want_cuda:
        torch.cuda.set_device(local)
    kw: dict[str, Any] = {}
    if backend == "nccl":
        kw["device_id"] = torch.device(dev)
    td.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s), **kw)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, backend=backend, device=dev)
    _CONTEXT = ctx
    check_same_versions(ctx)
    return ctx


def versions() -> dict[str, str]:
    """The versions every rank must share (boltzflow, torch, python)."""
    import sys

    import torch

    from . import __version__

    return {"boltzflow": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def check_same_versions(ctx: DistContext) -> None:
    """InputError when the ranks run different versions of boltzflow, torch or python."""
    all_v = ctx.all_gather_object(versions())
    for r, v in enumerate(all_v):
        if v != all_v[0]:
            diff = ", ".join(f"{k} {all_v[0][k]} vs {v.get(k)}" for k in all_v[0] if all_v[0][k] != v.get(k))
            raise InputError(f"rank {r} runs other versions than rank 0 ({diff}); install the same environment "
                             "on every node")


def shutdown() -> None:
    """Leave the process group (call once at the end of a distributed CLI verb)."""
    global _CONTEXT
    import sys

    _CONTEXT = None
    if "torch.distributed" not in sys.modules:  # never joined a group; do not import torch for nothing
        return
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        # every rank arrives before any tears down: a rank destroying its gloo pairs while another still
        # talks to it aborted the process ("terminate called without an active exception", exit -6) on a
        # loaded machine
        td.barrier()
        td.destroy_process_group()


def rank0_first(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the other ranks (e.g. rank 0 builds and caches data that the others
    then read). An exception on rank 0 is re-raised on every rank, so no rank waits forever."""
    if not ctx.active:
        return fn()
    err = None
    out = None
    if ctx.is_main:
        try:
            out = fn()
        except BaseException as e:  # re-raised below, after telling the other ranks
            err = e
    msg = ctx.broadcast_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if msg is not None:
        raise InputError(f"rank 0 failed: {' '.join(msg.split())}")
    if not ctx.is_main:
        out = fn()
    return out  # type: ignore[return-value]


def on_rank0(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank (it must pickle). An exception on
    rank 0 is re-raised there and reported as an InputError on the other ranks."""
    if not ctx.active:
        return fn()
    out, err = None, None
    if ctx.is_main:
        try:
            out = fn()
        except BaseException as e:  # re-raised below, after telling the other ranks
            err = e
    box = ctx.broadcast_object((out, None if err is None else f"{type(err).__name__}: {err}"))
    if err is not None:
        raise err
    if box[1] is not None:
        raise InputError(f"rank 0 failed: {' '.join(box[1].split())}")
    return box[0]
