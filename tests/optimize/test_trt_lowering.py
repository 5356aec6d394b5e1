"""TensorRT lowering (a pure graph rewrite) and the engine stage's TensorRT-free helpers. No TensorRT needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import onnx
import pytest
from onnx import TensorProto, helper

from mixtral_trt.optimize import trt_compat
from mixtral_trt.optimize.trt_lowering import LoweringError, lower_for_tensorrt

MAX_SEQ = 32


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.export.tiny import default_tiny

    return export(default_tiny(), tmp_path_factory.mktemp("trt-lower") / "export", max_seq_len=MAX_SEQ, progress=False)


@pytest.fixture(scope="module")
def canonical(export_dir):
    return onnx.load(str(export_dir / "model.onnx"), load_external_data=False)


def _attrs(node):
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _cache_dims(values):
    return {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in values
            if vi.name.startswith(("past_key_values.", "present."))}  # fmt: skip


def test_each_moe_becomes_one_plugin_node_with_the_same_inputs(canonical):
    before = canonical.SerializeToString()
    lowered = lower_for_tensorrt(canonical, MAX_SEQ)
    assert canonical.SerializeToString() == before  # the input model is not touched

    moe = [n for n in canonical.graph.node if n.domain == "mixtral"]
    plugins = [n for n in lowered.graph.node if n.op_type == "MixtralMoETop2"]
    assert len(moe) == len(plugins) == 2  # one per decoder layer of the tiny model
    for old, new in zip(moe, plugins):
        assert new.domain == "trt.plugins" and new.name == old.name
        assert list(new.input) == list(old.input) and list(new.output) == list(old.output)
        assert _attrs(new) == {"num_experts": 8, "top_k": 2, "activation": "swiglu", "quantization": "none",
                               "plugin_version": "1", "plugin_namespace": "mixtral"}  # fmt: skip
    # everything else is the same graph: same nodes in the same order, same weights by reference
    others = [n for n in canonical.graph.node if n.domain != "mixtral"]
    assert [n for n in lowered.graph.node if n.op_type != "MixtralMoETop2"] == others
    assert list(lowered.graph.initializer) == list(canonical.graph.initializer)
    assert all(t.data_location == TensorProto.EXTERNAL for t in lowered.graph.initializer)
    assert {(o.domain, o.version) for o in lowered.opset_import} == {("", 24), ("trt.plugins", 1)}


def test_cache_length_is_pinned_and_batch_stays_dynamic(canonical):
    lowered = lower_for_tensorrt(canonical, MAX_SEQ)
    before = _cache_dims(canonical.graph.input) | _cache_dims(canonical.graph.output)
    after = _cache_dims(lowered.graph.input) | _cache_dims(lowered.graph.output)
    assert set(after) == set(before) and len(after) == 8  # 2 layers x key/value x in/out
    for name, dims in after.items():
        assert before[name] == ["batch", 2, "max_cache_len", 32], name
        assert dims == ["batch", 2, MAX_SEQ, 32], name
    assert lower_for_tensorrt(canonical, 16).graph.input[3].type.tensor_type.shape.dim[2].dim_value == 16


def test_lowered_graph_passes_the_onnx_checker(export_dir, canonical, tmp_path):
    shutil.copyfile(export_dir / "model.onnx.data", tmp_path / "model.onnx.data")  # the checker refuses links
    onnx.save(lower_for_tensorrt(canonical, MAX_SEQ), tmp_path / "model.onnx")
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_moe_function_goes_with_the_last_moe_node(canonical, target):
    """The canonical graph defines MoETop2 as a model-local function; once every node is lowered
    the function must go too (TensorRT's parser would otherwise see, or expand, the dense body)."""
    from mixtral_trt.optimize.lowering import lower_for_onnxruntime

    assert [(f.domain, f.name) for f in canonical.functions] == [("mixtral", "MoETop2")]
    lowered = lower_for_tensorrt(canonical, MAX_SEQ) if target == "tensorrt" else lower_for_onnxruntime(canonical)
    assert not lowered.functions
    assert "mixtral" not in {o.domain for o in lowered.opset_import}


# -- synthetic single-node graphs -------------------------------------------------------------


def _moe_graph(inputs, **attrs) -> onnx.ModelProto:
    attrs = {"num_experts": 4, "top_k": 2, "activation": "swiglu", "quantization": "none", **attrs}
    node = helper.make_node("MoETop2", inputs, ["y"], domain="mixtral", name="moe", **attrs)
    cache = ["batch", 1, "max_cache_len", 8]
    graph = helper.make_graph(
        [node, helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["T", 16]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, cache)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["T", 16]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT16, cache)],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid("mixtral", 1)])


