"""Toy targets with known answers, for testing losses, training and estimators.

Every target has ``name``, ``dim``, ``energy(x: (batch, dim)) -> (batch,)`` (reduced energy in kT,
torch, differentiable; ``target(x)`` is the same), ``log_z`` (exact ``log int exp(-u) dx`` or None),
``sample(n, generator) -> (n, dim)`` (exact sampler where ``has_exact_sampler``), ``modes``
(:class:`SignModes` or None) and ``exact_minor_fraction`` (exact population of ``modes.minor`` or
None). ``log_prob(x) = -energy(x) - log_z`` where ``log_z`` is known.

Exact numbers come from 1D quadrature on a fine grid (float64, 200001 points; error < 1e-10 for
these smooth, fast-decaying densities); exact samplers invert the 1D CDF on that grid.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import InputError
from .modes import SignModes

_GRID_POINTS = 200_001


def _as_batch(x, dim: int, name: str):
    if x.ndim != 2 or x.shape[-1] != dim:
        raise InputError(f"{name}.energy expects x of shape (batch, {dim}), got {tuple(x.shape)}")
    return x


class Quadrature1D:
    """A 1D unnormalised density ``exp(-u(t))`` on ``[lo, hi]``: log Z, interval masses, inverse CDF."""

    def __init__(self, u_numpy, lo: float, hi: float, n: int = _GRID_POINTS):
        self.t = np.linspace(lo, hi, n)
        u = u_numpy(self.t)
        self.shift = float(u.min())
        w = np.exp(-(u - self.shift))
        dt = self.t[1] - self.t[0]
        # cumulative trapezoid
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * dt)])
        self.mass = float(cdf[-1])
        self.cdf = cdf / self.mass
        self.log_z = math.log(self.mass) - self.shift

    def fraction_below(self, a: float) -> float:
        """P(t < a)."""
        return float(np.interp(a, self.t, self.cdf))

    def inverse_cdf(self, u: np.ndarray) -> np.ndarray:
        return np.interp(u, self.cdf, self.t)


def _uniform(n: int, generator):
    import torch

    return torch.rand(n, generator=generator, dtype=torch.float64)


class ToyTarget:
    """Base class of toy targets (see module docstring)."""

    name: str = "toy"
    dim: int = 0
    log_z: float | None = None
    modes: SignModes | None = None
    exact_minor_fraction: float | None = None
    has_exact_sampler: bool = False

    def energy(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x):
        return self.energy(x)

    def log_prob(self, x):
        """Normalised log density ``(batch,)``; needs an exact ``log_z``."""
        if self.log_z is None:
            raise NotImplementedError(f"{self.name} has no known log Z, so no normalised log_prob")
        return -self.energy(x) - self.log_z

    def sample(self, n: int, generator=None):
        raise NotImplementedError(f"{self.name} has no exact sampler; use MCMC or replica exchange for references")

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "log_z": self.log_z,
                "exact_minor_fraction": self.exact_minor_fraction,
                "modes": None if self.modes is None else self.modes.to_dict()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


#: 1D double wells ``a x^4 / 4 - b x^2 / 2 + c x`` named by the paper they come from (felardos2023 cites
#: both for its Double Well 12D): Noe et al. 2019 (minor mode x0 > 0, 0.83 %) and Midgley et al. 2021's
#: ``x^4 - 6 x^2 - 0.5 x`` (the Many Well pair; minor mode x0 < 0, 15.6 %).
DOUBLE_WELLS = {"noe": (1.0, 6.0, 1.0), "fab": (4.0, 12.0, -0.5)}


class DoubleWell12D(ToyTarget):
    """felardos2023's Double Well 12D: dim 0 bimodal, dims 1..11 Gaussian with std ``std`` (10).

    The paper does not print the 1D potential; it says "similar to previous works" (Noe et al. 2019,
    Midgley et al. 2021). By default we use Noe et al.'s double well
    ``u(x0) = a x0^4 / 4 - b x0^2 / 2 + c x0`` with a = 1, b = 6, c = 1 (wells near -2.5 and +2.4,
    barrier ~9 kT), so ``u(x) = u(x0) + sum_{i>=1} x_i^2 / (2 std^2)``. The tilt ``c > 0`` makes
    ``x0 > 0`` the minor mode (exact fraction 0.83% for these parameters, see ``exact_minor_fraction``).
    ``well="fab"`` (or ``toy_target("double-well-12d-fab")``) uses Midgley et al.'s well instead
    (a = 4, b = 12, c = -0.5: wells near -1.7 and +1.8, minor mode x0 < 0 with 15.6 %).
    """

    def __init__(self, dim: int = 12, a: float = 1.0, b: float = 6.0, c: float = 1.0, std: float = 10.0,
                 well: str | None = None):
        if well is not None:
            if well not in DOUBLE_WELLS:
                raise InputError(f"unknown double well {well!r}; choose one of {', '.join(DOUBLE_WELLS)}")
            a, b, c = DOUBLE_WELLS[well]
        if int(dim) < 1:
            raise InputError(f"DoubleWell12D needs dim >= 1, got {dim}")
        if a <= 0 or std <= 0:
            raise InputError("DoubleWell12D needs a > 0 and std > 0")
        self.name = ("double-well-12d" if int(dim) == 12 else f"double-well-{int(dim)}d") + (
            f"-{well}" if well not in (None, "noe") else "")
        self.dim, self.a, self.b, self.c, self.std = int(dim), float(a), float(b), float(c), float(std)
        self._q = Quadrature1D(self.u1_numpy, -12.0, 12.0)
        n_gauss = self.dim - 1
        self.log_z = self._q.log_z + n_gauss * (math.log(self.std) + 0.5 * math.log(2 * math.pi))
        below = self._q.fraction_below(0.0)
        minor = "positive" if self.c >= 0 else "negative"
        self.modes = SignModes(0, ("negative", "positive"), minor)
        self.exact_minor_fraction = 1.0 - below if minor == "positive" else below
        self.has_exact_sampler = True

    def u1_numpy(self, t: np.ndarray) -> np.ndarray:
        """The 1D double-well energy of dim 0 (numpy, float64)."""
        return self.a * t**4 / 4.0 - self.b * t**2 / 2.0 + self.c * t

    def energy(self, x):
        x = _as_batch(x, self.dim, self.name)
        x0 = x[:, 0]
        u = self.a * x0.pow(4) / 4.0 - self.b * x0.pow(2) / 2.0 + self.c * x0
        return u + 0.5 * (x[:, 1:] / self.std).pow(2).sum(-1)

    def sample(self, n: int, generator=None):
        import torch

        x0 = torch.from_numpy(self._q.inverse_cdf(_uniform(n, generator).numpy()))
        rest = torch.randn(n, self.dim - 1, generator=generator, dtype=torch.float64) * self.std
        return torch.cat([x0[:, None], rest], dim=1).to(torch.get_default_dtype())


class ManyWell(ToyTarget):
    """Many Well (midgley2021): the 2D double well of Noe et al. repeated ``dim / 2`` times.

    Per pair ``(x_{2k}, x_{2k+1})``: ``u = x^4 - 6 x^2 - 0.5 x + 0.5 y^2`` (the FAB parameters; log Z
    of the 32D version is 164.6957). The minor mode of each pair is ``x < 0``; ``modes`` labels
    the sign of coordinate 0 and ``exact_minor_fraction`` is P(x_0 < 0). The full target has
    ``2^(dim/2)`` modes, labelled by :meth:`mode_labels`.
    """

    def __init__(self, dim: int = 32):
        if int(dim) < 2 or int(dim) % 2:
            raise InputError(f"ManyWell needs an even dim >= 2, got {dim}")
        self.dim = int(dim)
        self.name = f"many-well-{self.dim}d"
        self._q = Quadrature1D(self.u1_numpy, -8.0, 8.0)
        self.log_z = (self.dim // 2) * (self._q.log_z + 0.5 * math.log(2 * math.pi))
        self.modes = SignModes(0, ("negative", "positive"), "negative")
        self.exact_minor_fraction = self._q.fraction_below(0.0)
        self.has_exact_sampler = True

    @staticmethod
    def u1_numpy(t: np.ndarray) -> np.ndarray:
        return t**4 - 6.0 * t**2 - 0.5 * t

    @property
    def n_modes(self) -> int:
        return 2 ** (self.dim // 2)

    def mode_labels(self, x) -> np.ndarray:
        """Well index in ``[0, 2^(dim/2))`` per sample: bit k set when ``x_{2k} > 0``. ``(batch,)`` int."""
        a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)[:, 0::2] > 0
        return (a.astype(np.int64) << np.arange(a.shape[1], dtype=np.int64)).sum(-1)

    def energy(self, x):
        x = _as_batch(x, self.dim, self.name)
        a, b = x[:, 0::2], x[:, 1::2]
        return (a.pow(4) - 6.0 * a.pow(2) - 0.5 * a + 0.5 * b.pow(2)).sum(-1)

    def sample(self, n: int, generator=None):
        import torch

        m = self.dim // 2
        a = torch.from_numpy(self._q.inverse_cdf(_uniform(n * m, generator).numpy())).reshape(n, m)
        b = torch.randn(n, m, generator=generator, dtype=torch.float64)
        return torch.stack([a, b], dim=-1).reshape(n, self.dim).to(torch.get_default_dtype())


class GaussianMixture2D(ToyTarget):
    """FAB's 2D mixture of ``n_modes`` (40) equal-weight isotropic Gaussians.

    Means uniform in ``[-loc_scale, loc_scale]^2`` (40) drawn from ``numpy.random.default_rng(seed)``;
    each component's std is ``softplus(1) = 1.3133`` (FAB's ``log_var_scaling = 1``). The density is
    normalised, so ``log_z = 0`` exactly. ``modes`` is None (40 modes, no single minor one).
    """

    def __init__(self, n_modes: int = 40, loc_scale: float = 40.0, std: float = math.log1p(math.e), seed: int = 0):
        if int(n_modes) < 1 or std <= 0:
            raise InputError("GaussianMixture2D needs n_modes >= 1 and std > 0")
        rng = np.random.default_rng(int(seed))
        self.means = rng.uniform(-loc_scale, loc_scale, size=(int(n_modes), 2))
        self.std = float(std)
        self.dim = 2
        self.name = "gmm-2d"
        self.log_z = 0.0
        self.has_exact_sampler = True

    @property
    def n_modes(self) -> int:
        return len(self.means)

    def mode_labels(self, x) -> np.ndarray:
        """Index of the nearest component mean per sample, ``(batch,)`` int."""
        a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
        return ((a[:, None, :] - self.means[None]) ** 2).sum(-1).argmin(-1)

    def energy(self, x):
        import torch

        x = _as_batch(x, 2, self.name)
        mu = torch.as_tensor(self.means, dtype=x.dtype, device=x.device)
        d2 = ((x[:, None, :] - mu[None]) / self.std).pow(2).sum(-1)  # (batch, K)
        k = mu.shape[0]
        log_comp = -0.5 * d2 - 2 * math.log(self.std) - math.log(2 * math.pi) - math.log(k)
        return -torch.logsumexp(log_comp, dim=-1)

    def sample(self, n: int, generator=None):
        import torch

        k = len(self.means)
        idx = torch.randint(0, k, (n,), generator=generator)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        x = torch.as_tensor(self.means, dtype=torch.float64)[idx] + self.std * eps
        return x.to(torch.get_default_dtype())


class Gaussian(ToyTarget):
    """Multivariate normal ``N(mean, cov)``: exact energy, log Z, sampler, and P(x_0 < 0)."""

    def __init__(self, dim: int = 2, mean: Sequence[float] | None = None, cov=None, name: str | None = None):
        dim = int(dim)
        if dim < 1:
            raise InputError(f"Gaussian needs dim >= 1, got {dim}")
        self.mean = np.zeros(dim) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
        self.cov = np.eye(dim) if cov is None else np.asarray(cov, dtype=np.float64)
        if self.mean.shape != (dim,) or self.cov.shape != (dim, dim):
            raise InputError(f"Gaussian mean must be ({dim},) and cov ({dim}, {dim})")
        if not np.allclose(self.cov, self.cov.T):
            raise InputError("Gaussian cov must be symmetric")
        try:
            self.chol = np.linalg.cholesky(self.cov)
        except np.linalg.LinAlgError:
            raise InputError("Gaussian cov must be positive definite") from None
        self.dim = dim
        self.name = name or f"gaussian-{dim}d"
        self.precision = np.linalg.inv(self.cov)
        logdet = 2.0 * float(np.log(np.diag(self.chol)).sum())
        self.log_z = 0.5 * dim * math.log(2 * math.pi) + 0.5 * logdet
        self.modes = SignModes(0, ("negative", "positive"), "negative")
        self.exact_minor_fraction = 0.5 * math.erfc(self.mean[0] / math.sqrt(2 * self.cov[0, 0]))
        self.has_exact_sampler = True

    def energy(self, x):
        import torch

        x = _as_batch(x, self.dim, self.name)
        mu = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        p = torch.as_tensor(self.precision, dtype=x.dtype, device=x.device)
        d = x - mu
        return 0.5 * ((d @ p) * d).sum(-1)

    def sample(self, n: int, generator=None):
        import torch

        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = torch.as_tensor(self.mean)[None] + eps @ torch.as_tensor(self.chol).T
        return x.to(torch.get_default_dtype())


class DW4(ToyTarget):
    """4 particles in 2D with a pairwise double-well potential (Koehler et al. 2020; draxler2024).

    ``u = (1 / tau) sum_{i<j} [a (d_ij - d0) + b (d_ij - d0)^2 + c (d_ij - d0)^4]`` with the standard
    parameters a = 0, b = -4, c = 0.9, d0 = 4, tau = 1. ``x: (batch, 8)`` = 4 particles x (x, y).
    Invariant under translations, so ``exp(-u)`` is not normalisable in R^8: ``log_z`` is None
    (flows for it work on the centre-of-mass-free subspace), and there is no exact sampler (the
    literature uses long MCMC runs as reference data).
    """

    def __init__(self, a: float = 0.0, b: float = -4.0, c: float = 0.9, d0: float = 4.0, tau: float = 1.0):
        self.n_particles, self.n_spatial = 4, 2
        self.dim = 8
        self.name = "dw4"
        self.a, self.b, self.c, self.d0, self.tau = float(a), float(b), float(c), float(d0), float(tau)

    def energy(self, x):
        import torch

        x = _as_batch(x, self.dim, self.name).reshape(-1, self.n_particles, self.n_spatial)
        i, j = torch.triu_indices(self.n_particles, self.n_particles, offset=1, device=x.device)
        d = (x[:, i] - x[:, j]).pow(2).sum(-1).sqrt() - self.d0
        return (self.a * d + self.b * d.pow(2) + self.c * d.pow(4)).sum(-1) / self.tau


class LJ13(ToyTarget):
    """13 Lennard-Jones particles in 3D (Koehler et al. 2020; Klein et al. 2023; draxler2024).

    ``u = (eps / tau) sum_{i<j} [(rm / d_ij)^12 - 2 (rm / d_ij)^6] + (osc / 2) sum_i |x_i - x_mean|^2``
    with eps = 1, rm = 1, tau = 1 and a harmonic restraint to the centre of mass of strength
    ``osc = 1`` (the standard benchmark parameters). ``x: (batch, 39)``. Translation invariant, so
    ``log_z`` is None; no exact sampler.
    """

    def __init__(self, n_particles: int = 13, eps: float = 1.0, rm: float = 1.0, tau: float = 1.0,
                 oscillator: float = 1.0):
        if int(n_particles) < 2:
            raise InputError("LJ needs at least 2 particles")
        self.n_particles, self.n_spatial = int(n_particles), 3
        self.dim = 3 * self.n_particles
        self.name = "lj13" if self.n_particles == 13 else f"lj{self.n_particles}"
        self.eps, self.rm, self.tau, self.oscillator = float(eps), float(rm), float(tau), float(oscillator)

    def energy(self, x):
        import torch

        x = _as_batch(x, self.dim, self.name).reshape(-1, self.n_particles, 3)
        i, j = torch.triu_indices(self.n_particles, self.n_particles, offset=1, device=x.device)
        d2 = (x[:, i] - x[:, j]).pow(2).sum(-1)
        r6 = (self.rm**2 / d2).pow(3)
        lj = (self.eps / self.tau) * (r6.pow(2) - 2.0 * r6).sum(-1)
        com = x - x.mean(dim=1, keepdim=True)
        return lj + 0.5 * self.oscillator * com.pow(2).sum((-1, -2))


TOY_NAMES = ("double-well-12d", "double-well-12d-fab", "many-well-16d", "many-well-32d", "gmm-2d", "dw4", "lj13", "gaussian-2d")


def toy_target(name: str) -> ToyTarget:
    """A toy target by name: one of :data:`TOY_NAMES`."""
    if name == "double-well-12d":
        return DoubleWell12D()
    if name == "double-well-12d-fab":
        return DoubleWell12D(well="fab")
    if name == "many-well-16d":
        return ManyWell(16)
    if name == "many-well-32d":
        return ManyWell(32)
    if name == "gmm-2d":
        return GaussianMixture2D()
    if name == "dw4":
        return DW4()
    if name == "lj13":
        return LJ13()
    if name == "gaussian-2d":
        return Gaussian(2, mean=[1.0, -0.5], cov=[[1.0, 0.5], [0.5, 2.0]], name="gaussian-2d")
    raise InputError(f"unknown toy target {name!r}; choose one of {', '.join(TOY_NAMES)}")
