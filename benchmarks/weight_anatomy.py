"""Where the importance weights of a generator's samples vary: which part of the Kish ESS deficit a
conformational state, a single torsion or a simple function of the internal coordinates explains.

    python benchmarks/weight_anatomy.py RUN_DIR --json              # RUN_DIR/samples/generated.npz
    python benchmarks/weight_anatomy.py RUN_DIR --samples S.npz -n 300000 --json

With normalised weights w (mean 1), the Kish ESS fraction is 1 / E[w^2] and its deficit is the chi-square
divergence chi2 = E[w^2] - 1 = Var(w). For a partition of the samples into bins b (a state, a torsion's
36 bins), the between-bin part ``sum_b P_q(b) (E[w | b] - 1)^2`` is the chi2 of that marginal: the part of
the deficit a perfect generator of the marginal alone would remove. Printed:

* ``states``: per conformational state of the system (its declared modes) the fraction of samples, of
  reweighted mass, the Kish ESS within it and its share of sum w^2 (1/Kish = sum over states of
  mass^2 / (samples x kish_within), so the share is the state's part of the deficit);
* ``residue_states`` (peptides): the same per combination of per-residue backbone states, R / B / L
  (alpha_R / beta_PPII / alpha_L) from the first residue on, largest share first;
* ``kish_if_state_exact``: the Kish ESS if the weights inside one state were all equal to their mean
  there (what learning that state perfectly would give), per state;
* ``torsions``: the largest chi2 of single-torsion marginals (36 bins) among all bonded torsions;
* ``largest``: the ``top`` largest weights (mean 1) with their share of sum w^2, state and the modes'
  torsion (degrees) where the system declares one, and their index in the sample set;
* ``linear_r2``: the fraction of Var(w) explained by a least-squares fit of w on the standardised bond
  lengths, bond angles and torsion sines/cosines (fit on one half, scored on the other).

A deficit that no marginal and no linear function explains is spread over the joint distribution of
many coordinates: the flow's precision, not a missed state, limits the ESS.

With ``--frames F.npz`` (repeatable; SampleSets of frames drawn from p with their reduced energies, e.g. the
run's ``data/tempering.npz`` and an independent reference) the run's generator also scores those frames:
``frames`` gives, per state, the mean of log w = -u - log q over the frames in it, relative to the mean
over all frames of that set (``excess``, nats, with its standard error). For frames from p the mean log w in
state s is ``KL(p_s || q_s) + log(P_s / Q_s)`` up to a constant shared by all states, so a large excess
on the training frames themselves means the flow under-fits the state (more data cannot help), and a
larger excess on independent frames than on the training frames (``gap``) means it over-fits them.

    python benchmarks/weight_anatomy.py RUN --frames RUN/data/tempering.npz --frames reference_300K.npz --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _chi2(bins: np.ndarray, w: np.ndarray, nb: int) -> float:
    n = len(w)
    cs = np.bincount(bins, minlength=nb)
    sw = np.bincount(bins, weights=w, minlength=nb)
    m = cs > 0
    return float(np.sum(cs[m] / n * (sw[m] / cs[m] - 1.0) ** 2))


def _bonded_torsions(adj: dict[int, list[int]]) -> list[tuple[int, int, int, int]]:
    """One (i, j, k, l) per rotatable bond j-k, and every hydrogen/branch torsion around it."""
    out = []
    for j in adj:
        for k in adj[j]:
            if j < k and len(adj[j]) > 1 and len(adj[k]) > 1:
                out += [(i, j, k, l) for i in adj[j] if i != k for l in adj[k] if l not in (j, i)]
    return out


def _features(x: np.ndarray, adj: dict[int, list[int]]) -> np.ndarray:
    from boltzflow.core.geometry import dihedral_of

    f = [np.linalg.norm(x[:, j] - x[:, k], axis=-1) for j in adj for k in adj[j] if j < k]
    for j in adj:
        for i in adj[j]:
            for k in adj[j]:
                if i < k:
                    a, b = x[:, i] - x[:, j], x[:, k] - x[:, j]
                    c = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
                    f.append(np.arccos(np.clip(c, -1.0, 1.0)))
    for j in adj:
        for k in adj[j]:
            if j < k and len(adj[j]) > 1 and len(adj[k]) > 1:
                i = next(a for a in adj[j] if a != k)
                l = next(a for a in adj[k] if a not in (j, i))
                t = dihedral_of(x, (i, j, k, l))
                f += [np.sin(t), np.cos(t)]
    F = np.stack(f, 1)
    return (F - F.mean(0)) / (F.std(0) + 1e-12)


def _by_label(lab: np.ndarray, names: list[str], w: np.ndarray) -> dict:
    """Per label present: fraction of samples (Q), reweighted mass (P), Kish ESS within (k), share of
    sum w^2 (= P^2 / (Q k) / sum over labels: its part of 1/Kish), Kish if its weights were equal."""
    n = len(w)
    out = {}
    for i, name in enumerate(names):
        m = lab == i
        if not m.any():
            continue
        wm = w[m]
        flat = w.copy()
        flat[m] = wm.mean()  # this state's weights made equal: its shape learned exactly
        out[name] = {"samples": float(m.mean()), "mass": float(wm.sum() / n),
                     "kish_within": float(wm.mean() ** 2 / np.mean(wm * wm)),
                     "w2_share": float(np.sum(wm * wm) / np.sum(w * w)),
                     "kish_if_state_exact": float(1.0 / np.mean(flat * flat))}
    return out


def _residue_labels(modes, x: np.ndarray) -> np.ndarray:
    """(n,) str: each frame's per-residue backbone states, R / B / L (alpha_R / beta_PPII / alpha_L) from the
    first residue on, e.g. "BLR"."""
    return np.array(["".join("RBL"[v] for v in row) for row in modes.residue_states(x)])


def anatomy(system, positions: np.ndarray, log_weights: np.ndarray, top: int = 5) -> dict:
    """The decomposition above for ``positions: (n, n_atoms, 3)`` nm and their ``log_weights: (n,)``."""
    from boltzflow.core.geometry import dihedral_of
    from boltzflow.transforms.zmatrix import bond_graph

    lw = np.asarray(log_weights, dtype=np.float64)
    ok = np.isfinite(lw)
    x, lw = np.asarray(positions, dtype=np.float64)[ok], lw[ok]
    w = np.exp(lw - lw.max())
    w /= w.mean()
    n = len(w)
    e_w2 = float(np.mean(w * w))
    out: dict = {"n": n, "n_invalid": int((~ok).sum()), "kish": 1.0 / e_w2, "chi2": e_w2 - 1.0}
    modes = system.modes
    if modes is not None:
        lab = modes.assign(x)
        out["states"] = _by_label(lab, list(modes.names), w)
    if hasattr(modes, "residue_states"):  # a peptide: every combination of per-residue backbone states
        combos, code = np.unique(_residue_labels(modes, x), return_inverse=True)
        by = _by_label(code.reshape(-1), [str(c) for c in combos], w)
        out["residue_states"] = dict(sorted(by.items(), key=lambda kv: -kv[1]["w2_share"]))
    # the largest weights one by one: a handful of draws in a region q misses sets a large sample's ESS
    big = np.argsort(w)[::-1][:top]
    atoms = getattr(modes, "atoms", None)
    angle = np.degrees(dihedral_of(x[big], tuple(atoms))) if atoms is not None else None
    kept = np.flatnonzero(ok)  # positions in the input of the finite-weight draws
    out["largest"] = [{"index": int(kept[i]), "w": float(w[i]), "w2_share": float(w[i] ** 2 / np.sum(w * w)),
                       **({"state": modes.names[int(lab[i])]} if modes is not None else {}),
                       **({"mode_coordinate_deg": float(angle[j])} if angle is not None else {})}
                      for j, i in enumerate(big)]
    adj = bond_graph(system.topology)
    names = [a.name for a in system.topology.atoms()]
    tors = []
    for q in _bonded_torsions(adj):
        t = dihedral_of(x, q)
        b = np.floor((t + np.pi) / (2 * np.pi) * 36).astype(int).clip(0, 35)
        tors.append((_chi2(b, w, 36), "-".join(names[i] for i in q)))
    tors.sort(reverse=True)
    out["torsions"] = [{"atoms": a, "chi2": c} for c, a in tors[:top]]
    F = np.c_[_features(x, adj), np.ones(n)]
    half = n // 2
    coef, *_ = np.linalg.lstsq(F[:half], w[:half], rcond=None)
    res = w[half:] - F[half:] @ coef
    out["linear_r2"] = float(1.0 - res.var() / w[half:].var())
    return out


def state_excess(system, positions: np.ndarray, log_weights: np.ndarray) -> dict:
    """Per state of frames ``positions: (n, n_atoms, 3)`` nm drawn from p, with ``log_weights: (n,)`` =
    -u - log q: {"n", "states": {state: {"n", "excess", "se"}}}, excess the state's mean log w minus the
    mean over all n frames (nats). Peptides: per combination of per-residue backbone states (R/B/L);
    other systems: per declared mode."""
    lw = np.asarray(log_weights, dtype=np.float64)
    ok = np.isfinite(lw)
    x, lw = np.asarray(positions, dtype=np.float64)[ok], lw[ok]
    modes = system.modes
    if modes is None:
        raise ValueError(f"system {system.name!r} declares no conformational states to split the frames by")
    if hasattr(modes, "residue_states"):
        names = _residue_labels(modes, x)
    else:
        names = np.asarray(modes.names)[modes.assign(x)]
    base = float(lw.mean())
    out = {}
    for name in np.unique(names):
        v = lw[names == name]
        out[str(name)] = {"n": int(len(v)), "excess": float(v.mean() - base),
                          "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")}
    return {"n": int(len(lw)), "n_invalid": int((~ok).sum()),
            "states": dict(sorted(out.items(), key=lambda kv: -kv[1]["n"]))}


def _score_frames(rd, system, path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positions, -u - log q) of at most n frames of the SampleSet at path (a random subset, in order),
    scored by the run's generator in float64; frames of another isomer than the generator's are dropped."""
    import torch

    from boltzflow.flows.generator import load_generator
    from boltzflow.sampling import SampleSet

    s = SampleSet.load(path)
    if s.reduced_energy is None:
        raise ValueError(f"'{path}' has no reduced energies: score frames saved by boltzflow (simulate, tempering)")
    idx = np.arange(len(s.positions))
    if len(idx) > n:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), n, replace=False))
    gen = load_generator(rd.path / "generator.pt", system).double().eval()
    x = np.asarray(s.positions[idx], dtype=np.float64)
    keep = gen.same_isomer(x)
    x, u = x[keep], np.asarray(s.reduced_energy, dtype=np.float64)[idx][keep]
    with torch.no_grad():
        lq = np.concatenate([gen.log_prob(torch.as_tensor(x[a:a + 4096])).numpy() for a in range(0, len(x), 4096)])
    return x, -u - lq


