"""The C++ runtime (runtime/cpp): built with CMake, its ctest suite run on data the Python side
writes, and its manifest reader compared with Python's json.load of the same files.

The data: a real export of a tiny model (mixtral_trt.export.onnx_export.export), an engine-stage
manifest written with mixtral_trt.manifest.write_manifest (stand-in plan and plugin bytes: nothing
here runs TensorRT), and tokenizer cases encoded by Python's sentencepiece on Mixtral's
tokenizer.model. Only the TensorRT-free library is built (no TensorRT or GPU here).

Needs cmake, a C++17 compiler and (Debian) nlohmann-json3-dev libsentencepiece-dev libssl-dev
libgtest-dev; skipped, naming what is missing, where they are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mixtral_trt.manifest import sha256_file, write_manifest
from tests.conftest import make_checkpoint

SOURCE = Path(__file__).parents[2] / "runtime" / "cpp"
# header -> Debian package providing it
HEADERS = {
    "nlohmann/json.hpp": "nlohmann-json3-dev",
    "sentencepiece_processor.h": "libsentencepiece-dev",
    "openssl/evp.h": "libssl-dev",
    "gtest/gtest.h": "libgtest-dev",
}
TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog because", "  leading spaces and\ttabs\nnewlines",
         "Ünïcödé — 東京 🚀", "1234567890 + 3.14159 = ?", ""]  # fmt: skip
# as optimize/engine.py writes them: prefill, then decode
PROFILES = [
    {"name": "prefill", "batch": [1, 2, 2], "seq": [1, 32, 64]},
    {"name": "decode", "batch": [1, 2, 2], "seq": [1, 1, 1]},
]


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("cmake", "ctest") if shutil.which(tool) is None]
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return [*missing, "a C++ compiler (g++)"]
    for header, package in HEADERS.items():
        probe = subprocess.run([cxx, "-std=c++17", "-E", "-x", "c++", "-", "-o", os.devnull], check=False,
                               input=f"#include <{header}>\n", capture_output=True, text=True)  # fmt: skip
        if probe.returncode != 0:
            missing.append(f"{header} ({package})")
    return missing


_MISSING = _missing_tools()
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason="C++ runtime build needs " + ", ".join(_MISSING) + ": apt-get install -y cmake g++ nlohmann-json3-dev "
    "libsentencepiece-dev libssl-dev libgtest-dev",
)


def _write_data(root: Path) -> Path:
    """export/ (real), engine/ (Python-written engine-stage manifest), tokenizer_cases.json."""
    import sentencepiece
    from mixtral_trt.export.onnx_export import export

    ckpt = make_checkpoint(root / "ckpt", seed=1, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                           num_key_value_heads=2, num_hidden_layers=2, num_local_experts=4)  # fmt: skip
    export(ckpt, root / "export", max_batch=2, max_seq_len=64, progress=False)
    exported = json.loads((root / "export" / "manifest.json").read_text())

    engine = root / "engine"
    engine.mkdir()
    rng = np.random.default_rng(0)
    (engine / "model.plan").write_bytes(rng.bytes(4096))  # stand-in bytes: only hashed here
    (engine / "libmixtral_moe_top2.so").write_bytes(rng.bytes(1024))
    shutil.copyfile(root / "export" / "tokenizer.model", engine / "tokenizer.model")
    io = json.loads(json.dumps(exported["io"]))
    for entry in io["inputs"] + io["outputs"]:
        if entry["name"].startswith(("past_key_values.", "present.")):
            entry["dtype"] = "float16"
    plugins = [
        {"name": "MixtralMoETop2", "version": "1", "namespace": "mixtral", "library": "libmixtral_moe_top2.so",
         "sha256": sha256_file(engine / "libmixtral_moe_top2.so")},
        # a build with the Python creator records no library (the C++ side is given one with --plugin)
        {"name": "MixtralMoETop2", "version": "1", "namespace": "mixtral", "library": None, "sha256": None,
         "python": "mixtral_trt.plugins.moe_plugin"},
    ]  # fmt: skip
    body = {
        "config": exported["config"],
        "export": {**exported["export"], "precision": "fp16"},
        "io": io,
        "engine": {"plan_file": "model.plan", "target": "tensorrt", "trt_version": "11.1.0", "cache_dtype": "float16",
                   "target_sms": ["sm_90"], "profiles": PROFILES, "plugins": plugins},
    }  # fmt: skip
    write_manifest(engine, "engine", body)

    model = engine / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    cases = []
    for text in TEXTS:
        ids = [sp.bos_id(), *sp.encode(text)]
        cases.append({"text": text, "ids": ids, "decoded": sp.decode(ids)})
    doc = {"model": str(model), "vocab_size": sp.vocab_size(), "cases": cases}
    (root / "tokenizer_cases.json").write_text(json.dumps(doc, ensure_ascii=False))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(build dir, data dir): CMake builds in the background while Python writes the data."""
    build = tmp_path_factory.mktemp("cpp-build")
    data = tmp_path_factory.mktemp("cpp-data")
    # -O0: these are correctness tests, and the build is most of their time.
    script = (f"cmake -S '{SOURCE}' -B '{build}' -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0 "
              f"&& cmake --build '{build}' -j 2")  # fmt: skip
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _write_data(data)
    finally:
        out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"building runtime/cpp failed:\n{out[-6000:]}"
    return build, data


