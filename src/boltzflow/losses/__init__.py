"""Training losses for Boltzmann generators (science.md section 1).

Every loss returns a :class:`LossOutput`. Data-free losses share the signature
``loss(gen, energy, n, *, generator=None, penalty_weight=0.0, **options)``; ``klz`` takes data
instead: ``klz(gen, x_data, *, generator=None, penalty_weight=0.0)``.

``gen`` follows the generator protocol: ``sample_and_log_prob(n, generator) -> (x, log_q)``
(differentiable), ``log_prob(x) -> (batch,)``, ``penalty(x) -> (batch,)``, ``parameters()``.
``energy`` is a callable ``u(x) -> (batch,)`` reduced energy in kT (+inf marks invalid samples,
which are dropped from the loss and counted in ``metrics["n_invalid"]``).
"""

from __future__ import annotations

from ..errors import InputError
from .base import LossOutput, kish_ess
from .core import (
    alpha2_resampled,
    chi2_data,
    klx,
    klx_path,
    klz,
    klz_df,
    l2plus,
    l2plus_nodetach,
    l2plus_nomask,
    logvar_data,
    rwml,
)
from .fab import fab

#: name -> loss function. The :data:`DATA_LOSSES` need data (the trainer passes them frames); all others
#: are data-free.
LOSSES = {
    "klz": klz,
    "klx": klx,
    "klx_path": klx_path,
    "klz_df": klz_df,
    "l2plus": l2plus,
    "l2plus_nomask": l2plus_nomask,
    "l2plus_nodetach": l2plus_nodetach,
    "fab": fab,
    "alpha2": alpha2_resampled,
    "rwml": rwml,
    "chi2_data": chi2_data,
    "logvar_data": logvar_data,
}

#: the losses the trainer passes training frames (``x_data``) instead of a sample count
DATA_LOSSES = ("klz", "chi2_data", "logvar_data")


def get_loss(name: str):
    """The loss function registered as ``name``; InputError listing the valid names otherwise."""
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


__all__ = ["LOSSES", "DATA_LOSSES", "LossOutput", "get_loss", "kish_ess", "klz", "klx", "klx_path", "klz_df", "chi2_data",
           "logvar_data", "l2plus", "l2plus_nomask", "l2plus_nodetach", "fab", "rwml"]
