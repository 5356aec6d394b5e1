"""Structure of the canonical ONNX: the ops the design promises, the I/O contract, external weights."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from mixtral_trt.export import moe_op  # registers the mixtral.MoETop2 schema
from mixtral_trt.manifest import read_manifest, verify_files
from tests.conftest import make_checkpoint
from tests.export.conftest import MAX_SEQ, SMALL, export_small

L = SMALL["num_hidden_layers"]
ONNX_TYPES = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}


@pytest.fixture(scope="module")
def model(small_export) -> onnx.ModelProto:
    return onnx.load(str(small_export / "model.onnx"), load_external_data=False)


@pytest.fixture(scope="module")
def manifest(small_export) -> dict:
    return json.loads((small_export / "manifest.json").read_text())


def nodes_of(model: onnx.ModelProto, op_type: str, domain: str = "") -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type and n.domain == domain]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_checker_passes(small_export):
    assert onnx.defs.has(moe_op.MOE_OP, moe_op.MOE_DOMAIN)
    onnx.checker.check_model(str(small_export / "model.onnx"), full_check=True)


def test_opsets_and_domains(model):
    assert {o.domain: o.version for o in model.opset_import} == {"": 24, "mixtral": 1}
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "mixtral"}, domains
    for op in sorted({n.op_type for n in model.graph.node if n.domain == ""}):
        schema = onnx.defs.get_schema(op, max_inclusive_version=24, domain="")  # raises if not in opset 24
        assert not schema.deprecated, op


def test_one_moe_per_layer(model):
    moes = nodes_of(model, "MoETop2", "mixtral")
    assert len(moes) == L
    for i in range(L):
        (node,) = [n for n in moes if n.name.startswith(f"model.layers.{i}/")]
        a = attrs(node)
        assert a["num_experts"] == SMALL["num_local_experts"]
        assert a["top_k"] == 2
        assert a.get("quantization", b"none") == b"none"
        p = f"model.layers.{i}.block_sparse_moe"
        assert list(node.input[1:4]) == [f"{p}.gate.weight", f"{p}.experts.w13", f"{p}.experts.w2"]


@pytest.mark.parametrize(
    "op,per_layer,extra",
    [("RMSNormalization", 2, 1), ("RotaryEmbedding", 2, 0), ("TensorScatter", 2, 0), ("Attention", 1, 0)],
)
def test_standard_op_counts(model, op, per_layer, extra):
    found = nodes_of(model, op)
    assert len(found) == per_layer * L + extra
    for i in range(L):
        assert sum(n.name.startswith(f"model.layers.{i}/") for n in found) == per_layer, (op, i)


def test_kv_cache_written_by_tensor_scatter_and_read_by_attention(model):
    producer = {out: n for n in model.graph.node for out in n.output}
    for i in range(L):
        for kind, slot in (("key", 1), ("value", 2)):
            scatter = producer[f"present.{i}.{kind}"]
            assert scatter.op_type == "TensorScatter"
            assert scatter.input[0] == f"past_key_values.{i}.{kind}"
            assert scatter.input[2] == "write_indices"
            assert attrs(scatter)["axis"] == 2
            (attention,) = [n for n in nodes_of(model, "Attention") if n.name.startswith(f"model.layers.{i}/")]
            assert attention.input[slot] == f"present.{i}.{kind}"  # the whole cache, just updated
            assert attention.input[3] == "attention_mask"


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_io_matches_manifest(model, manifest):
    io = manifest["io"]
    for values, table in ((model.graph.input, io["inputs"]), (model.graph.output, io["outputs"])):
        assert [v.name for v in values] == [e["name"] for e in table]
        for v, e in zip(values, table):
            assert v.type.tensor_type.elem_type == ONNX_TYPES[e["dtype"]], v.name
            assert _dims(v) == e["shape"], v.name


def test_io_names_are_the_public_contract(manifest):
    K, D = SMALL["num_key_value_heads"], SMALL["hidden_size"] // SMALL["num_attention_heads"]
    inputs = {e["name"]: e for e in manifest["io"]["inputs"]}
    outputs = {e["name"]: e for e in manifest["io"]["outputs"]}
    assert inputs["input_ids"]["shape"] == ["batch", "seq"] and inputs["input_ids"]["dtype"] == "int64"
    assert inputs["position_ids"]["shape"] == ["batch", "seq"]
    assert inputs["write_indices"]["shape"] == ["batch"]
    assert outputs["logits"]["shape"] == ["batch", "seq", SMALL["vocab_size"]]
    for i in range(L):
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{kind}"]["shape"] == ["batch", K, "max_cache_len", D]
            assert outputs[f"present.{i}.{kind}"]["shape"] == ["batch", K, "max_cache_len", D]
    assert len(inputs) == 3 + 2 * L and len(outputs) == 1 + 2 * L


def test_manifest_hashes_match_files(small_export, manifest):
    verify_files(small_export, manifest)
    assert {"model.onnx", "model.onnx.data", "config.json"} <= set(manifest["files"])
    on_disk = {p.name for p in small_export.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():  # independently of mixtral_trt.manifest
        data = (small_export / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    read_manifest(small_export, "export")


def _external(init: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


def test_initializers_are_external(small_export, model):
    size = (small_export / "model.onnx.data").stat().st_size
    assert model.graph.initializer
    for init in model.graph.initializer:
        assert init.data_location == TensorProto.EXTERNAL, init.name
        assert not init.raw_data and not init.float_data, init.name
        ext = _external(init)
        assert ext["location"] == "model.onnx.data", init.name
        offset, length = int(ext["offset"]), int(ext["length"])
        assert offset % 4096 == 0, f"{init.name} is not page-aligned"
        itemsize = {TensorProto.FLOAT: 4, TensorProto.BFLOAT16: 2, TensorProto.FLOAT16: 2}[init.data_type]
        assert length == itemsize * int(np.prod(init.dims)), init.name
        assert offset + length <= size, init.name
    assert (small_export / "model.onnx").stat().st_size < 1 << 20  # weights are not inlined


def _read(export_dir: Path, init: onnx.TensorProto) -> np.ndarray:
    ext = _external(init)
    with open(export_dir / ext["location"], "rb") as f:
        f.seek(int(ext["offset"]))
        raw = f.read(int(ext["length"]))
    return np.frombuffer(raw, dtype="<f4").reshape(tuple(init.dims))


def test_initializer_bytes_are_the_checkpoint_weights(small_checkpoint, small_export, model):
    from safetensors.numpy import load_file

    ckpt = load_file(small_checkpoint / "model.safetensors")
    inits = {i.name: i for i in model.graph.initializer}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.1.self_attn.k_proj.weight", "model.layers.0.block_sparse_moe.gate.weight"):  # fmt: skip
        np.testing.assert_array_equal(_read(small_export, inits[name]), ckpt[name], err_msg=name)
    for i in range(L):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        E = SMALL["num_local_experts"]
        w13 = np.stack([np.concatenate([ckpt[f"{p}.{e}.w1.weight"], ckpt[f"{p}.{e}.w3.weight"]]) for e in range(E)])
        w2 = np.stack([ckpt[f"{p}.{e}.w2.weight"] for e in range(E)])
        np.testing.assert_array_equal(_read(small_export, inits[f"{p}.w13"]), w13)
        np.testing.assert_array_equal(_read(small_export, inits[f"{p}.w2"]), w2)
    theta, D = 1e6, SMALL["hidden_size"] // SMALL["num_attention_heads"]
    angles = np.arange(MAX_SEQ)[:, None] * theta ** (-np.arange(0, D, 2) / D)  # [P, D/2]
    np.testing.assert_allclose(_read(small_export, inits["rope.cos_cache"]), np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(_read(small_export, inits["rope.sin_cache"]), np.sin(angles), atol=1e-6)


# --- bfloat16 checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    ckpt = make_checkpoint(root / "ckpt", seed=11, torch_dtype="bfloat16", **SMALL)
    return ckpt, export_small(ckpt, root / "export"), root


def test_bf16_weights_stay_bf16_with_casts(bf16):
    _, export_dir, _ = bf16
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(str(export_dir / "model.onnx"))
    types = {i.name: i.data_type for i in model.graph.initializer}
    half = {n for n, t in types.items() if t == TensorProto.BFLOAT16}
    assert {n for n, t in types.items() if t != TensorProto.BFLOAT16} == {"rope.cos_cache", "rope.sin_cache"}
    casts = {n.input[0]: n for n in nodes_of(model, "Cast") if n.input[0] in types}
    assert set(casts) == half  # exactly one fp32 view of each bf16 weight
    assert all(attrs(c)["to"] == TensorProto.FLOAT for c in casts.values())
    consumers = collections.Counter(name for n in model.graph.node if n.op_type != "Cast" for name in n.input)
    assert not any(consumers[name] for name in half), "a bf16 initializer is used without its Cast"
    assert read_manifest(export_dir, "export")["export"]["weight_dtypes"] == ["bfloat16", "float32"]


def test_bf16_export_runs_on_onnxruntime_like_transformers(bf16):
    ort = pytest.importorskip("onnxruntime")
    transformers = pytest.importorskip("transformers")
    import torch

    from mixtral_trt.optimize.lowering import lower_export_dir

    ckpt, export_dir, root = bf16
    lowered = lower_export_dir(export_dir, root / "ort", data="copy")
    session = ort.InferenceSession(str(lowered / "model.onnx"), providers=["CPUExecutionProvider"])
    B, S, K, D = 2, 6, SMALL["num_key_value_heads"], SMALL["hidden_size"] // SMALL["num_attention_heads"]
    ids = np.random.default_rng(0).integers(3, SMALL["vocab_size"], (B, S))
    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(S), (B, 1)), "write_indices": np.zeros(B, np.int64)}
    for i in range(L):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((B, K, MAX_SEQ, D), np.float32)
    logits = session.run(["logits"], feeds)[0]
    assert np.isfinite(logits).all()

    hf = transformers.MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = hf.eval()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