def test_int8_node_keeps_its_scale_inputs():
    lowered = lower_for_tensorrt(_moe_graph(["x", "r", "w13", "w2", "s13", "s2"], quantization="int8"), 8)
    [node] = [n for n in lowered.graph.node if n.op_type == "MixtralMoETop2"]
    assert list(node.input) == ["x", "r", "w13", "w2", "s13", "s2"]
    assert _attrs(node)["quantization"] == "int8"


def test_trailing_empty_optional_inputs_are_dropped():
    lowered = lower_for_tensorrt(_moe_graph(["x", "r", "w13", "w2", "", ""]), 8)
    assert list(lowered.graph.node[0].input) == ["x", "r", "w13", "w2"]


@pytest.mark.parametrize(
    "inputs, attrs, words",
    [
        (["x", "r", "w13", "w2"], {"quantization": "int8"}, ["needs inputs", "w13_scale, w2_scale"]),
        (["x", "r", "w13", "w2", "s13", "s2"], {}, ["needs inputs (hidden, router, w13, w2)"]),
        (["x", "r", "w13", "w2"], {"top_k": 3}, ["moe:", "top_k=3"]),
        (["x", "r", "w13", "w2"], {"num_experts": 0}, ["num_experts=0"]),
        (["x", "r", "w13", "w2"], {"activation": "gelu"}, ["activation='gelu'"]),
    ],
)
def test_bad_moe_nodes_are_refused(inputs, attrs, words):
    with pytest.raises(LoweringError) as info:
        lower_for_tensorrt(_moe_graph(inputs, **attrs), 8)
    for word in words:
        assert word in str(info.value)


def test_a_graph_without_moe_or_with_bad_limits_is_refused(canonical):
    from mixtral_trt.optimize.lowering import lower_for_onnxruntime

    with pytest.raises(LoweringError, match="no mixtral.MoETop2 node"):
        lower_for_tensorrt(lower_for_onnxruntime(canonical), MAX_SEQ)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(LoweringError, match="max_seq_len"):
            lower_for_tensorrt(canonical, bad)
    fixed = lower_for_tensorrt(canonical, MAX_SEQ)
    del fixed.opset_import[:]
    fixed.opset_import.extend([helper.make_opsetid("", 24)])
    fixed.graph.node.append(helper.make_node("MoETop2", ["a", "b", "c", "d"], ["e"], domain="mixtral", num_experts=4))
    with pytest.raises(LoweringError, match="fixed length 32, not 16"):
        lower_for_tensorrt(fixed, 16)


# -- the TensorRT adapter and engine helpers without TensorRT ---------------------------------


