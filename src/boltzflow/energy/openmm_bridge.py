"""OpenMM -> torch energy bridge: reduced energies (kT) and forces of a MolecularSystem.

``OpenMMEnergy(system)`` is a ``torch.nn.Module``: ``u = energy(x)`` for ``x: (batch, n_atoms, 3)``
nm (float32/float64, any device) returns ``(batch,)`` kT on x's device and dtype; the backward
pass uses OpenMM forces (du/dx = -F/kT). Per-term energies come from force groups (one group per
canonical term name, see :mod:`boltzflow.energy.terms`).

``n_workers=1`` evaluates in-process with one Context; ``n_workers>1`` spreads the batch over a
pool of spawned worker processes, each owning its own Context. A worker that dies or hangs raises
:class:`~boltzflow.errors.WorkerError` naming it; the pool is then torn down and restarted on the
next call. Configurations OpenMM cannot evaluate (non-finite coordinates or energies, exceptions)
get ``u = +inf``, ``valid = False`` and zero gradient. Nothing is cached by tensor content.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from ..errors import InputError, WorkerError
from .base import TERM_NAMES, EnergyCap, EnergyResult, check_positions, log_linear_cap
from .terms import term_systems

PLATFORMS = ("CPU", "Reference", "CUDA", "OpenCL")


# ---------------------------------------------------------------------------------------------
# evaluation kernel shared by the in-process engine and the workers (no torch needed)
# ---------------------------------------------------------------------------------------------
def _compute(context, x: np.ndarray, masks: list[int], want_forces: bool):
    """Energies (batch, G) kJ/mol, forces (batch, G, n, 3) kJ/mol/nm or None, valid (batch,).

    ``x: (batch, n, 3)`` float64 nm; one OpenMM ``getState`` per (sample, group mask)."""
    import openmm.unit as unit

    b, n = x.shape[0], x.shape[1]
    g = len(masks)
    energies = np.full((b, g), np.inf)
    forces = np.zeros((b, g, n, 3)) if want_forces else None
    valid = np.zeros(b, dtype=bool)
    kj = unit.kilojoule_per_mole
    fu = unit.kilojoule_per_mole / unit.nanometer
    for i in range(b):
        xi = x[i]
        if not np.all(np.isfinite(xi)):
            continue
        try:
            context.setPositions(xi)
            e_i = np.empty(g)
            f_i = np.empty((g, n, 3)) if want_forces else None
            for k, mask in enumerate(masks):
                st = context.getState(getEnergy=True, getForces=want_forces, groups=mask)
                e_i[k] = st.getPotentialEnergy().value_in_unit(kj)
                if want_forces:
                    f_i[k] = st.getForces(asNumpy=True).value_in_unit(fu)
        except Exception:  # OpenMM refuses the configuration (e.g. NaN, overflow): sample invalid
            continue
        ok = bool(np.all(np.isfinite(e_i)) and (not want_forces or np.all(np.isfinite(f_i))))
        if ok:
            energies[i] = e_i
            if want_forces:
                forces[i] = f_i
            valid[i] = True
    return energies, forces, valid


def _make_context(system_xml: str, platform: str, properties: dict[str, str]):
    import openmm

    system = openmm.XmlSerializer.deserialize(system_xml)
    plat = openmm.Platform.getPlatformByName(platform)
    return openmm.Context(system, openmm.VerletIntegrator(0.001), plat, dict(properties))


def _worker_main(conn, system_xml: str, platform: str, properties: dict[str, str]) -> None:
    """Worker process: build a Context, then answer (x, masks, want_forces) requests until None."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts us down
    try:
        ctx = _make_context(system_xml, platform, properties)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        try:
            conn.send(("ok", _compute(ctx, *msg)))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


# ---------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------
class _InProcess:
    def __init__(self, system_xml: str, platform: str, properties: dict[str, str]):
        self._args = (system_xml, platform, properties)
        self._ctx = None

    def compute(self, x, masks, want_forces):
        if self._ctx is None:
            self._ctx = _make_context(*self._args)
        return _compute(self._ctx, x, masks, want_forces)

    def close(self) -> None:
        self._ctx = None

    @property
    def pids(self) -> list[int]:
        return []


def _shutdown(procs: list, conns: list, timeout: float = 5.0) -> None:
    """Stop worker processes: polite request, then join, then terminate/kill."""
    for c in conns:
        try:
            c.send(None)
        except Exception:
            pass
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.terminate()
            p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for c in conns:
        try:
            c.close()
        except Exception:
            pass
    procs.clear()
    conns.clear()


