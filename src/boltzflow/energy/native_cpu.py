"""The native energy's CPU kernel: ``native_cpu.cpp`` built on first use and called through ctypes.

:class:`CpuKernel` evaluates the same terms as :func:`boltzflow.energy.native_kernels.reduced_energy_and_gradient`
(bonds, Urey-Bradley, LJ + Coulomb pairs, angles, torsions, impropers, CMAP) plus OBC2 GB with its
surface-area term (which the torch path leaves to autograd)
for ``x: (batch, n_atoms, 3)`` nm on the CPU in float32 or float64, energy and analytic gradient in
one pass, over OpenMP threads (``torch.get_num_threads()``); ctypes releases the GIL during the call.

Building: the first use compiles the source with the system C++ compiler (``$CXX`` or ``g++``,
``-O3 -march=native -fopenmp``; about 2 s) into a cache directory (``$BOLTZFLOW_CACHE`` or
``~/.cache/boltzflow``) keyed by the source, the flags, the compiler and the CPU, so a cached
library never runs on a CPU it was not built for. Set ``BOLTZFLOW_CPU_KERNEL=0`` to disable it;
without a compiler :func:`load` returns None with the reason in :func:`unavailable_reason` and
:class:`~boltzflow.energy.native.NativeEnergy` falls back to the torch kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ..io import current_umask

SOURCE = Path(__file__).with_name("native_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c++17"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


class BfParams(ctypes.Structure):
    """Mirror of ``struct BfParams`` in native_cpu.cpp (same field order)."""

    _fields_ = [
        ("n_atoms", ctypes.c_int64),
        ("n_hd", ctypes.c_int64), ("hd_idx", ctypes.c_void_p), ("hd_k", ctypes.c_void_p), ("hd_r0", ctypes.c_void_p),
        ("n_pair", ctypes.c_int64), ("pair_idx", ctypes.c_void_p), ("pair_a", ctypes.c_void_p),
        ("pair_b", ctypes.c_void_p), ("pair_c", ctypes.c_void_p),
        ("n_angle", ctypes.c_int64), ("angle_idx", ctypes.c_void_p), ("angle_k", ctypes.c_void_p),
        ("angle_t0", ctypes.c_void_p),
        ("n_dq", ctypes.c_int64), ("dq_idx", ctypes.c_void_p),
        ("n_fourier", ctypes.c_int64), ("kc", ctypes.c_void_p), ("ks", ctypes.c_void_p),
        ("fourier_len", ctypes.c_void_p), ("torsion_const", ctypes.c_double),
        ("a0", ctypes.c_int64),
        ("n_improper", ctypes.c_int64), ("improper_map", ctypes.c_void_p), ("improper_k", ctypes.c_void_p),
        ("improper_t0", ctypes.c_void_p), ("improper_2pi", ctypes.c_void_p),
        ("n_cmap", ctypes.c_int64), ("cmap_phi_map", ctypes.c_void_p), ("cmap_psi_map", ctypes.c_void_p),
        ("cmap_base", ctypes.c_void_p), ("cmap_size", ctypes.c_void_p), ("cmap_delta", ctypes.c_void_p),
        ("cmap_coeff", ctypes.c_void_p),
        ("gb", ctypes.c_int64), ("gb_q", ctypes.c_void_p), ("gb_or", ctypes.c_void_p), ("gb_sr", ctypes.c_void_p),
        ("gb_offset", ctypes.c_double), ("gb_pref", ctypes.c_double), ("gb_eps_in", ctypes.c_double),
        ("gb_eps_out", ctypes.c_double), ("gb_kappa", ctypes.c_double), ("gb_sa_coef", ctypes.c_double),
        ("gb_sa_offset", ctypes.c_double), ("gb_probe", ctypes.c_double),
    ]

#: constants of ``NativeEnergy._gb_const`` the kernel takes (OBC2 + ACE surface area)
GB_CONSTANTS = ("offset", "pref", "eps_in", "eps_out", "kappa", "sa_coef", "sa_offset", "probe")


def _cpu_tag() -> str:
    """What the -march=native code depends on: the CPU's model and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("flags", "model name", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("BOLTZFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "boltzflow")
    return Path(root) / "kernels"


