"""Native batched parallel tempering (boltzflow.replica.native, simulate --method native-tempering):
exact populations within its between-ladder error bars, bitwise resume, other-isomer frames not
counted, clear refusals."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from boltzflow.cli import main
from boltzflow.errors import ConfigError, InputError
from boltzflow.replica.native import NativeTemperingConfig, ladder_populations, run_native_tempering

KT = 2.494  # kJ/mol at 300 K


def _double_well(x):
    """u in kT: a double well along atom 0's x (barrier 8 kT, minima at +-0.1 nm, + well 2 kT lower)
    plus harmonic terms (sd 0.05 nm) for the other coordinates."""
    a = x[:, 0, 0] / 0.1
    return (8.0 * (a * a - 1) ** 2 - 1.0 * a + (x[:, 1:] ** 2).sum((1, 2)) / (2 * 0.05 ** 2)
            + (x[:, 0, 1:] ** 2).sum(-1) / (2 * 0.05 ** 2))


def _toy_system():
    pos = np.zeros((2, 3))
    pos[0, 0] = -0.1  # the upper well
    return SimpleNamespace(positions=pos, masses=np.array([12.0, 12.0]), kT=KT, temperature=300.0, name="double-well")


def _exact_plus_well() -> float:
    a = np.linspace(-2.5, 2.5, 20001)
    w = np.exp(-(8.0 * (a * a - 1) ** 2 - a))
    return float(w[a > 0].sum() / w.sum())


def test_populations_match_quadrature_within_ladder_errors(tmp_path):
    cfg = NativeTemperingConfig(ladders=32, replicas=5, t_max=1500.0, rounds=500, steps_per_swap=20, burnin_rounds=100,
                                stride_rounds=4, timestep_fs=2.0, friction_per_ps=10.0, minimize_steps=0, seed=3)
    s = run_native_tempering(_toy_system(), _double_well, cfg, tmp_path / "a", dtype=torch.float64)
    assert s.positions.shape == (32 * 100, 2, 3) and s.provenance["frames_per_ladder"] == 100
    assert s.provenance["energy_evals"] == 32 * 5 * (1 + 500 * 20)
    pop = ladder_populations(s, {"plus": lambda x: x[:, 0, 0] > 0})["plus"]
    exact = _exact_plus_well()
    assert 0 < pop.stderr < 0.05
    assert abs(pop.value - exact) < 4 * pop.stderr, (pop.value, pop.stderr, exact)
    # without the swaps (one temperature) the chains stay in the upper well they started in
    cold = run_native_tempering(_toy_system(), _double_well,
                                NativeTemperingConfig(**{**cfg.__dict__, "replicas": 1}), tmp_path / "b",
                                dtype=torch.float64)
    assert ladder_populations(cold, {"plus": lambda x: x[:, 0, 0] > 0})["plus"].value < 0.05


def test_resume_is_bitwise_and_may_only_extend(tmp_path):
    base = dict(ladders=4, replicas=3, t_max=900.0, steps_per_swap=5, burnin_rounds=10, stride_rounds=3,
                minimize_steps=0, seed=1, checkpoint_every=7)
    full = run_native_tempering(_toy_system(), _double_well, NativeTemperingConfig(rounds=60, **base), tmp_path / "full")
    run_native_tempering(_toy_system(), _double_well, NativeTemperingConfig(rounds=31, **base), tmp_path / "part")
    with pytest.raises(InputError, match="--resume"):
        run_native_tempering(_toy_system(), _double_well, NativeTemperingConfig(rounds=60, **base), tmp_path / "part")
    with pytest.raises(InputError, match="seed"):
        run_native_tempering(_toy_system(), _double_well, NativeTemperingConfig(rounds=60, **{**base, "seed": 2}),
                             tmp_path / "part", resume=True)
    resumed = run_native_tempering(_toy_system(), _double_well, NativeTemperingConfig(rounds=60, **base),
                                   tmp_path / "part", resume=True)
    assert np.array_equal(full.positions, resumed.positions)
    assert np.array_equal(full.reduced_energy, resumed.reduced_energy)
    assert full.provenance["energy_evals"] == resumed.provenance["energy_evals"]
    # a longer burn-in on resume drops the frames kept before it
    longer = run_native_tempering(_toy_system(), _double_well,
                                  NativeTemperingConfig(rounds=60, **{**base, "burnin_rounds": 16}), tmp_path / "part",
                                  resume=True)
    assert np.array_equal(longer.positions.reshape(4, -1, 2, 3), full.positions.reshape(4, -1, 2, 3)[:, 2:])
    with pytest.raises(InputError, match="multiple of stride_rounds"):
        run_native_tempering(_toy_system(), _double_well, NativeTemperingConfig(rounds=60, **{**base, "burnin_rounds": 17}),
                             tmp_path / "part", resume=True)
    with pytest.raises(InputError, match="nothing to resume"):
        run_native_tempering(_toy_system(), _double_well, NativeTemperingConfig(rounds=60, **base), tmp_path / "new",
                             resume=True)


def test_frames_keep_rejects_are_left_out_ladder_by_ladder(tmp_path):
    cfg = NativeTemperingConfig(ladders=4, replicas=5, t_max=1500.0, rounds=80, steps_per_swap=20, burnin_rounds=20,
                                stride_rounds=2, minimize_steps=0, timestep_fs=2.0, friction_per_ps=10.0)
    full = run_native_tempering(_toy_system(), _double_well, cfg, tmp_path / "a")
    s = run_native_tempering(_toy_system(), _double_well, cfg, tmp_path / "b", keep=lambda x: x[:, 0, 0] < 0)
    bad = full.positions[:, 0, 0] >= 0
    assert bad.any() and not bad.all()  # the hot replicas bring frames of the other well down
    assert s.provenance["other_isomer_frames"] == int(bad.sum()) and len(s) == int((~bad).sum())
    assert np.array_equal(s.positions, full.positions[~bad]) and s.log_weights is None
    assert s.provenance["ladder_sizes"] == [int(k) for k in (~bad).reshape(4, 30).sum(1)]
    assert ladder_populations(s, {"plus": lambda x: x[:, 0, 0] >= 0})["plus"].value == 0


def test_config_errors():
    with pytest.raises(ConfigError, match="2 ladders"):
        NativeTemperingConfig(ladders=1)
    with pytest.raises(ConfigError, match="burnin_rounds"):
        NativeTemperingConfig(rounds=100, burnin_rounds=100)


def test_cli_butane_runs_resumes_and_reports_ladder_errors(tmp_path, capsys):
    out = tmp_path / "pt"
    args = ["simulate", "butane", "--method", "native-tempering", "--ladders", "4", "--replicas", "2",
            "--t-max", "400", "--steps-per-iteration", "5", "--stride", "2", "--burnin", "4", "--no-progress",
            "-o", str(out), "--json"]
    assert main(args + ["--iterations", "12"]) == 0
    assert main(args + ["--iterations", "20"]) == 2  # an existing run needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--iterations", "20", "--resume"]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "native-tempering" and summary["ladders"] == 4 and summary["rounds"] == 20
    assert summary["n_samples"] == 4 * 8 and summary["other_isomer_frames"] == 0
    pops = summary["populations_ladders"]
    assert abs(sum(v["value"] for v in pops.values()) - 1) < 1e-9  # butane's modes partition the frames
    from boltzflow.sampling import SampleSet

    s = SampleSet.load(out / "samples.npz")
    assert s.provenance["sampler"] == "native-tempering" and s.provenance["decorrelated"] is False


def test_peptide_reference_script_writes_a_reference_from_native_runs(tmp_path):
    """scripts/peptide_reference.py on two (toy) native runs of the tetrapeptide: per-run populations with
    between-ladder errors, the file capped at --max-frames per run, ladder-major, its energies equal to OpenMM's."""
    import importlib.util
    import json
    from pathlib import Path

    from boltzflow.sampling import SampleSet

    for seed in (0, 1):
        assert main(["simulate", "alanine-tetrapeptide", "--method", "native-tempering", "--ladders", "4",
                     "--iterations", "24", "--burnin", "4", "--stride", "2", "--steps-per-iteration", "5",
                     "--seed", str(seed), "--no-progress", "-o", str(tmp_path / f"r{seed}")]) == 0
    spec = importlib.util.spec_from_file_location("peptide_reference",
                                                  Path(__file__).resolve().parents[2] / "scripts" / "peptide_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ref.npz"
    assert mod.main(["alanine-tetrapeptide", str(tmp_path / "r0"), str(tmp_path / "r1"), "-o", str(out),
                     "--json", str(tmp_path / "ref.json"), "--max-frames", "20"]) == 0
    res = json.loads((tmp_path / "ref.json").read_text())
    assert [r["ladders"] for r in res["runs"]] == [4, 4] and all(r["frames_per_ladder"] == 10 for r in res["runs"])
    for name, (v, se) in res["runs"][0]["populations"].items():
        assert 0 <= v <= 1 and se >= 0, name
    assert res["file"]["n_frames_per_run"] == [20, 20] and res["file"]["energy_check_max_abs_kT"] < 1e-2
    s = SampleSet.load(out)
    assert s.provenance["sampler"] == "native-tempering" and s.provenance["decorrelated"] is False and len(s) == 40
