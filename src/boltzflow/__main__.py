"""``python -m boltzflow`` (and ``torchrun --nproc_per_node N -m boltzflow VERB ...``): the CLI."""

from .cli import entry

entry()
