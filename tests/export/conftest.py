"""A small checkpoint and its export, made once per session and shared read-only.

Exporting traces the decoder (seconds), so error tests and graph tests reuse one export;
tests that need to change a checkpoint copy it first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_checkpoint

# Two layers, so per-layer structure is distinguishable from per-graph structure; GQA 2:1.
SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2,
             num_key_value_heads=1, num_local_experts=4, vocab_size=200)  # fmt: skip
MAX_BATCH = 2
MAX_SEQ = 16


def export_small(ckpt: Path, out: Path) -> Path:
    from mixtral_trt.export.onnx_export import export

    return export(ckpt, out, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """Read-only: copy it before changing anything."""
    return make_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", seed=7, **SMALL)


@pytest.fixture(scope="session")
def small_export(small_checkpoint, tmp_path_factory) -> Path:
    """Read-only export of :func:`small_checkpoint`."""
    return export_small(small_checkpoint, tmp_path_factory.mktemp("small-export") / "export")