def find_compiler() -> str | None:
    """The C++ compiler kernels are built with: ``$CXX``, else g++ or c++ on the PATH (None: none)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def kernels_disabled() -> bool:
    """Whether ``BOLTZFLOW_CPU_KERNEL`` switches the C++ kernels off ("0", "false", "no", "off")."""
    return os.environ.get("BOLTZFLOW_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off")


def _build(cxx: str) -> Path:
    """Compile the energy kernel and return the library's path."""
    return build_shared_library(cxx, SOURCE)


def build_shared_library(cxx: str, source: Path) -> Path:
    """Compile a C++ kernel source (once per source/flags/compiler/CPU, cached, atomic) and return the
    library's path. RuntimeError with the compiler's message when it fails."""
    SOURCE = Path(source)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + version.encode() + _cpu_tag().encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    lib = out_dir / f"{SOURCE.stem}_{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.stem + ".", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name}:\n{r.stderr[-2000:]}")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkstemp made it owner-only; a library as the umask gives
        os.replace(tmp, lib)  # atomic: concurrent builders both end with a complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the kernel functions' ctypes signatures on ``lib``; returns it."""
    for name in ("bf_energy_f64", "bf_energy_f32"):
        f = getattr(lib, name)
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.POINTER(BfParams), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_double, ctypes.c_int]
    return lib


def load_source(source: str | os.PathLike) -> ctypes.CDLL:
    """Build another version of the kernel's source with the same flags (e.g. an older commit's, to time
    against; benchmarks/energy_throughput.py --baseline-source) and load it. RuntimeError when no
    compiler is found or the build fails."""
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set $CXX)")
    return _declare(ctypes.CDLL(str(build_shared_library(cxx, Path(source)))))


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None when disabled or unbuildable
    (see :func:`unavailable_reason`; a warning says why once)."""
    global _lib, _reason, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if kernels_disabled():
            _reason = "disabled by BOLTZFLOW_CPU_KERNEL=0"
            return None
        cxx = find_compiler()
        if cxx is None:
            _reason = "no C++ compiler found (install g++ or set $CXX)"
        else:
            try:
                _lib = _declare(ctypes.CDLL(str(_build(cxx))))
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                _reason = f"building the CPU kernel failed: {e}"
        if _lib is None and _reason is not None:
            warnings.warn(f"boltzflow native energy: {_reason}; using the slower torch kernels", RuntimeWarning,
                          stacklevel=3)
        return _lib


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (None when the kernel is available or not tried yet)."""
    return _reason