class _Pool:
    """Spawned worker processes, one OpenMM Context each; batches are split across them."""

    def __init__(self, system_xml: str, platform: str, properties_for, n_workers: int, timeout: float):
        self._xml = system_xml
        self._platform = platform
        self._properties_for = properties_for  # worker index -> platform properties
        self.n_workers = n_workers
        self.timeout = timeout
        self._procs: list = []
        self._conns: list = []
        self._finalizer = None

    def _start(self) -> None:
        import multiprocessing as mp
        import time

        ctx = mp.get_context("spawn")
        procs, conns = [], []
        self._procs, self._conns = procs, conns
        self._finalizer = weakref.finalize(self, _shutdown, procs, conns)
        for k in range(self.n_workers):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker_main, args=(child, self._xml, self._platform, self._properties_for(k)),
                            name=f"boltzflow-openmm-worker-{k}", daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        deadline = time.monotonic() + max(self.timeout, 60.0)
        for k in range(self.n_workers):
            status, info = self._receive(k, deadline, "starting")
            if status != "ready":
                self.close()
                raise WorkerError(f"OpenMM worker {k} failed to start on platform {self._platform}: {info}")

    def _receive(self, k: int, deadline: float, doing: str):
        import time

        conn, proc = self._conns[k], self._procs[k]
        while True:
            try:
                if conn.poll(0.05):
                    return conn.recv()
            except (EOFError, OSError):
                pass  # pipe closed: the worker is gone; report below
            if not proc.is_alive():
                code = proc.exitcode
                self.close()
                raise WorkerError(f"OpenMM worker {k} (pid {proc.pid}) died while {doing} (exit code {code}); "
                                  "the pool was shut down and will restart on the next call")
            if time.monotonic() > deadline:
                pid = proc.pid
                self.close()
                raise WorkerError(f"OpenMM worker {k} (pid {pid}) did not answer within {self.timeout:.0f} s while "
                                  f"{doing}; the pool was shut down (raise timeout= for slow evaluations)")

    def compute(self, x, masks, want_forces):
        import time

        if not self._procs:
            self._start()
        chunks = [c for c in np.array_split(x, min(self.n_workers, len(x))) if len(c)]
        for k, c in enumerate(chunks):
            try:
                self._conns[k].send((np.ascontiguousarray(c), masks, want_forces))
            except (BrokenPipeError, EOFError, OSError):
                pid, code = self._procs[k].pid, self._procs[k].exitcode
                self.close()
                raise WorkerError(f"OpenMM worker {k} (pid {pid}) is gone (exit code {code}); "
                                  "the pool was shut down and will restart on the next call") from None
        deadline = time.monotonic() + self.timeout
        results = []
        for k in range(len(chunks)):
            status, payload = self._receive(k, deadline, "evaluating energies")
            if status != "ok":
                self.close()
                raise WorkerError(f"OpenMM worker {k} failed: {payload}")
            results.append(payload)
        e = np.concatenate([r[0] for r in results])
        f = np.concatenate([r[1] for r in results]) if want_forces else None
        v = np.concatenate([r[2] for r in results])
        return e, f, v

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown once
            self._finalizer = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
class _OpenMMFunction(torch.autograd.Function):
    """x (batch, n, 3) -> (u (batch, G) kT, valid (batch,)); backward with OpenMM forces."""

    @staticmethod
    def forward(ctx, x, module, masks, grad_max):
        need_grad = ctx.needs_input_grad[0]
        x64 = x.detach().to("cpu", torch.float64).numpy()
        e, f, valid = module._engine.compute(x64, masks, need_grad)
        beta = module.system.beta
        u = torch.from_numpy(e * beta).to(device=x.device, dtype=x.dtype)
        finite = torch.isfinite(u).all(dim=1)  # float32 overflow counts as invalid
        valid_t = torch.from_numpy(valid).to(x.device) & finite
        u = torch.where(valid_t[:, None], u, torch.full_like(u, float("inf")))
        if need_grad:
            grad = torch.from_numpy(-f * beta).to(device=x.device, dtype=x.dtype)  # du/dx, (b, G, n, 3)
            grad = torch.where(valid_t[:, None, None, None], grad, torch.zeros_like(grad))
            ctx.save_for_backward(grad, valid_t)
            ctx.grad_max = grad_max
        ctx.mark_non_differentiable(valid_t)
        return u, valid_t

    @staticmethod
    def backward(ctx, gu, _gvalid):
        grad, valid = ctx.saved_tensors
        gu = torch.where(valid[:, None], gu, torch.zeros_like(gu))
        per_term = gu[:, :, None, None] * grad  # (b, G, n, 3)
        if ctx.grad_max is not None:
            norm = per_term.flatten(2).norm(dim=2).clamp_min(1e-30)  # (b, G)
            scale = torch.clamp(ctx.grad_max / norm, max=1.0)
            per_term = per_term * scale[:, :, None, None]
        return per_term.sum(dim=1), None, None, None


