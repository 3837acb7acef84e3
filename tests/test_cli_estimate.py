"""CLI smoke tests: simulate, estimate, free-energy, compare (real OpenMM runs on tiny systems)."""

import json
import math

import numpy as np
import pytest

from boltzflow.cli import main
from boltzflow.replica import extract_samples
from boltzflow.replica.toy import harmonic_reduced_free_energy, harmonic_system
from boltzflow.sampling import SampleSet


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def harmonic_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    sysdir = d / "harmonic"
    harmonic_system(5).save(sysdir)
    run = d / "run"
    rc = main(["simulate", str(sysdir), "--t-min", "300", "--t-max", "600", "--replicas", "4", "--iterations", "80",
               "--steps-per-iteration", "100", "--collision-rate", "20", "--platform", "Reference", "--no-progress",
               "-o", str(run)])
    assert rc == 0
    return sysdir, run


def test_simulate_writes_storage_samples_and_summary(harmonic_run):
    sysdir, run = harmonic_run
    for f in ("replica.nc", "replica_checkpoint.nc", "samples.npz", "summary.json", "system/metadata.json"):
        assert (run / f).is_file(), f
    ss = SampleSet.load(run / "samples.npz")
    assert ss.positions.shape[1:] == (5, 3) and ss.temperature == 300.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_iterations"] == 80 and summary["statistical_inefficiency"] >= 1
    assert "boltzflow simulate" in ss.provenance["command"]


def test_simulate_bad_input_exits_2(harmonic_run, capsys, tmp_path):
    sysdir, run = harmonic_run
    rc, _, err = run_cli(capsys, "simulate", sysdir, "--iterations", "5", "-o", run)
    assert rc == 2 and "--resume" in err
    rc, _, err = run_cli(capsys, "simulate", tmp_path / "nope", "-o", tmp_path / "r")
    assert rc == 2 and "system" in err
    rc, _, err = run_cli(capsys, "simulate", sysdir, "--t-min", "500", "--t-max", "300", "-o", tmp_path / "r2")
    assert rc == 2 and "t_min" in err


def test_estimate_weighted_toy_samples_json(capsys, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1.5, (20000, 2))
    log_q = np.sum(-0.5 * (x / 1.5) ** 2 - np.log(1.5 * np.sqrt(2 * np.pi)), 1)
    u = 0.5 * np.sum((x - 1.0) ** 2, 1)  # target N(1, 1) per dimension, log Z = log(2 pi)
    p = SampleSet(x, u, log_q, -u - log_q).save(tmp_path / "toy.npz")
    rc, out, _ = run_cli(capsys, "estimate", p, "--population", "x[0]>0", "--json")
    assert rc == 0
    res = {e["name"]: e for e in json.loads(out)}
    tail_keys = {"pareto_k", "reliable", "stderr_method", "stderr_delta", "stderr_batch_means"}
    assert all({"name", "value", "stderr", "ess", "pareto_k", "reliable"} <= set(e) <= {"name", "value", "stderr", "ess"}
               | tail_keys for e in res.values())
    assert res["log_Z"]["pareto_k"] < 0.7 and res["log_Z"]["reliable"] is True  # q wider than p: light tail
    exact = 0.5 * math.erfc(-1 / math.sqrt(2))  # P(N(1,1) > 0)
    assert abs(res["P(x[0]>0)"]["value"] - exact) < 4 * res["P(x[0]>0)"]["stderr"]
    assert abs(res["log_Z"]["value"] - math.log(2 * math.pi)) < 4 * res["log_Z"]["stderr"]
    assert 0 < res["ess"]["value"] < 20000
    rc, out, _ = run_cli(capsys, "estimate", p, "--population", "x[0]>0")
    assert rc == 0 and "P(x[0]>0)" in out and "ess" in out


@pytest.mark.parametrize("argv,msg", [
    (["--population", "phi>>0"], "cannot parse"),
    (["--population", "phi>0"], "topology"),
])
def test_estimate_bad_input_exits_2(capsys, tmp_path, argv, msg):
    p = SampleSet(np.zeros((4, 2))).save(tmp_path / "z.npz")
    rc, _, err = run_cli(capsys, "estimate", p, *argv)
    assert rc == 2 and msg in err
    rc, _, err = run_cli(capsys, "estimate", tmp_path / "missing.npz")
    assert rc == 2 and "not found" in err


