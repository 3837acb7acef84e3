import json

import pytest

from boltzflow.core.rundir import RunDir
from boltzflow.io import atomic_write


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


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    import os

    old = os.umask(umask)
    try:
        p = atomic_write(tmp_path / "f.bin", lambda fh: fh.write(b"x"))
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == mode


def test_output_guards(tmp_path):
    from boltzflow.errors import InputError
    from boltzflow.io import check_output_dir, check_output_file, run_kind

    run = tmp_path / "pt"
    run.mkdir()
    (run / "replica.nc").write_bytes(b"")
    assert run_kind(run) == "replica-exchange run" and run_kind(tmp_path / "none") is None
    assert check_output_dir(tmp_path / "new", "training run") == tmp_path / "new"
    assert check_output_dir(run, "replica-exchange run") == run  # its own kind: the verb decides
    with pytest.raises(InputError, match="replica-exchange run directory"):
        check_output_dir(run, "training run")
    assert check_output_dir(run, "training run", overwrite=True) == run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("a")
    with pytest.raises(InputError, match="did not make"):
        check_output_dir(tmp_path / "mine", "system")
    with pytest.raises(InputError, match="already exists"):
        check_output_file(tmp_path / "mine" / "a.txt")
    assert check_output_file(tmp_path / "mine" / "a.txt", overwrite=True).name == "a.txt"


def test_staged_files_land_together_or_not_at_all(tmp_path):
    from boltzflow.io import staged_files

    dest = tmp_path / "plots"
    dest.mkdir()
    (dest / "a.png").write_text("old a")
    with pytest.raises(RuntimeError):
        with staged_files(dest) as d:
            (d / "a.png").write_text("new a")
            raise RuntimeError("failed after the first figure")
    assert (dest / "a.png").read_text() == "old a" and sorted(p.name for p in tmp_path.iterdir()) == ["plots"]
    with staged_files(dest) as d:
        (d / "a.png").write_text("new a")
        (d / "b.png").write_text("new b")
    assert (dest / "a.png").read_text() == "new a" and (dest / "b.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_a_run_stopped_by_bad_input_is_undone_unless_resumable(tmp_path):
    from boltzflow.errors import InputError
    from boltzflow.io import undone_on_input_error

    for name, keep in (("new", False), ("resumable", True)):
        with pytest.raises(InputError):
            with undone_on_input_error(tmp_path / name, keep_if=("ckpt",)) as d:
                d.mkdir()
                (d / "config.toml").write_text("x")
                if keep:
                    (d / "ckpt").write_text("x")
                raise InputError("bad")
        assert (tmp_path / name).exists() == keep
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        with undone_on_input_error(tmp_path / "mine"):
            raise InputError("bad")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"  # a folder that held files is never touched


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    p = tmp_path / "summary.json"
    p.write_text("{}")
    p.chmod(0o600)
    atomic_write(p, lambda fh: fh.write(b"{}"))
    assert p.stat().st_mode & 0o777 == 0o600
