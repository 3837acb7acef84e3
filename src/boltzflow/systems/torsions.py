"""Backbone torsions (phi, psi) found from a topology's bond graph, independent of atom naming.

Works for Amber-style caps (ACE/NME residues) and CHARMM-style patched termini alike: an amide
is a carbonyl carbon (bonded to a terminal O) bonded to an N; a residue's CA is the carbon bonded
to an amide N and to a carbonyl carbon.
"""

from __future__ import annotations

from collections import defaultdict


def _graph(topology):
    atoms = list(topology.atoms())
    nbrs: dict[int, set[int]] = defaultdict(set)
    for a, b in topology.bonds():
        nbrs[a.index].add(b.index)
        nbrs[b.index].add(a.index)
    elem = [a.element.symbol if a.element is not None else "" for a in atoms]
    return atoms, nbrs, elem


def backbone_torsions(topology) -> list[dict[str, tuple[int, int, int, int]]]:
    """Per residue with a complete backbone, ``{"phi": (C-, N, CA, C), "psi": (N, CA, C, N+)}``
    (atom indices); residues lacking a neighbour get only the torsion that exists."""
    atoms, nbrs, elem = _graph(topology)

    def is_carbonyl(c: int) -> bool:
        return elem[c] == "C" and any(elem[o] == "O" and len(nbrs[o]) == 1 for o in nbrs[c])

    out = []
    for ca in range(len(atoms)):
        if elem[ca] != "C" or is_carbonyl(ca):
            continue
        ns = [n for n in nbrs[ca] if elem[n] == "N"]
        cs = [c for c in nbrs[ca] if is_carbonyl(c)]
        if len(ns) != 1 or len(cs) != 1:
            continue
        n, c = ns[0], cs[0]
        tors = {}
        prev_c = [p for p in nbrs[n] if p != ca and is_carbonyl(p)]
        next_n = [q for q in nbrs[c] if elem[q] == "N"]
        if prev_c:
            tors["phi"] = (prev_c[0], n, ca, c)
        if next_n:
            tors["psi"] = (n, ca, c, next_n[0])
        if tors:
            out.append(tors)
    return out


def named_torsions(topology) -> dict[str, tuple[int, int, int, int]]:
    """``{"phi": ..., "psi": ...}`` of the first residue with both (dipeptides), plus ``phi<i>``/``psi<i>``
    for every residue i (0-based over residues that have them)."""
    res = backbone_torsions(topology)
    named: dict[str, tuple[int, int, int, int]] = {}
    for i, t in enumerate(res):
        for k, v in t.items():
            named[f"{k}{i}"] = v
    for t in res:
        if "phi" in t and "psi" in t:
            named.setdefault("phi", t["phi"])
            named.setdefault("psi", t["psi"])
    return named
