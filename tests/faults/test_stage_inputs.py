"""Every stage checks what it reads: manifests and hashes, external-data locations, config
consistency, MoETop2 attributes on ONNX Runtime, and safetensors headers.

The oracles are independent of the code under test: a byte flipped by the test, onnx's own
rules for external data, transformers' reading of a config and its logits, the weights' shapes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main
from mixtral_trt.config import ConfigError, MixtralConfig, load_config
from mixtral_trt.export import moe_schema
from mixtral_trt.export.checkpoint import CheckpointError, read_header
from mixtral_trt.manifest import MANIFEST, ManifestError, file_entry, read_manifest
from mixtral_trt.onnx_files import ExternalDataError
from mixtral_trt.optimize import engine, lowering, precision
from mixtral_trt.optimize.lowering import LoweringError, lower_for_onnxruntime
from mixtral_trt.runtime import GenerationError
from tests.conftest import make_checkpoint
from tests.export.conftest import small_checkpoint, small_export  # noqa: F401 - session fixtures

DATA = "model.onnx.data"


class TensorRTTouched(Exception):
    """Raised by a stand-in for loading TensorRT: the check under test must come first."""


@pytest.fixture
def no_tensorrt(monkeypatch):
    def load(target=None):
        raise TensorRTTouched(target)

    monkeypatch.setattr(engine.trt_compat, "load", load)


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def reseal(directory: Path) -> None:
    """Rewrite the manifest over the directory's current files: a crafted artifact whose hashes match."""
    manifest = read_manifest(directory, verify=False)
    manifest["files"] = {p.name: file_entry(p) for p in sorted(directory.iterdir())
                         if p.name != MANIFEST and p.is_file() and not p.is_symlink()}  # fmt: skip
    (directory / MANIFEST).write_text(json.dumps(manifest))


def load_for_onnxruntime(src: Path, out: Path):
    from mixtral_trt import runtime

    return runtime.load(src, backend="onnxruntime")


STAGES = {
    "engine": lambda src, out: engine.build(src, out, progress=False),
    "lower_dir": lambda src, out: lowering.lower_dir(src, out, data="copy"),
    "convert": lambda src, out: precision.convert(src, out, "fp16", progress=False),
    "onnxruntime": load_for_onnxruntime,
}


# --- the source's manifest and hashes ------------------------------------------------------------


