"""A molecular generator's maximum-likelihood step reads nothing back to the host.

On a GPU the flow's step is ~2e4 small kernels, so a step is bound by their launches unless it runs as one
captured CUDA graph (benchmarks/gpu_ml.py --graph), and capture fails at the first device-to-host read (a
0-d tensor used as an index, ``.item()``, ``nonzero``). The twenty-fourth session's H200 run failed there
(``x[:, i[0]]`` in the internal-coordinate transform). The same reads show up on the CPU as dispatcher ops,
which this test watches, with the torch spline path the GPU takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from boltzflow.flows import spline_cpu
from boltzflow.flows.generator import GeneratorConfig, build_generator

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
              torch.ops.aten.masked_select.default}


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lead", ["none", "backbone"])
def test_training_step_reads_nothing_back(monkeypatch, lead):
    from boltzflow.systems.builtin import builtin_system

    monkeypatch.setattr(spline_cpu, "usable", lambda x: False)  # the torch spline ops, as on a GPU
    system = builtin_system("alanine-dipeptide")
    cfg = GeneratorConfig(pipeline="internal-all", fixed_torsions="isomer", blocks=2, hidden=16, lead=lead,
                          lead_blocks=1)
    torch.manual_seed(0)
    x = torch.tensor(np.array(system.positions), dtype=torch.float32)[None].repeat(8, 1, 1)
    x = x + 0.002 * torch.randn(x.shape)
    gen = build_generator(system, cfg, data=x)
    data = gen.prepare_data(x)
    spy = _HostReads()
    with spy:
        loss = -gen.log_prob(data).mean()
        loss.backward()
    assert torch.isfinite(loss)
    assert spy.seen == [], f"host reads in the training step: {sorted(set(spy.seen))}"
