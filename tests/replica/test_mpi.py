"""Replica exchange under MPI (``mpiexec -n 2 boltzflow simulate``): openmmtools' own MPI path, rank 0
writes, resume works, too many ranks is a one-line error. Runs only where mpi4py and an mpiexec are
installed (``pip install -e .[mpi]``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e .[mpi])")

REPO = Path(__file__).resolve().parents[2]
ARGS = ["butane", "--replicas", "2", "--steps-per-iteration", "20", "--checkpoint-interval", "2", "--no-progress"]


def mpiexec(n: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "boltzflow", "simulate", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_simulate_under_mpi_writes_on_rank0_and_resumes(tmp_path):
    out = tmp_path / "pt"
    r = mpiexec(2, *ARGS, "--iterations", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes samples.npz, summary.json)
    assert (out / "samples.npz").is_file() and (out / "summary.json").is_file()
    r = mpiexec(2, *ARGS, "--iterations", "6", "-o", str(out), "--resume", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["n_iterations"] == 6
    record = json.loads((out / "replica_config.json").read_text())
    assert record["resumed_from_iteration"] == 4
    assert json.loads((out / "replica_cost.json").read_text())["iteration"] == 6


def test_more_ranks_than_replicas_is_a_one_line_error(tmp_path):
    r = mpiexec(3, *ARGS, "--iterations", "2", "-o", str(tmp_path / "x"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("boltzflow simulate: error:")]
    assert lines and all("3 MPI ranks but only 2 replicas" in ln for ln in lines)
    assert not (tmp_path / "x").exists()