@pytest.mark.parametrize("stage", ["engine", "lower_dir"])
def test_flipped_byte_in_the_weights_is_refused(stage, small_export, tmp_path, no_tensorrt):
    src = copy_export(small_export, tmp_path / "src")
    flip_byte(src / DATA, (src / DATA).stat().st_size // 2)
    with pytest.raises(ManifestError, match=f"{DATA}: sha256 differs"):
        STAGES[stage](src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_verify_skips_only_the_hashes(small_export, tmp_path, no_tensorrt):
    src = copy_export(small_export, tmp_path / "src")
    flip_byte(src / DATA, 100)
    with pytest.raises(TensorRTTouched):  # the hashes were not checked, so the build went on to TensorRT
        engine.build(src, tmp_path / "out", progress=False, verify=False)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_data_file_that_is_a_link_is_refused(stage, small_export, tmp_path, no_tensorrt):
    # The link points at an identical copy: every hash matches, only the link is wrong.
    src = copy_export(small_export, tmp_path / "src")
    elsewhere = tmp_path / "elsewhere.data"
    shutil.move(src / DATA, elsewhere)
    (src / DATA).symlink_to(elsewhere)
    with pytest.raises(ValueError, match="symbolic link"):  # a ValueError: TensorRT was not reached
        STAGES[stage](src, tmp_path / "out")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None, reason="TensorRT-RTX is not installed")
def test_engine_command_refuses_a_flipped_byte(small_export, tmp_path):
    src = copy_export(small_export, tmp_path / "src")
    flip_byte(src / DATA, 7)
    result = CliRunner().invoke(main, ["engine", str(src), "--out", str(tmp_path / "e"), "--target", "tensorrt-rtx",
                                       "--quiet"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and "sha256 differs" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "e").exists()


# --- external data locations ---------------------------------------------------------------------


def _relocate(src: Path, tmp: Path, how: str) -> str:
    """Point the first initializer's external data somewhere onnx's rules forbid; returns the location."""
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    tensor = model.graph.initializer[0]
    info = {e.key: e for e in tensor.external_data}
    if how == "parent":
        shutil.copyfile(src / DATA, tmp / DATA)  # a real file, so a runtime following the path would succeed
        info["location"].value = f"../{DATA}"
    elif how == "absolute":
        info["location"].value = str((src / DATA).resolve())
    elif how == "link":
        (src / "weights.link").symlink_to(DATA)
        info["location"].value = "weights.link"
    elif how == "beyond":
        info["offset"].value = str((src / DATA).stat().st_size)
    (src / "model.onnx").write_bytes(model.SerializeToString())
    reseal(src)
    return info["location"].value


RULES = {"parent": "'..'", "absolute": "absolute path", "link": "symbolic link", "beyond": "beyond the end"}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("how", sorted(RULES))
def test_external_data_outside_the_rules_is_refused(how, stage, small_export, tmp_path, no_tensorrt):
    src = copy_export(small_export, tmp_path / "src")
    name = onnx.load(str(src / "model.onnx"), load_external_data=False).graph.initializer[0].name
    location = _relocate(src, tmp_path, how)
    expected = GenerationError if stage == "onnxruntime" else ExternalDataError
    with pytest.raises(expected) as info:
        STAGES[stage](src, tmp_path / "out")
    message = str(info.value)
    for fragment in (repr(name), repr(location), RULES[how]):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not (tmp_path / "out").exists()


# --- config fields that disagree -----------------------------------------------------------------

BASE = MixtralConfig(vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                     rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=64).to_hf()  # fmt: skip


def refused(raw: dict, *fragments: str) -> None:
    with pytest.raises(ConfigError) as info:
        MixtralConfig.from_hf({**BASE, **raw}, source="c/config.json")
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    {"rope_scaling": {"type": "default", "rope_theta": 10000.0}},
])  # fmt: skip
def test_two_rope_bases_are_refused(rope):
    # transformers 5 takes the base inside the RoPE object: the export would use another one.
    refused(rope, "rope_theta=1000000.0", "rope_theta=10000.0")


def test_rope_scaling_and_rope_parameters_that_disagree_are_refused():
    refused({"rope_theta": None, "rope_scaling": {"rope_type": "default", "rope_theta": 5e5},
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
            "rope_scaling.rope_theta=500000.0", "rope_parameters.rope_theta=10000.0")  # fmt: skip


@pytest.mark.parametrize("fields, fragments", [
    ({"num_local_experts": 4, "num_experts": 8}, ["num_local_experts=4", "num_experts=8"]),
    ({"torch_dtype": "float32", "dtype": "bfloat16"}, ["torch_dtype='float32'", "dtype='bfloat16'"]),
    ({"eos_token_id": [2, 32000]}, ["eos_token_id=[2, 32000]", "one"]),
])  # fmt: skip
def test_one_setting_given_two_values_is_refused(fields, fragments):
    refused(fields, *fragments)


def test_agreeing_spellings_are_accepted():
    raw = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "num_experts": 4,
           "dtype": "bfloat16", "eos_token_id": [2, 2]}
    del raw["num_local_experts"]  # transformers' other name for it
    cfg = MixtralConfig.from_hf(raw)
    assert (cfg.rope_theta, cfg.num_local_experts, cfg.eos_token_id) == (1e6, 4, 2)


def test_eos_of_config_and_generation_config_must_agree(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [32000]}))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    for fragment in ("eos_token_id=2", "eos_token_id=[32000]", "generation_config.json", "agree"):
        assert fragment in str(info.value)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    assert load_config(tmp_path).eos_token_id == 2


