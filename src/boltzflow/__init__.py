"""boltzflow: Boltzmann generators for CHARMM36m molecules in OpenMM.

Data flows one way::

    systems -> energy -> transforms -> flows -> losses/training -> sampling -> estimators -> reports
                                                 replica (reference sampling) beside it

Importing :mod:`boltzflow` does no work: heavy dependencies (OpenMM, torch) are imported by
the submodules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
