"""Exceptions. Every message says what was wrong and what to do.

:class:`InputError` (and subclasses) mark problems with what the user gave us (files, shapes,
options); the CLI prints them as one line and exits with code 2.
"""

from __future__ import annotations


class BoltzflowError(Exception):
    """Base class of all boltzflow errors."""


class InputError(BoltzflowError, ValueError):
    """Bad user input: missing/malformed file, wrong shape, NaN coordinates, unknown option."""


class ConfigError(InputError):
    """A configuration file or dataclass has unknown keys or invalid values."""


class SystemBuildError(InputError):
    """A molecule could not be turned into an OpenMM System (unknown residue, bad terminus, ...)."""


class UnsupportedForceError(BoltzflowError):
    """The native energy does not implement a force of this System; use backend='openmm'."""


class WorkerError(BoltzflowError, RuntimeError):
    """An OpenMM worker process died or failed; the message names the worker and the cause."""


class CheckpointError(InputError):
    """A checkpoint is missing, corrupt, or was made for a different system or configuration."""