def _dump(build: Path, directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(build / "manifest_dump"), str(directory)], check=False, capture_output=True, text=True)


def test_ctest_passes_with_python_data(built):
    build, data = built
    env = {**os.environ, "MIXTRAL_TEST_DATA": str(data)}
    out = subprocess.run(
        ["ctest", "--output-on-failure"], cwd=build, env=env, check=False, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr
    assert "100% tests passed" in out.stdout
    assert "Skipped" not in out.stdout, out.stdout  # the data-driven tests ran too
    assert "TokenizerFromPython.EncodesLikePythonSentencepiece" in out.stdout


def _kv_oracle(manifest: dict) -> dict:
    cfg, limits = manifest["config"], manifest["export"]
    dtype = manifest.get("engine", {}).get("cache_dtype") or next(
        e["dtype"] for e in manifest["io"]["inputs"] if e["name"] == "past_key_values.0.key"
    )
    shape = [limits["max_batch"], cfg["num_key_value_heads"], limits["max_seq_len"], cfg["head_dim"]]
    size = np.dtype(dtype).itemsize
    per = int(np.prod(shape)) * size
    return {"dtype": dtype, "element_size": size, "shape": shape, "bytes_per_buffer": per,
            "total_bytes": per * 2 * cfg["num_hidden_layers"]}  # fmt: skip


@pytest.mark.parametrize("stage", ["export", "engine"])
def test_manifest_round_trip(built, stage):
    build, data = built
    out = _dump(build, data / stage)
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    theirs = json.loads((data / stage / "manifest.json").read_text())
    for key in ("format", "format_version", "stage", "config", "io", "files"):
        assert ours[key] == theirs[key], key
    assert ours["config"].keys() == theirs["config"].keys()  # every field typed, none invented
    for key in ("max_batch", "max_seq_len", "precision"):
        assert ours["export"][key] == theirs["export"][key], key
    assert ours["kv_cache"] == _kv_oracle(theirs)
    if stage == "export":
        assert "engine" not in ours
        return
    typed = ("plan_file", "target", "trt_version", "cache_dtype", "target_sms", "profiles", "plugins")
    assert {k: ours["engine"][k] for k in typed} == {k: theirs["engine"][k] for k in typed}
    assert ours["engine"]["profiles"] == PROFILES
    assert ours["kv_cache"]["dtype"] == "float16" and ours["kv_cache"]["element_size"] == 2


def test_manifest_refusals_name_the_problem(built, tmp_path):
    build, data = built
    copy = tmp_path / "engine"
    shutil.copytree(data / "engine", copy)
    plan = bytearray((copy / "model.plan").read_bytes())
    plan[100] ^= 0xFF  # same size, other bytes
    (copy / "model.plan").write_bytes(bytes(plan))
    out = _dump(build, copy)
    assert out.returncode == 1
    assert "model.plan: sha256" in out.stderr and "modified or corrupt" in out.stderr, out.stderr

    manifest = json.loads((data / "engine" / "manifest.json").read_text())
    (copy / "model.plan").write_bytes((data / "engine" / "model.plan").read_bytes())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    out = _dump(build, copy)
    assert out.returncode == 1
    assert "format_version=2; this mixtral_runtime reads version 1" in out.stderr, out.stderr
