"""Independence Metropolis-Hastings (IMH) with a normalised proposal: exact Boltzmann samples, no weights.

Proposals ``x'`` are drawn independently from a generator q; a chain at ``x`` moves to ``x'`` with
probability ``min(1, w(x') / w(x))``, ``w = exp(-u - log q)`` (the importance weight), so the chain's
stationary distribution is p_B exactly (Tierney 1994; wu2021 slides: "flow-MCMC"). A perfect proposal
(``q = p_B``, all weights equal) accepts every move.

The chain needs only the log weights of i.i.d. proposals: :func:`imh_chains` turns the ``n`` log weights
a flow sample already carries into ``chains`` chains of ``n // chains`` steps, at no extra energy cost
(the same ``n`` energy evaluations reweighting uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class IMHResult:
    """index: (steps, chains) int, the proposal each chain sits on after each step (index into the
    log weights given); accept: (steps - 1, chains) bool, whether step t >= 1 moved the chain."""

    index: np.ndarray
    accept: np.ndarray

    @property
    def accept_rate(self) -> float:
        return float(self.accept.mean()) if self.accept.size else float("nan")

    @property
    def steps(self) -> int:
        return int(self.index.shape[0])

    @property
    def chains(self) -> int:
        return int(self.index.shape[1])

    def chain_major(self) -> np.ndarray:
        """(steps * chains,) proposal indices: chain 0's steps in order, then chain 1's, ... (time order
        within each chain, the layout block errors and statistical inefficiencies expect)."""
        return np.ascontiguousarray(self.index.T).reshape(-1)


def imh_chains(log_w, chains: int = 1, seed: int | np.random.Generator = 0) -> IMHResult:
    """Run ``chains`` IMH chains over i.i.d. proposals with log weights ``log_w: (n,)`` (``-u - log q``,
    any additive constant; NaN / -inf = invalid, never accepted).

    Proposal ``i`` is offered to chain ``i % chains`` at step ``i // chains``; each chain starts on its
    first proposal (step 0) and ``n // chains`` steps are run (a remainder of ``n % chains`` proposals is
    unused). Chains that start on an invalid proposal leave it at the first valid one."""
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    if chains < 1:
        raise InputError(f"chains must be >= 1, got {chains}")
    steps = lw.size // chains
    if steps < 1:
        raise InputError(f"{lw.size} proposals cannot feed {chains} chains; draw at least {chains}")
    if np.any(lw == np.inf):
        raise InputError("log weights contain +inf; check the energies and log densities")
    lw = np.where(np.isnan(lw), -np.inf, lw)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    grid = lw[: steps * chains].reshape(steps, chains)
    log_u = np.log(rng.random((max(steps - 1, 0), chains)))
    index = np.empty((steps, chains), dtype=np.int64)
    accept = np.zeros((max(steps - 1, 0), chains), dtype=bool)
    cur = np.arange(chains)
    cur_lw = grid[0].copy()
    index[0] = cur
    with np.errstate(invalid="ignore"):
        for t in range(1, steps):
            new = grid[t]
            ratio = new - cur_lw  # -inf - -inf = nan: an invalid chain moves to any valid proposal
            ratio = np.where(np.isneginf(cur_lw) & np.isfinite(new), np.inf, ratio)
            a = np.isfinite(new) & (log_u[t - 1] < ratio)
            cur = np.where(a, t * chains + np.arange(chains), cur)
            cur_lw = np.where(a, new, cur_lw)
            index[t] = cur
            accept[t - 1] = a
    return IMHResult(index=index, accept=accept)
