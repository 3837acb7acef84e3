"""Z-matrices derived automatically from a molecule's bond graph.

A Z-matrix is a placement order plus, for every placed atom ``i``, three reference atoms
``(j, k, l)`` that are already placed: ``i`` is put at bond length ``|x_i - x_j|``, angle
``(i, j, k)`` and torsion ``(i, j, k, l)``. The first three atoms of a molecule fix the rigid
frame (6 rigid-body degrees of freedom) and carry fewer coordinates (see
:class:`boltzflow.transforms.internal.InternalCoordinates`).

Rules used here (all from the topology bonds, no atom-name heuristics):

* heavy atoms: breadth-first tree from the graph centre (smallest eccentricity; then most
  neighbours, lowest index), which keeps placement chains short; ``j`` = tree parent, ``k`` = parent of ``j`` (or another
  placed neighbour of ``j``), ``l`` = an earlier placed sibling of ``i`` when there is one
  (improper-like torsion, nearly constant), else the parent of ``k``, else any placed
  neighbour of ``j`` / ``k`` / placed atom not in ``{i, j, k}``.
* hydrogens (:func:`hydrogen_zmatrix`): ``j`` = the heavy parent, ``k`` = first heavy
  neighbour of ``j``; ``l`` = an earlier hydrogen of the same parent (so methyl siblings carry
  a ~±120° torsion), else a second heavy neighbour of ``j``, else a heavy neighbour of ``k``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True, eq=False)
class ZMatrix:
    """Placement order and reference atoms, in the input file's atom indices.

    order: (m,) atoms in placement order.
    rows: (m, 4) int64 ``(i, j, k, l)``; ``-1`` where undefined (first atoms of a molecule).
        For a full Z-matrix row 0 is ``(a0,-1,-1,-1)``, row 1 ``(a1,a0,-1,-1)``, row 2
        ``(a2,j,k,-1)``. For a hydrogen Z-matrix every row is complete.
    levels: list of index arrays into ``rows``; atoms in the same level can be placed together
        (their references are all in earlier levels or fixed atoms).
    """

    order: np.ndarray
    rows: np.ndarray
    levels: tuple

    @property
    def n(self) -> int:
        return int(self.order.shape[0])


def bond_graph(topology) -> dict[int, list[int]]:
    """Adjacency lists ``{atom index: sorted neighbour indices}`` of an OpenMM Topology."""
    adj: dict[int, set[int]] = {a.index: set() for a in topology.atoms()}
    for b in topology.bonds():
        i, k = b[0].index, b[1].index
        adj[i].add(k)
        adj[k].add(i)
    return {i: sorted(v) for i, v in adj.items()}


def _levels(rows: np.ndarray, fixed: set[int]) -> tuple:
    """Group rows into levels that can be placed simultaneously."""
    level_of: dict[int, int] = {a: -1 for a in fixed}
    out: list[list[int]] = []
    for r, (i, j, k, l) in enumerate(rows):
        refs = [a for a in (j, k, l) if a >= 0]
        lev = 1 + max([level_of[a] for a in refs], default=-1)
        level_of[int(i)] = lev
        while len(out) <= lev:
            out.append([])
        out[lev].append(r)
    return tuple(np.array(v, dtype=np.int64) for v in out if v)


def _eccentricity(adj: dict[int, list[int]], a: int) -> int:
    """Longest bond-graph distance from a (large for unreachable atoms)."""
    dist = {a: 0}
    queue = deque([a])
    while queue:
        b = queue.popleft()
        for c in adj[b]:
            if c not in dist:
                dist[c] = dist[b] + 1
                queue.append(c)
    return max(dist.values()) + len(adj) * (len(dist) < len(adj))


def build_zmatrix(adjacency: dict[int, list[int]], atoms, root: int | None = None) -> ZMatrix:
    """Z-matrix over the connected atom subset ``atoms`` using only bonds inside that subset.

    Raises InputError if the subset has fewer than 3 atoms or is not connected.
    """
    atoms = [int(a) for a in atoms]
    aset = set(atoms)
    if len(atoms) < 3:
        raise InputError(f"internal coordinates need at least 3 atoms, got {len(atoms)}")
    adj = {a: [b for b in adjacency[a] if b in aset] for a in atoms}
    if root is None:
        root = min(atoms, key=lambda a: (_eccentricity(adj, a), -len(adj[a]), a))
    if root not in aset:
        raise InputError(f"root atom {root} is not in the atom subset")
    parent: dict[int, int] = {root: -1}
    order = [root]
    queue = deque([root])
    while queue:
        a = queue.popleft()
        for b in adj[a]:
            if b not in parent:
                parent[b] = a
                order.append(b)
                queue.append(b)
    if len(order) != len(atoms):
        missing = sorted(aset - set(order))
        raise InputError(
            f"the bond graph of the selected atoms is not connected (atoms {missing[:5]} unreachable); "
            "internal coordinates need one connected molecule"
        )
    placed: list[int] = []
    rows = []
    for i in order:
        pos = len(placed)
        pset = set(placed)
        if pos == 0:
            rows.append((i, -1, -1, -1))
        elif pos == 1:
            rows.append((i, parent[i], -1, -1))
        else:
            j = parent[i]
            k = parent[j] if parent[j] >= 0 else next(b for b in adj[j] if b in pset and b != i)
            if pos == 2:
                rows.append((i, j, k, -1))
            else:
                l = _pick_l(i, j, k, adj, parent, placed, pset)
                rows.append((i, j, k, l))
        placed.append(i)
    rows_a = np.array(rows, dtype=np.int64)
    return ZMatrix(np.array(order, dtype=np.int64), rows_a, _levels(rows_a, set()))


def _pick_l(i, j, k, adj, parent, placed, pset) -> int:
    excl = {i, j, k}
    # earlier sibling (same parent j, already placed): improper-like torsion
    sib = [b for b in adj[j] if b in pset and b not in excl and parent.get(b) == j]
    if sib:
        return sib[0]
    if parent.get(k, -1) >= 0 and parent[k] not in excl:
        return parent[k]
    for cand in [b for b in adj[k] if b in pset] + [b for b in adj[j] if b in pset] + placed:
        if cand not in excl:
            return cand
    raise InputError(f"cannot find a torsion reference atom for atom {i}")  # pragma: no cover


def hydrogen_zmatrix(adjacency: dict[int, list[int]], heavy, hydrogens, parents) -> ZMatrix:
    """Rows placing each hydrogen in the local frame of its heavy parent (heavy atoms fixed).

    heavy: (n_heavy,) heavy atom indices; hydrogens / parents: (n_h,) hydrogen indices and their
    heavy parents. Needs every parent to reach two further heavy atoms (e.g. not methane).
    """
    hset = set(int(a) for a in heavy)
    placed_h: dict[int, list[int]] = {}
    rows = []
    for h, j in zip((int(a) for a in hydrogens), (int(p) for p in parents)):
        heavy_nb = [b for b in adjacency[j] if b in hset]
        if not heavy_nb:
            raise InputError(
                f"hydrogen {h}: its parent atom {j} has no heavy neighbour; local hydrogen frames need "
                "at least two bonded heavy atoms (molecules like water or methane are not supported)"
            )
        k = heavy_nb[0]
        sib = placed_h.get(j, [])
        if sib:
            l = sib[0]
        elif len(heavy_nb) > 1:
            l = heavy_nb[1]
        else:
            cand = [b for b in adjacency[k] if b in hset and b != j]
            if not cand:
                raise InputError(
                    f"hydrogen {h}: no heavy atom bonded to {k} besides {j}; local hydrogen frames need a "
                    "chain of three heavy atoms"
                )
            l = cand[0]
        rows.append((h, j, k, l))
        placed_h.setdefault(j, []).append(h)
    rows_a = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return ZMatrix(rows_a[:, 0].copy(), rows_a, _levels(rows_a, hset))


def all_atom_zmatrix(adjacency, heavy, hydrogens, parents) -> ZMatrix:
    """Heavy-atom Z-matrix (bond-graph BFS) followed by the hydrogens in local frames."""
    zh = build_zmatrix(adjacency, heavy)
    zhh = hydrogen_zmatrix(adjacency, heavy, hydrogens, parents)
    rows = np.concatenate([zh.rows, zhh.rows])
    return ZMatrix(rows[:, 0].copy(), rows, _levels(rows, set()))
