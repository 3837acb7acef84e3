"""Data-parallel training (torchrun, gloo): 2 ranks reproduce the one-process loss curve, rank 0 alone
writes, a stopped 2-rank run resumes to the same parameters (also on another number of ranks), launch errors
are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from boltzflow.distributed import SINGLE, DistContext, shard_bounds
from boltzflow.errors import CheckpointError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402

#: pre-training (KLz) losses of 1 and 2 ranks agree to float32 summation order: the 2-rank loss is the
#: mean of two shard means (each 64 of the 128 samples) instead of one mean over 128
LOSS_RTOL = 1e-5


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N ARGS`` with this test's src on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(ddp_worker.__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_shard_bounds_cover_the_batch_once():
    for n in (1, 7, 128, 129):
        for world in (1, 2, 3, 5):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert SINGLE.shard(10) == (0, 10) and not SINGLE.active and SINGLE.is_main
    assert DistContext(rank=1, world_size=2).shard(128) == (64, 128)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    proc = torchrun(2, str(HERE / "ddp_worker.py"), str(d / "run"), str(d / "out.json"), "--stop-at", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, json.loads((d / "out.json").read_text())


def test_two_ranks_give_the_one_process_loss_curve(tmp_path, two_rank_run):
    d, out = two_rank_run
    assert out["world_size"] == 2
    assert out["ddp_alive"] == 0  # Trainer.run let its DDP wrappers (which hold the process group) go
    trainer, _ = ddp_worker.train(tmp_path / "one")
    one = ddp_worker.result(trainer)
    two = out["full"]
    steps = [r["step"] for r in one["rows"]]
    assert steps == [r["step"] for r in two["rows"]] == list(range(1, 19))  # one row per step: rank 0 alone writes
    for r1, r2 in zip(one["rows"], two["rows"]):
        if r1["stage"] == "pretrain":  # same global batches: the same curve
            assert r2["loss"] == pytest.approx(r1["loss"], rel=LOSS_RTOL)
        else:  # data-free fine-tuning: per-rank sample streams, the same kind of number
            assert torch.isfinite(torch.tensor(r2["loss"]))
    assert one["energy_evals"] == two["energy_evals"]  # global counts: shards summed over ranks
    log = (d / "run" / "log.txt").read_text()
    assert log.count("ESS guard at step 12") == 1  # rank 1 wrote nothing
    assert log.count("warm restart of fine-tuning at step 15") == 1  # finetune.cycles under DDP


def test_two_rank_run_resumes_to_the_same_parameters(two_rank_run):
    _, out = two_rank_run
    assert out["resumed"]["params"] == out["full"]["params"]
    assert [r["loss"] for r in out["resumed"]["rows"]] == [r["loss"] for r in out["full"]["rows"]]


def test_resume_on_another_number_of_ranks_continues_the_run(two_rank_run, tmp_path):
    """A 2-rank checkpoint resumes in one process (and a one-process one on 2 ranks): the same parameters at the
    checkpoint, then the rest of the run; each rank's sample stream starts anew, so only the data-driven
    pre-training steps repeat the uninterrupted curve."""
    d, out = two_rank_run
    ckpt = torch.load(d / "run" / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    assert ckpt["ranks"][0]["sample_rng"].tolist() != ckpt["ranks"][1]["sample_rng"].tolist()  # distinct streams
    full = {r["step"]: r for r in out["full"]["rows"]}
    # 2 ranks stopped at step 8 (a checkpoint), then one process
    proc = torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path / "two"), str(tmp_path / "two.json"),
                    "--max-steps", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer, _ = ddp_worker.train(tmp_path / "two", resume=True)
    rows = trainer.run_dir.read_metrics()
    assert [r["step"] for r in rows] == list(range(1, 19))
    for r in rows:
        if r["step"] <= 12:  # pre-training: the same global batches as the uninterrupted 2-rank run
            assert r["loss"] == pytest.approx(full[r["step"]]["loss"], rel=LOSS_RTOL)
        assert torch.isfinite(torch.tensor(r["loss"]))
    assert "resuming a run of 2 process(es) on 1" in (tmp_path / "two" / "log.txt").read_text()
    # one process stopped at step 8, then 2 ranks
    ddp_worker.train(tmp_path / "one", max_steps=8)
    proc = torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path / "one"), str(tmp_path / "one.json"), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "one.json").read_text())["full"]["rows"]
    assert [r["step"] for r in rows] == list(range(1, 19))
    for r in rows:
        if r["step"] <= 12:
            assert r["loss"] == pytest.approx(full[r["step"]]["loss"], rel=LOSS_RTOL)
    ckpt = torch.load(tmp_path / "one" / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 18


def test_resume_on_another_number_of_ranks_is_refused_with_a_split_pool(tmp_path):
    """Reweighted maximum likelihood's pool is split over the ranks: such a run resumes on its own number only."""
    proc = torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path / "run"), str(tmp_path / "out.json"),
                    "--loss", "rwml", "--max-steps", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(CheckpointError, match="written by 2 process.*pool is split"):
        ddp_worker.train(tmp_path / "run", resume=True, loss="rwml")


