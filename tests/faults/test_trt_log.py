"""TensorRT's note for every Int64 network input ("Make sure input X has Int64 binding.") is not
a problem of the model: hidden by default, printed with ``--verbose`` (on ``engine`` and on the
main job's group, which also applies to its commands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from ._helpers import one_layer_export, rtx_or_skip

REPO = Path(__file__).resolve().parents[2]
NOTE = "Make sure input {} has Int64 binding."

pytestmark = pytest.mark.tensorrt


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    rtx_or_skip()
    return one_layer_export(tmp_path_factory)


def _int64_inputs(export_dir: Path) -> list[str]:
    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
    return [i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.INT64]


def _engine(export_dir: Path, out: Path, before: list[str], after: list[str]) -> str:
    cmd = [sys.executable, "-m", "mixtral_trt.cli", *before, "engine", str(export_dir), "--out", str(out),
           "--target", "tensorrt-rtx", "--sm", "89", *after]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stderr


def test_int64_binding_notes_hidden_by_default(export_dir, tmp_path):
    names = _int64_inputs(export_dir)
    assert names  # input_ids, position_ids, ... : the notes would be there
    err = _engine(export_dir, tmp_path / "engine", [], [])
    assert "Int64 binding" not in err, err


@pytest.mark.parametrize("where", ["engine", "group"])
def test_int64_binding_notes_shown_with_verbose(where, export_dir, tmp_path):
    flags = (["--verbose"], []) if where == "group" else ([], ["--verbose"])
    err = _engine(export_dir, tmp_path / "engine", *flags)
    for name in _int64_inputs(export_dir):
        assert NOTE.format(name) in err, err
