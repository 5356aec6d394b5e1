"""The main job (`mixtral-build` with no command): stages, summary, reuse and resume, bad options."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _run(*args):
    return CliRunner().invoke(main, ["--max-seq-len", "64", "--max-batch", "2", *args])


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_RTX, reason="needs TensorRT-RTX: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
def test_default_build_makes_every_artifact_then_reuses_them(tmp_path):
    out = tmp_path / "b"
    first = _run("--precision", "fp16", "--target", "tensorrt-rtx", "--out", str(out))
    assert first.exit_code == 0, first.output
    for stage in ("export", "fp16", "engine"):
        assert (out / stage / "manifest.json").is_file(), stage
    assert (out / "engine" / "model.plan").is_file() and not (out / "onnxruntime").exists()
    assert f"try it:  mixtral-build generate {out} --prompt" in first.output
    record = json.loads((out / "build.json").read_text())
    assert set(record) == {"export", "precision fp16", "tensorrt-rtx engine"}
    assert [record[s]["serves"] for s in record] == [None, "onnxruntime", "tensorrt"]
    second = _run("--precision", "fp16", "--target", "tensorrt-rtx", "--out", str(out))
    assert second.exit_code == 0, second.output
    assert second.output.count("reused") == 3 + 3  # progress lines and summary rows


def test_interrupted_build_resumes_at_the_unfinished_stage(tmp_path, monkeypatch):
    from mixtral_trt.optimize import precision

    out = tmp_path / "b"
    real = precision.convert

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during this stage

    monkeypatch.setattr(precision, "convert", fail)
    interrupted = _run("--precision", "int8", "--target", "onnxruntime", "--out", str(out))
    assert interrupted.exit_code != 0
    assert (out / "export" / "manifest.json").is_file() and not (out / "int8").exists()
    monkeypatch.setattr(precision, "convert", real)
    resumed = _run("--precision", "int8", "--target", "onnxruntime", "--out", str(out))
    assert resumed.exit_code == 0, resumed.output
    assert "reused: " + str(out / "export") in resumed.output
    assert (out / "int8" / "manifest.json").is_file()
    # Changing an option invalidates the stages that depend on it, and only those.
    again = _run("--precision", "int8", "--target", "onnxruntime", "--out", str(out), "--fp16-attention")
    assert again.exit_code == 0, again.output
    assert "reused: " + str(out / "export") in again.output
    assert "done: " + str(out / "int8") in again.output
    from mixtral_trt.manifest import read_manifest

    assert read_manifest(out / "int8", "optimize")["optimize"]["int8"]["attention"] is False


def test_int8_options_without_int8_are_refused_before_any_stage(tmp_path):
    for flag in ("--int8-router", "--int8-lm-head", "--fp16-attention"):
        result = _run("--precision", "fp16", "--target", "onnxruntime", flag, "--out", str(tmp_path / "b"))
        assert result.exit_code == 1, result.output
        assert f"{flag} apply to --precision int8 only, not fp16" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(HAVE_TRT, reason="datacenter TensorRT is installed here")
def test_target_tensorrt_without_tensorrt_names_the_package(tmp_path):
    result = _run("--target", "tensorrt", "--out", str(tmp_path / "b"))
    assert result.exit_code == 1 and "pip install tensorrt-cu13" in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_RTX, reason="needs TensorRT-RTX")
def test_unsupported_sm_names_the_supported_list(tmp_path):
    result = _run("--target", "tensorrt-rtx", "--sm", "90", "--out", str(tmp_path / "b"))
    assert result.exit_code == 1
    assert "90" in result.output and "89" in result.output and "120" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()  # refused before any stage ran


def test_bad_choices_are_refused_by_click(tmp_path):
    for args in (["--precision", "fp8"], ["--target", "tpu"], ["--sm", "ampere"]):
        result = _run(*args, "--out", str(tmp_path / "b"))
        assert result.exit_code == 1 and result.output.count("Error: ") == 1, args
    assert not (tmp_path / "b").exists()
