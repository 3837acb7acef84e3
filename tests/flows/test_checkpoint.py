"""Checkpoints: round trip of make_flow models, fingerprints, clear errors on bad files."""

from __future__ import annotations

import pytest
import torch

from boltzflow.errors import CheckpointError, InputError
from boltzflow.flows.builders import flow_config, make_flow
from boltzflow.flows.checkpoint import load_model, read_model_info, register_builder, save_model


def _trained_like(cfg, seed=0, scale=0.2):
    flow = make_flow(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return flow


@pytest.mark.parametrize("cfg", [
    flow_config(6, "realnvp", blocks=2, hidden=16),
    flow_config(5, "spline", circular=[1, 4], blocks=2, hidden=16, bins=5, seed=3),
    flow_config(4, "realnvp", blocks=1, hidden=8, context_dim=2),
])
def test_flow_roundtrip_same_density(cfg, tmp_path):
    flow = _trained_like(cfg)
    path = save_model(tmp_path / "flow.pt", flow, "flow", cfg, fingerprint="abc123", extra={"step": 7})
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    info = read_model_info(path)
    assert info["kind"] == "flow" and info["fingerprint"] == "abc123" and info["extra"] == {"step": 7}
    assert info["config"] == cfg
    loaded = load_model(path, expected_fingerprint="abc123")
    ctx = torch.randn(64, cfg.get("context_dim", 0)) if cfg.get("context_dim") else None
    x = flow.sample(64, generator=torch.Generator().manual_seed(0), context=ctx).detach()
    assert torch.equal(loaded.log_prob(x, context=ctx), flow.log_prob(x, context=ctx).detach())
    # a freshly built model (identity init) would give a different density: the weights were restored
    assert not torch.allclose(make_flow(**cfg).log_prob(x, context=ctx), loaded.log_prob(x, context=ctx))


def test_fingerprint_mismatch_is_a_clear_error(tmp_path):
    cfg = flow_config(4, blocks=1, hidden=8)
    path = save_model(tmp_path / "f.pt", make_flow(**cfg), "flow", cfg, fingerprint="system-A")
    with pytest.raises(CheckpointError, match="system-A.*system-B"):
        load_model(path, expected_fingerprint="system-B")
    nofp = save_model(tmp_path / "g.pt", make_flow(**cfg), "flow", cfg)
    with pytest.raises(CheckpointError, match="made for system None"):
        load_model(nofp, expected_fingerprint="system-B")
    assert isinstance(load_model(nofp), torch.nn.Module)  # no expectation: loads


def test_bad_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a boltzflow model checkpoint"):
        load_model(other)
    # architecture changed since saving: weights do not fit
    cfg = flow_config(4, blocks=1, hidden=8)
    path = save_model(tmp_path / "f.pt", make_flow(**cfg), "flow", cfg)
    payload = torch.load(path, weights_only=True)
    payload["config"]["hidden"] = 16
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)
    payload["config"]["kind"] = "glow"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="no longer builds"):
        load_model(path)
    payload["kind"] = "nobody-registered-this"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="no builder is registered"):
        load_model(path)


def test_registry_and_build_kwargs(tmp_path):
    def build_linear(config, scale=1.0):
        m = torch.nn.Linear(config["n"], config["n"])
        m.scale = scale
        return m

    register_builder("test-linear", build_linear, overwrite=True)
    with pytest.raises(InputError, match="already registered"):
        register_builder("test-linear", lambda c: None)
    with pytest.raises(InputError, match="no builder registered"):
        save_model(tmp_path / "x.pt", torch.nn.Linear(2, 2), "unregistered-kind", {})
    m = torch.nn.Linear(3, 3).double()
    path = save_model(tmp_path / "lin.pt", m, "test-linear", {"n": 3})
    loaded = load_model(path, scale=2.5)
    assert loaded.scale == 2.5 and loaded.weight.dtype == torch.float64
    assert torch.equal(loaded.weight, m.weight.detach())


@pytest.mark.parametrize("weights_dtype", ["float16", "bfloat16"])
def test_half_precision_weights_halve_the_file_and_load_in_the_model_dtype(weights_dtype, tmp_path):
    cfg = flow_config(6, "spline", circular=[1, 4], blocks=2, hidden=256, bins=5, seed=3)
    flow = _trained_like(cfg, scale=0.02)  # weights of a trained flow's size
    full = save_model(tmp_path / "full.pt", flow, "flow", cfg)
    half = save_model(tmp_path / "half.pt", flow, "flow", cfg, weights_dtype=weights_dtype)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    info = read_model_info(half)
    assert info["weights_dtype"] == weights_dtype and info["dtype"] == "float32"
    loaded = load_model(half)
    ref = dict(flow.named_parameters())
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.float32  # computes in the model's dtype ...
        rounded = ref[name].detach().to(getattr(torch, weights_dtype)).float()
        assert torch.equal(p.detach(), rounded)  # ... with the rounded values
    for name, b in loaded.named_buffers():  # buffers are kept exactly
        assert torch.equal(b, dict(flow.named_buffers())[name])
    x = flow.sample(256, generator=torch.Generator().manual_seed(0)).detach()
    diff = (loaded.log_prob(x) - flow.log_prob(x)).detach()
    assert diff.abs().max() > 0  # a (slightly) different flow
    assert diff.abs().max() < 0.1  # measured 0.003 (float16) and 0.02 (bfloat16)
    with pytest.raises(InputError, match="weights_dtype"):
        save_model(tmp_path / "bad.pt", flow, "flow", cfg, weights_dtype="int4")


def test_int8_weights_quarter_the_file_with_per_row_scales(tmp_path):
    cfg = flow_config(6, "spline", circular=[1, 4], blocks=2, hidden=256, bins=5, seed=3)
    flow = _trained_like(cfg, scale=0.02)
    full = save_model(tmp_path / "full.pt", flow, "flow", cfg)
    q8 = save_model(tmp_path / "q8.pt", flow, "flow", cfg, weights_dtype="int8")
    assert q8.stat().st_size < 0.35 * full.stat().st_size
    assert read_model_info(q8)["weights_dtype"] == "int8"
    loaded = load_model(q8)
    ref = dict(flow.named_parameters())
    for name, p in loaded.named_parameters():
        w = ref[name].detach()
        assert p.dtype == torch.float32
        if w.dim() >= 2:  # each row within half a step of its own scale, max|w_row| / 127
            step = w.reshape(w.shape[0], -1).abs().amax(1) / 127
            err = (p.detach() - w).reshape(w.shape[0], -1).abs().amax(1)
            assert torch.all(err <= 0.5 * step + 1e-7) and torch.any(err > 0)
            # the largest entry of each row is exact up to float32
            i = w.reshape(w.shape[0], -1).abs().argmax(1)
            assert torch.allclose(p.detach().reshape(w.shape[0], -1).gather(1, i[:, None]),
                                  w.reshape(w.shape[0], -1).gather(1, i[:, None]), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.detach(), w.half().float())
    x = flow.sample(256, generator=torch.Generator().manual_seed(0)).detach()
    diff = (loaded.log_prob(x) - flow.log_prob(x)).detach()
    assert 0 < diff.abs().max() < 0.2
