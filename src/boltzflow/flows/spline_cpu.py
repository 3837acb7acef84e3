"""The fused CPU kernel of the rational-quadratic splines (``spline_cpu.cpp``), as a torch autograd
Function.

The torch implementation in :mod:`boltzflow.flows.splines` runs ~60 small tensor ops per coupling
layer and as many in the backward pass (gathers, scatters, zero fills), which made the spline ~85 %
of a flow training step on the CPU. The kernel does the whole spline per element in one pass and also
returns the derivatives of ``y`` and ``log|dy/dx|`` with respect to ``x`` and to every unnormalised
parameter, so the backward pass is two broadcast multiplies. Same maps, same parameterisation, same
gradients (tests compare both implementations); first derivatives only (``once_differentiable``:
nothing in boltzflow differentiates a spline twice).

Built on first use like the native energy's kernel (:func:`boltzflow.energy.native_cpu.build_shared_library`,
cached); ``BOLTZFLOW_CPU_KERNEL=0`` or a missing compiler selects the torch implementation.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from ..energy.native_cpu import build_shared_library, find_compiler, kernels_disabled

SOURCE = Path(__file__).with_name("spline_cpu.cpp")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def load() -> ctypes.CDLL | None:
    """The compiled spline library (built on first use), or None when disabled or unbuildable."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if kernels_disabled():
            return None
        cxx = find_compiler()
        if cxx is None:
            return None
        try:
            lib = ctypes.CDLL(str(build_shared_library(cxx, SOURCE)))
            for name in ("bf_rq_spline_f64", "bf_rq_spline_f32"):
                f = getattr(lib, name)
                f.restype = ctypes.c_int
                f.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_double, ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                              ctypes.c_double, ctypes.c_int] + [ctypes.c_void_p] * 6
            _lib = lib
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            warnings.warn(f"boltzflow splines: building the CPU kernel failed ({e}); using torch ops", RuntimeWarning,
                          stacklevel=3)
        return _lib


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel can evaluate a spline on x (CPU, float32/float64, kernel available)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and load() is not None


def _run(x: torch.Tensor, params: torch.Tensor, kind: int, bound: float, inverse: bool, consts: tuple,
         jacobians: bool = True):
    """(y, ld, dy/dx, dld/dx, dy/dparams, dld/dparams); without ``jacobians`` the last four are None and
    the kernel skips the derivative work (sampling, evaluation)."""
    lib = load()
    xs = x.detach().contiguous()
    ps = params.detach().to(x.dtype).contiguous()
    n = xs.numel()
    n_par = ps.shape[-1]
    k = (n_par + 1) // 3 if kind == 0 else n_par // 3
    y, ld, dydx, dldx = (torch.empty_like(xs) for _ in range(4))
    jy = torch.empty(n, n_par, dtype=xs.dtype) if jacobians else None
    jl = torch.empty(n, n_par, dtype=xs.dtype) if jacobians else None
    fn = lib.bf_rq_spline_f64 if xs.dtype == torch.float64 else lib.bf_rq_spline_f32
    rc = fn(n, k, xs.data_ptr(), ps.data_ptr(), kind, float(bound), int(inverse), *consts, torch.get_num_threads(),
            y.data_ptr(), ld.data_ptr(), dydx.data_ptr(), dldx.data_ptr(), jy.data_ptr() if jacobians else None,
            jl.data_ptr() if jacobians else None)
    if rc != 0:  # pragma: no cover - the Python wrappers check K before calling
        raise RuntimeError(f"spline kernel failed (code {rc})")
    if not jacobians:
        return y, ld, None, None, None, None
    return y, ld, dydx, dldx, jy.reshape(ps.shape), jl.reshape(ps.shape)


class _FusedSpline(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, params, kind, bound, inverse, consts):
        y, ld, dydx, dldx, jy, jl = _run(x, params, kind, bound, inverse, consts)
        ctx.save_for_backward(dydx, dldx, jy, jl)
        ctx.params_dtype = params.dtype
        return y, ld

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gl):
        dydx, dldx, jy, jl = ctx.saved_tensors
        gx = gp = None
        if ctx.needs_input_grad[0]:
            gx = gy * dydx + gl * dldx
        if ctx.needs_input_grad[1]:
            gp = (gy.unsqueeze(-1) * jy + gl.unsqueeze(-1) * jl).to(ctx.params_dtype)
        return gx, gp, None, None, None, None


def fused_spline(x: torch.Tensor, params: torch.Tensor, kind: int, bound: float, inverse: bool,
                 min_width: float, min_height: float, min_derivative: float, derivative_offset: float):
    """(y, logabsdet), each shaped like ``x: (...)``, for ``params: (..., P)`` = [K width logits, K height
    logits, K - 1 (kind 0, identity tails outside [-bound, bound]) or K (kind 1, circular on [-pi, pi))
    derivative logits]. Matches :func:`boltzflow.flows.splines.unconstrained_rq_spline` (kind 0) and
    :func:`~boltzflow.flows.splines.circular_rq_spline` (kind 1)."""
    consts = (float(min_width), float(min_height), float(min_derivative), float(derivative_offset))
    if torch.is_grad_enabled() and (x.requires_grad or params.requires_grad):
        return _FusedSpline.apply(x, params, int(kind), float(bound), bool(inverse), consts)
    y, ld, *_ = _run(x, params, int(kind), float(bound), bool(inverse), consts, jacobians=False)
    return y, ld


__all__ = ["load", "usable", "fused_spline"]
