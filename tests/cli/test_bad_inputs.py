"""Bad input to every verb: exit 2, one line on stderr, no traceback, and no file changed.

One shared folder (``world``) holds what a user has: a prepared system, a replica-exchange run, a
training run with samples and a report, their own files, and broken inputs. Every case runs the CLI
in-process and compares a snapshot of the whole folder (names, contents, mtimes, modes) before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openmm")

from boltzflow.cli import main  # noqa: E402
from boltzflow.sampling import SampleSet  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ADP_PDB = REPO / "systems" / "alanine-dipeptide" / "alanine-dipeptide.pdb"
ADP_REF = REPO / "systems" / "alanine-dipeptide" / "reference_300K.npz"


def run_cli(capsys, argv: list) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``boltzflow ARGV`` run in this process."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` -> (content hash, mtime_ns, mode) of files, ('dir', mode) of folders."""
    snap = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        if p.is_dir():
            snap[str(p.relative_to(root))] = ("dir", st.st_mode)
        else:
            snap[str(p.relative_to(root))] = (hashlib.sha1(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode)
    return snap


def _pdb_variants(w: Path) -> None:
    """A PDB missing one heavy atom (CB) and one with CHARMM-named caps inside the residue."""
    lines = [ln for ln in ADP_PDB.read_text().splitlines() if not ln.startswith("CONECT")]
    (w / "missing_cb.pdb").write_text("\n".join(ln for ln in lines if " CB  ALA" not in ln) + "\n")
    rename = {"ACE": {"CH3": "CAY", "C": "CY", "O": "OY", "H1": "HY1", "H2": "HY2", "H3": "HY3"},
              "NME": {"N": "NT", "H": "HNT", "C": "CAT", "H1": "HT1", "H2": "HT2", "H3": "HT3"}}
    out = []
    for ln in lines:
        res = ln[17:20] if ln.startswith(("ATOM", "HETATM")) else ""
        if res in rename:
            name = rename[res][ln[12:16].strip()]
            ln = f"{ln[:12]} {name:<3s} ALA A   2{ln[26:]}"
        out.append(ln)
    (w / "charmm_caps.pdb").write_text("\n".join(out) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from boltzflow.config import dump_toml
    from boltzflow.pipeline import RunConfig
    from boltzflow.replica.toy import harmonic_system

    w = tmp_path_factory.mktemp("world")
    assert main(["prepare", "alanine-dipeptide", "-o", str(w / "adp")]) == 0
    harmonic_system(4).save(w / "harmonic")
    assert main(["simulate", str(w / "harmonic"), "--t-min", "300", "--t-max", "400", "--replicas", "2",
                 "--iterations", "20", "--steps-per-iteration", "20", "--platform", "Reference", "--no-progress",
                 "-o", str(w / "pt")]) == 0
    # a training run as `train` + `sample` + `report` leave it (no generator needed for these cases)
    run = w / "run"
    shutil.copytree(w / "adp", run / "system")
    (run / "config.toml").write_text(dump_toml(RunConfig()))
    (run / "summary.json").write_text(json.dumps({"system": "alanine-dipeptide"}))
    ref = SampleSet.load(ADP_REF).subset(np.arange(0, 400, 4))
    rng = np.random.default_rng(0)
    log_q = -ref.reduced_energy + rng.normal(0, 0.5, len(ref))
    SampleSet(ref.positions, ref.reduced_energy, log_q, -ref.reduced_energy - log_q, 300.0,
              {"sampler": "flow:conditional", "energy_evals": len(ref)}).save(run / "samples" / "generated.npz")
    assert main(["report", str(run)]) == 0
    # the user's own things
    (w / "mine").mkdir()
    (w / "empty").mkdir()
    (w / "mine" / "notes.txt").write_text("mine\n")
    (w / "notes.txt").write_text("mine\n")
    (w / "traj.dcd").write_bytes(b"not a trajectory, but the user's")
    # broken inputs
    adp = SampleSet.load(ADP_REF).positions[:3].astype(np.float64)
    np.save(w / "frames.npy", adp)
    np.save(w / "user_energies.npy", np.zeros(3))
    np.save(w / "zero_frames.npy", np.zeros((0, 22, 3)))
    np.save(w / "wrong_atoms.npy", np.zeros((2, 5, 3)))
    nan, inf = adp.copy(), adp.copy()
    nan[1, 3, 0], inf[0, 0, 2] = np.nan, np.inf
    np.save(w / "nan.npy", nan)
    np.save(w / "inf.npy", inf)
    np.save(w / "strings.npy", np.array(["a", "b"]))
    np.save(w / "complex.npy", adp.astype(np.complex128))
    np.savez(w / "no_positions.npz", x=np.zeros(3))
    (w / "empty.npy").write_bytes(b"")
    (w / "garbage.npz").write_text("garbage")
    (w / "empty.pdb").write_text("")
    (w / "garbage.pdb").write_text("this is not a PDB file\n")
    (w / "bad_syntax.toml").write_text("[training\nsteps = \n")
    (w / "unknown_key.toml").write_text("[training]\nstepz = 3\n")
    SampleSet(np.zeros((30, 2))).save(w / "toy.npz")
    SampleSet(np.zeros((10, 5, 3))).save(w / "five_atoms.npz")
    nan_frames = SampleSet.load(ADP_REF).positions[:20].astype(np.float64)
    nan_frames[5, 3, 0] = np.nan
    SampleSet(nan_frames, temperature=300.0).save(w / "nan_positions.npz")
    np.savez(w / "string_positions.npz", positions=np.array([["a", "b"], ["c", "d"]]))
    np.savez(w / "damaged_meta.npz", positions=np.zeros((3, 2)), meta_json=np.array("{not json"))
    shutil.copytree(w / "adp", w / "adp_damaged")
    (w / "adp_damaged" / "metadata.json").write_text("{damaged")
    shutil.copytree(w / "run", w / "run_damaged")
    (w / "run_damaged" / "generator.pt").write_text("not a torch file")
    (w / "run_damaged" / "summary.json").write_text("{damaged")
    _pdb_variants(w)
    return w


# (id, argv with {w} for the world folder, a fragment the error line must contain)
CASES = [
    # prepare
    ("prepare-missing-file", ["prepare", "{w}/nope.pdb", "-o", "{w}/new"], "nope.pdb"),
    ("prepare-empty-pdb", ["prepare", "{w}/empty.pdb", "-o", "{w}/new"], "empty.pdb"),
    ("prepare-garbage-pdb", ["prepare", "{w}/garbage.pdb", "-o", "{w}/new"], "garbage.pdb"),
    ("prepare-unknown-name", ["prepare", "no-such-molecule", "-o", "{w}/new"], "built-in"),
    ("prepare-temperature-inf", ["prepare", "alanine-dipeptide", "--temperature", "inf", "-o", "{w}/new"], "finite"),
    ("prepare-temperature-nan", ["prepare", "alanine-dipeptide", "--temperature", "nan", "-o", "{w}/new"], "finite"),
    ("prepare-temperature-negative", ["prepare", "alanine-dipeptide", "--temperature", "-5", "-o", "{w}/new"], "> 0"),
    ("prepare-temperature-zero", ["prepare", "alanine-dipeptide", "--temperature", "0", "-o", "{w}/new"], "> 0"),
    ("prepare-temperature-text", ["prepare", "alanine-dipeptide", "--temperature", "warm", "-o", "{w}/new"], "warm"),
    ("prepare-unknown-solvent", ["prepare", "alanine-dipeptide", "--solvent", "water", "-o", "{w}/new"], "water"),
    ("prepare-into-user-folder", ["prepare", "alanine-dipeptide", "-o", "{w}/mine"], "--overwrite"),
    ("prepare-onto-a-file", ["prepare", "alanine-dipeptide", "-o", "{w}/notes.txt"], "not a directory"),
    ("prepare-into-replica-run", ["prepare", "alanine-dipeptide", "-o", "{w}/pt"], "replica-exchange run"),
    ("prepare-into-training-run", ["prepare", "alanine-dipeptide", "-o", "{w}/run"], "training run"),
    ("prepare-missing-heavy-atom", ["prepare", "{w}/missing_cb.pdb", "-o", "{w}/new"], "missing heavy atom(s) CB"),
    ("prepare-charmm-named-caps", ["prepare", "{w}/charmm_caps.pdb", "-o", "{w}/new"], "CHARMM-named cap"),
    ("prepare-psf-without-params", ["prepare", "{w}/x.psf", "-o", "{w}/new"], "--params"),
    # energy
    ("energy-missing-coords", ["energy", "{w}/adp", "--coords", "{w}/nope.npy"], "not found"),
    ("energy-empty-file", ["energy", "{w}/adp", "--coords", "{w}/empty.npy"], "could not read"),
    ("energy-garbage-npz", ["energy", "{w}/adp", "--coords", "{w}/garbage.npz"], "could not read"),
    ("energy-npz-without-positions", ["energy", "{w}/adp", "--coords", "{w}/no_positions.npz"], "positions"),
    ("energy-zero-frames", ["energy", "{w}/adp", "--coords", "{w}/zero_frames.npy"], "no coordinates"),
    ("energy-wrong-atom-count", ["energy", "{w}/adp", "--coords", "{w}/wrong_atoms.npy"], "22"),
    ("energy-nan", ["energy", "{w}/adp", "--coords", "{w}/nan.npy"], "NaN"),
    ("energy-inf", ["energy", "{w}/adp", "--coords", "{w}/inf.npy"], "inf"),
    ("energy-strings", ["energy", "{w}/adp", "--coords", "{w}/strings.npy"], "real numbers"),
    ("energy-complex", ["energy", "{w}/adp", "--coords", "{w}/complex.npy"], "real numbers"),
    ("energy-no-system", ["energy", "{w}/nowhere", "--coords", "{w}/frames.npy"], "nowhere"),
    ("energy-output-bad-suffix", ["energy", "{w}/adp", "--coords", "{w}/frames.npy", "-o", "{w}/e.csv"], ".npz"),
    ("energy-output-exists", ["energy", "{w}/adp", "--coords", "{w}/frames.npy", "-o", "{w}/user_energies.npy"],
     "--overwrite"),
    ("energy-damaged-system", ["energy", "{w}/adp_damaged", "--coords", "{w}/frames.npy"], "damaged"),
    ("energy-bad-backend", ["energy", "{w}/adp", "--coords", "{w}/frames.npy", "--backend", "gpu"], "gpu"),
    # simulate
    ("simulate-into-user-folder", ["simulate", "{w}/harmonic", "-o", "{w}/mine"], "--overwrite"),
    ("simulate-over-existing-run", ["simulate", "{w}/harmonic", "-o", "{w}/pt"], "--resume"),
    ("simulate-into-training-run", ["simulate", "{w}/harmonic", "-o", "{w}/run"], "training run"),
    ("simulate-onto-a-file", ["simulate", "{w}/harmonic", "-o", "{w}/notes.txt"], "not a directory"),
    ("simulate-t-min-negative", ["simulate", "{w}/harmonic", "--t-min", "-5", "-o", "{w}/new"], "--t-min"),
    ("simulate-t-max-inf", ["simulate", "{w}/harmonic", "--t-max", "inf", "-o", "{w}/new"], "--t-max"),
    ("simulate-t-min-equals-t-max", ["simulate", "{w}/harmonic", "--t-min", "300", "--t-max", "300", "-o", "{w}/new"],
     "equals"),
    ("simulate-t-min-above-t-max", ["simulate", "{w}/harmonic", "--t-min", "500", "--t-max", "300", "-o", "{w}/new"],
     "t_min"),
    ("simulate-no-replicas", ["simulate", "{w}/harmonic", "--replicas", "0", "-o", "{w}/new"], "n_replicas"),
    ("simulate-iterations-text", ["simulate", "{w}/harmonic", "--iterations", "many", "-o", "{w}/new"], "many"),
    ("simulate-zero-iterations", ["simulate", "{w}/harmonic", "--iterations", "0", "-o", "{w}/new"], "n_iterations"),
    ("simulate-negative-timestep", ["simulate", "{w}/harmonic", "--timestep-fs", "-1", "-o", "{w}/new"],
     "timestep_fs"),
    ("simulate-unknown-platform", ["simulate", "{w}/harmonic", "--platform", "Bogus", "--iterations", "2",
                                   "-o", "{w}/new"], "Bogus"),
    ("simulate-no-system", ["simulate", "{w}/nowhere", "-o", "{w}/new"], "nowhere"),
    # train
    ("train-into-replica-run", ["train", "{w}/adp", "-o", "{w}/pt"], "replica-exchange run"),
    ("train-into-system-dir", ["train", "{w}/adp", "-o", "{w}/adp"], "system"),
    ("train-into-user-folder", ["train", "{w}/adp", "-o", "{w}/mine"], "--overwrite"),
    ("train-without-output", ["train", "{w}/adp"], "-o RUN_DIR"),
    ("train-bad-toml", ["train", "{w}/adp", "-o", "{w}/new", "--config", "{w}/bad_syntax.toml"], "bad_syntax.toml"),
    ("train-unknown-config-key", ["train", "{w}/adp", "-o", "{w}/new", "--config", "{w}/unknown_key.toml"], "stepz"),
    ("train-missing-config", ["train", "{w}/adp", "-o", "{w}/new", "--config", "{w}/nope.toml"], "nope.toml"),
    ("train-set-without-equals", ["train", "{w}/adp", "-o", "{w}/new", "--set", "training.steps"], "KEY=VALUE"),
    ("train-set-unknown-key", ["train", "{w}/adp", "-o", "{w}/new", "--set", "training.stepz=3"], "stepz"),
    ("train-steps-text", ["train", "{w}/adp", "-o", "{w}/new", "--pretrain-steps", "ten"], "ten"),
    ("train-missing-reference", ["train", "{w}/adp", "-o", "{w}/new", "--set", 'data.reference="{w}/nope.npz"'],
     "not found"),
    ("train-into-empty-folder-missing-reference", ["train", "{w}/adp", "-o", "{w}/empty", "--set",
                                                   'data.reference="{w}/nope.npz"'], "not found"),
    ("train-unknown-pipeline", ["train", "{w}/adp", "-o", "{w}/new", "--pipeline", "nope"], "nope"),
    ("train-bad-dtype", ["train", "{w}/adp", "-o", "{w}/new", "--set", 'dtype="float16"'], "float16"),
    ("train-negative-steps", ["train", "{w}/adp", "-o", "{w}/new", "--set", "training.finetune.steps=-5"], ">= 0"),
    ("train-steps-wrong-type", ["train", "{w}/adp", "-o", "{w}/new", "--set", 'training.finetune.steps="abc"'],
     "must be int"),
    ("train-resume-nothing", ["train", "--resume", "{w}/nowhere"], "nowhere"),
    ("train-resume-replica-run", ["train", "--resume", "{w}/pt"], "not a training run"),
    # sample
    ("sample-zero", ["sample", "{w}/run", "-n", "0"], "-n must be >= 1"),
    ("sample-negative", ["sample", "{w}/run", "-n", "-3"], "-n must be >= 1"),
    ("sample-batch-zero", ["sample", "{w}/run", "-n", "10", "--batch-size", "0"], "--batch-size"),
    ("sample-export-unknown-format", ["sample", "{w}/run", "-n", "10", "--export", "{w}/out.xyz"], ".xyz"),
    ("sample-export-over-user-file", ["sample", "{w}/run", "-n", "10", "--export", "{w}/traj.dcd"], "--overwrite"),
    ("sample-damaged-generator", ["sample", "{w}/run_damaged", "-n", "10"], "generator.pt"),
    ("sample-no-run", ["sample", "{w}/nowhere"], "nowhere"),
    ("sample-replica-run", ["sample", "{w}/pt", "-n", "10"], "generator"),
    # estimate
    ("estimate-missing", ["estimate", "{w}/nope.npz"], "not found"),
    ("estimate-garbage", ["estimate", "{w}/garbage.npz"], "readable"),
    ("estimate-no-positions", ["estimate", "{w}/no_positions.npz"], "positions"),
    ("estimate-bad-expression", ["estimate", "{w}/toy.npz", "--population", "x[0]>>0"], "parse"),
    ("estimate-phi-without-system", ["estimate", "{w}/toy.npz", "--population", "phi>0"], "topology"),
    ("estimate-wrong-atoms-for-system", ["estimate", "{w}/five_atoms.npz", "--system", "{w}/adp"], "22"),
    ("estimate-no-system", ["estimate", "{w}/toy.npz", "--system", "{w}/nowhere"], "nowhere"),
    ("estimate-string-positions", ["estimate", "{w}/string_positions.npz", "--population", "x[0]>0"], "real numbers"),
    ("estimate-damaged-metadata", ["estimate", "{w}/damaged_meta.npz"], "meta_json"),
    ("estimate-nan-positions", ["estimate", "{w}/nan_positions.npz", "--system", "{w}/adp"], "NaN/inf positions"),
    ("estimate-negative-bootstrap", ["estimate", "{w}/toy.npz", "--bootstrap", "-1"], "--bootstrap"),
    # free-energy
    ("free-energy-negative-temperature", ["free-energy", "{w}/pt/samples.npz", "--system", "{w}/harmonic",
                                          "--to-temperature", "-5"], "--to-temperature"),
    ("free-energy-inf-temperature", ["free-energy", "{w}/pt/samples.npz", "--system", "{w}/harmonic",
                                     "--to-temperature", "inf"], "finite"),
    ("free-energy-no-state-b", ["free-energy", "{w}/pt/samples.npz", "--system", "{w}/harmonic"], "--to"),
    ("free-energy-missing-b", ["free-energy", "{w}/pt/samples.npz", "--system", "{w}/harmonic", "--to-temperature",
                               "350", "--samples-b", "{w}/nope.npz"], "not found"),
    ("free-energy-toy-samples", ["free-energy", "{w}/toy.npz", "--system", "{w}/harmonic", "--to-temperature", "350"],
     "molecular"),
    # compare
    ("compare-missing-replica", ["compare", "--replica", "{w}/nowhere", "--samples", "{w}/run/samples/generated.npz",
                                 "--system", "{w}/adp"], "simulate"),
    ("compare-replica-is-training-run", ["compare", "--replica", "{w}/run", "--samples",
                                         "{w}/run/samples/generated.npz", "--system", "{w}/adp"], "simulate"),
    ("compare-missing-samples", ["compare", "--replica", "{w}/pt", "--samples", "{w}/nope.npz", "--system",
                                 "{w}/harmonic"], "not found"),
    ("compare-system-without-modes", ["compare", "--replica", "{w}/pt", "--samples", "{w}/pt/samples.npz",
                                      "--system", "{w}/harmonic"], "modes"),
    ("compare-wrong-atoms", ["compare", "--replica", "{w}/pt", "--samples", "{w}/run/samples/generated.npz",
                             "--system", "{w}/adp"], "22"),
    ("compare-nan-positions", ["compare", "--replica", ADP_REF, "--samples", "{w}/nan_positions.npz", "--system",
                               "{w}/adp"], "NaN/inf positions"),
    ("compare-target-stderr-zero", ["compare", "--replica", ADP_REF, "--samples", "{w}/run/samples/generated.npz",
                                    "--system", "{w}/adp", "--target-stderr", "0"], "target-stderr"),
    ("compare-output-into-replica-run", ["compare", "--replica", ADP_REF, "--samples", "{w}/run/samples/generated.npz",
                                         "--system", "{w}/adp", "-o", "{w}/pt"], "replica-exchange run"),
    ("compare-output-into-user-folder", ["compare", "--replica", ADP_REF, "--samples",
                                         "{w}/run/samples/generated.npz", "--system", "{w}/adp", "-o", "{w}/mine"],
     "--overwrite"),
    # report
    ("report-damaged-summary", ["report", "{w}/run_damaged"], "summary.json"),
    ("report-no-run", ["report", "{w}/nowhere"], "nowhere"),
    ("report-replica-run", ["report", "{w}/pt"], "boltzflow train"),
    ("report-missing-replica", ["report", "{w}/run", "--replica", "{w}/nope.npz"], "not found"),
    ("report-garbage-replica", ["report", "{w}/run", "--replica", "{w}/garbage.npz"], "readable"),
    ("report-wrong-atoms-replica", ["report", "{w}/run", "--replica", "{w}/five_atoms.npz"], "22"),
    # demo
    ("demo-into-user-folder", ["demo", "--quick", "-o", "{w}/mine"], "--overwrite"),
    ("demo-into-replica-run", ["demo", "--quick", "-o", "{w}/pt"], "replica-exchange run"),
    ("demo-no-cuda", ["demo", "--quick", "--device", "cuda", "-o", "{w}/new"], "cuda"),
    # merge / sharded sampling
    ("merge-run-without-shards", ["merge", "{w}/run"], "no shards"),
    ("merge-files-without-o", ["merge", "{w}/toy.npz"], "-o"),
    ("merge-onto-existing-file", ["merge", "{w}/toy.npz", "-o", "{w}/toy.npz"], "--overwrite"),
    ("sample-shard-out-of-range", ["sample", "{w}/run", "-n", "4", "--shard", "2/2"], "i/N"),
    # export
    ("export-no-run", ["export", "{w}/nowhere", "{w}/dest"], "nowhere"),
    ("export-replica-run", ["export", "{w}/pt", "{w}/dest"], "generator.pt"),
    ("export-missing-note", ["export", "{w}/run", "{w}/dest", "--note", "{w}/nope.md"], "--note"),
    ("export-bad-dtype", ["export", "{w}/run", "{w}/dest", "--weights-dtype", "int4"], "int4"),
    # the command line itself
    ("unknown-verb", ["transmogrify"], "transmogrify"),
    ("unknown-option", ["estimate", "{w}/toy.npz", "--frobnicate"], "--frobnicate"),
]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_line_nothing_changed(world, capsys, argv, fragment):
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present: --device cuda is valid here")
    before = snapshot(world)
    rc, out, err = run_cli(capsys, [str(a).replace("{w}", str(world)) for a in argv])
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert snapshot(world) == before, "a file under the world folder changed"


def test_world_inputs_are_fine_otherwise(world, capsys):
    """The good inputs next to the bad ones work (so the cases above fail for their one reason)."""
    rc, out, err = run_cli(capsys, ["energy", world / "adp", "--coords", world / "frames.npy", "--json"])
    assert rc == 0, err
    assert len(json.loads(out)["reduced_energy"]) == 3
    rc, out, err = run_cli(capsys, ["compare", "--replica", ADP_REF, "--samples", world / "run/samples/generated.npz",
                                    "--system", world / "adp", "--json"])
    assert rc == 0, err
    assert json.loads(out)["replica_exchange"]["energy_evals"] == 5_600_000  # read through the v1 -> v2 map
