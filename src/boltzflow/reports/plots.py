"""Matplotlib figures (headless, Agg). Each function writes one PNG and returns its path.

Angles are in radians, energies in kT. Weighted histograms take self-normalised weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def ramachandran(panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]], path, bins: int = 64) -> Path:
    """One 2D phi/psi histogram (free energy -log p, kT) per ``(label, phi, psi, weights)`` panel."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    for ax, (label, phi, psi, w) in zip(axes[0], panels):
        h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=w)
        with np.errstate(divide="ignore"):
            f = -np.log(h / max(h.sum(), 1e-300))
        f -= np.nanmin(f[np.isfinite(f)]) if np.any(np.isfinite(f)) else 0.0
        im = ax.imshow(f.T, origin="lower", extent=(-180, 180, -180, 180), cmap="viridis", vmax=8, aspect="equal")
        ax.set_title(f"{label} (n={len(phi)})")
        ax.set_xlabel("phi (deg)")
        ax.set_ylabel("psi (deg)")
        ax.axvline(0, color="w", lw=0.6, ls="--")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="free energy (kT)")
    return _save_no_tight(fig, path)


def _save_no_tight(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def torsion_histogram(sets: Sequence[tuple[str, np.ndarray, np.ndarray | None]], path, name: str = "dihedral",
                      bins: int = 72) -> Path:
    """Overlaid 1D histograms of an angle (radians) for ``(label, angles, weights)`` sets."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    edges = np.linspace(-180, 180, bins + 1)
    for label, ang, w in sets:
        ax.hist(np.degrees(ang), bins=edges, weights=w, density=True, histtype="step", lw=1.6, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(f"{name} (deg)")
    ax.set_ylabel("density")
    ax.legend()
    return _save(fig, path)


def energy_histograms(u_b_gen: np.ndarray | None, u_b_ref: np.ndarray | None, u_g_ref: np.ndarray | None,
                      u_g_gen: np.ndarray | None, path) -> Path:
    """felardos2023 fig. 3 style: left u_B (target energy, kT) of generated vs reference samples;
    right u_G = -log q (generator energy) of reference vs generated samples."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))

    def hist(ax, data, title):
        finite = [(lab, d[np.isfinite(d)]) for lab, d in data if d is not None and np.any(np.isfinite(d))]
        if not finite:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
            return
        lo = min(np.percentile(d, 0.5) for _, d in finite)
        hi = max(np.percentile(d, 99.5) for _, d in finite)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        for lab, d in finite:
            ax.hist(d, bins=edges, density=True, histtype="step", lw=1.6, label=lab)
        ax.set_title(title)
        ax.legend()

    hist(axes[0], [("generated", u_b_gen), ("reference", u_b_ref)], "u_B: target energy (kT)")
    hist(axes[1], [("reference", u_g_ref), ("generated", u_g_gen)], "u_G = -log q: generator energy")
    axes[0].set_xlabel("u_B (kT)")
    axes[1].set_xlabel("u_G (nats)")
    return _save(fig, path)


def training_curves(rows: list[dict], path, mode_names: Sequence[str] = (), exact: dict | None = None) -> Path:
    """Loss, ESS and mode fractions over training steps from metrics.jsonl rows."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    stages = sorted({r.get("stage", "") for r in rows}, key=lambda s: min(r["step"] for r in rows if r.get("stage", "") == s))
    for stage in stages:
        rs = [r for r in rows if r.get("stage", "") == stage]
        steps = [r["step"] for r in rs]
        axes[0].plot(steps, [r.get("loss", np.nan) for r in rs], label=stage)
        axes[1].plot(steps, [r.get("ess", np.nan) for r in rs], label=stage)
        for name in mode_names:
            vals = [_mode_value(r, name) for r in rs]
            axes[2].plot(steps, vals, label=f"{name} ({stage})")
    if exact:
        for name, v in exact.items():
            axes[2].axhline(v, ls="--", color="k", lw=0.8)
            axes[2].text(axes[2].get_xlim()[0], v, f" {name} ref", va="bottom", fontsize=8)
    axes[0].set_title("loss")
    axes[0].set_yscale("symlog")
    axes[1].set_title("ESS (fraction of batch)")
    axes[1].set_ylim(0, 1)
    axes[2].set_title("mode fractions")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _mode_value(row: dict, name: str) -> float:
    modes = row.get("modes") or row.get("mode_fractions") or {}
    if isinstance(modes, dict) and name in modes:
        return modes[name]
    return row.get(f"mode_{name}", row.get(name, np.nan))
