"""CLI smoke tests for `boltzflow prepare` and `boltzflow energy` (real OpenMM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")

from boltzflow.cli import main  # noqa: E402
from boltzflow.energy.openmm_bridge import OpenMMEnergy  # noqa: E402
from boltzflow.systems import MolecularSystem  # noqa: E402
from boltzflow.systems.builtin import builtin_dir  # noqa: E402


@pytest.fixture(scope="module")
def adp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "adp"
    assert main(["prepare", "alanine-dipeptide", "--solvent", "obc2", "-o", str(d)]) == 0
    return d


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_prepare_writes_system_dir(adp_dir):
    for f in ("system.xml", "topology.pdb", "metadata.json"):
        assert (adp_dir / f).is_file()
    ms = MolecularSystem.load(adp_dir)
    assert ms.n_atoms == 22 and ms.solvent == "obc2" and ms.modes is not None


def test_energy_json_matches_api(adp_dir, tmp_path, capsys):
    ms = MolecularSystem.load(adp_dir)
    rng = np.random.default_rng(0)
    x = ms.positions[None] + rng.normal(0, 0.01, (3, ms.n_atoms, 3))
    np.save(tmp_path / "frames.npy", x)
    capsys.readouterr()
    rc = main(["energy", str(adp_dir), "--coords", str(tmp_path / "frames.npy"), "--backend", "openmm",
               "--terms", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    u = OpenMMEnergy(ms)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out["reduced_energy"], u, rtol=1e-6)
    np.testing.assert_allclose(out["energy_kj_mol"], u * ms.kT, rtol=1e-6)
    terms = out["terms_kj_mol"]
    assert "gb" in terms and "cmap" in terms
    np.testing.assert_allclose(np.sum([terms[k] for k in terms], axis=0), out["energy_kj_mol"], rtol=1e-6)


def test_prepare_psf_route_and_pdb_file(tmp_path, capsys):
    d = builtin_dir("butane")
    rc = main(["prepare", str(d / "butane.psf"), "--params", str(d / "butane.rtf"), str(d / "butane.prm"),
               "--coords", str(d / "butane.pdb"), "-o", str(tmp_path / "but"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["n_atoms"] == 14
    rc = main(["prepare", str(builtin_dir("alanine-dipeptide") / "alanine-dipeptide.pdb"), "-o", str(tmp_path / "a")])
    assert rc == 0 and MolecularSystem.load(tmp_path / "a").n_atoms == 22


def test_bad_inputs_exit_2_with_one_line(adp_dir, tmp_path, capsys):
    ms = MolecularSystem.load(adp_dir)
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5, 3)))
    err = _one_line_error(capsys, main(["energy", str(adp_dir), "--coords", str(tmp_path / "wrong.npy")]))
    assert "22" in err
    nan = ms.positions[None].copy()
    nan[0, 3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    err = _one_line_error(capsys, main(["energy", str(adp_dir), "--coords", str(tmp_path / "nan.npy")]))
    assert "NaN" in err
    err = _one_line_error(capsys, main(["energy", str(adp_dir), "--coords", str(tmp_path / "missing.npy")]))
    assert "not found" in err
    _one_line_error(capsys, main(["energy", str(tmp_path / "nowhere"), "--coords", str(tmp_path / "nan.npy")]))
    pdb = (builtin_dir("alanine-dipeptide") / "alanine-dipeptide.pdb").read_text().replace(" ALA A", " XYZ A")
    (tmp_path / "xyz.pdb").write_text(pdb)
    err = _one_line_error(capsys, main(["prepare", str(tmp_path / "xyz.pdb"), "-o", str(tmp_path / "o1")]))
    assert "XYZ" in err
    err = _one_line_error(capsys, main(["prepare", str(tmp_path / "missing.pdb"), "-o", str(tmp_path / "o2")]))
    d = builtin_dir("butane")
    err = _one_line_error(capsys, main(["prepare", str(d / "butane.psf"), "--params", str(tmp_path / "no.prm"),
                                        "--coords", str(d / "butane.pdb"), "-o", str(tmp_path / "o3")]))
    assert "no.prm" in err
    (tmp_path / "bad.prm").write_text("BONDS\nCG331 CG321 x y\n")
    _one_line_error(capsys, main(["prepare", str(d / "butane.psf"), "--params", str(tmp_path / "bad.prm"),
                                  "--coords", str(d / "butane.pdb"), "-o", str(tmp_path / "o4")]))


def test_console_script_exit_code(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "import sys; from boltzflow.cli import main; sys.exit(main())",
           "energy", str(tmp_path / "nowhere"), "--coords", str(tmp_path / "x.npy")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_energy_output_arrays_match_json_and_text(tmp_path, capsys):
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-dipeptide")
    rng = np.random.default_rng(1)
    x = system.positions[None] + rng.normal(0, 0.01, (5, system.n_atoms, 3))
    x[2, 0] += 50.0  # one atom far away: still a valid frame
    np.save(tmp_path / "frames.npy", x)
    base = ["energy", "alanine-dipeptide", "--coords", str(tmp_path / "frames.npy"), "--backend", "native"]
    capsys.readouterr()
    assert main(base + ["--json", "--terms"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert main(base + ["-o", str(tmp_path / "e.npy")]) == 0
    assert "wrote 5 energies" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), js["energy_kj_mol"], rtol=1e-12)
    assert main(base + ["-o", str(tmp_path / "e.npy")]) == 2  # exists: refused without --overwrite
    assert main(base + ["-o", str(tmp_path / "e.npz"), "--terms"]) == 0
    with np.load(tmp_path / "e.npz") as z:
        np.testing.assert_allclose(z["reduced_energy"], js["reduced_energy"], rtol=1e-12)
        assert z["valid"].all() and float(z["temperature_k"]) == 300.0
        for name, vals in js["terms_kj_mol"].items():
            np.testing.assert_allclose(z[f"term_{name}_kj_mol"], vals, rtol=1e-12)
    capsys.readouterr()
    assert main(base) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("frame") and len(rows) == 6
    assert float(rows[3].split()[1]) == pytest.approx(js["energy_kj_mol"][2], abs=1e-4)