def main(argv=None) -> dict:
    import torch

    from boltzflow.core.rundir import RunDir
    from boltzflow.sampling import SampleSet
    from boltzflow.systems import MolecularSystem

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (its system/ and, by default, samples/generated.npz)")
    ap.add_argument("--samples", help="SampleSet .npz with log weights (default RUN/samples/generated.npz)")
    ap.add_argument("-n", type=int, default=300_000, help="use the first n samples (default 300 000)")
    ap.add_argument("--frames", action="append", default=[], metavar="F.npz",
                    help="frames from p with reduced energies (repeatable): per-state excess of -u - log q under "
                         "the run's generator (see above); the first is taken as the training frames for 'gap'")
    ap.add_argument("--frames-n", type=int, default=60_000, help="score at most this many frames of each set")
    ap.add_argument("--json", action="store_true", help="print the JSON only")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from boltzflow.errors import InputError

    try:
        rd = RunDir(a.run, create=False)
    except InputError as e:
        ap.exit(2, f"error: {e}\n")
    system = MolecularSystem.load(rd.system_dir)
    if a.frames:
        missing = [f for f in a.frames if not Path(f).is_file()]
        if missing:
            ap.exit(2, f"error: no frames at '{missing[0]}'\n")
        out = {"run": str(a.run), "frames": {}}
        for f in a.frames:
            try:
                out["frames"][f] = state_excess(system, *_score_frames(rd, system, Path(f), a.frames_n))
            except ValueError as e:
                ap.exit(2, f"error: {e}\n")
        if len(a.frames) > 1:  # independent frames against the first (training) set, states in both
            first, *rest = (out["frames"][f]["states"] for f in a.frames)
            out["gap"] = {f: {k: v["excess"] - first[k]["excess"] for k, v in r.items() if k in first}
                          for f, r in zip(a.frames[1:], rest)}
        print(json.dumps(out) if a.json else json.dumps(out, indent=1))
        return out
    path = Path(a.samples) if a.samples else rd.path / "samples" / "generated.npz"
    if not path.is_file():
        ap.exit(2, f"error: no samples at '{path}': run `boltzflow sample {a.run}` first or pass --samples\n")
    s = SampleSet.load(path)
    if s.log_weights is None:
        ap.exit(2, f"error: '{path}' has no log weights: sample it with `boltzflow sample` first\n")
    out = {"run": str(a.run), "samples": str(path), **anatomy(system, s.positions[: a.n], s.log_weights[: a.n])}
    if a.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
