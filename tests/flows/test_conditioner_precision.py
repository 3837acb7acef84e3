"""bfloat16 conditioners (flows/nn.py conditioner_precision): the networks compute in bf16 inside the block
only, stay close to float32, keep float32 gradients, and the trainer's option trains and validates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from boltzflow.errors import ConfigError, InputError
from boltzflow.flows.builders import make_flow
from boltzflow.flows.nn import MLP, conditioner_precision


def _mlp():
    torch.manual_seed(0)
    m = MLP(12, 30, hidden=64, depth=3, zero_init_last=False)
    return m


def test_bf16_block_is_close_to_float32_and_restores():
    m = _mlp()
    h = torch.randn(256, 12, generator=torch.Generator().manual_seed(1))
    ref = m(h)
    with conditioner_precision(m, "bfloat16"):
        y = m(h)
        assert m.compute_dtype == torch.bfloat16
    assert y.dtype == torch.float32 and m.compute_dtype is None
    assert not torch.equal(y, ref)  # the bf16 path ran
    assert float((y - ref).detach().abs().max()) < 0.03 * float(ref.detach().abs().max())
    assert torch.equal(m(h), ref)  # restored
    with conditioner_precision(m, "bfloat16"):
        m(h).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in m.parameters())
    with pytest.raises(InputError, match="conditioner dtype"):
        with conditioner_precision(m, "float16"):
            pass


def test_bf16_spline_flow_density_stays_within_hundredths_of_a_nat():
    torch.manual_seed(2)
    flow = make_flow(6, "spline", blocks=2, hidden=32, seed=0, circular=[0, 3])
    for p in flow.parameters():  # away from the identity initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    x = flow.sample(512, generator=torch.Generator().manual_seed(3)).detach()
    ref = flow.log_prob(x)
    with conditioner_precision(flow, "bfloat16"):
        lp = flow.log_prob(x)
    d = (lp - ref).abs()
    assert float(d.max()) > 0 and float(d.max()) < 0.1 and float(d.mean()) < 0.02


def test_trainer_trains_with_bf16_conditioners_and_validates_the_option():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from double_well_2d import data, dw_energy

    from boltzflow.training.trainer import OptimConfig, StageConfig, TrainConfig, Trainer

    with pytest.raises(ConfigError, match="conditioner_dtype"):
        TrainConfig(conditioner_dtype="float16")
    torch.manual_seed(0)
    gen = make_flow(2, "realnvp", blocks=1, hidden=16, seed=0)
    c = TrainConfig(pretrain=StageConfig(loss="klz", steps=60, batch=128), finetune=StageConfig(loss="klz", steps=0),
                    optimizer=OptimConfig(lr=3e-3), log_every=10, progress=False, seed=1, conditioner_dtype="bfloat16")
    x = data(2000)
    before = float(-gen.log_prob(x).mean())
    s = Trainer(gen, dw_energy, c, data=x).run()
    after = float(-gen.log_prob(x).mean())
    assert s["skipped_steps"] == 0 and after < before - 0.2
    assert all(m.compute_dtype is None for m in gen.modules() if isinstance(m, MLP))


def test_native_bfloat16_is_read_from_the_cpu_flags():
    from boltzflow.flows.nn import cpu_has_native_bfloat16

    assert cpu_has_native_bfloat16("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n") is False
    assert cpu_has_native_bfloat16("flags\t: avx2 avx512f avx512_bf16\nflags\t: avx2 avx512f avx512_bf16\n") is True
    assert cpu_has_native_bfloat16("flags : avx2 amx_tile amx_bf16\n") is True
    assert cpu_has_native_bfloat16("model name : something\n") is None  # no flags line: unknown


def test_trainer_warns_when_bf16_conditioners_would_be_emulated(monkeypatch, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from double_well_2d import data, dw_energy

    import boltzflow.training.trainer as trainer_mod
    from boltzflow.core.rundir import RunDir
    from boltzflow.training.trainer import OptimConfig, StageConfig, TrainConfig, Trainer

    def run(native: bool | None, dtype: str, name: str):
        monkeypatch.setattr(trainer_mod, "cpu_has_native_bfloat16", lambda: native)
        c = TrainConfig(pretrain=StageConfig(loss="klz", steps=2, batch=16), finetune=StageConfig(loss="klz", steps=0),
                        optimizer=OptimConfig(lr=1e-3), progress=False, conditioner_dtype=dtype)
        rd = RunDir(tmp_path / name)
        Trainer(make_flow(2, "realnvp", blocks=1, hidden=8, seed=0), dw_energy, c, run_dir=rd, data=data(64)).run()
        log = tmp_path / name / "log.txt"
        return log.read_text() if log.exists() else ""

    with pytest.warns(UserWarning, match="without native bfloat16"):
        assert "set training.conditioner_dtype=float32" in run(False, "bfloat16", "emulated")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for native, dtype, name in ((True, "bfloat16", "native"), (None, "bfloat16", "unknown"), (False, "float32", "fp32")):
            assert "without native bfloat16" not in run(native, dtype, name)


def test_flow_step_benchmark_json():
    """benchmarks/flow_step.py at toy size on the shipped generator: both precisions timed, density compared."""
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    import flow_step

    out = flow_step.main([str(root / "systems/alanine-dipeptide/generators/energy"), "--batch", "16",
                          "--repeats", "1", "--kish", "300", "--json"])
    assert out["float32"]["ml_step_ms"] > 0 and out["bfloat16"]["sample_ms"] > 0 and out["speedup_ml_step"] > 0
    assert 0 < out["log_q_diff_sd"] < 0.05 and abs(out["kish_bf16_log_q"] - out["kish_float32"]) < 0.05
