"""Each class of bad generation request or damaged build, one by one: refused with GenerationError
(CLI: one 'Error:' line, exit 1) naming the value, the model usable afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mixtral_trt import runtime
from mixtral_trt.cli import main

from ._generate_build import VOCAB

NAN, INF = float("nan"), float("inf")
GOOD = [[1, 415, 2936]]


@pytest.fixture(scope="module")
def greedy(model):
    return model.generate(GOOD, max_new_tokens=4, greedy=True)[0].output_ids


def _refused(model, greedy, match, prompts=GOOD, **kwargs):
    with pytest.raises(runtime.GenerationError, match=match):
        model.generate(prompts, **({"max_new_tokens": 2} | kwargs))
    assert model.generate(GOOD, max_new_tokens=4, greedy=True)[0].output_ids == greedy


def _one_error_line(result, *words):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_sampling_values(model, greedy, name, value):
    _refused(model, greedy, f"{name}={value} must be a finite number", **{name: value})


@pytest.mark.parametrize(
    "name, value",
    [("top_k", 2.5), ("top_k", True), ("max_new_tokens", 3.0), ("max_new_tokens", True), ("max_new_tokens", "3"),
     ("seed", 1.5), ("seed", False)],
)  # fmt: skip
def test_counts_must_be_integers(model, greedy, name, value):
    _refused(model, greedy, f"{name}={value!r} must be an integer", **{name: value})


def test_numpy_integers_are_counts(model, greedy):
    [r] = model.generate(GOOD, max_new_tokens=np.int64(4), top_k=np.int32(1), seed=np.uint8(3))
    assert r.output_ids == greedy  # top_k=1 keeps only the argmax


def test_negative_seed_refused(model, greedy):
    _refused(model, greedy, r"seed=-1 must be >= 0", seed=-1, temperature=0.8)


def test_extreme_finite_values_still_sample(model, greedy):
    # A temperature this small is argmax in the limit; the penalty's 1e-310 pushes seen logits
    # to inf and 1e300 to -0: both must still give a distribution to draw from.
    [r] = model.generate(GOOD, max_new_tokens=4, temperature=1e-310, seed=0)
    assert r.output_ids == greedy
    for penalty in (1e-310, 1e300):
        [r] = model.generate(GOOD, max_new_tokens=4, repetition_penalty=penalty, temperature=0.9, top_p=0.9, seed=1)
        assert len(r.output_ids) == 4 and all(0 <= t < VOCAB for t in r.output_ids)


def test_single_stop_string_is_one_string(model):
    [full] = model.generate(["Paris is"], max_new_tokens=12, greedy=True)
    text = full.text
    # A two-character stop string whose characters each occur before the pair does: cut at the
    # pair, not at its first character.
    stop = next(text[i : i + 2] for i in range(len(text) - 1)
                if min(text.find(text[i]), text.find(text[i + 1])) < text.find(text[i : i + 2]))  # fmt: skip
    [cut] = model.generate(["Paris is"], max_new_tokens=12, greedy=True, stop=stop)
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]


@pytest.mark.parametrize("stop, match", [([1], "stop string 0 is 1, not a str"), (5, "stop=5 must be a string"),
                                         (["\ud800"], "lone surrogate"), ("", "must not be empty")])  # fmt: skip
def test_bad_stop_values(model, greedy, stop, match):
    _refused(model, greedy, match, stop=stop)


@pytest.mark.parametrize(
    "prompt, match",
    [([1.0, 415.0], "prompt 0 has 1.0 at position 0, not an integer token id"),
     ([1, True], "prompt 0 has True at position 1"), (np.array([1.5, 2.0]), "has 1.5 at position 0"),
     ([[1, 2]], r"has \[1, 2\] at position 0"), (None, "prompt 0 is a NoneType"), ({}, "prompt 0 is a dict"),
     ([-1], r"token id -1 outside the vocabulary \[0, 32000\)"), ([2**64], "token id 18446744073709551616 outside"),
     ("\ud800", r"lone surrogate U\+D800 at character 0"), ("ab\udcff", "invalid UTF-8 byte 0xff at character 2"),
     (b"ok \xc3", "not valid UTF-8: byte 0xc3 at offset 3"), ("", "prompt 0 is empty"), (b"", "prompt 0 is empty")],
)  # fmt: skip
def test_bad_prompts(model, greedy, prompt, match):
    _refused(model, greedy, match, prompts=[prompt])
    with pytest.raises(runtime.GenerationError, match=match):
        model.logits([prompt])


@pytest.mark.parametrize("prompts", [None, {}, b"\x01\x02", "Hello", 7])
def test_bad_prompt_lists(model, greedy, prompts):
    _refused(model, greedy, "prompts must be a list", prompts=prompts)


def test_integer_arrays_and_utf8_bytes_are_prompts(model):
    ids = model.generate([[1, 415, 2936]], max_new_tokens=3, greedy=True)[0]
    for same in (np.array([1, 415, 2936]), [np.int64(1), np.int32(415), 2936], (1, 415, 2936)):
        assert model.generate([same], max_new_tokens=3, greedy=True)[0].output_ids == ids.output_ids
    text = model.generate(["café"], max_new_tokens=3, greedy=True)[0]
    as_bytes = model.generate(["café".encode()], max_new_tokens=3, greedy=True)[0]
    assert as_bytes.prompt_ids == text.prompt_ids == model.tokenizer.encode("café")


def test_unknown_option_and_callback(model, greedy):
    _refused(model, greedy, "unknown sampling option 'temprature'", temprature=0.5)
    _refused(model, greedy, "on_token=str must be a function", on_token="print")


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [(["--repetition-penalty", "nan"], ["repetition_penalty=nan"]), (["--temperature", "inf"], ["temperature=inf"]),
     (["--top-p", "nan"], ["top_p=nan"]), (["--seed", "-1", "--temperature", "0.7"], ["seed=-1"]),
     (["--stop", ""], ["stop strings must not be empty"])],
)  # fmt: skip
def test_cli_sampling_values(build, args, words):
    result = CliRunner().invoke(main, ["generate", str(build), "--prompt-ids", "1,415", *args])
    _one_error_line(result, *words)


@pytest.mark.parametrize("ids", ["1_0", "\uff11,2", "1,-", "--5"])
def test_cli_ids_are_ascii_integers(build, ids):
    result = CliRunner().invoke(main, ["generate", str(build), "--prompt-ids", ids])
    assert result.exit_code == 1 and "not a comma-separated list of integers" in result.output, result.output
    assert "Traceback" not in result.output


def test_cli_invalid_utf8_argument(build):
    # A real process: the command line's undecodable byte reaches Python as a lone surrogate.
    exe = [sys.executable, "-c", "from mixtral_trt.cli import main; main()"]
    proc = subprocess.run([*exe, "generate", os.fsencode(build), "--no-verify", "--prompt", b"caf\xff"],
                          capture_output=True, timeout=120)  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode == 1 and proc.stdout == b"", err
    assert err.strip().splitlines() == ["Error: prompt 0 holds the invalid UTF-8 byte 0xff at character 3, not valid "
                                        "text; give UTF-8 text"], err  # fmt: skip


# --- damaged or unsupported builds --------------------------------------------------------------


def test_bf16_build_refused_by_onnxruntime_on_cpu(build, tmp_path):
    from mixtral_trt.optimize.precision import convert

    bf16 = convert(build, tmp_path / "bf16", "bf16", progress=False)
    with pytest.raises(runtime.GenerationError, match="bf16 build and ONNX Runtime on CPU has no bf16 MatMul.*fp32"):
        runtime.load(bf16, providers=["CPUExecutionProvider"])
    result = CliRunner().invoke(main, ["generate", str(bf16), "--prompt-ids", "1,2"])
    _one_error_line(result, "bf16", "--precision fp32")


def _damaged_copy(build, tmp_path, name: str, size: int, record_size: bool = False):
    """A copy of the build with ``name`` truncated to ``size`` bytes (optionally with the manifest
    recording that size, as if the damage happened before the stage hashed it)."""
    copy = tmp_path / "b"
    shutil.copytree(build, copy)
    os.truncate(copy / name, size)
    if record_size:
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["files"][name]["bytes"] = size
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_truncated_data_file_without_verify(build, tmp_path, model, greedy):
    copy = _damaged_copy(build, tmp_path, "model.onnx.data", 4096)
    with pytest.raises(runtime.GenerationError, match=r"model.onnx.data is 4096 bytes but its manifest records \d+"):
        runtime.load(copy, verify=False)
    result = CliRunner().invoke(main, ["generate", str(copy), "--no-verify", "--prompt-ids", "1,2"])
    _one_error_line(result, "model.onnx.data", "re-run the stage")
    assert model.generate(GOOD, max_new_tokens=4, greedy=True)[0].output_ids == greedy


# A data file cut short is caught by the external-data check before ONNX Runtime reads it;
# a graph cut short only by ONNX Runtime's own parser.
@pytest.mark.parametrize("name, size, match", [
    ("model.onnx.data", 4096, "external data location 'model.onnx.data'.* beyond the end of the file"),
    ("model.onnx", 100, "ONNX Runtime cannot load model.onnx / model.onnx.data .*Error parsing message")])  # fmt: skip
def test_file_onnxruntime_cannot_read(build, tmp_path, name, size, match):
    copy = _damaged_copy(build, tmp_path, name, size, record_size=True)
    with pytest.raises(runtime.GenerationError, match=match):
        runtime.load(copy, verify=False)
