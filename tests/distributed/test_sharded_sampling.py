"""Sharded sampling: shards with their own reproducible seeds merge into one SampleSet whose estimates
equal one process's on the same samples; torchrun sampling writes the same shards, merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from boltzflow import pipeline
from boltzflow.cli import main
from boltzflow.errors import InputError
from boltzflow.sampling import SampleSet
from boltzflow.sampling.shards import merge_sample_sets, parse_shard, shard_files, shard_seed

REPO = Path(__file__).resolve().parents[2]
needs_ref = pytest.mark.skipif(not (REPO / "systems" / "alanine-dipeptide" / "reference_300K.npz").is_file(),
                               reason="shipped reference data missing")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from boltzflow.systems.builtin import builtin_system

    cfg = pipeline.load_run_config(None, {
        "device": "cpu", "training.pretrain.steps": 4, "training.finetune.steps": 0, "training.pretrain.batch": 32,
        "training.progress": False, "generator.blocks": 1, "generator.hidden": 16, "generator.h_blocks": 1,
        "generator.h_hidden": 16, "data.max_samples": 300})
    d = tmp_path_factory.mktemp("shards") / "run"
    pipeline.train(builtin_system("alanine-dipeptide"), cfg, d, progress=False)
    return d


def arrays(s: SampleSet):
    return [s.positions, s.reduced_energy, s.log_q, s.log_weights]


def test_parse_shard_and_seeds():
    assert parse_shard("3/8") == (3, 8) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("8/8", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(InputError, match="i/N"):
            parse_shard(bad)
    seeds = {shard_seed(1, i, 8) for i in range(8)}
    assert len(seeds) == 8 and shard_seed(1, 3, 8) == shard_seed(1, 3, 8) and shard_seed(5, 0, 1) == 5


@needs_ref
def test_shards_merge_into_one_process_estimates(run, tmp_path):
    for i in range(3):
        s = pipeline.sample(run, n=50, batch_size=16, shard=(i, 3), seed=4)
        assert len(s) == [17, 17, 16][i] and s.provenance["shard"]["seed"] == shard_seed(4, i, 3)
    files = shard_files(run / "samples")
    assert [p.name for p in files] == [f"generated.shard-00{i}-of-003.npz" for i in range(3)]
    parts = [SampleSet.load(p) for p in files]
    assert not np.array_equal(parts[0].positions[:16], parts[1].positions[:16])  # distinct streams
    again = pipeline.sample(run, n=50, batch_size=16, shard=(1, 3), seed=4)  # reproducible
    assert all(np.array_equal(a, b) for a, b in zip(arrays(again), arrays(parts[1])))

    merged = pipeline.merge_samples(run)
    assert len(merged) == 50 and merged.provenance["shards"] == 3 and merged.provenance["energy_evals"] == 50
    est_merged = pipeline.estimate(run)
    # one process holding the same 50 samples in one file
    one = SampleSet(*[np.concatenate(a) for a in zip(*map(arrays, parts))], parts[0].temperature,
                    {k: v for k, v in parts[0].provenance.items() if k != "shard"})
    one.save(run / "samples" / "generated.npz")
    est_one = pipeline.estimate(run)
    assert est_merged.keys() == est_one.keys()
    for k in est_one:
        # as JSON text: NaN fields (e.g. a batch-means error of a state no chunk visits) compare equal
        assert json.dumps(est_merged[k].to_full_dict(), sort_keys=True, default=str) == \
            json.dumps(est_one[k].to_full_dict(), sort_keys=True, default=str), k


@needs_ref
def test_one_shard_is_the_unsharded_sample(run):
    a = pipeline.sample(run, n=20, batch_size=8, seed=9)
    b = pipeline.sample(run, n=20, batch_size=8, seed=9, shard=(0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))
    for p in shard_files(run / "samples"):
        p.unlink()


def test_merge_refuses_mixed_or_incomplete_shards():
    def part(i, count, n_total=4, base=1, t=300.0):
        return SampleSet(np.zeros((2, 3)), np.zeros(2), np.zeros(2), np.zeros(2), t,
                         {"shard": {"index": i, "count": count, "n_total": n_total, "seed": i, "base_seed": base}})

    with pytest.raises(InputError, match=r"shard\(s\) \[1\] of 2 missing"):
        merge_sample_sets([part(0, 2)])
    with pytest.raises(InputError, match="given twice"):
        merge_sample_sets([part(0, 2), part(0, 2)])
    with pytest.raises(InputError, match="different requests"):
        merge_sample_sets([part(0, 2), part(1, 2, base=2)])
    with pytest.raises(InputError, match="300.0 K"):
        merge_sample_sets([part(0, 2), part(1, 2, t=310.0)])
    m = merge_sample_sets([part(1, 2), part(0, 2)])  # any order in, shard order out
    assert len(m) == 4 and "shard" not in m.provenance


@needs_ref
def test_cli_shards_and_merge(run, tmp_path, capsys):
    for i in range(2):
        assert main(["sample", str(run), "-n", "24", "--batch-size", "12", "--shard", f"{i}/2"]) == 0
    assert "boltzflow merge" in capsys.readouterr().out
    files = shard_files(run / "samples")
    assert main(["merge", *map(str, files), "-o", str(tmp_path / "m.npz")]) == 0
    assert len(SampleSet.load(tmp_path / "m.npz")) == 24 and "24 samples from 2 parts" in capsys.readouterr().out
    assert main(["merge", str(run), "--json", "--remove-shards"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert {"ess", "phi_positive"} <= set(est) and not shard_files(run / "samples")
    assert main(["merge", str(run)]) == 2  # nothing left to merge: one-line error
    assert "no shards" in capsys.readouterr().err
    assert main(["sample", str(run), "-n", "4", "--shard", "2/2"]) == 2


@needs_ref
def test_torchrun_sampling_equals_the_shards(run):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    for i in range(2):
        pipeline.sample(run, n=30, batch_size=16, shard=(i, 2), seed=3)
    by_shards = pipeline.merge_samples(run, remove_shards=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "boltzflow", "sample", str(run), "-n", "30", "--batch-size", "16", "--seed", "3",
                        "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"log_Z": {') == 1  # rank 0 alone prints
    merged = SampleSet.load(run / "samples" / "generated.npz")
    assert all(np.array_equal(a, b) for a, b in zip(arrays(merged), arrays(by_shards)))
    assert not shard_files(run / "samples")
