"""What the fault tests share: a one-layer checkpoint, its export, TensorRT-RTX or a skip."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import make_checkpoint

ONE_LAYER = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                 num_key_value_heads=1, num_local_experts=4, vocab_size=200)  # fmt: skip


def rtx_or_skip():
    from mixtral_trt.optimize import trt_compat

    try:
        return trt_compat.load("tensorrt-rtx")
    except ImportError as exc:
        pytest.skip(f"TensorRT-RTX is not installed (tensorrt_rtx_bindings): {exc}")


_SHARED: dict[str, Path] = {}  # one export per test session, read-only for everyone


def one_layer_export(tmp_path_factory) -> Path:
    """Read-only export of a one-layer checkpoint (``.parent / 'ckpt'``), made once per session."""
    if "export" not in _SHARED:
        from mixtral_trt.export.onnx_export import export

        root = tmp_path_factory.mktemp("faults")
        ckpt = make_checkpoint(root / "ckpt", seed=3, **ONE_LAYER)
        _SHARED["export"] = export(ckpt, root / "export", max_batch=1, max_seq_len=8, progress=False)
    return _SHARED["export"]


def siblings(path: Path) -> list[str]:
    """Everything beside ``path`` that belongs to it (partials, old copies, locks)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
