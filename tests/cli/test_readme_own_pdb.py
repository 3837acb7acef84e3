"""The README's "Bring your own PDB" steps, run as written on the alanine tetrapeptide at toy size.

The commands are read from the README itself (so the test follows the README); only toy-size options
are appended (argparse keeps the last value of a repeated option): fewer replicas / iterations,
a tiny generator, few samples.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

pytest.importorskip("openmm")

from boltzflow.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PDB = REPO / "systems" / "alanine-tetrapeptide" / "alanine-tetrapeptide.pdb"

TOY = {
    "simulate": ["--replicas", "2", "--t-max", "400", "--iterations", "30", "--steps-per-iteration", "20",
                 "--checkpoint-interval", "5", "--no-progress", "--ladders", "4", "--burnin", "10", "--stride", "2"],
    "train": ["--pretrain-steps", "4", "--finetune-steps", "2", "--batch", "16", "--no-progress", "--device", "cpu",
              "--set", "generator.blocks=1", "--set", "generator.hidden=8", "--set", "generator.h_blocks=1",
              "--set", "generator.h_hidden=8", "--set", "data.max_samples=200",
              "--set", "training.checkpoint_every=2", "--set", "training.log_every=2",
              # the default recipe is "data" here (the README names the reference): shrink its Langevin growth
              # and its ESS guard
              "--set", "data.md_frames=2", "--set", "data.md_burnin=5", "--set", "data.md_stride=5",
              "--set", "training.ess_guard=64", "--set", "training.eval_batch=64"],
    "sample": ["-n", "64", "--batch-size", "32"],
}


def readme_commands() -> list[list[str]]:
    """The boltzflow commands of the README's "Bring your own PDB" bash block, as argv lists."""
    text = README.read_text()
    m = re.search(r"## Bring your own PDB\s+```bash\n(.*?)```", text, re.S)
    assert m, "README has no 'Bring your own PDB' bash block"
    lines = m.group(1).replace("\\\n", " ").splitlines()
    cmds = []
    for line in lines:
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if line.startswith("boltzflow "):
            cmds.append(shlex.split(line)[1:])
    return cmds


def test_readme_block_is_the_expected_path():
    verbs = [c[0] for c in readme_commands()]
    assert verbs == ["prepare", "simulate", "train", "sample", "estimate", "compare", "report"]


def test_readme_own_pdb_steps_on_tetrapeptide(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PDB, tmp_path / "my_peptide.pdb")
    for argv in readme_commands():
        argv = argv + TOY.get(argv[0], [])
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"{' '.join(argv)} -> {rc}: {out.err[-2000:]}"
    # every step left what the next one and the user need
    meta = json.loads((tmp_path / "my_peptide" / "metadata.json").read_text())
    assert meta["n_atoms"] == 42 and meta["modes"]["kind"] == "peptide"
    # `train` without --recipe ran the default recipe, "data" here because the README names the reference
    summary = json.loads((tmp_path / "runs" / "my_peptide" / "summary.json").read_text())
    assert summary["recipe"] == "data" and summary["pipeline"] == "internal-all"
    assert summary["data_augmentation"]["energy_evals"] > 0
    assert (tmp_path / "runs" / "my_peptide-pt" / "samples.npz").is_file()
    assert (tmp_path / "runs" / "my_peptide" / "samples" / "generated.npz").is_file()
    assert (tmp_path / "runs" / "my_peptide" / "report.html").is_file() or \
        list((tmp_path / "runs" / "my_peptide").rglob("report.html"))
    # compare, with the automatic peptide modes, as JSON
    assert main(["compare", "--replica", "runs/my_peptide-pt", "--samples", "runs/my_peptide/samples/generated.npz",
                 "--system", "my_peptide/", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["minor_mode"] == "any_alpha_L"
    assert set(res["replica_exchange"]["populations"]) == {"helix", "extended", "mixed", "any_alpha_L"}
    # per-residue states through the population grammar
    assert main(["estimate", "runs/my_peptide-pt/samples.npz", "--system", "my_peptide/",
                 "--population", "mode=res1_beta_PPII", "--json"]) == 0
    assert "res1_beta_PPII" in capsys.readouterr().out
