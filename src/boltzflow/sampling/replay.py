"""Prioritised replay buffer of AIS samples for FAB training.

Stores AIS samples ``x`` with their AIS log weights ``log_w`` (targeting p^2/q for alpha = 2) and
the flow log density ``log_q`` at insertion. Samples are drawn with probability proportional to
``w``; after the flow changes, a drawn sample's weight is corrected by ``q_old / q_new`` so the
buffer keeps targeting p^2/q for the current q. Fixed capacity, oldest entries overwritten.
"""

from __future__ import annotations

from typing import Any

import torch


class PrioritisedReplayBuffer:
    """Ring buffer: ``x`` rows of shape ``event_shape``; ``log_w``, ``log_q`` (capacity,)."""

    def __init__(self, capacity: int, min_length: int | None = None):
        if capacity < 1:
            raise ValueError("replay buffer capacity must be >= 1")
        self.capacity = int(capacity)
        self.min_length = int(min_length if min_length is not None else min(capacity, 256))
        self.x: torch.Tensor | None = None
        self.log_w: torch.Tensor | None = None
        self.log_q: torch.Tensor | None = None
        self.length = 0
        self.pos = 0

    def __len__(self) -> int:
        return self.length

    @property
    def ready(self) -> bool:
        return self.length >= self.min_length

    def add(self, x: torch.Tensor, log_w: torch.Tensor, log_q: torch.Tensor) -> None:
        """Insert a batch ``x: (batch, ...)``; entries with non-finite weight are not stored."""
        keep = torch.isfinite(log_w) & torch.isfinite(log_q)
        x, log_w, log_q = x.detach()[keep], log_w.detach()[keep], log_q.detach()[keep]
        if self.x is None:
            self.x = x.new_zeros((self.capacity, *x.shape[1:]))
            self.log_w = log_w.new_full((self.capacity,), -torch.inf)
            self.log_q = log_q.new_zeros((self.capacity,))
        for start in range(0, x.shape[0], self.capacity):
            chunk = slice(start, min(start + self.capacity, x.shape[0]))
            m = chunk.stop - chunk.start
            idx = (self.pos + torch.arange(m)) % self.capacity
            self.x[idx] = x[chunk]
            self.log_w[idx] = log_w[chunk]
            self.log_q[idx] = log_q[chunk]
            self.pos = int((self.pos + m) % self.capacity)
            self.length = min(self.length + m, self.capacity)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``n`` entries with replacement, probability proportional to ``exp(log_w)``.

        Returns ``(indices (n,), x (n, ...), log_q at insertion (n,))``."""
        if self.length == 0 or self.log_w is None:
            raise RuntimeError("replay buffer is empty; add AIS samples before sampling")
        lw = self.log_w[: self.length]
        p = torch.softmax(lw.double(), 0)
        idx = torch.multinomial(p, n, replacement=True, generator=generator)
        return idx, self.x[idx], self.log_q[idx]

    def adjust(self, idx: torch.Tensor, log_q_new: torch.Tensor) -> None:
        """After evaluating the current flow at drawn entries: ``log_w += log_q_old - log_q_new``."""
        lq_new = log_q_new.detach().to(self.log_q.dtype)
        ok = torch.isfinite(lq_new)
        idx, lq_new = idx[ok], lq_new[ok]
        self.log_w[idx] = self.log_w[idx] + self.log_q[idx] - lq_new
        self.log_q[idx] = lq_new

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "min_length": self.min_length, "x": self.x, "log_w": self.log_w,
                "log_q": self.log_q, "length": self.length, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay buffer capacity {state['capacity']} in checkpoint != configured {self.capacity}")
        self.min_length = int(state["min_length"])
        self.x, self.log_w, self.log_q = state["x"], state["log_w"], state["log_q"]
        self.length, self.pos = int(state["length"]), int(state["pos"])