def test_modules_import_without_tensorrt_and_say_what_to_install():
    """Run in a fresh interpreter where neither nvinfer module can be imported."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tensorrt"] = None
        sys.modules["tensorrt_rtx_bindings"] = None
        from mixtral_trt.optimize import engine, trt_compat, trt_lowering
        from mixtral_trt.plugins import moe_plugin
        for target in (None, "tensorrt", "tensorrt-rtx"):
            try:
                trt_compat.load(target)
            except trt_compat.TensorRTUnavailable as exc:
                print(target, "|", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = dict(line.split(" | ", 1) for line in out.strip().splitlines())
    assert "pip install tensorrt-cu13" in lines["None"]
    assert "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings" in lines["None"]
    assert "pip install tensorrt-cu13" in lines["tensorrt"] and "rtx" not in lines["tensorrt"]
    assert "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings" in lines["tensorrt-rtx"]


def test_target_names():
    assert trt_compat.normalize_target("tensorrt_rtx") == trt_compat.normalize_target("TensorRT-RTX") == "tensorrt-rtx"
    assert trt_compat.normalize_target(None) is None
    with pytest.raises(ValueError, match="'onnxruntime' is not one of"):
        trt_compat.normalize_target("onnxruntime")


def test_unversioned_library_link_is_made_once(tmp_path):
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"ELF")
    link = trt_compat.ensure_symlink(tmp_path, "libtensorrt_rtx.so", "libtensorrt_rtx.so.1")
    assert os.readlink(link) == "libtensorrt_rtx.so.1" and link.read_bytes() == b"ELF"
    assert trt_compat.ensure_symlink(tmp_path, "libtensorrt_rtx.so", "libtensorrt_rtx.so.1") == link
    assert trt_compat.ensure_symlink(tmp_path, "libother.so", "libother.so.1") is None  # nothing to point at


def test_unwritable_library_directory_names_the_ln_command(tmp_path, monkeypatch):
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"ELF")

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "symlink", refuse)
    with pytest.raises(trt_compat.TensorRTUnavailable) as info:
        trt_compat.ensure_symlink(tmp_path, "libtensorrt_rtx.so", "libtensorrt_rtx.so.1")
    assert f"ln -s libtensorrt_rtx.so.1 {tmp_path}/libtensorrt_rtx.so" in str(info.value)


def test_engine_limits_profiles_and_sm_names():
    from mixtral_trt.optimize import engine

    assert engine.normalize_sms(["89", "sm_120", "SM86", "8.9"]) == ["89", "120", "86"]
    with pytest.raises(engine.EngineBuildError, match="'ampere' is not a compute capability"):
        engine.normalize_sms(["ampere"])
    assert engine.profile_ranges(4, 512) == [
        {"name": "prefill", "batch": [1, 4, 4], "seq": [1, 128, 512]},
        {"name": "decode", "batch": [1, 4, 4], "seq": [1, 1, 1]},
    ]
    assert engine.profile_ranges(2, 16)[0]["seq"] == [1, 16, 16]
    manifest = {"export": {"max_batch": 8, "max_seq_len": 64}}
    assert engine._limits(manifest, None, None) == (8, 64)
    assert engine._limits(manifest, 2, 32) == (2, 32)
    with pytest.raises(engine.EngineBuildError, match=r"max_seq_len=65; expected 2..64"):
        engine._limits(manifest, None, 65)
    with pytest.raises(engine.EngineBuildError, match="max_batch=0"):
        engine._limits(manifest, 0, None)


def test_datacenter_tensorrt_refuses_an_sm_list():
    from mixtral_trt.optimize import engine

    datacenter = trt_compat.TensorRT(module=None, flavour="tensorrt", version="11.0.0")
    assert datacenter.aot_sms() == () and datacenter.manifest_target == "tensorrt"
    with pytest.raises(engine.EngineBuildError, match="datacenter TensorRT builds for the GPU of this machine"):
        engine.check_target_sms(datacenter, ["89"])


def test_engines_are_built_from_canonical_graphs_only(tmp_path):
    from mixtral_trt.export.stitch import io_table
    from mixtral_trt.export.tiny import tiny_config
    from mixtral_trt.manifest import write_manifest
    from mixtral_trt.optimize import engine

    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "model.onnx.data").write_bytes(b"")
    cfg = tiny_config()
    export_info = {"model_file": "model.onnx", "data_file": "model.onnx.data", "precision": "fp32", "max_batch": 1,
                   "max_seq_len": 16}  # fmt: skip
    body = {"config": cfg.to_dict(), "export": export_info, "io": io_table(cfg), "optimize": {"target": "onnxruntime"}}
    write_manifest(tmp_path, "optimize", body)
    with pytest.raises(engine.EngineBuildError, match="optimize output for target 'onnxruntime'"):
        engine.build(tmp_path, tmp_path.parent / "engine", progress=False)
    assert not (tmp_path.parent / "engine").exists()


def test_copy_cache_update_equals_tensor_scatter_on_onnxruntime(tmp_path):
    """The standard-op cache update (for Triton) writes exactly what TensorScatter writes."""
    import numpy as np
    import onnxruntime as ort

    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.export.tiny import default_tiny
    from mixtral_trt.optimize.lowering import lower_for_onnxruntime
    from mixtral_trt.optimize.trt_lowering import scatter_copy_nodes

    export_dir = export(default_tiny(), tmp_path / "export", max_seq_len=16, progress=False)
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    del copied.graph.node[:]
    for node in model.graph.node:
        copied.graph.node.extend(scatter_copy_nodes(node) if node.op_type == "TensorScatter" else [node])
    assert not [n for n in copied.graph.node if n.op_type == "TensorScatter"]

    rng = np.random.default_rng(0)
    B, S, L = 2, 3, 16
    feeds = {"input_ids": rng.integers(3, 32000, (B, S)), "position_ids": np.array([[4, 5, 6], [9, 10, 11]]),
             "write_indices": np.array([4, 9])}  # fmt: skip
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((B, 2, L, 32)).astype(np.float32)

    def run(m):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(export_dir))
        return ort.InferenceSession(lower_for_onnxruntime(m).SerializeToString(), options).run(None, feeds)

    for want, got in zip(run(model), run(copied)):
        np.testing.assert_array_equal(got, want)
