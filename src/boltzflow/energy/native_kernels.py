"""Analytic energy + gradient kernels for the native energy's fast path (no autograd).

Every kernel works on positions in the component-major layout ``p: (3, n_atoms, batch)`` nm
(batch contiguous, so every elementwise op runs over whole rows of configurations) and adds its
gradient ``dE/dp`` into ``grad: (3, n_atoms, batch)`` in place; it returns its energy ``(batch,)``
in the parameters' unit (kJ/mol in :class:`~boltzflow.energy.native.NativeEnergy`). Per-term
index tensors are ``(k, n_terms)`` atom indices, parameters ``(n_terms, 1)`` columns.

The formulas are the autograd path's (``native.py``) differentiated by hand:

- distance terms: ``dE/dd = (dE/dr2) * 2 d`` with ``d = p_i - p_j``;
- angles ``theta = atan2(|w|, u.v)`` (``u = p0 - p1, v = p2 - p1, w = u x v``):
  ``dtheta/du = (u x w) / (|u|^2 |w|)``, ``dtheta/dv = (w x v) / (|v|^2 |w|)``;
- dihedrals (IUPAC sign, ``b1 = p1 - p0, b2 = p2 - p1, b3 = p3 - p2, m = b1 x b2, n = b2 x b3``):
  ``dphi/dp0 = -|b2| m / |m|^2``, ``dphi/dp3 = |b2| n / |n|^2`` and the two middle atoms from
  translation/rotation invariance.

Degenerate geometry (zero distance, collinear angle or dihedral atoms): squared norms are clamped
at 1e-30, so the gradient there is 0/1e-30 = 0 and everywhere finite, as on the autograd path.

These functions take plain tensors and no Python state, so ``torch.compile`` fuses them.
"""

from __future__ import annotations

import torch

#: Clamp for squared norms (nm^2, nm^4).
TINY = 1e-30


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(0)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a0, a1, a2 = a.unbind(0)
    b0, b1, b2 = b.unbind(0)
    return torch.stack((a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0))


