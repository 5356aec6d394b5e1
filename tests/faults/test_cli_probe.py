"""Odd inputs on every command, as a new user or an attacker would give them: each is refused with
one ``Error:`` line that names the value, exit status 1, no traceback, and nothing new on disk.

The oracle is the input itself: the value the test planted must be named, and the directory
the command was pointed at must be left exactly as it was (its file names and contents).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main

from ._helpers import one_layer_export, rtx_or_skip

TOKENS = 2**31  # one more than a 32-bit dimension holds


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    export = one_layer_export(tmp_path_factory)
    return {"export": export, "ckpt": export.parent / "ckpt"}


def _config(**fields):
    """A setup that copies the checkpoint to tmp/c and sets config.json (and generation_config.json) fields."""

    def setup(built, tmp):
        ckpt = shutil.copytree(built["ckpt"], tmp / "c")
        for name in ("config.json", "generation_config.json"):
            raw = json.loads((ckpt / name).read_text())
            raw.update({k: v for k, v in fields.items() if name == "config.json" or k in raw})
            (ckpt / name).write_text(json.dumps(raw))  # json writes NaN and Infinity as Python's json reads them

    return setup


def _copy(src: str, dst: str):
    def setup(built, tmp):
        shutil.copytree(built[src], tmp / dst)

    return setup


def _restage(stage: str):
    def setup(built, tmp):
        shutil.copytree(built["export"], tmp / "x")
        manifest = json.loads((tmp / "x" / "manifest.json").read_text())
        (tmp / "x" / "manifest.json").write_text(json.dumps({**manifest, "stage": stage}))

    return setup


def _nested(built, tmp):
    """A previous export at tmp/out with the checkpoint copied inside it (replacing it would delete it)."""
    shutil.copytree(built["export"], tmp / "out")
    shutil.copytree(built["ckpt"], tmp / "out" / "ck")


def _main_out(record: dict):
    """A main job's OUT at tmp/out: the export as its stage 'export', and ``record`` as build.json."""

    def setup(built, tmp):
        shutil.copytree(built["export"], tmp / "out" / "export")
        (tmp / "out" / "build.json").write_text(json.dumps(record))

    return setup


def _a_file(built, tmp):
    (tmp / "f").write_text("not a directory")


