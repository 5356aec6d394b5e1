"""Output paths that cannot be written: every stage's CLI answers one ``Error:`` line naming the
path and what to do, exits 1, and leaves nothing at the path or beside it (no partial, no lock)."""

from __future__ import annotations

import errno
import os

import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main
from mixtral_trt.manifest import read_manifest

from ._helpers import one_layer_export, rtx_or_skip, sha256, siblings

STAGES = ["tiny", "export", "optimize", "engine", "main"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return one_layer_export(tmp_path_factory)


def _args(stage: str, export_dir, out) -> list[str]:
    return {
        "tiny": ["tiny", str(out)],
        "export": ["export", "--model", str(export_dir.parent / "ckpt"), "--out", str(out)],
        "optimize": ["optimize", str(export_dir), "--out", str(out)],
        "engine": ["engine", str(export_dir), "--out", str(out)],
        "main": ["--model", str(export_dir.parent / "ckpt"), "--out", str(out), "--target", "onnxruntime"],
    }[stage]


def _one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("stage", STAGES)
def test_output_under_a_file_is_refused_naming_it(stage, export_dir, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory")
    result = CliRunner().invoke(main, _args(stage, export_dir, blocker / "out"))
    _one_error_line(result, str(blocker), "not a directory", "choose another output path")
    assert blocker.read_text() == "a file, not a directory"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.parametrize("stage", ["tiny", "main"])
def test_output_where_the_file_system_refuses_directories(stage, export_dir):
    out = f"/proc/mixtral-trt-test-{os.getpid()}"  # procfs: even root cannot create entries
    result = CliRunner().invoke(main, _args(stage, export_dir, out))
    _one_error_line(result, out)
    assert not os.path.lexists(out)


@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "read-only file system"),
                                             (errno.EACCES, "permission denied")])  # fmt: skip
def test_unwritable_output_is_one_error_line(code, words, tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, dir=None, **kwargs):  # noqa: A002  (tempfile's argument name)
        raise OSError(code, os.strerror(code), str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # root ignores permission bits: simulate it
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(main, ["tiny", str(out)])
    _one_error_line(result, words, str(tmp_path), "choose")
    assert os.listdir(tmp_path) == []


def test_disk_full_while_writing_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def fill_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # a part of the file got written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as from write(): no file named

    monkeypatch.setattr(safetensors.torch, "save_file", fill_disk)
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(main, ["tiny", str(out)])
    _one_error_line(result, f"no space left on device writing {out}", "GB free", "choose another output path")
    assert os.listdir(tmp_path) == []


class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.tensorrt
def test_disk_full_during_engine_build_keeps_previous_engine(export_dir, tmp_path, monkeypatch):
    rtx_or_skip()
    from mixtral_trt.optimize import engine

    out = tmp_path / "engine"
    engine.build(export_dir, out, target="tensorrt-rtx", sms=["89"], progress=False)
    before = sha256(out / "model.plan")
    opened = engine._PlanFile.__init__

    def full_disk(self, path):
        opened(self, path)
        self._f = _FullDisk(self._f)

    monkeypatch.setattr(engine._PlanFile, "__init__", full_disk)
    args = ["engine", str(export_dir), "--out", str(out), "--target", "tensorrt-rtx", "--sm", "89", "--quiet"]
    result = CliRunner().invoke(main, args)
    _one_error_line(result, f"no space left on device writing {out / 'model.plan'}", "GB free")
    read_manifest(out, "engine", verify=True)
    assert sha256(out / "model.plan") == before
    assert siblings(out) == []