def _gather(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """p: (3, n_atoms, batch), idx: (k, n) -> (3, k, n, batch)."""
    k, n = idx.shape
    return p.index_select(1, idx.reshape(-1)).view(3, k, n, p.shape[-1])


def _scatter(grad: torch.Tensor | None, idx: torch.Tensor, *parts: torch.Tensor) -> None:
    """grad[:, idx[a, t]] += parts[a][:, t] for parts: k x (3, n, batch); nothing when grad is None.

    One index_add per slot (no stacked copy), so the compiled kernel fuses each part into its scatter."""
    if grad is None:
        return
    for a, part in enumerate(parts):
        grad.index_add_(1, idx[a], part)


def harmonic_distance(p: torch.Tensor, grad: torch.Tensor | None, idx: torch.Tensor, k: torch.Tensor,
                      r0: torch.Tensor) -> torch.Tensor:
    """Bonds and Urey-Bradley: sum 0.5 k (r - r0)^2 over pairs idx: (2, n)."""
    x = _gather(p, idx)
    d = x[:, 0] - x[:, 1]  # (3, n, batch)
    r = torch.sqrt(_dot(d, d).clamp_min(TINY))
    dr = r - r0
    kdr = k * dr
    g = (kdr / r) * d
    _scatter(grad, idx, g, -g)
    return 0.5 * (kdr * dr).sum(0)


def pair_lj_coulomb(p: torch.Tensor, grad: torch.Tensor | None, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonbonded pairs idx: (2, n): (A/r^12 - B/r^6, C/r) summed -> (lj, coulomb) each (batch,)."""
    x = _gather(p, idx)
    d = x[:, 0] - x[:, 1]
    inv_r2 = 1.0 / _dot(d, d).clamp_min(TINY)
    inv_r = torch.sqrt(inv_r2)
    inv_r6 = inv_r2 * inv_r2 * inv_r2
    a6 = a * inv_r6
    e_lj = (a6 - b) * inv_r6
    e_c = c * inv_r
    # dE/d(r^2) = -(6 A/r^12 - 3 B/r^6 + C/(2 r)) / r^2; dE/dd = 2 d dE/d(r^2)
    de = -(6.0 * a6 - 3.0 * b) * inv_r6 - 0.5 * e_c
    g = (2.0 * de * inv_r2) * d
    _scatter(grad, idx, g, -g)
    return e_lj.sum(0), e_c.sum(0)


def harmonic_angle(p: torch.Tensor, grad: torch.Tensor | None, idx: torch.Tensor, k: torch.Tensor,
                   theta0: torch.Tensor) -> torch.Tensor:
    """Angles idx: (3, n) (vertex in the middle): sum 0.5 k (theta - theta0)^2."""
    x = _gather(p, idx)
    u, v = x[:, 0] - x[:, 1], x[:, 2] - x[:, 1]
    w = _cross(u, v)
    wn = torch.sqrt(_dot(w, w).clamp_min(TINY))
    theta = torch.atan2(wn, _dot(u, v))
    dth = theta - theta0
    de = k * dth
    s = de / wn
    gu = _cross(u, w) * (s / _dot(u, u).clamp_min(TINY))
    gv = _cross(w, v) * (s / _dot(v, v).clamp_min(TINY))
    _scatter(grad, idx, gu, -(gu + gv), gv)
    return 0.5 * (de * dth).sum(0)


def dihedral(p: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """cos and sin of the IUPAC dihedral angles of idx: (4, n) -> (cos, sin: (n, batch), saved for the gradient).

    The angle is ``atan2(sin, cos)``; where it is undefined (collinear atoms) cos = 1, sin = 0, i.e. 0,
    like ``native._dihedral``."""
    x = _gather(p, idx)
    b1, b2, b3 = x[:, 1] - x[:, 0], x[:, 2] - x[:, 1], x[:, 3] - x[:, 2]
    m, n = _cross(b1, b2), _cross(b2, b3)
    b2n2 = _dot(b2, b2).clamp_min(TINY)
    b2n = torch.sqrt(b2n2)
    yy = b2n * _dot(b1, n)
    xx = _dot(m, n)
    bad = (xx.abs() + yy.abs()) < 1e-18
    inv = torch.rsqrt((xx * xx + yy * yy).clamp_min(TINY))
    cos = torch.where(bad, torch.ones_like(xx), xx * inv)
    sin = torch.where(bad, torch.zeros_like(yy), yy * inv)
    return cos, sin, (b1, b2, b3, m, n, b2n2, b2n)


def fourier_torsion(cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Periodic torsions summed per dihedral as a Fourier series, with no trigonometric calls.

    sum_terms k (1 + cos(n phi - phase)) = const + sum_n (kc[n] cos(n phi) + ks[n] sin(n phi)) with
    ``kc[n-1] = sum k cos(phase)``, ``ks[n-1] = sum k sin(phase)`` over the terms of periodicity n:
    (n_max, n_dihedrals, 1). cos(n phi), sin(n phi) come from the angle-addition recurrence.
    Returns (energy without the constant (batch,), dE/dphi (n_dihedrals, batch))."""
    cn, sn = cos, sin
    e = kc[0] * cn + ks[0] * sn
    de = ks[0] * cn - kc[0] * sn
    for k in range(1, kc.shape[0]):
        cn, sn = cn * cos - sn * sin, sn * cos + cn * sin
        e = e + kc[k] * cn + ks[k] * sn
        de = de + (k + 1) * (ks[k] * cn - kc[k] * sn)
    return e.sum(0), de


def dihedral_gradient(grad: torch.Tensor | None, idx: torch.Tensor, saved: tuple[torch.Tensor, ...], de: torch.Tensor) -> None:
    """grad += dE/dphi * dphi/dp for dihedrals idx: (4, n) given de = dE/dphi: (n, batch)."""
    if grad is None:
        return
    b1, b2, b3, m, n, b2n2, b2n = saved
    g0 = m * (-de * b2n / _dot(m, m).clamp_min(TINY))
    g3 = n * (de * b2n / _dot(n, n).clamp_min(TINY))
    f1 = _dot(b1, b2) / b2n2
    f3 = _dot(b3, b2) / b2n2
    g1 = f3 * g3 - (1.0 + f1) * g0
    g2 = f1 * g0 - (1.0 + f3) * g3
    _scatter(grad, idx, g0, g1, g2, g3)


def wrapped_improper(th: torch.Tensor, k: torch.Tensor, theta0: torch.Tensor, two_pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k min(|th - th0|, 2pi - |th - th0|)^2 -> (energy (batch,), dE/dth)."""
    diff = th - theta0
    d = diff.abs()
    alt = two_pi - d
    use = d <= alt
    dm = torch.where(use, d, alt)
    sgn = torch.sign(diff) * torch.where(use, torch.ones_like(d), -torch.ones_like(d))
    return (k * dm * dm).sum(0), 2.0 * k * dm * sgn


def cmap(phi: torch.Tensor, psi: torch.Tensor, coeff: torch.Tensor, base: torch.Tensor, size: torch.Tensor,
         delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenMM bicubic CMAP patches (see ``native._compile_periodic_cmap_coefficients``).

    phi, psi: (n, batch) rad; coeff: (16, patches); base, size: (n, 1) long; delta: (n, 1).
    Returns (energy (batch,), dE/dphi, dE/dpsi)."""
    two_pi = 2 * torch.pi
    a = torch.remainder(phi + two_pi, two_pi) / delta
    b = torch.remainder(psi + two_pi, two_pi) / delta
    s = torch.minimum(a.floor().long(), size - 1).clamp_min(0)
    t = torch.minimum(b.floor().long(), size - 1).clamp_min(0)
    da = a - s.to(a.dtype)
    db = b - t.to(b.dtype)
    cf = coeff[:, base + s + size * t]  # (16, n, batch)
    rows, drows = [], []
    for i in range(4):
        c0, c1, c2, c3 = cf[4 * i], cf[4 * i + 1], cf[4 * i + 2], cf[4 * i + 3]
        rows.append(((c3 * db + c2) * db + c1) * db + c0)
        drows.append((3.0 * c3 * db + 2.0 * c2) * db + c1)
    e = ((rows[3] * da + rows[2]) * da + rows[1]) * da + rows[0]
    de_da = (3.0 * rows[3] * da + 2.0 * rows[2]) * da + rows[1]
    de_db = ((drows[3] * da + drows[2]) * da + drows[1]) * da + drows[0]
    return e.sum(0), de_da / delta, de_db / delta


def energy_and_gradient(p: torch.Tensor, prm: dict[str, torch.Tensor], need_grad: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Total energy and its gradient for every term present in ``prm`` (see ``NativeEnergy._fast_params``).

    p: (3, n_atoms, batch) contiguous (batch-contiguous rows keep the compiled loops vectorised) ->
    (energy (batch,), dE/dp (3, n_atoms, batch) or None without need_grad)."""
    grad = torch.zeros_like(p) if need_grad else None
    e = p.new_zeros(p.shape[-1])
    if "hd_idx" in prm:
        e = e + harmonic_distance(p, grad, prm["hd_idx"], prm["hd_k"], prm["hd_r0"])
    if "pair_idx" in prm:
        lj, coul = pair_lj_coulomb(p, grad, prm["pair_idx"], prm["pair_A"], prm["pair_B"], prm["pair_C"])
        e = e + lj + coul
    if "angle_idx" in prm:
        e = e + harmonic_angle(p, grad, prm["angle_idx"], prm["angle_k"], prm["angle_t0"])
    if "dq_idx" in prm:
        cos, sin, saved = dihedral(p, prm["dq_idx"])
        if "torsion_kc" in prm:
            et, de = fourier_torsion(cos, sin, prm["torsion_kc"], prm["torsion_ks"])
            e = e + et + prm["torsion_const"]
        else:
            de = torch.zeros_like(cos)
        if "angle_quads" in prm:  # impropers and CMAP need the angle itself: the last rows of dq_idx
            a0 = cos.shape[0] - prm["angle_quads"].shape[0]
            phi = torch.atan2(sin[a0:], cos[a0:])
            de_a = torch.zeros_like(phi)
            if "improper_map" in prm:
                m = prm["improper_map"]
                ei, di = wrapped_improper(phi.index_select(0, m), prm["improper_k"], prm["improper_t0"], prm["improper_2pi"])
                e = e + ei
                de_a.index_add_(0, m, di)
            if "cmap_phi_map" in prm:
                mp, ms = prm["cmap_phi_map"], prm["cmap_psi_map"]
                ec, dp, ds = cmap(phi.index_select(0, mp), phi.index_select(0, ms), prm["cmap_coeff"], prm["cmap_base"],
                                  prm["cmap_size"], prm["cmap_delta"])
                e = e + ec
                de_a.index_add_(0, mp, dp)
                de_a.index_add_(0, ms, ds)
            de = torch.cat((de[:a0], de[a0:] + de_a))
        dihedral_gradient(grad, prm["dq_idx"], saved, de)
    return e, grad


def reduced_energy_and_gradient(p: torch.Tensor, prm: dict[str, torch.Tensor], beta: float, need_grad: bool = True
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`energy_and_gradient` in kT with the validity flag folded in (one compiled region).

    p: (3, n_atoms, batch) nm -> (u (batch,) kT, +inf where invalid; valid (batch,) bool: finite
    input and energy; du/dp (3, n_atoms, batch), zero on invalid columns, or None)."""
    e, grad = energy_and_gradient(p, prm, need_grad)
    u = e * beta
    valid = torch.isfinite(u) & torch.isfinite(p).all(0).all(0)
    u = torch.where(valid, u, torch.full_like(u, float("inf")))
    if grad is not None:
        grad = torch.where(valid, grad * beta, torch.zeros_like(grad))
    return u, valid, grad