def test_free_energy_exp_and_bar_between_temperatures(harmonic_run, capsys, tmp_path):
    sysdir, run = harmonic_run
    t1 = json.loads((run / "replica_config.json").read_text())["temperatures_k"][1]
    s1 = extract_samples(run, state_index=1)
    pb = s1.save(tmp_path / "b.npz")
    rc, out, err = run_cli(capsys, "free-energy", run / "samples.npz", "--system", sysdir, "--to-temperature",
                           f"{t1!r}", "--samples-b", pb, "--platform", "Reference", "--json")
    assert rc == 0, err
    res = {e["name"]: e for e in json.loads(out)}
    exact = harmonic_reduced_free_energy(5, 300.0, t1)
    for name in ("dF_EXP(A->B)", "dF_BAR"):
        assert abs(res[name]["value"] - exact) < 5 * res[name]["stderr"] + 0.1, (name, res[name], exact)
    rc, _, err = run_cli(capsys, "free-energy", run / "samples.npz", "--system", sysdir)
    assert rc == 2 and "--to" in err


@pytest.fixture(scope="module")
def butane_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("butane")
    rc = main(["simulate", "butane", "--t-min", "300", "--t-max", "500", "--replicas", "2", "--iterations", "30",
               "--steps-per-iteration", "50", "--platform", "Reference", "--no-progress", "-o", str(d / "run")])
    assert rc == 0
    return d / "run"


def test_compare_table_json_and_plots(butane_run, capsys, tmp_path):
    ref = SampleSet.load(butane_run / "samples.npz")
    rng = np.random.default_rng(1)
    # a stand-in 'generator': jittered reference frames with made-up log q (weights are then arbitrary but valid)
    x = np.concatenate([ref.positions] * 4) + rng.normal(0, 0.002, (4 * len(ref),) + ref.positions.shape[1:])
    from boltzflow.replica.energies import reduced_energies
    from boltzflow.systems.builtin import builtin_system

    u = reduced_energies(builtin_system("butane"), x, 300.0, platform="Reference")
    log_q = -u + rng.normal(0, 0.3, len(u))
    gen = SampleSet(x, u, log_q, -u - log_q, 300.0, {"sampler": "flow", "wall_s": 2.0,
                                                     "training_energy_evals": 1000}).save(tmp_path / "gen.npz")
    out_dir = tmp_path / "cmp"
    rc, out, err = run_cli(capsys, "compare", "--replica", butane_run, "--samples", gen, "--system", "butane",
                           "-o", out_dir, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert set(res["replica_exchange"]["populations"]) == {"gauche_minus", "gauche_plus", "trans"}
    r, g = res["replica_exchange"], res["generator"]
    assert r["energy_evals"] == 30 * 2 * 50 and g["training_energy_evals"] == 1000
    assert sum(v["value"] for v in g["populations"].values()) == pytest.approx(1.0)
    assert res["torsion_kl_64"]["reweighted"] >= 0
    assert r["pareto_k"] is None and isinstance(g["pareto_k"], float) and "pareto_k" in g["populations"]["trans"]
    assert (g["tail_warning"] is None) == (g["pareto_k"] <= 0.7)
    assert (out_dir / "torsion.png").is_file() and (out_dir / "energies.png").is_file()
    assert (out_dir / "compare.json").is_file()
    rc, out, _ = run_cli(capsys, "compare", "--replica", butane_run, "--samples", gen, "--system", "butane",
                         "-o", out_dir)
    assert rc == 0 and "replica exchange" in out and "P(trans)" in out and "Pareto k of the weights" in out
    rc, _, err = run_cli(capsys, "compare", "--replica", tmp_path / "none", "--samples", gen, "--system", "butane")
    assert rc == 2 and "simulate" in err
    before = sorted(p.name for p in butane_run.iterdir())
    rc, out, _ = run_cli(capsys, "compare", "--replica", butane_run, "--samples", gen, "--system", "butane")
    assert rc == 0 and "P(trans)" in out and "compare.json" not in out
    assert sorted(p.name for p in butane_run.iterdir()) == before  # nothing written into the replica run


def test_estimate_uses_block_errors_for_time_ordered_frames(capsys, tmp_path):
    rng = np.random.default_rng(2)
    n, phi = 4000, 0.97
    x = np.empty(n)
    x[0] = rng.normal()
    for i in range(1, n):
        x[i] = phi * x[i - 1] + np.sqrt(1 - phi ** 2) * rng.normal()
    pos = np.stack([x, np.zeros(n)], 1)
    res = {}
    for flag in (True, False):
        p = SampleSet(pos, provenance={"decorrelated": flag, "statistical_inefficiency": 60.0}).save(tmp_path / f"{flag}.npz")
        rc, out, _ = run_cli(capsys, "estimate", p, "--population", "x[0]>1", "--json")
        assert rc == 0
        res[flag] = json.loads(out)[0]
    assert res[False]["value"] == pytest.approx(res[True]["value"])
    assert res[False]["stderr"] > 3 * res[True]["stderr"]  # g ~ 65: block error ~ sqrt(g) x binomial
