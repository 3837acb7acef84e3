"""boltzflow: Boltzmann generators for CHARMM36m molecules in OpenMM.

Packages import each other downward only (enforced by ``tests/core/test_layering.py``)::

    errors -> units, io, config, distributed -> core -> systems -> energy -> sampling -> transforms -> flows
        -> losses -> training -> estimators -> reports -> recipes -> pipeline -> cli -> __main__
                                            replica (reference sampling) beside reports

Importing :mod:`boltzflow` does no work: heavy dependencies (OpenMM, torch) are imported by
the submodules that need them. It only filters pymbar's import-time banner out of the log
(:func:`silence_pymbar_banner`), for Python users as for the command line.
"""

import logging

__version__ = "0.1.0"

#: pymbar logger -> text of the notice it logs on import, whatever the data (pymbar runs fine without JAX)
PYMBAR_IMPORT_NOTICES = {"pymbar.mbar_solvers": "JAX NOT FOUND",
                         "pymbar.timeseries": "Warning on use of the timeseries module"}


def _not_an_import_notice(record: logging.LogRecord) -> bool:
    return PYMBAR_IMPORT_NOTICES.get(record.name, "\0") not in str(record.msg)


def silence_pymbar_banner() -> None:
    """Filter pymbar's import-time notices (the 9-line JAX banner) out of the log; other pymbar
    warnings still show. Called when boltzflow is imported (before pymbar is)."""
    for name in PYMBAR_IMPORT_NOTICES:
        log = logging.getLogger(name)
        if _not_an_import_notice not in log.filters:
            log.addFilter(_not_an_import_notice)


silence_pymbar_banner()

__all__ = ["__version__", "silence_pymbar_banner"]
