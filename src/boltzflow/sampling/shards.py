"""Sharded sampling: N processes (torchrun ranks or batch-scheduler jobs) each draw one part of a
sample, with their own reproducible seed, and the parts merge into one :class:`SampleSet`.

Shard ``i`` of ``N`` of a request for ``n`` samples draws the ``i``-th contiguous part of ``n``
(:func:`boltzflow.distributed.shard_bounds`; sizes differ by at most one) with the seed
:func:`shard_seed` ``(seed, i, N)``: distinct for every shard, the same on every rerun, and equal to
``seed`` itself for ``N = 1`` (so one shard is the unsharded sample). Its file is
``generated.shard-III-of-NNN.npz`` with ``provenance["shard"] = {"index", "count", "n_total",
"seed", "base_seed"}``.

Importance weights of flow samples are absolute (``log w = -u - log q``, not normalised per shard),
so the merged set is exactly the sample one process would hold with the same configurations: every
estimator gives the same answer on it.

    >>> merged = merge_sample_sets([SampleSet.load(p) for p in shard_files("runs/adp/samples")])
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..core.sampleset import SampleSet
from ..errors import InputError

SHARD_RE = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.npz$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with 0 <= i < N; InputError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise InputError(f"--shard expects i/N with 0 <= i < N (e.g. 0/4 for the first of 4 shards), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_seed(seed: int, index: int, count: int) -> int:
    """The seed of shard ``index`` of ``count``: ``seed`` for one shard, else a 63-bit seed derived from
    (seed, index) by numpy's SeedSequence (distinct streams, reproducible)."""
    if count == 1:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**63, int(index)]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def shard_name(stem: str, index: int, count: int) -> str:
    """File name of shard ``index`` of ``count``: ``STEM.shard-III-of-NNN.npz``."""
    return f"{stem}.shard-{index:03d}-of-{count:03d}.npz"


def shard_files(directory: str | Path, stem: str = "generated") -> list[Path]:
    """The shard files ``STEM.shard-*-of-*.npz`` in ``directory``, in shard order."""
    found = []
    for p in Path(directory).glob(f"{stem}.shard-*-of-*.npz"):
        m = SHARD_RE.match(p.name)
        if m and m.group("stem") == stem:
            found.append((int(m.group("i")), p))
    return [p for _, p in sorted(found)]


def merge_sample_sets(sets: list[SampleSet], require_complete: bool = True) -> SampleSet:
    """One SampleSet from shards (concatenated in shard order).

    Checks that the parts describe one state (same temperature, same system fingerprint, same array
    fields) and, when they carry shard records, that they are shards of one request (same count, seed
    and total, no duplicates) and, with ``require_complete``, that none is missing. Provenance: the
    first part's, with ``energy_evals`` and ``wall_s`` summed over shards (total cost),
    ``elapsed_s`` the longest shard's wall time and ``shards`` the number merged."""
    if not sets:
        raise InputError("no sample sets to merge; give at least one .npz (or a run with samples/*.shard-*.npz)")
    t0 = sets[0].temperature
    fp0 = sets[0].provenance.get("fingerprint")
    for k, s in enumerate(sets[1:], 1):
        if (s.temperature is None) != (t0 is None) or (t0 is not None and abs(float(s.temperature) - float(t0)) > 1e-9):
            raise InputError(f"part {k} is at {s.temperature} K but part 0 at {t0} K; merge samples of one state only")
        if s.provenance.get("fingerprint") != fp0:
            raise InputError(f"part {k} comes from another system than part 0 (fingerprints differ); merge samples of "
                             "one system only")
        if s.positions.shape[1:] != sets[0].positions.shape[1:]:
            raise InputError(f"part {k} has configurations of shape {s.positions.shape[1:]}, part 0 "
                             f"{sets[0].positions.shape[1:]}; merge samples of one system only")
        for name in ("reduced_energy", "log_q", "log_weights"):
            if (getattr(s, name) is None) != (getattr(sets[0], name) is None):
                raise InputError(f"part {k} {'lacks' if getattr(s, name) is None else 'has'} {name} unlike part 0; "
                                 "merge samples drawn the same way")
    records = [s.provenance.get("shard") for s in sets]
    if any(r is not None for r in records):
        if any(r is None for r in records):
            raise InputError("some parts are shards and some are not; merge the shards of one request")
        key = {(r["count"], r["base_seed"], r["n_total"]) for r in records}
        if len(key) > 1:
            raise InputError(f"the shards come from different requests (count, seed, n: {sorted(key)}); merge the "
                             "shards of one `boltzflow sample --shard` run")
        count = records[0]["count"]
        idx = [int(r["index"]) for r in records]
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})
            raise InputError(f"shard(s) {dup} given twice; give each shard once")
        missing = sorted(set(range(count)) - set(idx))
        if missing and require_complete:
            raise InputError(f"shard(s) {missing} of {count} missing; run `boltzflow sample --shard i/{count}` for "
                             "them first")
        order = np.argsort(idx)
        sets = [sets[i] for i in order]
    merged = SampleSet.concatenate(list(sets))
    prov = dict(sets[0].provenance)
    prov.pop("shard", None)
    for key in ("energy_evals", "wall_s"):
        vals = [s.provenance.get(key) for s in sets]
        if all(isinstance(v, (int, float)) for v in vals):
            prov[key] = type(vals[0])(sum(vals))
    walls = [s.provenance.get("wall_s") for s in sets]
    if all(isinstance(v, (int, float)) for v in walls):
        prov["elapsed_s"] = float(max(walls))
    prov["shards"] = len(sets)
    if records[0] is not None:
        prov["seed"] = records[0]["base_seed"]
    return SampleSet(merged.positions, merged.reduced_energy, merged.log_q, merged.log_weights, merged.temperature, prov)
