"""Save and load flows (any ``nn.Module``) with the configuration that rebuilds them.

A checkpoint is one ``torch.save`` file (written atomically) holding::

    {"format": "boltzflow-model", "version": 1, "kind": str, "config": dict,
     "fingerprint": str | None, "state_dict": {...}}

``kind`` names a *builder* ``fn(config, **build_kwargs) -> nn.Module`` registered with
:func:`register_builder`; "flow" (``make_flow(**config)``) is built in. ``fingerprint`` identifies
the system the model was trained for (e.g. ``MolecularSystem.fingerprint()``); loading with a
different ``expected_fingerprint`` raises :class:`~boltzflow.errors.CheckpointError`.
Configs must contain only plain data (str, int, float, bool, None, lists, tuples, dicts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, InputError
from ..io import atomic_torch_save

FORMAT = "boltzflow-model"
VERSION = 1
#: storage types of :func:`save_model`'s ``weights_dtype`` (None: the model's own)
WEIGHT_DTYPES = (None, "float16", "bfloat16", "int8")


def quantize_rows(w: Any) -> tuple[Any, Any]:
    """Symmetric per-row int8 of a weight matrix ``w: (rows, ...)``: ``(q int8, scale float32 (rows, 1, ...))``
    with ``w ~ q * scale`` and ``scale = max|w_row| / 127`` (1 where a row is zero)."""
    import torch

    flat = w.detach().reshape(w.shape[0], -1).float()
    scale = flat.abs().amax(1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(flat / scale).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale.reshape((w.shape[0],) + (1,) * (w.dim() - 1))


def _store(state: dict, params: set, weights_dtype: str | None) -> tuple[dict, dict]:
    """``state`` with its trainable float parameters in ``weights_dtype``, and the int8 row scales (if int8:
    matrices per row, vectors in float16)."""
    import torch

    if weights_dtype is None:
        return state, {}
    out, scales = {}, {}
    for k, v in state.items():
        if k not in params or not v.is_floating_point():
            out[k] = v
        elif weights_dtype == "int8" and v.dim() >= 2:
            out[k], scales[k] = quantize_rows(v)
        else:
            out[k] = v.to(torch.float16 if weights_dtype == "int8" else getattr(torch, weights_dtype))
    return out, scales


def _build_flow(config: dict, **build_kwargs) -> Any:
    from .builders import make_flow

    return make_flow(**{**config, **build_kwargs})


# kind -> builder. Populated with built-ins; other packages add theirs with register_builder().
_BUILDERS: dict[str, Callable[..., Any]] = {"flow": _build_flow}


def register_builder(kind: str, fn: Callable[..., Any], overwrite: bool = False) -> None:
    """Register ``fn(config: dict, **build_kwargs) -> nn.Module`` as the builder of ``kind``."""
    if not isinstance(kind, str) or not kind:
        raise InputError("builder kind must be a non-empty string")
    if not callable(fn):
        raise InputError(f"builder for {kind!r} must be callable")
    if kind in _BUILDERS and _BUILDERS[kind] is not fn and not overwrite:
        raise InputError(f"a builder for kind {kind!r} is already registered; pass overwrite=True to replace it")
    _BUILDERS[kind] = fn


def registered_kinds() -> list[str]:
    return sorted(_BUILDERS)


def save_model(
    path: str | os.PathLike,
    model: Any,
    kind: str,
    config: dict,
    fingerprint: str | None = None,
    extra: dict | None = None,
    weights_dtype: str | None = None,
) -> Path:
    """Atomically write ``model.state_dict()`` with ``kind``, ``config`` and ``fingerprint``.

    ``extra``: optional plain-data metadata (e.g. training step), returned by :func:`read_model_info`.
    ``weights_dtype``: "float16" or "bfloat16" stores the trainable parameters rounded to that type (half
    the file; buffers such as coordinate statistics stay exact); "int8" stores weight matrices as int8 with
    one float32 scale per row (:func:`quantize_rows`; a quarter of float32) and vectors in float16. The model
    is loaded back in its own dtype with the rounded values, so it is a slightly different flow whose log q is
    still exact for itself: measure its ESS, not the original's.
    """
    if kind not in _BUILDERS:
        raise InputError(f"no builder registered for kind {kind!r} (known: {registered_kinds()}); "
                         "call register_builder first so the checkpoint can be loaded back")
    if not isinstance(config, dict):
        raise InputError(f"config must be a dict, got {type(config).__name__}")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise InputError("fingerprint must be a string or None")
    if weights_dtype not in WEIGHT_DTYPES:
        raise InputError(f"weights_dtype {weights_dtype!r} unknown; choose one of {WEIGHT_DTYPES}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    dtype = str(floats[0]).replace("torch.", "") if floats else None
    state, scales = _store(state, {name for name, _ in model.named_parameters()}, weights_dtype)
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "config": dict(config),
               "fingerprint": fingerprint, "extra": dict(extra or {}), "dtype": dtype,
               "weights_dtype": weights_dtype, "state_dict": state}
    if scales:
        payload["int8_scales"] = scales
    return atomic_torch_save(path, payload)


def _read(path: str | os.PathLike) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or train a model first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
                              "re-create it") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a boltzflow model checkpoint (no '{FORMAT}' header)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')}, "
                              f"this boltzflow reads version {VERSION}")
    return payload


def read_model_info(path: str | os.PathLike) -> dict:
    """``{"kind", "config", "fingerprint", "extra", "dtype", "weights_dtype"}`` of a checkpoint, without
    building the model (``dtype``: the model's; ``weights_dtype``: the parameters' storage type, None = same)."""
    p = _read(path)
    return {"kind": p["kind"], "config": p["config"], "fingerprint": p["fingerprint"], "extra": p.get("extra", {}),
            "dtype": p.get("dtype"), "weights_dtype": p.get("weights_dtype")}


def load_model(path: str | os.PathLike, expected_fingerprint: str | None = None, **build_kwargs) -> Any:
    """Rebuild the model of a checkpoint with its registered builder and load its weights.

    ``expected_fingerprint``: when given, the checkpoint must carry exactly this fingerprint,
    otherwise :class:`CheckpointError`. ``build_kwargs`` go to the builder (e.g. a system object).
    The model is returned on CPU, in the saved floating dtype, in eval mode.
    """
    p = _read(path)
    kind = p["kind"]
    if expected_fingerprint is not None and p["fingerprint"] != expected_fingerprint:
        got = p["fingerprint"]
        raise CheckpointError(
            f"checkpoint {path} was made for system {got!r}, not for this system {expected_fingerprint!r}; "
            "load a checkpoint trained on this system, or retrain"
        )
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise CheckpointError(f"checkpoint {path} holds a model of kind {kind!r} but no builder is registered "
                              f"for it (known: {registered_kinds()}); import the module that registers it")
    try:
        model = builder(dict(p["config"]), **build_kwargs)
    except InputError as exc:
        raise CheckpointError(f"checkpoint {path}: its config no longer builds a {kind!r} model ({exc})") from exc
    dtype = p.get("dtype")
    if dtype in ("float64", "float32", "float16", "bfloat16"):
        import torch

        model = model.to(getattr(torch, dtype))
    state = p["state_dict"]
    scales = p.get("int8_scales") or {}
    if scales:  # int8 rows back to floats: w = q * scale (the model's dtype follows in load_state_dict)
        state = {k: (v.float() * scales[k] if k in scales else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the rebuilt {kind!r} model ({exc}); "
                              "the architecture changed since it was saved") from exc
    model.eval()
    return model