# (id, setup or None, args ({E}: the export, {C}: the checkpoint, {T}: this case's directory), message fragment)
CASES = [
    ("config-eps-nan", _config(rms_norm_eps=float("nan")), ["export", "--model", "{T}/c", "--out", "{T}/o"],
     "'rms_norm_eps' must be a finite number, found nan"),
    ("config-theta-inf", _config(rope_theta=float("inf")), ["export", "--model", "{T}/c", "--out", "{T}/o"],
     "'rope_theta' must be a positive finite number, found inf"),
    ("config-tie-string", _config(tie_word_embeddings="false"), ["export", "--model", "{T}/c", "--out", "{T}/o"],
     "'tie_word_embeddings' must be true or false, found 'false'"),
    ("config-bos-outside-vocab", _config(bos_token_id=500), ["export", "--model", "{T}/c", "--out", "{T}/o"],
     "bos_token_id=500 must be a token id in [0, vocab_size=200)"),
    ("tiny-vocab-1", None, ["tiny", "{T}/o", "--vocab", "1"], "bos_token_id=1 must be a token id in [0, vocab_size=1)"),
    ("export-model-is-file", _a_file, ["export", "--model", "{T}/f", "--out", "{T}/o"],
     "checkpoint directory {T}/f is a file, not a directory"),
    ("export-batch-huge", None, ["export", "--model", "{C}", "--out", "{T}/o", "--max-batch", str(10**12)],
     "--max-batch=1000000000000 x --max-seq-len=4096 = 4096000000000000 tokens; TensorRT's dimensions are 32-bit"),
    ("main-batch-huge", None, ["--model", "{C}", "--out", "{T}/o", "--max-batch", str(TOKENS // 8),
                               "--max-seq-len", "8", "--target", "onnxruntime", "--quiet"], f"= {TOKENS} tokens"),
    ("export-out-in-checkpoint", _copy("ckpt", "c"), ["export", "--model", "{T}/c", "--out", "{T}/c/o"],
     "output path {T}/c/o is inside the input directory {T}/c"),
    ("export-checkpoint-in-out", _nested, ["export", "--model", "{T}/out/ck", "--out", "{T}/out"],
     "the input directory {T}/out/ck is inside the output path {T}/out"),
    ("main-out-is-checkpoint", _copy("ckpt", "c"), ["--model", "{T}/c", "--out", "{T}/c", "--target", "onnxruntime"],
     "output path {T}/c is the input directory {T}/c itself"),
    ("optimize-out-in-source", _copy("export", "x"), ["optimize", "{T}/x", "--out", "{T}/x/o"],
     "output path {T}/x/o is inside the input directory {T}/x"),
    ("optimize-engine-output", _restage("engine"), ["optimize", "{T}/x", "--out", "{T}/o"],
     "is a 'engine' stage's output; this reads the output of export"),
    ("engine-batch-huge", None, ["engine", "{E}", "--out", "{T}/o", "--max-batch", str(10**12)],
     "max_batch=1000000000000 x max_seq_len=8"),
    ("engine-tokens-over-32-bit", None, ["engine", "{E}", "--out", "{T}/o", "--max-batch", str(TOKENS // 8)],
     f"= {TOKENS} tokens in one prefill"),
    ("engine-sm-empty-list", None, ["engine", "{E}", "--out", "{T}/o", "--sm", ","], "',' names no SM"),
    ("generate-missing-dir", None, ["generate", "{T}/nothing", "--prompt-ids", "1"], "{T}/nothing does not exist"),
    ("inspect-a-file", None, ["inspect", "{E}/manifest.json"], "give the directory that holds it, {E}"),
    ("inspect-checkpoint", None, ["inspect", "{C}"], "{C} is a Hugging Face checkpoint, not a build"),
    ("inspect-out-without-stages", _main_out({}), ["inspect", "{T}/out"],
     "{T}/out/build.json lists no finished stage still in {T}/out; rerun the main job"),
    ("generate-out-export-only", _main_out({"export": {"path": "export", "serves": None}}),
     ["generate", "{T}/out", "--prompt-ids", "1"], "(a main-job build directory) has no build for ONNX Runtime"),
    ("triton-repo-is-build", _copy("export", "x"), ["triton", "{T}/x", "--out", "{T}/x", "--no-verify"],
     "output path {T}/x is the input directory {T}/x itself"),
    ("triton-name-too-long", None, ["triton", "{E}", "--out", "{T}/r", "--name", "m" * 300], "use at most 128"),
]  # fmt: skip
RTX = [  # a refusal that needs TensorRT-RTX installed (it comes from the RTX target)
    ("engine-rtx-timing-cache", None, ["engine", "{E}", "--out", "{T}/o", "--target", "tensorrt-rtx",
                                       "--timing-cache", "{T}/t.cache"],
     "--timing-cache {T}/t.cache: TensorRT-RTX keeps no timing cache"),
    ("engine-out-in-source", _copy("export", "x"), ["engine", "{T}/x", "--out", "{T}/x/o", "--target", "tensorrt-rtx"],
     "output path {T}/x/o is inside the input directory {T}/x"),
]  # fmt: skip


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _probe(built, tmp_path, setup, args, fragment):
    if setup is not None:
        setup(built, tmp_path)
    fill = {"{E}": str(built["export"]), "{C}": str(built["ckpt"]), "{T}": str(tmp_path)}
    for key, value in fill.items():
        args, fragment = [a.replace(key, value) for a in args], fragment.replace(key, value)
    before = _tree(tmp_path), _tree(built["export"].parent)
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert fragment in errors[0], result.output
    assert (_tree(tmp_path), _tree(built["export"].parent)) == before  # nothing written, nothing removed


@pytest.mark.parametrize("setup, args, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_in_one_line(built, tmp_path, setup, args, fragment):
    _probe(built, tmp_path, setup, args, fragment)


@pytest.mark.parametrize("setup, args, fragment", [c[1:] for c in RTX], ids=[c[0] for c in RTX])
def test_refused_in_one_line_rtx(built, tmp_path, setup, args, fragment):
    rtx_or_skip()
    _probe(built, tmp_path, setup, args, fragment)


def test_kernel_build_usage_and_output_errors(tmp_path, capsys):
    from mixtral_trt.plugins import build

    with pytest.raises(SystemExit) as bad_flag:
        build.main(["--bogus"])
    assert bad_flag.value.code == 1 and capsys.readouterr().err.splitlines()[-1].startswith("Error: unrecognized")
    (tmp_path / "f").write_text("x")
    # the output path is refused before nvcc is looked for (so before minutes of compiling)
    assert build.main(["--out-dir", str(tmp_path / "f"), "--nvcc", str(tmp_path / "no-nvcc"), "--quiet"]) == 1
    expected = f"Error: output path {tmp_path / 'f'} exists and is a file; choose a directory path\n"
    assert capsys.readouterr().err == expected
