"""Conditioner networks for coupling layers.

An :class:`MLP` maps the conditioning part of a vector (plus an optional context) to the
parameters of a transform. Its last layer is zero-initialised, so every coupling built on it
starts as the identity map (log-det 0) and training begins from the base distribution.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import InputError

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "celu": nn.CELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def activation_module(name: str) -> nn.Module:
    """A fresh activation module by name (``celu``, ``relu``, ``silu``, ``gelu``, ``tanh``, ``elu``)."""
    try:
        return _ACTIVATIONS[str(name).lower()]()
    except KeyError:
        raise InputError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Fully connected network ``(batch, in_dim) -> (batch, out_dim)``.

    ``depth`` counts the linear layers (>= 1): depth 2 is ``Linear(in, hidden) - act -
    Linear(hidden, out)``, the "two layers with internal feature size 64 separated by a CELU" of
    felardos2023. With ``zero_init_last`` (default) the last layer's weight and bias are zero, so
    the network outputs 0 at initialisation. ``compute_dtype`` (None: the input's) runs the layers under
    autocast in that type (see :func:`conditioner_precision`); the output keeps the input's dtype.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 64,
        depth: int = 2,
        activation: str = "celu",
        zero_init_last: bool = True,
    ):
        super().__init__()
        in_dim, out_dim, hidden, depth = int(in_dim), int(out_dim), int(hidden), int(depth)
        if in_dim < 1 or out_dim < 1:
            raise InputError(f"MLP needs in_dim >= 1 and out_dim >= 1, got {in_dim} and {out_dim}")
        if depth < 1:
            raise InputError(f"MLP depth counts linear layers and must be >= 1, got {depth}")
        if hidden < 1:
            raise InputError(f"MLP hidden width must be >= 1, got {hidden}")
        activation_module(activation)  # validate early
        sizes = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < depth - 1:
                layers.append(activation_module(activation))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.compute_dtype: torch.dtype | None = None
        if zero_init_last:
            last = self.net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h: (batch, in_dim) -> (batch, out_dim)``."""
        if self.compute_dtype is None or self.compute_dtype == h.dtype:
            return self.net(h)
        with torch.autocast(device_type=h.device.type, dtype=self.compute_dtype):
            y = self.net(h)
        return y.to(h.dtype)


#: conditioner precisions :func:`conditioner_precision` accepts by name
CONDITIONER_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU multiplies bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` among the flags of
    ``/proc/cpuinfo``, or of the text ``cpuinfo``); None where that cannot be read (not Linux). Without it
    torch emulates bfloat16 matrix products: measured on an AVX2-only AMD EPYC core, a 1024 x 128 by
    128 x 128 product took 7.8 ms in bfloat16 against 0.78 ms in float32, and a training step of the
    tetrapeptide's 8 x 128 flow 3.2 s against 0.57 s."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return None
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@contextmanager
def conditioner_precision(model: nn.Module, dtype: str = "float32") -> Iterator[None]:
    """Inside the block every :class:`MLP` of ``model`` computes in ``dtype`` ("bfloat16": autocast, fp32
    master weights and gradients; "float32": as built). bfloat16 runs the matrix products on AMX / tensor
    cores (8x the fp32 rate on a Sapphire Rapids core) but rounds the spline parameters to ~3 digits, and
    the rounding makes sampling and density evaluation differ by ~0.01 nats: use it for training steps
    and training pools, and float32 for the samples that are reweighted."""
    if dtype not in CONDITIONER_DTYPES:
        raise InputError(f"unknown conditioner dtype {dtype!r}; choose one of {', '.join(CONDITIONER_DTYPES)}")
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    before = [m.compute_dtype for m in mlps]
    for m in mlps:
        m.compute_dtype = CONDITIONER_DTYPES[dtype]
    try:
        yield
    finally:
        for m, d in zip(mlps, before):
            m.compute_dtype = d