def test_accepted_rope_object_and_explicit_head_dim_match_transformers(tmp_path):
    """A config in transformers 5's form (base only in rope_parameters) with a head_dim other than
    hidden/heads exports to the logits transformers computes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ort = pytest.importorskip("onnxruntime")
    from mixtral_trt.export.onnx_export import export

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=5, num_hidden_layers=1, hidden_size=32, intermediate_size=48,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=24, num_local_experts=4,
                           vocab_size=200)  # fmt: skip
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 100.0}  # far from 1e6: a wrong base shows
    (ckpt / "config.json").write_text(json.dumps(raw))
    export(ckpt, tmp_path / "export", max_batch=1, max_seq_len=32, progress=False)
    session = ort.InferenceSession(lower_for_onnxruntime(onnx.load(str(tmp_path / "export/model.onnx"),
                                                                   load_external_data=False)).SerializeToString(),
                                   _options(ort, tmp_path / "export"), providers=["CPUExecutionProvider"])  # fmt: skip
    ids = np.arange(3, 23, dtype=np.int64)[None]
    feeds = {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None], "write_indices": np.zeros(1, np.int64)}
    feeds |= {i.name: np.zeros((1, 1, 32, 24), np.float32) for i in session.get_inputs() if i.name.startswith("past")}
    ours = session.run(["logits"], feeds)[0]
    hf = transformers.MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _options(ort, data_dir: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    return options


# --- MoETop2 attributes on ONNX Runtime ----------------------------------------------------------


@pytest.fixture(scope="module")
def canonical(small_export) -> onnx.ModelProto:
    return onnx.load(str(small_export / "model.onnx"), load_external_data=False)


def _set(node: onnx.NodeProto, **attrs) -> None:
    for name, value in attrs.items():
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])


@pytest.mark.parametrize("change, fragments", [
    ({"top_k": 5}, ["top_k=5", "num_experts=4"]),
    ({"top_k": 0}, ["top_k=0"]),
    ({"activation": "gelu"}, ["activation='gelu'", "swiglu"]),
    ({"quantization": "int4"}, ["quantization='int4'"]),
    ({"quantization": "int8"}, ["quantization='int8'", "6 inputs", "w13_scale"]),
    ({"num_experts": 3}, ["num_experts=3", "4 router rows"]),
    ({"inputs": ["s13", "s2"]}, ["quantization='none'", "4 inputs"]),
])  # fmt: skip
@pytest.mark.parametrize("moe", lowering.MOE_LOWERINGS)
def test_moe_attributes_onnxruntime_cannot_honour_are_refused(canonical, change, fragments, moe):
    model = onnx.ModelProto()
    model.CopyFrom(canonical)
    node = next(n for n in model.graph.node if n.op_type == moe_schema.MOE_OP)
    change = dict(change)
    node.input.extend(change.pop("inputs", []))
    _set(node, **change)
    with pytest.raises(LoweringError) as info:
        lower_for_onnxruntime(model, moe)
    for fragment in (node.name, *fragments):
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


# --- safetensors headers -------------------------------------------------------------------------


def test_deeply_nested_safetensors_header_is_refused(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="model.safetensors has a corrupt safetensors header.*nested"):
        read_header(path)


def test_deeply_nested_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_config(tmp_path)


def test_manifest_naming_a_file_outside_its_directory_is_refused(small_export, tmp_path):
    src = copy_export(small_export, tmp_path / "src")
    manifest = json.loads((src / MANIFEST).read_text())
    (tmp_path / "outside").write_bytes(b"x")
    manifest["files"]["../outside"] = {"bytes": 1, "sha256": "0" * 64}
    (src / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="'../outside': not a plain file name"):
        read_manifest(src)
    assert os.path.exists(tmp_path / "outside")


def test_main_job_verifies_a_reused_source_and_not_a_fresh_one(small_checkpoint, tmp_path, monkeypatch):
    from mixtral_trt.optimize import precision

    out, real, seen = tmp_path / "b", precision.convert, []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("verify"))
        return real(*args, **kwargs)

    monkeypatch.setattr(precision, "convert", recording)
    # bf16: OUT/bf16 and OUT/fp32 (for ONNX Runtime) are both converted from OUT/export
    args = ["--model", str(small_checkpoint), "--precision", "bf16", "--target", "onnxruntime", "--max-seq-len", "16",
            "--max-batch", "1", "--out", str(out), "--quiet"]  # fmt: skip
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert seen == [False, False]  # OUT/export was written by this run: not hashed a second time
    flip_byte(out / "export" / DATA, 3)
    shutil.rmtree(out / "fp32")  # rebuilt next run, from the reused (now altered) OUT/export
    second = CliRunner().invoke(main, args)
    assert seen == [False, False, True]
    assert second.exit_code == 1 and "sha256 differs" in second.output and "Traceback" not in second.output
