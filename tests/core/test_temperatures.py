"""Temperatures given to the Python API must be finite and > 0 K (issue 15); above 1 000 K they warn."""

from __future__ import annotations

import math
import warnings

import pytest

from boltzflow.errors import InputError
from boltzflow.units import HOT_TEMPERATURE_K, check_temperature, kt_kj_per_mol


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "hot", None])
def test_bad_temperatures_are_refused(bad):
    with pytest.raises(InputError, match="finite temperature > 0 K"):
        check_temperature(bad)
    with pytest.raises(InputError):
        kt_kj_per_mol(bad)


def test_good_and_hot_temperatures():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_temperature(300) == 300.0
    assert kt_kj_per_mol(300.0) == pytest.approx(2.494, abs=1e-3)
    with pytest.warns(UserWarning, match="above 1000 K"):
        assert check_temperature(2 * HOT_TEMPERATURE_K, "T") == 2000.0


def test_molecular_system_refuses_a_bad_temperature():
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("butane")
    for bad in (float("inf"), -1.0, math.nan):
        with pytest.raises(InputError, match="temperature"):
            system.with_temperature(bad)
    with pytest.raises(InputError, match="temperature"):
        builtin_system("butane", temperature=float("inf"))
