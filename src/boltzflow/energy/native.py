"""Native batched CHARMM36m energy in torch: the fast path, checked against OpenMM.

``NativeEnergy(system)`` compiles a MolecularSystem's OpenMM System once into index and
parameter tensors (registered buffers, so ``.to(device)`` works) and evaluates
``x: (batch, n_atoms, 3)`` nm -> ``u: (batch,)`` kT in vectorised tensor ops, in x's dtype
(float32 or float64) and on x's device.

Two evaluation paths compute the same formulas. The default *analytic* path computes energy and
hand-derived forces together in one pass. On the CPU it runs the C++ kernel
(:mod:`boltzflow.energy.native_cpu`: built on first use with the system compiler, every term
including OBC2 GB, vectorised over blocks of configurations, OpenMP over ``torch.get_num_threads()``;
``cpu_kernel="auto"``); on CUDA, or with ``cpu_kernel="torch"`` or no compiler, the torch kernels
(:mod:`boltzflow.energy.native_kernels`) over batch chunks of ``chunk_size`` configurations in a
component-major ``(3, n_atoms, batch)`` layout, optionally fused by ``torch.compile``
(``compile=True``), with GB on autograd. The *autograd* path (``analytic=False``, and whenever
per-term gradient caps are set) differentiates the energy with autograd. Double backward works on
both (the analytic path re-evaluates through autograd when ``create_graph=True``).

Supported forces (everything CHARMM36m produces in vacuum / OBC2 through the ForceField
route ``charmm36_2024.xml [+ implicit/obc2.xml]`` and through ``CharmmPsfFile``), all NoCutoff,
non-periodic:

- HarmonicBondForce: 0.5 k (r - r0)^2. A pair joining the two ends of an angle is reported as
  ``urey_bradley``, otherwise ``bond`` (the rule of :mod:`boltzflow.energy.terms`).
- HarmonicAngleForce: 0.5 k (theta - theta0)^2 (``angle``).
- PeriodicTorsionForce: k (1 + cos(n phi - phase)), any number of terms (``torsion``).
- CustomTorsionForce harmonic impropers ``k*min(dtheta, 2*pi-dtheta)^2; dtheta=abs(theta-theta0)``
  with the expression's own value of ``pi`` (charmm36_2024.xml, CharmmPsfFile), or the unwrapped
  ``k*(theta-theta0)^2`` of charmm36.xml (``improper``).
- CMAPTorsionForce: OpenMM's bicubic patches built from periodic cubic-spline derivatives
  on the grid ``energy[i + size*j]`` at angles ``(2 pi i/size, 2 pi j/size)`` (``cmap``).
- NonbondedForce (Coulomb + Lennard-Jones with Lorentz-Berthelot mixing and exceptions),
  CustomNonbondedForce (e.g. acoef/bcoef tables incl. NBFIX, with exclusions) and CustomBondForce
  (1-4 LJ): every pair term is reduced to ``A/r^12 - B/r^6`` (``lj``) + ``C/r`` (``coulomb``)
  on one merged pair list.
- GB: CustomGBForce in the OBC2 form of ``openmm.app.internal.customgbforces.GBSAOBC2Force``
  (implicit/obc2.xml and CharmmPsfFile, incl. the ACE surface-area term and salt ``kappa``) and
  the built-in GBSAOBCForce (``gb``).

Compilation: each OpenMM force class has one compiler function (``@force_compiler`` in
:data:`FORCE_COMPILERS`) that turns the force into a :class:`TermTable`; a force's table is merged
into the System's only when the whole force compiled. Adding a force type is one such function (plus,
for a new kind of term, its evaluation here and in the kernels).

Custom expressions are never trusted by spelling: each is evaluated at probe points with
:mod:`boltzflow.energy.native_expr` and compared with the formula implemented here; anything
else makes :func:`unsupported_forces` name the force (use ``backend='openmm'`` for it).

Accuracy: float64 agrees with OpenMM's Reference platform to ~1e-14 relative per term (tests
require 1e-6). float32 vs float64 on perturbed alanine dipeptide: ~2e-6 relative energy (~5e-4 kT)
and ~4e-6 relative force (max component error / max force), vacuum and OBC2.

Degenerate geometry: distances use ``sqrt(max(r^2, 1e-30))``, angles ``atan2(|u x v|, u.v)``
with a clamped cross-product norm, dihedrals ``atan2`` with a guarded (0, 0) case. So a
collinear angle, a zero-length bond or coincident atoms give finite values and finite (zero
where undefined) gradients. Coincident *non-excluded* atoms give a huge or infinite LJ energy;
a non-finite energy (or non-finite input) gives ``u = +inf``, ``valid = False`` and a zero
gradient for that sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .base import EnergyCap, EnergyResult, cap_gradient, check_positions, log_linear_cap
from .native_expr import Expression, ExpressionError, numeric_definitions

#: Coulomb constant used by OpenMM's NonbondedForce / GBSAOBCForce, kJ nm / (mol e^2).
ONE_4PI_EPS0 = 138.93545764438198
#: Constants hard-coded in openmm.app.internal.customgbforces (the OBC2 CustomGBForce).
_GB_PREF = 138.935485
_ACE_COEF = 28.3919551
_ACE_PROBE = 0.14
#: Clamp for squared norms (nm^2, nm^4): keeps sqrt/atan2 gradients finite at degenerate geometry.
_TINY = 1e-30
#: Clamp for squared distances inside the GB integrals (nm^2).
_GB_TINY = 1e-12

_IGNORED = ("CMMotionRemover", "AndersenThermostat")


def _v(q) -> float:
    """Strip an openmm.unit Quantity (OpenMM's default units: nm, kJ/mol, rad, e)."""
    return float(q._value) if hasattr(q, "_value") else float(q)


# ------------------------------------------------------------------------------------------
# compilation: OpenMM System -> numpy arrays
# ------------------------------------------------------------------------------------------
@dataclass
class TermTable:
    """The terms one OpenMM force contributes, as rows of plain numbers (OpenMM units: nm, rad, kJ/mol).

    bonds ``(i, j, r0, k)``; angles ``(i, j, k, theta0, k)``; torsions ``(i, j, k, l, n, phase, k)``;
    impropers ``(i, j, k, l, k, theta0, two_pi)``; cmap_maps ``(size, coefficients (size*size, 16))``;
    cmaps ``(map, a1..a8)`` with ``map`` indexing this table's maps; pair_A/B/C: additions to the pair
    coefficients over the ``n (n-1) / 2`` upper-triangle pairs (``A/r^12 - B/r^6 + C/r``; None: none);
    gb: the GB parameters (:func:`_set_gb`) or None."""

    n: int
    bonds: list = field(default_factory=list)
    angles: list = field(default_factory=list)
    torsions: list = field(default_factory=list)
    impropers: list = field(default_factory=list)
    cmap_maps: list = field(default_factory=list)
    cmaps: list = field(default_factory=list)
    pair_A: np.ndarray | None = None
    pair_B: np.ndarray | None = None
    pair_C: np.ndarray | None = None
    gb: dict | None = None

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This table's pair-coefficient additions (A, B, C), created as zeros on first use; add into them."""
        if self.pair_A is None:
            m = self.n * (self.n - 1) // 2
            self.pair_A, self.pair_B, self.pair_C = np.zeros(m), np.zeros(m), np.zeros(m)
        return self.pair_A, self.pair_B, self.pair_C  # type: ignore[return-value]


@dataclass
class _Compiled(TermTable):
    """A whole System: the merged :class:`TermTable` of its supported forces, the forces it cannot
    evaluate (``unsupported``), the terms present (``present``, reported even when empty) and the pair
    list ``pair_iu``, ``pair_ju``."""

    unsupported: list = field(default_factory=list)
    present: set = field(default_factory=set)  # term names of forces present (possibly empty)
    pair_iu: np.ndarray | None = None
    pair_ju: np.ndarray | None = None

    def merge(self, t: TermTable) -> None:
        """Append a force's table (rows in force order; cmap map indices shifted past the maps so far)."""
        if t.gb is not None:
            self.gb = t.gb
        base = len(self.cmap_maps)
        self.bonds += t.bonds
        self.angles += t.angles
        self.torsions += t.torsions
        self.impropers += t.impropers
        self.cmap_maps += t.cmap_maps
        self.cmaps += [(base + m, *atoms) for m, *atoms in t.cmaps]
        if t.pair_A is not None:
            a, b, c = self.pairs()
            a += t.pair_A
            b += t.pair_B
            c += t.pair_C


class _Unsupported(Exception):
    pass


def _triu_index(n: int):
    iu, ju = np.triu_indices(n, k=1)
    lookup = -np.ones((n, n), dtype=np.int64)
    lookup[iu, ju] = np.arange(len(iu))
    lookup[ju, iu] = np.arange(len(iu))
    return iu, ju, lookup


def _check_nocutoff(force, what: str = "NoCutoff") -> None:
    if force.getNonbondedMethod() != 0:
        raise _Unsupported(f"nonbonded method {force.getNonbondedMethod()} is not {what}")


def _globals(force) -> dict[str, float]:
    return {force.getGlobalParameterName(i): force.getGlobalParameterDefaultValue(i) for i in range(force.getNumGlobalParameters())}


def _tabulated(force) -> dict:
    import openmm

    funcs = {}
    for t in range(force.getNumTabulatedFunctions()):
        name = force.getTabulatedFunctionName(t)
        fn = force.getTabulatedFunction(t)
        if isinstance(fn, openmm.Discrete2DFunction):
            xs, ys, vals = fn.getFunctionParameters()
            vals = list(vals)
            funcs[name] = lambda a, b, xs=xs, vals=vals: vals[int(round(a)) + xs * int(round(b))]
        elif isinstance(fn, openmm.Discrete1DFunction):
            vals = list(fn.getFunctionParameters())
            funcs[name] = lambda a, vals=vals: vals[int(round(a))]
        else:
            raise _Unsupported(f"tabulated function {name!r} of type {type(fn).__name__}")
    return funcs


_PROBE_R = np.array([0.22, 0.45, 1.1])
_CHECK_R = np.array([0.3, 0.7, 2.0])


def _basis(r: np.ndarray) -> np.ndarray:
    return np.stack([r**-12.0, -(r**-6.0), 1.0 / r], axis=1)


def _fit_pair(fun) -> tuple[float, float, float]:
    """Fit E(r) = A/r^12 - B/r^6 + C/r from probes; verify elsewhere, else raise."""
    e = np.array([fun(r) for r in _PROBE_R])
    coef = np.linalg.solve(_basis(_PROBE_R), e)
    chk = np.array([fun(r) for r in _CHECK_R])
    pred = _basis(_CHECK_R) @ coef
    scale = np.abs(_basis(_CHECK_R) * coef).sum(1) + 1e-12
    if not np.all(np.abs(chk - pred) <= 1e-8 * scale):
        raise _Unsupported("energy expression is not of the form A/r^12 - B/r^6 + C/r")
    return float(coef[0]), float(coef[1]), float(coef[2])


def _compile_periodic_cmap_coefficients(size: int, energy: np.ndarray) -> np.ndarray:
    """OpenMM's CMAP patch coefficients: (size*size, 16), patch index s + size*t, c[4a+b] * da^a * db^b.

    energy: (size*size,) kJ/mol with energy[i + size*j] at angles (2 pi i/size, 2 pi j/size).
    Derivatives at the knots come from periodic cubic splines (first angle, second angle,
    then the cross derivative as the first-angle derivative of the second-angle derivative)."""
    from scipy.interpolate import CubicSpline

    grid = np.asarray(energy, dtype=np.float64).reshape(size, size)  # grid[j, i]: i first angle, j second
    knots = np.arange(size + 1) * (2 * np.pi / size)

    def dperiodic(values: np.ndarray, axis: int) -> np.ndarray:
        v = np.moveaxis(values, axis, -1)
        v = np.concatenate([v, v[..., :1]], axis=-1)
        d = CubicSpline(knots, v, axis=-1, bc_type="periodic")(knots[:-1], 1)
        return np.moveaxis(d, -1, axis)

    d1 = dperiodic(grid, 1)  # d/d(first angle)
    d2 = dperiodic(grid, 0)  # d/d(second angle)
    d12 = dperiodic(d2, 1)
    delta = 2 * np.pi / size
    i = np.arange(size)
    ii, jj = np.meshgrid(i, i, indexing="xy")  # ii[j, i] = i, jj[j, i] = j
    ni, nj = (ii + 1) % size, (jj + 1) % size
    corners = [(ii, jj), (ni, jj), (ni, nj), (ii, nj)]

    def corner_values(f):
        return np.stack([f[b, a] for a, b in corners], axis=-1)  # (size, size, 4) indexed [j, i]

    # bicubic interpolation: rows of the inverse Hermite matrix, corners ordered (0,0),(1,0),(1,1),(0,1)
    x = np.concatenate(
        [corner_values(grid), corner_values(d1) * delta, corner_values(d2) * delta, corner_values(d12) * delta * delta],
        axis=-1,
    )  # (size, size, 16)
    coeff = x @ _bicubic_matrix().T  # (size, size, 16)
    return coeff.reshape(size * size, 16)  # row j*size + i == s + size*t with s=i, t=j


def _bicubic_matrix() -> np.ndarray:
    """16x16 matrix W with coeff = W @ [f(4), f_a(4), f_b(4), f_ab(4)] (corners (0,0),(1,0),(1,1),(0,1)).

    Derived, not tabulated: solve the Hermite conditions of p(a, b) = sum c[4i+j] a^i b^j."""
    corners = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    rows = []
    for kind in range(4):
        for a, b in corners:
            row = np.zeros(16)
            for i in range(4):
                for j in range(4):
                    if kind == 0:
                        row[4 * i + j] = a**i * b**j
                    elif kind == 1:
                        row[4 * i + j] = i * a ** max(i - 1, 0) * b**j if i else 0.0
                    elif kind == 2:
                        row[4 * i + j] = j * a**i * b ** max(j - 1, 0) if j else 0.0
                    else:
                        row[4 * i + j] = i * j * a ** max(i - 1, 0) * b ** max(j - 1, 0) if i and j else 0.0
            rows.append(row)
    return np.linalg.inv(np.array(rows))


def _obc_I(r, or1, sr2):
    if r + sr2 - or1 < 0:
        return 0.0
    U = r + sr2
    L = max(or1, abs(r - sr2))
    return 0.5 * (1 / L - 1 / U + 0.25 * (r - sr2 * sr2 / r) * (1 / U**2 - 1 / L**2) + 0.5 * math.log(L / U) / r)


def _obc2_B(I, or_, offset):
    psi = I * or_
    return 1 / (1 / or_ - math.tanh(psi - 0.8 * psi**2 + 4.85 * psi**3) / (or_ + offset))


def _close(a: float, b: float, tol: float = 1e-8) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _compile_custom_gb(force, c: TermTable) -> None:
    import openmm

    _check_nocutoff(force)
    if force.getNumTabulatedFunctions():
        raise _Unsupported("tabulated functions")
    names = [force.getPerParticleParameterName(i) for i in range(force.getNumPerParticleParameters())]
    if not {"charge", "or", "sr"} <= set(names):
        raise _Unsupported(f"per-particle parameters {names} are not (charge, or, sr)")
    glob = _globals(force)
    pair_noexcl = openmm.CustomGBForce.ParticlePairNoExclusions
    single = openmm.CustomGBForce.SingleParticle
    if force.getNumComputedValues() != 2:
        raise _Unsupported("expected 2 computed values (I, B) of the OBC2 form")
    nI, eI, tI = force.getComputedValueParameters(0)
    nB, eB, tB = force.getComputedValueParameters(1)
    if (nI, nB, tI, tB) != ("I", "B", pair_noexcl, single):
        raise _Unsupported("computed values are not I (pair, no exclusions) and B (single particle)")
    try:
        fI, fB = Expression(eI), Expression(eB)
        offset = numeric_definitions(eB).get("offset")
        if offset is None:
            raise _Unsupported("B expression has no 'offset' definition")
        for r in (0.05, 0.15, 0.3, 0.6, 1.5):
            for or1, sr2 in ((0.1, 0.06), (0.15, 0.13), (0.11, 0.16), (0.2, 0.05)):
                v = dict(glob, r=r, or1=or1, sr2=sr2, or2=0.13, sr1=0.09, charge1=0.3, charge2=-0.4)
                if not _close(fI(v), _obc_I(r, or1, sr2)):
                    raise _Unsupported(f"computed value I is not the OBC integral: {eI!r}")
        for I in (0.3, 2.0, 6.0):
            for or_ in (0.1, 0.16):
                if not _close(fB(dict(glob, I=I, sr=0.07, charge=0.2, **{"or": or_})), _obc2_B(I, or_, offset)):
                    raise _Unsupported(f"computed value B is not the OBC2 Born radius: {eB!r}")
        gb: dict[str, Any] = {"offset": offset, "sa": None, "pair": None, "self": None}
        for t in range(force.getNumEnergyTerms()):
            expr, kind = force.getEnergyTermParameters(t)
            f = Expression(expr)
            nd = numeric_definitions(expr)
            eps_in, eps_out, kappa = nd.get("soluteDielectric"), nd.get("solventDielectric"), nd.get("kappa", 0.0)
            if kind == single:
                pts = [(q, or_, B) for q in (0.4, -0.7) for or_ in (0.1, 0.17) for B in (0.12, 0.35)]
                vals = [f(dict(glob, charge=q, sr=0.08, B=B, **{"or": or_})) for q, or_, B in pts]
                if eps_in is not None and eps_out is not None:
                    ref = [-0.5 * _GB_PREF * (1 / eps_in - math.exp(-kappa * B) / eps_out) * q * q / B for q, _, B in pts]
                    if all(_close(a, b) for a, b in zip(vals, ref)) and gb["self"] is None:
                        gb["self"] = (eps_in, eps_out, kappa)
                        continue
                off = nd.get("offset", offset)
                ref = [_ACE_COEF * (or_ + off + _ACE_PROBE) ** 2 * ((or_ + off) / B) ** 6 for _, or_, B in pts]
                if all(_close(a, b) for a, b in zip(vals, ref)) and gb["sa"] is None:
                    gb["sa"] = (_ACE_COEF, off, _ACE_PROBE)
                    continue
                raise _Unsupported(f"single-particle energy term not recognised: {expr!r}")
            elif kind == pair_noexcl and eps_in is not None and eps_out is not None:
                pts = [(r, B1, B2) for r in (0.1, 0.3, 0.9) for B1, B2 in ((0.12, 0.2), (0.3, 0.15))]
                ok = gb["pair"] is None
                for r, B1, B2 in pts:
                    fij = math.sqrt(r * r + B1 * B2 * math.exp(-r * r / (4 * B1 * B2)))
                    ref = -_GB_PREF * (1 / eps_in - math.exp(-kappa * fij) / eps_out) * 0.3 * -0.6 / fij
                    val = f(dict(glob, r=r, B1=B1, B2=B2, charge1=0.3, charge2=-0.6, or1=0.1, or2=0.12, sr1=0.07, sr2=0.09))
                    ok = ok and _close(val, ref)
                if not ok:
                    raise _Unsupported(f"pair energy term not recognised: {expr!r}")
                gb["pair"] = (eps_in, eps_out, kappa)
            else:
                raise _Unsupported(f"energy term of type {kind} not recognised: {expr!r}")
    except ExpressionError as e:
        raise _Unsupported(str(e)) from e
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        raise _Unsupported(f"expression could not be checked: {e}") from e
    if gb["self"] is None or gb["pair"] is None or gb["self"] != gb["pair"]:
        raise _Unsupported("missing or inconsistent GB self / pair energy terms")
    params = np.array([force.getParticleParameters(i) for i in range(force.getNumParticles())], dtype=np.float64)
    col = {nm: k for k, nm in enumerate(names)}
    _set_gb(c, params[:, col["charge"]], params[:, col["or"]], params[:, col["sr"]], offset, gb["self"], _GB_PREF, gb["sa"])


def _set_gb(c: TermTable, charge, or_, sr, offset, diel, pref, sa) -> None:
    eps_in, eps_out, kappa = diel
    c.gb = {
        "charge": np.asarray(charge, dtype=np.float64),
        "or": np.asarray(or_, dtype=np.float64),
        "sr": np.asarray(sr, dtype=np.float64),
        "offset": float(offset),
        "pref": float(pref),
        "eps_in": float(eps_in),
        "eps_out": float(eps_out),
        "kappa": float(kappa),
        "sa_coef": 0.0 if sa is None else float(sa[0]),
        "sa_offset": float(offset) if sa is None else float(sa[1]),
        "probe": _ACE_PROBE if sa is None else float(sa[2]),
    }


# ------------------------------------------------------------------------------------------
# force compilers: one function per OpenMM force type -> TermTable
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairIndex:
    """The upper-triangle pair list of ``n`` atoms: ``iu``, ``ju`` ``(n (n-1) / 2,)`` and ``lookup[i, j]``,
    the pair's position (-1 on the diagonal)."""

    iu: np.ndarray
    ju: np.ndarray
    lookup: np.ndarray

    @classmethod
    def of(cls, n: int) -> PairIndex:
        return cls(*_triu_index(n))


#: a force compiler: reads one OpenMM force and writes its terms into the TermTable (raises
#: _Unsupported, with the reason, for a form it does not implement)
ForceCompiler = Callable[[Any, TermTable, PairIndex], None]


@dataclass(frozen=True)
class _Registered:
    compile: ForceCompiler
    term: str | None  # the term reported (as zeros) even when the force is empty, like the bridge


#: OpenMM force class name -> its compiler. Adding a force type is one ``@force_compiler`` function here
#: (plus, for a new kind of term, its evaluation in NativeEnergy and the kernels).
FORCE_COMPILERS: dict[str, _Registered] = {}


def force_compiler(kind: str, term: str | None = None) -> Callable[[ForceCompiler], ForceCompiler]:
    """Register the decorated function as the compiler of OpenMM forces of class ``kind``; ``term``: the
    term name reported even when such a force is empty."""

    def register(fn: ForceCompiler) -> ForceCompiler:
        FORCE_COMPILERS[kind] = _Registered(fn, term)
        return fn

    return register


@force_compiler("HarmonicBondForce")
def _harmonic_bonds(force, t: TermTable, pairs: PairIndex) -> None:
    for b in range(force.getNumBonds()):
        i, j, r0, k = force.getBondParameters(b)
        t.bonds.append((i, j, _v(r0), _v(k)))


@force_compiler("HarmonicAngleForce", term="angle")
def _harmonic_angles(force, t: TermTable, pairs: PairIndex) -> None:
    for a in range(force.getNumAngles()):
        i, j, k_, t0, k = force.getAngleParameters(a)
        t.angles.append((i, j, k_, _v(t0), _v(k)))


@force_compiler("PeriodicTorsionForce", term="torsion")
def _periodic_torsions(force, t: TermTable, pairs: PairIndex) -> None:
    for n in range(force.getNumTorsions()):
        i, j, k_, l, per, ph, k = force.getTorsionParameters(n)
        t.torsions.append((i, j, k_, l, float(per), _v(ph), _v(k)))


@force_compiler("CustomTorsionForce", term="improper")
def _harmonic_impropers(force, t: TermTable, pairs: PairIndex) -> None:
    expr = force.getEnergyFunction()
    names = [force.getPerTorsionParameterName(i) for i in range(force.getNumPerTorsionParameters())]
    if not {"k", "theta0"} <= set(names):
        raise _Unsupported(f"per-torsion parameters {names} are not (k, theta0): {expr!r}")
    pi_ = numeric_definitions(expr).get("pi", math.pi)
    glob = _globals(force)
    two_pi = None
    try:
        f = Expression(expr)
        for cand in (2 * pi_, math.inf):  # wrapped (charmm36_2024.xml, CharmmPsfFile) or plain k*(theta-theta0)^2
            ok = True
            for k in (1.3, 50.0):
                for t0 in (0.0, 0.4, -2.9, math.pi):
                    for th in np.linspace(-math.pi, math.pi, 13):
                        d = abs(th - t0)
                        ref = k * min(d, cand - d) ** 2
                        var = dict(glob, **{nm: 0.0 for nm in names})
                        var.update(theta=float(th), k=k, theta0=t0)
                        ok = ok and _close(f(var), ref)
            if ok:
                two_pi = cand
                break
    except (ExpressionError, ValueError, ZeroDivisionError) as e:
        raise _Unsupported(f"{e}") from e
    if two_pi is None:
        raise _Unsupported(f"not a harmonic improper k*min(dtheta, 2*pi-dtheta)^2 or k*(theta-theta0)^2: {expr!r}")
    ik, it0 = names.index("k"), names.index("theta0")
    for n in range(force.getNumTorsions()):
        i, j, k_, l, p = force.getTorsionParameters(n)
        t.impropers.append((i, j, k_, l, float(p[ik]), float(p[it0]), two_pi))


@force_compiler("CMAPTorsionForce", term="cmap")
def _cmap(force, t: TermTable, pairs: PairIndex) -> None:
    for m in range(force.getNumMaps()):
        size, energy = force.getMapParameters(m)
        energy = np.array([_v(e) for e in (energy._value if hasattr(energy, "_value") else energy)], dtype=np.float64)
        t.cmap_maps.append((int(size), _compile_periodic_cmap_coefficients(int(size), energy)))
    for n in range(force.getNumTorsions()):
        m, *atoms = force.getTorsionParameters(n)
        t.cmaps.append((m, *atoms))


@force_compiler("NonbondedForce")
def _nonbonded(force, t: TermTable, pairs: PairIndex) -> None:
    _check_nocutoff(force)
    if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
        raise _Unsupported("parameter offsets")
    p = np.array([[_v(v) for v in force.getParticleParameters(i)] for i in range(t.n)])
    q, sig, eps = p[:, 0], p[:, 1], p[:, 2]
    iu, ju, lookup = pairs.iu, pairs.ju, pairs.lookup
    s = 0.5 * (sig[iu] + sig[ju])
    e = np.sqrt(eps[iu] * eps[ju])
    A = 4 * e * s**12
    B = 4 * e * s**6
    C = ONE_4PI_EPS0 * q[iu] * q[ju]
    for x in range(force.getNumExceptions()):
        i, j, qq, sg, ep = force.getExceptionParameters(x)
        idx = lookup[i, j]
        qq, sg, ep = _v(qq), _v(sg), _v(ep)
        A[idx] = 4 * ep * sg**12
        B[idx] = 4 * ep * sg**6
        C[idx] = ONE_4PI_EPS0 * qq
    pa, pb, pc = t.pairs()
    pa += A
    pb += B
    pc += C


@force_compiler("CustomNonbondedForce")
def _custom_nonbonded(force, t: TermTable, pairs: PairIndex) -> None:
    _check_nocutoff(force)
    if force.getNumInteractionGroups():
        raise _Unsupported("interaction groups")
    if hasattr(force, "getNumComputedValues") and force.getNumComputedValues():
        raise _Unsupported("computed values")
    expr = force.getEnergyFunction()
    names = [force.getPerParticleParameterName(i) for i in range(force.getNumPerParticleParameters())]
    glob, funcs = _globals(force), _tabulated(force)
    params = [tuple(force.getParticleParameters(i)) for i in range(t.n)]
    uniq = sorted(set(params))
    code = {p: k for k, p in enumerate(uniq)}
    try:
        f = Expression(expr)
        table = np.zeros((len(uniq), len(uniq), 3))
        for a, pa in enumerate(uniq):
            for b, pb in enumerate(uniq):
                var = dict(glob)
                var.update({nm + "1": v for nm, v in zip(names, pa)})
                var.update({nm + "2": v for nm, v in zip(names, pb)})
                table[a, b] = _fit_pair(lambda r: f(dict(var, r=float(r)), funcs))
    except (ExpressionError, ValueError, ZeroDivisionError, IndexError, OverflowError) as e:
        raise _Unsupported(f"{e}: {expr!r}") from e
    tcode = np.array([code[p] for p in params])
    abc = table[tcode[pairs.iu], tcode[pairs.ju]].copy()
    for x in range(force.getNumExclusions()):
        i, j = force.getExclusionParticles(x)
        abc[pairs.lookup[i, j]] = 0.0
    pa, pb, pc = t.pairs()
    pa += abc[:, 0]
    pb += abc[:, 1]
    pc += abc[:, 2]


@force_compiler("CustomBondForce")
def _custom_bonds(force, t: TermTable, pairs: PairIndex) -> None:
    expr = force.getEnergyFunction()
    names = [force.getPerBondParameterName(i) for i in range(force.getNumPerBondParameters())]
    glob = _globals(force)
    cache: dict = {}
    pa, pb, pc = t.pairs()
    try:
        f = Expression(expr)
        for b in range(force.getNumBonds()):
            i, j, p = force.getBondParameters(b)
            p = tuple(p)
            if p not in cache:
                var = dict(glob, **dict(zip(names, p)))
                cache[p] = _fit_pair(lambda r: f(dict(var, r=float(r))))
            idx = pairs.lookup[i, j]
            if idx < 0:
                raise _Unsupported(f"bond ({i}, {j}) of a particle with itself")
            A, B, C = cache[p]
            pa[idx] += A
            pb[idx] += B
            pc[idx] += C
    except (ExpressionError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise _Unsupported(f"{e}: {expr!r}") from e


@force_compiler("CustomGBForce", term="gb")
def _custom_gb(force, t: TermTable, pairs: PairIndex) -> None:
    _compile_custom_gb(force, t)


@force_compiler("GBSAOBCForce", term="gb")
def _gbsa_obc(force, t: TermTable, pairs: PairIndex) -> None:
    _check_nocutoff(force)
    p = np.array([[_v(v) for v in force.getParticleParameters(i)] for i in range(t.n)])
    offset = 0.009
    or_ = p[:, 1] - offset
    sa_energy = _v(force.getSurfaceAreaEnergy())
    sa = (4 * math.pi * sa_energy, offset, _ACE_PROBE) if sa_energy != 0 else None
    _set_gb(t, p[:, 0], or_, or_ * p[:, 2], offset, (force.getSoluteDielectric(), force.getSolventDielectric(), 0.0),
            ONE_4PI_EPS0, sa)


def _compile_force(force, pairs: PairIndex, n: int) -> tuple[TermTable, str | None]:
    """(the TermTable of one force, the term it reports even when empty); _Unsupported with the reason."""
    if hasattr(force, "usesPeriodicBoundaryConditions") and force.usesPeriodicBoundaryConditions():
        raise _Unsupported("periodic boundary conditions")
    reg = FORCE_COMPILERS.get(type(force).__name__)
    if reg is None:
        raise _Unsupported("not implemented in the native backend")
    table = TermTable(n)
    reg.compile(force, table, pairs)
    return table, reg.term


def _compile(system) -> _Compiled:
    """The :class:`_Compiled` tables of an ``openmm.System``: each force's table is merged only when the
    whole force compiled (an unsupported force leaves nothing behind and is named in ``unsupported``)."""
    n = system.getNumParticles()
    c = _Compiled(n=n)
    pairs = PairIndex.of(n)
    c.pairs()
    c.pair_iu, c.pair_ju = pairs.iu, pairs.ju
    if any(system.isVirtualSite(i) for i in range(n)):
        c.unsupported.append("virtual sites (the native backend has no virtual-site construction)")
    for force in system.getForces():
        if type(force).__name__ in _IGNORED:
            continue
        try:
            table, term = _compile_force(force, pairs, n)
            if table.gb is not None and c.gb is not None:
                raise _Unsupported("more than one GB force")
        except _Unsupported as e:
            c.unsupported.append(f"{type(force).__name__} '{force.getName()}' ({e})")
            continue
        c.merge(table)
        if term:
            c.present.add(term)
    return c


def unsupported_forces(openmm_system) -> list[str]:
    """Forces of ``openmm_system`` (an ``openmm.System``) the native backend cannot evaluate; [] when all are supported."""
    return _compile(openmm_system).unsupported


# ------------------------------------------------------------------------------------------
# geometry kernels: x (batch, n_atoms, 3) -> per-term values, safe at degenerate geometry
# ------------------------------------------------------------------------------------------
# Layout: positions are split into three component tensors c = (cx, cy, cz), each (n_atoms, batch);
# gathers are row gathers (index_select on dim 0) and every per-term array is (n_terms, batch).
Vec = tuple  # (3,) of tensors with identical shape


def _gather(c: Vec, idx_t: torch.Tensor) -> list[Vec]:
    """c: 3 x (n_atoms, batch), idx_t: (k, n) -> k vectors of 3 x (n, batch)."""
    k, n = idx_t.shape
    flat = idx_t.reshape(-1)
    comps = [ci.index_select(0, flat).view(k, n, ci.shape[1]).unbind(0) for ci in c]
    return [(comps[0][a], comps[1][a], comps[2][a]) for a in range(k)]


def _sub(a: Vec, b: Vec) -> Vec:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _dot(a: Vec, b: Vec) -> torch.Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: Vec, b: Vec) -> Vec:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dihedral(c: Vec, idx_t: torch.Tensor) -> torch.Tensor:
    """IUPAC dihedral angle in (-pi, pi] of atoms idx_t: (4, n) -> (n, batch); 0 where undefined."""
    p0, p1, p2, p3 = _gather(c, idx_t)
    b1, b2, b3 = _sub(p1, p0), _sub(p2, p1), _sub(p3, p2)
    n1, n2 = _cross(b1, b2), _cross(b2, b3)
    yy = torch.sqrt(_dot(b2, b2).clamp_min(_TINY)) * _dot(b1, n2)
    xx = _dot(n1, n2)
    bad = (xx.abs() + yy.abs()) < 1e-18
    return torch.atan2(torch.where(bad, torch.zeros_like(yy), yy), torch.where(bad, torch.ones_like(xx), xx))


def _angle(c: Vec, idx_t: torch.Tensor) -> torch.Tensor:
    """Angle i-j-k in [0, pi] for idx_t: (3, n) -> (n, batch)."""
    p0, p1, p2 = _gather(c, idx_t)
    u, v = _sub(p0, p1), _sub(p2, p1)
    w = _cross(u, v)
    return torch.atan2(torch.sqrt(_dot(w, w).clamp_min(_TINY)), _dot(u, v))


def _distance2(c: Vec, idx_t: torch.Tensor) -> torch.Tensor:
    """Squared distance of pairs idx_t: (2, n) -> (n, batch), clamped at 1e-30 nm^2."""
    p0, p1 = _gather(c, idx_t)
    d = _sub(p0, p1)
    return _dot(d, d).clamp_min(_TINY)


# ------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------
class NativeEnergy(torch.nn.Module):
    """Batched torch evaluation of a MolecularSystem's OpenMM System (see module docstring).

    system: :class:`~boltzflow.systems.MolecularSystem` (its OpenMM System must be fully supported,
        see :func:`unsupported_forces`; otherwise UnsupportedForceError).
    cap: optional :class:`EnergyCap` (per-term gradient cap, log-linear total-energy cap).
    dtype: storage dtype of the parameter buffers (computation always follows x's dtype).
    device: where the buffers live initially (``.to(device)`` moves them later).
    compile: fuse the torch analytic kernels (or, with ``analytic=False``, the autograd energy) with
        ``torch.compile``: about 3x faster than eager after a compilation of about a minute per dtype;
        on the CPU the C++ kernel (below) is faster still and takes precedence unless
        ``cpu_kernel="torch"``; per-term gradient caps run eagerly.
    analytic: hand-derived forces (default; ~2x faster eager than autograd); False: autograd path.
    cpu_kernel: on the CPU, the analytic path's kernel: ``"auto"`` (default) the C++ kernel
        (:mod:`boltzflow.energy.native_cpu`, built on first use, OpenMP over ``torch.get_num_threads()``;
        about 10x the eager torch kernels) when a C++ compiler is available, else the torch kernels;
        ``"cpp"`` requires it; ``"torch"`` always uses the torch kernels (``compile`` applies to them).

    ``forward(x) -> (batch,) kT``; ``evaluate(x) -> EnergyResult(u, valid)``;
    ``terms(x) -> {name: (batch,) kT}`` (uncapped values; sum == u before the log-linear cap).
    """

    def __init__(self, system, cap: EnergyCap | None = None, dtype: torch.dtype = torch.float64, device=None,
                 compile: bool = False, analytic: bool = True, cpu_kernel: str = "auto"):
        super().__init__()
        from ..errors import ConfigError, UnsupportedForceError

        if cpu_kernel not in ("auto", "cpp", "torch"):
            raise ConfigError(f"cpu_kernel must be 'auto', 'cpp' or 'torch', got {cpu_kernel!r}")

        comp = _compile(system.system)
        if comp.unsupported:
            raise UnsupportedForceError(
                f"native energy does not support {'; '.join(comp.unsupported)} of system {system.name!r}; "
                "use backend='openmm' (CLI: --backend openmm)"
            )
        self.n_atoms = comp.n
        self.beta = float(system.beta)
        self.temperature = float(system.temperature)
        self.cap = cap if cap is not None else EnergyCap()
        self.compile = bool(compile)
        self.analytic = bool(analytic)
        self.cpu_kernel = cpu_kernel
        self._cpu = None  # native_cpu.CpuKernel, made on first CPU call
        self._compiled = None
        # a HarmonicBondForce pair joining the two ends of an angle is Urey-Bradley (as in energy.terms)
        ends = {(min(a[0], a[2]), max(a[0], a[2])) for a in comp.angles}
        ub = [b for b in comp.bonds if (min(b[0], b[1]), max(b[0], b[1])) in ends]
        bd = [b for b in comp.bonds if (min(b[0], b[1]), max(b[0], b[1])) not in ends]

        def buf(name: str, arr, kind: str = "f"):
            arr = np.asarray(arr)
            tdt = {"i": torch.long, "b": torch.bool}.get(kind, dtype)
            t = torch.as_tensor(arr, dtype=tdt, device=device)
            self.register_buffer(name, t, persistent=False)

        self._terms: list[str] = []
        for name, rows in (("bond", bd), ("urey_bradley", ub)):
            if rows:
                a = np.array(rows)
                buf(f"{name}_idx", a[:, :2].T.astype(np.int64), "i")
                buf(f"{name}_r0", a[:, 2])
                buf(f"{name}_k", a[:, 3])
                self._terms.append(name)
        if comp.angles:
            a = np.array(comp.angles)
            buf("angle_idx", a[:, :3].T.astype(np.int64), "i")
            buf("angle_t0", a[:, 3])
            buf("angle_k", a[:, 4])
            self._terms.append("angle")
        if comp.torsions:
            a = np.array(comp.torsions)
            a = a[a[:, 6] != 0.0] if np.any(a[:, 6] != 0.0) else a[:1]
            buf("torsion_idx", a[:, :4].T.astype(np.int64), "i")
            buf("torsion_n", a[:, 4])
            buf("torsion_phase", a[:, 5])
            buf("torsion_k", a[:, 6])
            self._terms.append("torsion")
        if comp.impropers:
            a = np.array(comp.impropers)
            buf("improper_idx", a[:, :4].T.astype(np.int64), "i")
            buf("improper_k", a[:, 4])
            buf("improper_t0", a[:, 5])
            buf("improper_2pi", a[:, 6])
            self._terms.append("improper")
        if comp.cmaps:
            a = np.array(comp.cmaps, dtype=np.int64)
            offsets = np.cumsum([0] + [s * s for s, _ in comp.cmap_maps])[:-1]
            sizes = np.array([s for s, _ in comp.cmap_maps])
            buf("cmap_coeff", np.concatenate([cf for _, cf in comp.cmap_maps]).T.copy())  # (16, patches)
            buf("cmap_idx", np.concatenate([a[:, 1:5].T, a[:, 5:9].T], axis=1), "i")  # (4, 2n)
            buf("cmap_base", offsets[a[:, 0]], "i")
            buf("cmap_size", sizes[a[:, 0]], "i")
            buf("cmap_delta", 2 * np.pi / sizes[a[:, 0]])
            self._terms.append("cmap")
        self._zero_terms = [t for t in ("angle", "torsion", "improper", "cmap") if t in comp.present and t not in self._terms]
        keep = (comp.pair_A != 0) | (comp.pair_B != 0) | (comp.pair_C != 0)
        if keep.any():
            buf("pair_idx", np.stack([comp.pair_iu[keep], comp.pair_ju[keep]]), "i")
            buf("pair_A", comp.pair_A[keep])
            buf("pair_B", comp.pair_B[keep])
            buf("pair_C", comp.pair_C[keep])
            self._has_lj = bool(np.any(comp.pair_A[keep] != 0) or np.any(comp.pair_B[keep] != 0))
            self._has_coul = bool(np.any(comp.pair_C[keep] != 0))
            self._terms += [t for t, h in (("lj", self._has_lj), ("coulomb", self._has_coul)) if h]
        if comp.gb is not None:
            g = comp.gb
            buf("gb_eye", np.eye(comp.n, dtype=bool), "b")
            buf("gb_q", g["charge"])
            qq = np.outer(g["charge"], g["charge"])
            np.fill_diagonal(qq, 0.0)
            buf("gb_qq", qq)
            buf("gb_or", g["or"])
            buf("gb_sr", g["sr"])
            self._gb_const = {k: g[k] for k in ("offset", "pref", "eps_in", "eps_out", "kappa", "sa_coef", "sa_offset", "probe")}
            self._terms.append("gb")
        self._build_fast_path(buf)

    def _build_fast_path(self, buf) -> None:
        """Index buffers of the analytic fast path: bonds + Urey-Bradley as one list, and the union of
        torsion, improper and CMAP atom quadruples (each dihedral computed once) with per-term maps."""
        hd = [n for n in ("bond", "urey_bradley") if n in self._terms]
        if hd:
            buf("hd_idx", torch.cat([getattr(self, f"{n}_idx") for n in hd], 1).cpu().numpy(), "i")
            buf("hd_k", torch.cat([getattr(self, f"{n}_k") for n in hd]).cpu().numpy())
            buf("hd_r0", torch.cat([getattr(self, f"{n}_r0") for n in hd]).cpu().numpy())
        # dihedral quadruples: torsion-only ones first, then those whose angle itself is needed
        # (impropers, CMAP; the kernel takes atan2 only of these rows)
        def cols(name: str) -> list[tuple]:
            return [tuple(c) for c in getattr(self, name).cpu().numpy().T.tolist()] if hasattr(self, name) else []

        angle_q = list(dict.fromkeys(cols("improper_idx") + cols("cmap_idx")))
        tors_q = [q for q in dict.fromkeys(cols("torsion_idx")) if q not in set(angle_q)]
        quads = {q: i for i, q in enumerate(tors_q + angle_q)}
        if quads:
            buf("dq_idx", np.array(list(quads), dtype=np.int64).T.copy(), "i")
        if "torsion" in self._terms:
            n = self.torsion_n.cpu().numpy()
            if not np.allclose(n, np.round(n)) or n.min() < 1:
                raise ValueError(f"torsion periodicities must be positive integers, got {sorted(set(n.tolist()))}")
            n = np.round(n).astype(int)
            k, ph = self.torsion_k.cpu().double().numpy(), self.torsion_phase.cpu().double().numpy()
            kc, ks = np.zeros((n.max(), len(quads))), np.zeros((n.max(), len(quads)))
            for q, ni, ki, pi in zip(cols("torsion_idx"), n, k, ph):
                kc[ni - 1, quads[q]] += ki * np.cos(pi)
                ks[ni - 1, quads[q]] += ki * np.sin(pi)
            buf("torsion_kc", kc)
            buf("torsion_ks", ks)
            buf("torsion_const", np.array([k.sum()]))
        if angle_q:
            a0 = len(tors_q)
            buf("angle_quads", np.arange(len(angle_q)), "i")
            if "improper" in self._terms:
                buf("improper_map", np.array([quads[q] - a0 for q in cols("improper_idx")], dtype=np.int64), "i")
            if "cmap" in self._terms:
                both = np.array([quads[q] - a0 for q in cols("cmap_idx")], dtype=np.int64)
                n = self.cmap_size.shape[0]
                buf("cmap_phi_map", both[:n], "i")
                buf("cmap_psi_map", both[n:], "i")
        self._fast_cache: dict = {}
        self._fast_kernel = None
        self._gb_compiled = None
        #: configurations per kernel call on the analytic path (larger batches are split)
        self.chunk_size = 1024

    #: buffers the analytic kernels take as (n, 1) columns, and as-is (indices, CMAP table)
    _FAST_COLS = ("hd_k", "hd_r0", "pair_A", "pair_B", "pair_C", "angle_k", "angle_t0", "torsion_kc", "torsion_ks",
                  "improper_k", "improper_t0", "improper_2pi", "cmap_delta")
    _FAST_RAW = ("hd_idx", "pair_idx", "angle_idx", "dq_idx", "torsion_const", "angle_quads", "improper_map",
                 "cmap_phi_map", "cmap_psi_map", "cmap_coeff")

    def _fast_params(self, ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """The kernels' parameters in ref's dtype and on its device (cached per dtype/device)."""
        key = (ref.dtype, ref.device)
        prm = self._fast_cache.get(key)
        if prm is None:
            prm = {}
            for name in self._FAST_COLS + self._FAST_RAW:
                if hasattr(self, name):
                    t = getattr(self, name).to(ref.device)
                    if t.is_floating_point():
                        t = t.to(ref.dtype)
                    prm[name] = t.unsqueeze(-1) if name in self._FAST_COLS else t
            if "cmap_coeff" in prm:
                prm["cmap_base"] = self.cmap_base.to(ref.device).unsqueeze(-1)
                prm["cmap_size"] = self.cmap_size.to(ref.device).unsqueeze(-1)
            self._fast_cache[key] = prm
        return prm

    def _apply(self, fn, *args, **kwargs):  # .to(device/dtype) invalidates the kernels' parameter cache
        self._fast_cache = {}
        self._cpu = None
        return super()._apply(fn, *args, **kwargs)

    def _fast_u(self, x: torch.Tensor, need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Analytic reduced energy for x: (batch, n_atoms, 3) nm of every term but GB on the torch kernels,
        of every term on the C++ kernel (see :meth:`_kernel_has_gb`) -> (u (batch,) kT, +inf where invalid; valid (batch,); du/dx (batch, n_atoms, 3) kT/nm, zero rows where invalid, or None)."""
        from . import native_kernels

        kernel = self._cpu_kernel_for(x)
        if kernel is not None:
            return kernel(x, self.beta, need_grad)
        fn = native_kernels.reduced_energy_and_gradient
        if self.compile:
            if self._fast_kernel is None:
                self._fast_kernel = torch.compile(fn, dynamic=True)
            fn = self._fast_kernel
        prm = self._fast_params(x)
        outs = []
        # chunks keep the (3, n_terms, chunk) temporaries in cache; the component-major (3, n_atoms, chunk)
        # copy makes every row batch-contiguous, so every loop is vectorised
        for xc in x.detach().split(self.chunk_size):
            u, valid, g = fn(xc.permute(2, 1, 0).contiguous(), prm, self.beta, need_grad)
            outs.append((u, valid, g.permute(2, 1, 0) if g is not None else None))
        if len(outs) == 1:
            return outs[0]
        us, vs, gs = zip(*outs)
        return torch.cat(us), torch.cat(vs), (torch.cat(gs) if need_grad else None)

    def _cpu_kernel_for(self, x: torch.Tensor):
        """The C++ kernel when it evaluates x (CPU float32/float64, ``cpu_kernel`` not "torch", a compiler
        available), else None (the torch kernels do)."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or self.cpu_kernel == "torch":
            return None
        return self._cpu_kernel()

    def _cpu_kernel(self):
        """The C++ kernel bound to this system (None when unavailable and cpu_kernel='auto')."""
        if self._cpu is None:
            from . import native_cpu

            lib = native_cpu.load()
            if lib is None:
                if self.cpu_kernel == "cpp":
                    raise RuntimeError(f"cpu_kernel='cpp' but the C++ kernel is unavailable: "
                                       f"{native_cpu.unavailable_reason()}; use cpu_kernel='auto' or 'torch'")
                return None
            gb = None
            if "gb" in self._terms:
                gb = {"q": self.gb_q.cpu().double().numpy(), "or": self.gb_or.cpu().double().numpy(),
                      "sr": self.gb_sr.cpu().double().numpy(), **self._gb_const}
            self._cpu = native_cpu.CpuKernel(lib, self._fast_params(torch.empty(0, dtype=torch.float64)), self.n_atoms, gb)
        return self._cpu

    def _kernel_has_gb(self, x: torch.Tensor) -> bool:
        """Whether the analytic path's kernel for x computes GB too (the C++ CPU kernel does)."""
        kernel = self._cpu_kernel_for(x)
        return kernel is not None and kernel.has_gb

    def __getstate__(self):  # the ctypes kernel holds raw pointers: rebuilt on first use after unpickling
        return {**self.__dict__, "_cpu": None}

    def _gb_from_x(self, x: torch.Tensor) -> torch.Tensor:
        """GB energy (batch,) kJ/mol for x: (batch, n_atoms, 3) nm (autograd)."""
        return self._gb_e(x.permute(2, 1, 0).contiguous().unbind(0))

    def _total_kj_autograd(self, x: torch.Tensor, gb: bool = True) -> torch.Tensor:
        c = x.permute(2, 1, 0).contiguous().unbind(0)
        out = self._terms_kj_fused(c, gb=gb)
        return torch.stack(list(out.values()), 0).sum(0) if out else x.new_zeros(x.shape[0])

    # ---- helpers ----------------------------------------------------------------------
    def _p(self, name: str, x: torch.Tensor) -> torch.Tensor:
        t = getattr(self, name)
        if t.is_floating_point() and t.dtype != x.dtype:
            return t.to(x.dtype)
        return t

    @property
    def term_names(self) -> tuple[str, ...]:
        """Names of the terms this System has, in TERM_NAMES order."""
        from .base import TERM_NAMES

        return tuple(t for t in TERM_NAMES if t in self._terms or t in self._zero_terms)

    # ---- terms in kJ/mol ----------------------------------------------------------------
    def _col(self, name: str, ref: torch.Tensor) -> torch.Tensor:
        """Parameter buffer (n,) as a (n, 1) column in ref's dtype."""
        return self._p(name, ref).unsqueeze(-1)

    def _bondlike(self, c: Vec, name: str, r2: torch.Tensor | None = None) -> torch.Tensor:
        r = torch.sqrt(_distance2(c, getattr(self, f"{name}_idx")) if r2 is None else r2)
        return (0.5 * self._col(f"{name}_k", r) * (r - self._col(f"{name}_r0", r)) ** 2).sum(0)

    def _angle_e(self, c: Vec) -> torch.Tensor:
        th = _angle(c, self.angle_idx)
        return (0.5 * self._col("angle_k", th) * (th - self._col("angle_t0", th)) ** 2).sum(0)

    def _torsion_e(self, c: Vec, phi: torch.Tensor | None = None) -> torch.Tensor:
        phi = _dihedral(c, self.torsion_idx) if phi is None else phi
        arg = self._col("torsion_n", phi) * phi - self._col("torsion_phase", phi)
        return (self._col("torsion_k", phi) * (1 + torch.cos(arg))).sum(0)

    def _improper_e(self, c: Vec, th: torch.Tensor | None = None) -> torch.Tensor:
        th = _dihedral(c, self.improper_idx) if th is None else th
        d = (th - self._col("improper_t0", th)).abs()
        d = torch.minimum(d, self._col("improper_2pi", th) - d)
        return (self._col("improper_k", th) * d * d).sum(0)

    def _cmap_e(self, c: Vec, ang: torch.Tensor | None = None) -> torch.Tensor:
        n = self.cmap_size.shape[0]
        ang = _dihedral(c, self.cmap_idx) if ang is None else ang  # (2n, batch): first angles, then second angles
        two_pi = 2 * math.pi
        ang = torch.remainder(ang + two_pi, two_pi)
        delta = self._col("cmap_delta", ang)
        sa, sb = (ang / delta.repeat(2, 1)).split(n, dim=0)
        size = self.cmap_size.unsqueeze(-1)
        s = torch.minimum(sa.detach().floor().long(), size - 1).clamp_min(0)
        t = torch.minimum(sb.detach().floor().long(), size - 1).clamp_min(0)
        da = sa - s.to(ang.dtype)
        db = sb - t.to(ang.dtype)
        cf = self._p("cmap_coeff", ang)[:, self.cmap_base.unsqueeze(-1) + s + size * t].unbind(0)  # 16 x (n, batch)
        # sum_ij c[4i+j] da^i db^j by Horner in db, then in da
        rows = [((cf[4 * i + 3] * db + cf[4 * i + 2]) * db + cf[4 * i + 1]) * db + cf[4 * i] for i in range(4)]
        e = ((rows[3] * da + rows[2]) * da + rows[1]) * da + rows[0]
        return e.sum(0)

    def _pair_e(self, c: Vec, r2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_r2 = 1.0 / (_distance2(c, self.pair_idx) if r2 is None else r2)
        inv_r6 = inv_r2 * inv_r2 * inv_r2
        lj = ((self._col("pair_A", inv_r2) * inv_r6 - self._col("pair_B", inv_r2)) * inv_r6).sum(0)
        coul = (self._col("pair_C", inv_r2) * torch.sqrt(inv_r2)).sum(0)
        return lj, coul

    def _gb_e(self, c: Vec) -> torch.Tensor:
        """OBC2 GB on the dense (n, n, batch) pair matrix (all pairs, no exclusions)."""
        k = self._gb_const
        ref = c[0]
        q, or_, sr = self._col("gb_q", ref), self._col("gb_or", ref), self._col("gb_sr", ref)  # (n, 1)
        d = [ci.unsqueeze(1) - ci.unsqueeze(0) for ci in c]  # (n, n, batch)
        eye = self.gb_eye.unsqueeze(-1)
        r2 = torch.where(eye, torch.ones_like(d[0]), (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).clamp_min(_GB_TINY))
        r = torch.sqrt(r2)
        or1 = or_.unsqueeze(1)  # (n, 1, 1)
        sr2 = sr.unsqueeze(0)  # (1, n, 1)
        U = r + sr2
        L = torch.maximum(or1.expand_as(r), (r - sr2).abs())
        inv_r, inv_U, inv_L = 1 / r, 1 / U, 1 / L
        val = 0.5 * (inv_L - inv_U + 0.25 * (r - sr2 * sr2 * inv_r) * (inv_U * inv_U - inv_L * inv_L) + 0.5 * torch.log(L * inv_U) * inv_r)
        val = torch.where((r + sr2 - or1 >= 0) & ~eye, val, torch.zeros_like(val))
        I = val.sum(1)  # (n, batch)
        psi = I * or_
        radius = or_ + k["offset"]
        B = 1 / (1 / or_ - torch.tanh(psi - 0.8 * psi * psi + 4.85 * psi * psi * psi) / radius)
        pref = k["pref"]
        kap = k["kappa"]
        self_screen = (1 / k["eps_in"] - torch.exp(-kap * B) / k["eps_out"]) if kap else (1 / k["eps_in"] - 1 / k["eps_out"])
        e = (-0.5 * pref * self_screen * q * q / B).sum(0)
        if k["sa_coef"]:
            rad = or_ + k["sa_offset"]
            e = e + (k["sa_coef"] * (rad + k["probe"]) ** 2 * (rad / B) ** 6).sum(0)
        bb = B.unsqueeze(1) * B.unsqueeze(0)
        f = torch.sqrt(r2 + bb * torch.exp(-r2 / (4 * bb)))
        screen = (1 / k["eps_in"] - torch.exp(-kap * f) / k["eps_out"]) if kap else (1 / k["eps_in"] - 1 / k["eps_out"])
        qq = self._p("gb_qq", ref).unsqueeze(-1)  # q_i q_j with zero diagonal, (n, n, 1)
        return e + (-0.5 * pref) * (screen * qq / f).sum((0, 1))

    def _terms_kj(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (batch, n_atoms, 3) nm -> {term: (batch,) kJ/mol}; kernels work on 3 x (n_atoms, batch) components."""
        g = self.cap.term_grad_max
        if g is None:
            return self._terms_kj_fused(x.permute(2, 1, 0).contiguous().unbind(0))
        # per-term gradient cap: every term sees its own capped copy of x
        xin = lambda: cap_gradient(x, g).permute(2, 1, 0).contiguous().unbind(0)  # noqa: E731
        out: dict[str, torch.Tensor] = {}
        for name in ("bond", "urey_bradley"):
            if name in self._terms:
                out[name] = self._bondlike(xin(), name)
        if "angle" in self._terms:
            out["angle"] = self._angle_e(xin())
        if "torsion" in self._terms:
            out["torsion"] = self._torsion_e(xin())
        if "improper" in self._terms:
            out["improper"] = self._improper_e(xin())
        if "cmap" in self._terms:
            out["cmap"] = self._cmap_e(xin())
        if hasattr(self, "pair_idx"):
            lj, _ = self._pair_e(xin()) if self._has_lj else (None, None)
            _, coul = self._pair_e(xin()) if self._has_coul else (None, None)
            if self._has_lj:
                out["lj"] = lj
            if self._has_coul:
                out["coulomb"] = coul
        if "gb" in self._terms:
            out["gb"] = self._gb_e(xin())
        for name in self._zero_terms:
            out[name] = x.new_zeros(x.shape[0])
        return out

    def _terms_kj_fused(self, c: Vec, gb: bool = True) -> dict[str, torch.Tensor]:
        """All terms with one distance gather (bonds, UB, pairs) and one dihedral pass (torsions, impropers, CMAP)."""
        out: dict[str, torch.Tensor] = {}
        dist_names = [nm for nm in ("bond", "urey_bradley") if nm in self._terms] + (["pair"] if hasattr(self, "pair_idx") else [])
        if dist_names:
            idx = [getattr(self, f"{nm}_idx") for nm in dist_names]
            r2s = _distance2(c, torch.cat(idx, 1)).split([t.shape[1] for t in idx], 0)
            for nm, r2 in zip(dist_names, r2s):
                if nm == "pair":
                    lj, coul = self._pair_e(c, r2)
                    if self._has_lj:
                        out["lj"] = lj
                    if self._has_coul:
                        out["coulomb"] = coul
                else:
                    out[nm] = self._bondlike(c, nm, r2)
        if "angle" in self._terms:
            out["angle"] = self._angle_e(c)
        dih = [(nm, a) for nm, a in (("torsion", "torsion_idx"), ("improper", "improper_idx"), ("cmap", "cmap_idx")) if nm in self._terms]
        if dih:
            idx = [getattr(self, a) for _, a in dih]
            phis = _dihedral(c, torch.cat(idx, 1)).split([t.shape[1] for t in idx], 0)
            for (nm, _), phi in zip(dih, phis):
                out[nm] = {"torsion": self._torsion_e, "improper": self._improper_e, "cmap": self._cmap_e}[nm](c, phi)
        if gb and "gb" in self._terms:
            out["gb"] = self._gb_e(c)
        for name in self._zero_terms:
            out[name] = c[0].new_zeros(c[0].shape[1])
        return out

    def _total_kj(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self._terms_kj(x).values())
        return torch.stack(parts, 0).sum(0) if parts else x.new_zeros(x.shape[0])

    # ---- public API -----------------------------------------------------------------------
    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-term reduced energies {name: (batch,) kT} for x: (batch, n_atoms, 3) nm (gradient-capped if cap set)."""
        x = check_positions(x, self.n_atoms)
        return {k: v * self.beta for k, v in self._terms_kj(x).items()}

    def evaluate(self, x: torch.Tensor) -> EnergyResult:
        """EnergyResult(u: (batch,) kT, valid: (batch,) bool); invalid rows get u=+inf and zero gradient."""
        x = check_positions(x, self.n_atoms)
        fast = self.analytic and self.cap.term_grad_max is None
        if fast and ("gb" not in self._terms or self._kernel_has_gb(x)):  # everything in one kernel
            u, valid = _AnalyticEnergy.apply(x, self)
            return EnergyResult(log_linear_cap(u, self.cap.energy_max), valid)
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        xm = _MaskGrad.apply(x, mask)
        if fast:  # GB (dense Born-radius chain rule) stays on autograd (compiled with the rest when compile=True)
            u, _ = _AnalyticEnergy.apply(xm, self)
            gb = self._gb_from_x
            if self.compile:
                if self._gb_compiled is None:
                    self._gb_compiled = torch.compile(self._gb_from_x, dynamic=True)
                gb = self._gb_compiled
            u = u + gb(xm) * self.beta
        elif self.compile and self.cap.term_grad_max is None:
            if self._compiled is None:
                self._compiled = torch.compile(self._total_kj, dynamic=True)
            u = self._compiled(xm) * self.beta
        else:
            u = self._total_kj(xm) * self.beta
        u = log_linear_cap(u, self.cap.energy_max)
        finite_x = torch.isfinite(x.detach()).flatten(1).all(1)
        valid = finite_x & torch.isfinite(u.detach())
        mask.copy_(valid)
        u = torch.where(valid, u, torch.full_like(u, math.inf))
        return EnergyResult(u, valid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """u: (batch,) kT for x: (batch, n_atoms, 3) nm."""
        return self.evaluate(x).u

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, T={self.temperature} K, terms={self._terms}"


class _AnalyticEnergy(torch.autograd.Function):
    """(u (batch,) kT, valid (batch,)) with hand-derived forces: every term but GB on the torch kernels
    (``native_kernels``), every term including GB on the C++ CPU kernel (``native_cpu``).

    Invalid rows (non-finite input or energy) get u = +inf and a zero gradient. First-order backward
    uses the forces computed in forward; a backward with ``create_graph=True`` (double backward)
    re-evaluates the same terms on the autograd path, so higher derivatives work."""

    @staticmethod
    def forward(ctx, x, module):
        u, valid, g = module._fast_u(x, need_grad=ctx.needs_input_grad[0])
        ctx.mark_non_differentiable(valid)
        ctx.save_for_backward(x, g, valid)
        ctx.module = module
        ctx.with_gb = module._kernel_has_gb(x)
        return u, valid

    @staticmethod
    def backward(ctx, gu, _gvalid):
        x, g, valid = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                u = ctx.module._total_kj_autograd(x, gb=ctx.with_gb) * ctx.module.beta
                u = torch.where(valid, u, torch.zeros_like(u))
            (gx,) = torch.autograd.grad(u, x, gu, create_graph=True)
            return gx, None
        return gu.view(-1, 1, 1) * g, None


class _MaskGrad(torch.autograd.Function):
    """Identity; backward zeroes the gradient rows whose ``mask`` entry is False (filled after forward)."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.mask = mask  # not saved_for_backward: it is filled in place after the forward pass
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        m = ctx.mask.view(-1, *([1] * (g.dim() - 1)))
        return torch.where(m, g, torch.zeros_like(g)), None