# ---------------------------------------------------------------------------------------------
# public module
# ---------------------------------------------------------------------------------------------
def _check_platform(platform: str) -> None:
    import openmm

    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if platform not in PLATFORMS:
        raise InputError(f"unknown OpenMM platform {platform!r}; choose one of {', '.join(PLATFORMS)}")
    if platform not in available:
        raise InputError(f"OpenMM platform {platform!r} is not available on this machine "
                         f"(available: {', '.join(available)}); pick another with platform=/--platform")


class OpenMMEnergy(torch.nn.Module):
    """Reduced energy u(x) in kT of a :class:`~boltzflow.systems.MolecularSystem` via OpenMM.

    system: the MolecularSystem. cap: optional :class:`EnergyCap` (per-term gradient cap in kT/nm,
    log-linear energy cap in kT). platform: "CPU" | "Reference" | "CUDA" | "OpenCL".
    n_workers: 1 = one in-process Context; >1 = that many spawned worker processes (scripts that use
    workers need the usual ``if __name__ == "__main__":`` guard of the spawn start method).
    device_index: GPU index for CUDA/OpenCL (every worker uses this device; None = OpenMM's choice).
    precision: "single" | "mixed" | "double" (CUDA/OpenCL only).
    threads: CPU-platform threads per Context (default 1). timeout: seconds a worker may take per call.
    """

    def __init__(self, system, cap: EnergyCap | None = None, platform: str = "CPU", n_workers: int = 1,
                 device_index: int | None = None, precision: str | None = None, threads: int | None = 1,
                 timeout: float = 300.0):
        super().__init__()
        import openmm

        _check_platform(platform)
        if not isinstance(n_workers, int) or n_workers < 1:
            raise InputError(f"n_workers must be an integer >= 1, got {n_workers!r}")
        if precision is not None and precision not in ("single", "mixed", "double"):
            raise InputError(f"precision must be single, mixed or double, got {precision!r}")
        if precision is not None and platform not in ("CUDA", "OpenCL"):
            raise InputError(f"precision applies to the CUDA and OpenCL platforms only, not {platform}")
        if device_index is not None and platform not in ("CUDA", "OpenCL"):
            raise InputError(f"device_index applies to the CUDA and OpenCL platforms only, not {platform}")
        self.system = system
        self.cap = cap
        self.platform = platform
        self.n_workers = n_workers
        split, groups = term_systems(system.system, system.topology)
        #: canonical term names present in this System, in TERM_NAMES order
        self.term_names: tuple[str, ...] = tuple(t for t in TERM_NAMES if t in groups)
        self._term_masks = [1 << TERM_NAMES.index(t) for t in self.term_names]
        self._all_mask = sum(self._term_masks)
        props: dict[str, str] = {}
        if platform == "CPU" and threads is not None:
            props["Threads"] = str(int(threads))
        if platform in ("CUDA", "OpenCL"):
            if precision is not None:
                props["Precision"] = precision
            if device_index is not None:
                props["DeviceIndex"] = str(int(device_index))
        xml = openmm.XmlSerializer.serialize(split)
        if n_workers == 1:
            self._engine = _InProcess(xml, platform, props)
        else:
            self._engine = _Pool(xml, platform, lambda k: props, n_workers, float(timeout))

    @property
    def n_atoms(self) -> int:
        return self.system.n_atoms

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live worker processes (empty in-process or before the first call)."""
        return self._engine.pids

    def _grad_max(self):
        return None if self.cap is None else self.cap.term_grad_max

    def evaluate(self, x: torch.Tensor) -> EnergyResult:
        """EnergyResult(u (batch,) kT with caps applied, valid (batch,) bool) for x (batch, n_atoms, 3) nm."""
        x = check_positions(x, self.n_atoms)
        if len(x) == 0:
            return EnergyResult(x.new_zeros(0), torch.zeros(0, dtype=torch.bool, device=x.device))
        grad_max = self._grad_max()
        masks = self._term_masks if grad_max is not None else [self._all_mask]
        u, valid = _OpenMMFunction.apply(x, self, masks, grad_max)
        u = u.sum(dim=1)
        if self.cap is not None:
            u = log_linear_cap(u, self.cap.energy_max)
        return EnergyResult(u, valid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch,) reduced energy in kT (+inf where invalid)."""
        return self.evaluate(x).u

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{term name: (batch,) kT} (uncapped energies; gradients obey the per-term cap)."""
        x = check_positions(x, self.n_atoms)
        u, _ = _OpenMMFunction.apply(x, self, self._term_masks, self._grad_max())
        return {name: u[:, k] for k, name in enumerate(self.term_names)}

    def close(self) -> None:
        """Release the Context / stop the worker processes (idempotent)."""
        self._engine.close()

    def __enter__(self) -> "OpenMMEnergy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort; weakref.finalize also covers exit
        try:
            self.close()
        except Exception:
            pass

    def extra_repr(self) -> str:
        return f"system={self.system.name!r}, platform={self.platform!r}, n_workers={self.n_workers}, cap={self.cap}"
