import json

import pytest

from boltzflow.io import atomic_write
from boltzflow.training.rundir import RunDir


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["f.txt"]


def test_metrics_append_truncate_and_summary(tmp_path):
    rd = RunDir(tmp_path / "run")
    for s in range(5):
        rd.append_metrics({"step": s, "loss": float(s)})
    with open(rd.metrics_path, "a") as fh:
        fh.write('{"step": 5, "lo')  # a line cut by a crash is ignored
    assert [r["step"] for r in rd.read_metrics()] == [0, 1, 2, 3, 4]
    rd.truncate_metrics(2)
    assert [r["step"] for r in rd.read_metrics()] == [0, 1, 2]
    rd.update_summary(a=1)
    rd.update_summary(b=2)
    assert json.loads(rd.summary_path.read_text()) == {"a": 1, "b": 2}
    rd.write_environment(["boltzflow", "test"])
    env = json.loads((rd.path / "environment.json").read_text())
    assert env["argv"] == ["boltzflow", "test"] and "torch" in env
