"""Population grammar on a real topology, Estimate JSON form, bad input -> InputError."""

import json

import numpy as np
import pytest

from boltzflow.errors import InputError
from boltzflow.estimators import (
    Estimate,
    conformational_free_energy,
    expectation,
    log_weights,
    log_z,
    parse_region,
    population,
)
from boltzflow.systems.modes import dihedral


@pytest.fixture(scope="module")
def adp():
    from boltzflow.systems.builtin import builtin_system

    return builtin_system("alanine-dipeptide")


def _rotated_frames(system, n=40, seed=0):
    """Frames whose phi/psi vary: random rigid perturbations are not enough, so jitter all atoms."""
    rng = np.random.default_rng(seed)
    return system.positions[None] + rng.normal(0, 0.08, (n, system.n_atoms, 3))


def test_phi_psi_regions_match_dihedrals(adp):
    x = _rotated_frames(adp)
    from boltzflow.systems.torsions import named_torsions

    t = named_torsions(adp.topology)
    phi = np.degrees(dihedral(x, t["phi"]))
    psi = np.degrees(dihedral(x, t["psi"]))
    assert 0 < np.sum(phi > 0) < len(x)
    np.testing.assert_array_equal(parse_region("phi>0", adp.topology).indicator(x), phi > 0)
    np.testing.assert_array_equal(parse_region(" phi < 0 and psi >= 100 ", adp.topology).indicator(x),
                                  (phi < 0) & (psi >= 100))
    a = ",".join(map(str, t["phi"]))
    np.testing.assert_array_equal(parse_region(f"dihedral({a})>0").indicator(x), phi > 0)
    # mode=phi_positive agrees with the system's modes
    np.testing.assert_array_equal(parse_region("mode=phi_positive", modes=adp.modes).indicator(x),
                                  adp.modes.assign(x) == list(adp.modes.names).index("phi_positive"))


@pytest.mark.parametrize("expr,match", [("phi>>0", "cannot parse"), ("chi>0", "unknown coordinate"),
                                        ("mode=alpha", "unknown mode"), ("", "empty"),
                                        ("phi>500", "must be in"), ("phi>0 & ", None)])
def test_bad_expressions_raise_input_error_with_grammar(adp, expr, match):
    if match is None:  # a trailing '&' is tolerated (empty condition dropped)
        assert parse_region(expr, adp.topology).indicator(_rotated_frames(adp, 3)).shape == (3,)
        return
    with pytest.raises(InputError, match=match):
        parse_region(expr, adp.topology, adp.modes)


def test_phi_without_topology_and_flat_coordinates():
    with pytest.raises(InputError, match="topology"):
        parse_region("phi>0")
    x = np.array([[1.0, -2.0], [-1.0, 3.0]])
    np.testing.assert_array_equal(parse_region("x[0]>0 & x[1]<0").indicator(x), [True, False])
    with pytest.raises(InputError, match="out of range"):
        parse_region("x[5]>0").indicator(x)


def test_estimate_json_form_and_input_errors():
    e = population(np.array([1, 0, 0, 1], bool))
    d = e.to_dict()
    assert set(d) == {"name", "value", "stderr", "ess"} and d["value"] == 0.5
    json.dumps(d)
    assert Estimate("x", 1.0).to_dict()["stderr"] is None  # nan -> null
    with pytest.raises(InputError):
        log_weights(np.zeros(3), np.zeros(4))
    with pytest.raises(InputError):
        log_z(np.full(3, -np.inf))
    with pytest.raises(InputError):
        expectation(np.zeros((2, 2)))
    with pytest.raises(InputError, match="no"):
        conformational_free_energy(np.ones(3, bool), np.zeros(3, bool))
    # invalid samples (u = +inf) get weight 0 instead of poisoning the estimate
    lw = log_weights(np.array([0.0, np.inf, 0.0]), np.zeros(3))
    assert expectation(np.array([1.0, 100.0, 3.0]), lw, n_bootstrap=0).value == pytest.approx(2.0)


def test_ramachandran_surface_matches_region_population(adp):
    from boltzflow.estimators import ramachandran_surface

    x = _rotated_frames(adp, 200, seed=3)
    fes = ramachandran_surface(x, adp.topology, bins=64)
    assert fes.free_energy.shape == (64, 64) and fes.probability.sum() == pytest.approx(1.0)
    # probability mass right of phi = 0 equals the phi>0 population
    p_right = fes.probability[32:].sum()
    assert p_right == pytest.approx(parse_region("phi>0", adp.topology).indicator(x).mean())