class CpuKernel:
    """The C++ kernel bound to one NativeEnergy's fast-path parameters (kept alive here).

    ``prm`` is ``NativeEnergy._fast_params`` of a CPU float64 reference (tensors as the torch kernels
    take them); ``n_atoms`` the system size; ``gb`` (optional) the OBC2 parameters: per-atom arrays
    ``q`` (e), ``or`` and ``sr`` (offset and scaled offset radii, nm) and the :data:`GB_CONSTANTS`."""

    def __init__(self, lib: ctypes.CDLL, prm: dict[str, torch.Tensor], n_atoms: int, gb: dict | None = None):
        self._lib = lib
        keep: list[np.ndarray] = []

        def f64(name: str) -> int:
            a = np.ascontiguousarray(prm[name].detach().cpu().double().numpy().reshape(-1))
            keep.append(a)
            return a.ctypes.data

        def i32(arr) -> int:
            a = np.ascontiguousarray(np.asarray(arr, dtype=np.int32).reshape(-1))
            keep.append(a)
            return a.ctypes.data

        def idx(name: str) -> int:  # (k, n) index tensor -> (n, k) int32 rows
            return i32(prm[name].detach().cpu().numpy().T)

        p = BfParams(n_atoms=int(n_atoms))
        if "hd_idx" in prm:
            p.n_hd, p.hd_idx, p.hd_k, p.hd_r0 = prm["hd_idx"].shape[1], idx("hd_idx"), f64("hd_k"), f64("hd_r0")
        if "pair_idx" in prm:
            p.n_pair, p.pair_idx = prm["pair_idx"].shape[1], idx("pair_idx")
            p.pair_a, p.pair_b, p.pair_c = f64("pair_A"), f64("pair_B"), f64("pair_C")
        if "angle_idx" in prm:
            p.n_angle, p.angle_idx = prm["angle_idx"].shape[1], idx("angle_idx")
            p.angle_k, p.angle_t0 = f64("angle_k"), f64("angle_t0")
        if "dq_idx" in prm:
            n_dq = prm["dq_idx"].shape[1]
            p.n_dq, p.dq_idx = n_dq, idx("dq_idx")
            if "torsion_kc" in prm:
                kc = prm["torsion_kc"].detach().cpu().double().numpy().reshape(-1, n_dq).T  # (n_dq, n_fourier)
                ks = prm["torsion_ks"].detach().cpu().double().numpy().reshape(-1, n_dq).T
                nz = (kc != 0) | (ks != 0)
                length = np.where(nz.any(1), nz.shape[1] - np.argmax(nz[:, ::-1], axis=1), 0)
                kc, ks = np.ascontiguousarray(kc), np.ascontiguousarray(ks)
                keep += [kc, ks]
                p.n_fourier, p.kc, p.ks = kc.shape[1], kc.ctypes.data, ks.ctypes.data
                p.fourier_len = i32(length)
                p.torsion_const = float(prm["torsion_const"].double().sum())
            else:
                p.fourier_len = i32(np.zeros(n_dq))
            n_angle_q = prm["angle_quads"].shape[0] if "angle_quads" in prm else 0
            p.a0 = n_dq - n_angle_q
            if "improper_map" in prm:
                p.n_improper, p.improper_map = prm["improper_map"].shape[0], i32(prm["improper_map"].cpu().numpy())
                p.improper_k, p.improper_t0, p.improper_2pi = f64("improper_k"), f64("improper_t0"), f64("improper_2pi")
            if "cmap_phi_map" in prm:
                p.n_cmap = prm["cmap_phi_map"].shape[0]
                p.cmap_phi_map, p.cmap_psi_map = i32(prm["cmap_phi_map"].cpu().numpy()), i32(prm["cmap_psi_map"].cpu().numpy())
                p.cmap_base, p.cmap_size = i32(prm["cmap_base"].cpu().numpy()), i32(prm["cmap_size"].cpu().numpy())
                p.cmap_delta = f64("cmap_delta")
                coeff = np.ascontiguousarray(prm["cmap_coeff"].detach().cpu().double().numpy().T)  # (patches, 16)
                keep.append(coeff)
                p.cmap_coeff = coeff.ctypes.data
        if gb is not None:
            p.gb = 1
            for name in ("q", "or", "sr"):
                a = np.ascontiguousarray(np.asarray(gb[name], dtype=np.float64).reshape(-1))
                if a.shape != (n_atoms,):
                    raise ValueError(f"GB parameter {name!r} must have {n_atoms} entries, got {a.shape}")
                keep.append(a)
                setattr(p, f"gb_{name}", a.ctypes.data)
            for name in GB_CONSTANTS:
                setattr(p, f"gb_{name}", float(gb[name]))
        self.has_gb = gb is not None
        self._keep = keep
        self._params = p
        self.n_atoms = int(n_atoms)

    def __call__(self, x: torch.Tensor, beta: float, need_grad: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x: (batch, n_atoms, 3) nm, CPU float32/float64 -> (u (batch,) kT, +inf where invalid;
        valid (batch,) bool; du/dx (batch, n_atoms, 3) kT/nm, zero rows where invalid, or None)."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the CPU kernel takes CPU float32/float64 positions, got {x.dtype} on {x.device}")
        x = x.detach().contiguous()
        batch = x.shape[0]
        u = torch.empty(batch, dtype=x.dtype)
        g = torch.empty_like(x) if need_grad else None
        fn = self._lib.bf_energy_f64 if x.dtype == torch.float64 else self._lib.bf_energy_f32
        if batch:
            fn(ctypes.byref(self._params), x.data_ptr(), batch, u.data_ptr(), g.data_ptr() if g is not None else None,
               float(beta), max(1, torch.get_num_threads()))
        return u, torch.isfinite(u), g