def test_verbs_without_torchrun_support_refuse_it(monkeypatch, capsys):
    from boltzflow.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["estimate", "nothing.npz"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not run under torchrun" in err


def test_nccl_without_gpus_is_a_one_line_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    from boltzflow import distributed
    from boltzflow.errors import InputError

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InputError, match="needs CUDA GPUs"):
        distributed.init_distributed(backend="nccl")


def test_ranks_with_other_versions_are_a_one_line_error():
    from boltzflow import distributed
    from boltzflow.errors import InputError

    class TwoRanks:  # rank 1 runs another torch
        def all_gather_object(self, obj):
            return [obj, dict(obj, torch="0.0.1")]

    with pytest.raises(InputError, match=r"rank 1 runs other versions than rank 0 \(torch .* vs 0.0.1\)"):
        distributed.check_same_versions(TwoRanks())


def test_two_ranks_rwml_pools_are_sharded_and_resume_exactly(tmp_path):
    """Reweighted maximum likelihood under 2 ranks: each rank draws half of the pool (the evaluations add up
    to one pool per refresh), and a run stopped and resumed (each rank redraws its own pool) ends
    bitwise like the uninterrupted one."""
    proc = torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path / "run"), str(tmp_path / "out.json"),
                    "--loss", "rwml", "--stop-at", "14")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    full, resumed = out["full"], out["resumed"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in full["rows"])
    # 6 fine-tuning steps (12-17), refresh every 3: pools at steps 12 and 15, 4096 draws each over both ranks
    pools = 2 * 4096
    guard = 256 * 4  # before fine-tuning, at the warm restart (step 15), at step 16 (a checkpoint), at the stage end
    logging = 64 * 12  # the pre-training rows' evaluation batches (fine-tuning rows reuse no samples)
    assert full["energy_evals"] >= pools and full["energy_evals"] <= pools + guard + logging + 64 * 6
    assert resumed["params"] == full["params"]


def test_two_ranks_share_the_tempering_ladders(tmp_path):
    """`torchrun -m boltzflow train` with the energy recipe: each rank runs half of the tempering ladders and
    rank 0 joins them into one data/tempering.npz (the one-process number of frames, the evaluations of
    both halves, no part files left); training then reads it on both ranks."""
    quick = ["tempering.ladders=4", "tempering.replicas=3", "tempering.t_max=600.0", "tempering.burnin_rounds=2",
             "tempering.frames=10", "tempering.steps_per_swap=5", "tempering.keep_replicas=1",
             "generator.blocks=1", "generator.hidden=16", "training.pretrain.steps=4", "training.pretrain.batch=16",
             "training.finetune.steps=0", "training.log_every=2", "training.eval_batch=32"]
    sets = [a for kv in quick for a in ("--set", kv)]
    run = tmp_path / "run"
    proc = torchrun(2, "-m", "boltzflow", "train", "butane", "--recipe", "energy", "-o", str(run), "--no-progress",
                    *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from boltzflow.sampling import SampleSet

    data = SampleSet.load(run / "data" / "tempering.npz")
    info = data.provenance["tempering"]
    assert len(data.positions) == 4 * 10 and info["ranks"] == 2 and info["frames"] == 40
    assert info["energy_evals"] >= 4 * 3 * 5 * 12  # both halves: 4 ladders x 3 replicas x 5 steps x 12 rounds
    assert not list((run / "data").glob("tempering.part-*"))
    halves = data.positions.reshape(2, 20, -1)
    assert not torch.allclose(torch.as_tensor(halves[0]), torch.as_tensor(halves[1]))  # distinct seeds per rank
    log = (run / "log.txt").read_text()
    assert "shared by 2 ranks" in log and log.count("parallel tempering: 40 frames") == 1
    assert json.loads((run / "summary.json").read_text())["data_tempering"]["energy_evals"] == info["energy_evals"]
