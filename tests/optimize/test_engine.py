"""Engine builds with TensorRT-RTX (ahead of time, no GPU needed) or datacenter TensorRT (needs a GPU).

What a green run here means: every node of the tiny model's graph parses, the MoE becomes our
Python IPluginV3 (nothing falls back to "Plugin not found"), TensorScatter becomes the
KV-cache-update layer, the profiles and dtypes are legal, and the plan is written with a
manifest the runtime backend accepts. It does not mean the engine runs on a GPU.
"""

from __future__ import annotations

import errno
import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixtral_trt.manifest import read_manifest
from mixtral_trt.optimize import engine, trt_compat
from mixtral_trt.optimize.engine import EngineBuildError
from mixtral_trt.plugins import moe_plugin as P

pytestmark = pytest.mark.tensorrt

MAX_BATCH, MAX_SEQ = 4, 64
LAYERS = 2  # the built-in tiny model
CACHE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float16"}


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def trt():
    """TensorRT-RTX when installed (it builds without a GPU), else datacenter TensorRT on a GPU machine."""
    try:
        return trt_compat.load("tensorrt-rtx")
    except ImportError:
        pass
    try:
        found = trt_compat.load("tensorrt")
    except ImportError as exc:
        pytest.skip(f"neither tensorrt nor tensorrt_rtx_bindings imports: {exc}")
    if not _has_gpu():
        pytest.skip("datacenter TensorRT builds need a GPU; TensorRT-RTX is not installed")
    return found


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.export.tiny import default_tiny

    out = tmp_path_factory.mktemp("engine") / "export"
    return export(default_tiny(), out, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)


@pytest.fixture(scope="module")
def source(export_dir, tmp_path_factory):
    """precision -> source directory: the export (fp32) or a canonical precision conversion."""
    made = {"fp32": export_dir}

    def get(precision: str):
        if precision not in made:
            try:
                from mixtral_trt.optimize.precision import convert
            except ImportError:
                pytest.skip("optimize/precision.py (convert) is not there: only fp32 is built")
            made[precision] = convert(export_dir, tmp_path_factory.mktemp(precision) / "src", precision, progress=False)
        return made[precision]

    return get


@pytest.fixture(scope="module")
def built(trt, source, tmp_path_factory):
    """precision -> engine directory, built once per module."""
    done = {}

    def get(precision: str):
        if precision not in done:
            out = tmp_path_factory.mktemp(f"engine-{precision}") / "engine"
            done[precision] = engine.build(source(precision), out, target=trt.flavour, progress=False)
        return done[precision]

    return get


def _network_io(trt, network) -> dict[str, dict]:
    """Read straight from the network: name -> (mode, dtype, dims), independent of engine.network_io."""
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64"}
    tensors = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    tensors += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    return {t.name: (mode, names[t.dtype.name], list(t.shape)) for mode, t in tensors}


# -- the tiny model, every precision ------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_engine_builds_with_the_plugin_and_kv_cache_layers(trt, built, precision):
    from mixtral_trt.runtime.backends.tensorrt import engine_spec

    out = built(precision)
    manifest = read_manifest(out, "engine")  # re-hashes model.plan and the tokenizer files
    eng = manifest["engine"]
    layers = eng["layers"]
    assert layers["PLUGIN_V3"] == LAYERS  # one MixtralMoETop2 per MoE layer, none fell back
    assert layers["KV_CACHE_UPDATE"] == 2 * LAYERS  # key and value of each decoder layer
    assert layers["ATTENTION_INPUT"] == layers["ATTENTION_OUTPUT"] == LAYERS
    assert eng["attention_decomposable"] is True and eng["strongly_typed"] is True
    assert eng["precision"] == precision and eng["cache_dtype"] == CACHE_DTYPES[precision]
    assert eng["target"] == trt.manifest_target and eng["trt_version"] == trt.version
    if trt.is_rtx:
        assert eng["target_sms"] == ["sm_89", "sm_120"] and eng["timing_cache"] is None
    assert eng["plugins"] == [{"name": "MixtralMoETop2", "version": "1", "namespace": "mixtral", "library": None,
                               "sha256": None, "python": "mixtral_trt.plugins.moe_plugin"}]  # fmt: skip
    assert [p["name"] for p in eng["profiles"]] == ["prefill", "decode"]
    assert eng["profiles"][0]["batch"] == [1, MAX_BATCH, MAX_BATCH] and eng["profiles"][0]["seq"][2] == MAX_SEQ
    assert eng["profiles"][1]["seq"] == [1, 1, 1]
    assert (out / "model.plan").stat().st_size > 1 << 20 and (out / "tokenizer.model").is_file()
    assert not list(out.glob("*.onnx*"))  # the plan holds the weights; the graph does not come along
    spec = engine_spec(out, manifest)  # what the runtime backend reads
    assert spec.cache_dtype == CACHE_DTYPES[precision] and spec.plugins[0]["namespace"] == "mixtral"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_manifest_io_table_is_the_network_io(trt, source, built, precision):
    manifest = json.loads((built(precision) / "manifest.json").read_text())
    parsed = engine.parse(source(precision), target=trt.flavour)
    assert parsed.parser.num_errors == 0
    assert engine.inspect_network(parsed.network) == manifest["engine"]["layers"]
    actual = _network_io(trt, parsed.network)
    table = [("input", e) for e in manifest["io"]["inputs"]] + [("output", e) for e in manifest["io"]["outputs"]]
    assert [e["name"] for _, e in table] == list(actual)  # same tensors, same order
    for mode, e in table:
        net_mode, dtype, dims = actual[e["name"]]
        assert (mode, e["dtype"]) == (net_mode, dtype), e["name"]
        assert len(dims) == len(e["shape"]), e["name"]
        for d, m in zip(dims, e["shape"]):
            assert (d == -1 and isinstance(m, str)) or d == m, (e["name"], dims, e["shape"])
    cache = next(e for e in manifest["io"]["inputs"] if e["name"] == "past_key_values.1.value")
    assert cache["shape"] == ["batch", 2, MAX_SEQ, 32] and cache["dtype"] == CACHE_DTYPES[precision]
    # the public names are the export's, in the export's order
    export_io = json.loads((source("fp32") / "manifest.json").read_text())["io"]
    assert [e["name"] for e in manifest["io"]["inputs"]] == [e["name"] for e in export_io["inputs"]]
    assert [e["name"] for e in manifest["io"]["outputs"]] == [e["name"] for e in export_io["outputs"]]


def test_every_attention_is_marked_decomposable(trt, export_dir):
    parsed = engine.parse(export_dir, target=trt.flavour)
    assert parsed.attention_layers == LAYERS
    net = parsed.network
    for i in range(net.num_layers):
        layer = engine._downcast(trt.module, net.get_layer(i))
        if layer.type.name.startswith("ATTENTION_"):
            assert layer.attention.decomposable is True


def test_shorter_limits_pin_a_shorter_cache(trt, export_dir, tmp_path):
    out = engine.build(export_dir, tmp_path / "e", target=trt.flavour, max_batch=2, max_seq_len=32, progress=False)
    manifest = read_manifest(out, "engine", verify=False)
    assert manifest["export"]["max_seq_len"] == 32 and manifest["export"]["max_batch"] == 2
    assert manifest["io"]["inputs"][3]["shape"] == ["batch", 2, 32, 32]
    assert manifest["engine"]["profiles"][0] == {"name": "prefill", "batch": [1, 2, 2], "seq": [1, 32, 32]}


# -- refusals -------------------------------------------------------------------------------


def test_unsupported_sm_names_the_supported_list(trt, export_dir, tmp_path):
    if not trt.is_rtx:
        pytest.skip("ahead-of-time SM lists are a TensorRT-RTX feature")
    supported = ", ".join(trt.aot_sms())
    assert {"89", "120"} <= set(trt.aot_sms()) and "90" not in trt.aot_sms()
    with pytest.raises(EngineBuildError) as info:
        engine.build(export_dir, tmp_path / "e", target=trt.flavour, sms=["89", "90"], progress=False)
    assert "cannot build for SM 90" in str(info.value) and f"supported: {supported}" in str(info.value)
    assert not (tmp_path / "e").exists()


def test_too_long_max_seq_len_is_refused(trt, export_dir, tmp_path):
    with pytest.raises(EngineBuildError, match=rf"max_seq_len={MAX_SEQ + 1}; expected 2..{MAX_SEQ}"):
        engine.build(export_dir, tmp_path / "e", target=trt.flavour, max_seq_len=MAX_SEQ + 1, progress=False)


def test_plugin_registered_under_another_version_is_not_found(trt, export_dir, monkeypatch):
    registry = trt.module.get_plugin_registry()
    ours = P.register(trt.module)
    other = P.plugin_classes(trt.module)[1](version="2")
    register = P.register
    assert registry.deregister_creator(ours)
    try:
        assert registry.register_creator(other, P.PLUGIN_NAMESPACE)
        monkeypatch.setattr(P, "register", lambda module: other)  # the build must not put ours back
        with pytest.raises(EngineBuildError) as info:
            engine.parse(export_dir, target=trt.flavour)
    finally:
        monkeypatch.undo()
        registry.deregister_creator(other)
        register(trt.module)
    message = str(info.value)
    assert "Plugin not found, are the plugin name, version, and namespace correct?" in message  # TensorRT's words
    assert "op MixtralMoETop2" in message
    assert "asks for plugin MixtralMoETop2 version 1 namespace 'mixtral'" in message
    assert "registered under that name: MixtralMoETop2 version 2 namespace 'mixtral'" in message
    assert ("MixtralMoETop2", "1", "mixtral") in P.registered(trt.module)


def test_failed_plan_write_leaves_no_partial_output(trt, export_dir, tmp_path, monkeypatch):
    good = engine.build(export_dir, tmp_path / "engine", target=trt.flavour, progress=False)
    before = (good / "model.plan").read_bytes()

    real_write = engine._PlanFile.write

    def disk_full(self, data):  # half of the first write lands, then the disk is full
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine._PlanFile, "write", disk_full)
    for out in (tmp_path / "engine", tmp_path / "fresh"):
        with pytest.raises(OSError, match="No space left"):
            engine.build(export_dir, out, target=trt.flavour, progress=False)
    assert not (tmp_path / "fresh").exists()
    assert (good / "model.plan").read_bytes() == before  # the previous engine is intact
    read_manifest(good, "engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no *.partial-* left behind


def test_plan_is_streamed_to_disk_and_hashed(trt, export_dir, tmp_path, monkeypatch):
    """The builder streams the plan (build_serialized_network_to_stream) when it can; either way
    model.plan is what TensorRT serialized and the manifest's sha256 is its hash."""
    writes = []
    real_write = engine._PlanFile.write

    def counted(self, data):
        writes.append(len(data))
        real_write(self, data)

    monkeypatch.setattr(engine._PlanFile, "write", counted)
    out = engine.build(export_dir, tmp_path / "engine", target=trt.flavour, progress=False)
    plan = (out / "model.plan").read_bytes()
    assert sum(writes) == len(plan) > 0
    assert read_manifest(out, "engine", verify=True)["files"]["model.plan"]["sha256"] == hashlib.sha256(plan).hexdigest()
    streamed = hasattr(trt.module.Builder, "build_serialized_network_to_stream")
    if trt.is_rtx:
        assert streamed  # TensorRT-RTX 1.7 streams (datacenter TensorRT since 10.x; older ones take the other branch)


def test_timing_cache_is_saved_and_reused(trt, export_dir, tmp_path):
    if trt.is_rtx:
        pytest.skip("TensorRT-RTX has no timing cache (its timing-cache calls are deprecated no-ops)")
    cache = tmp_path / "timing.cache"
    engine.build(export_dir, tmp_path / "a", target=trt.flavour, timing_cache=cache, progress=False)
    first = cache.read_bytes()
    assert first
    engine.build(export_dir, tmp_path / "b", target=trt.flavour, timing_cache=cache, progress=False)
    assert len(cache.read_bytes()) >= len(first)
    engine.build(export_dir, tmp_path / "c", target=trt.flavour, progress=False)
    assert engine.default_timing_cache(tmp_path / "c", trt).is_file()


# -- the plugin alone -----------------------------------------------------------------------

E, H, I = 4, 32, 64  # noqa: E741


def _moe_model(act: str, quant: str, scale: str = "float16", w2_cols: int = I) -> onnx.ModelProto:
    import ml_dtypes

    dt = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16),
          "bfloat16": (ml_dtypes.bfloat16, TensorProto.BFLOAT16)}  # fmt: skip
    rng = np.random.default_rng(0)
    np_act, onnx_act = dt[act]
    wt = np.int8 if quant == "int8" else np_act
    arrays = {"router": rng.standard_normal((E, H)).astype(np_act),
              "w13": rng.standard_normal((E, 2 * I, H)).astype(wt),
              "w2": rng.standard_normal((E, H, w2_cols)).astype(wt)}  # fmt: skip
    if quant == "int8":
        arrays |= {"s13": rng.random((E, 2 * I)).astype(dt[scale][0]), "s2": rng.random((E, H)).astype(dt[scale][0])}
    node = helper.make_node(P.PLUGIN_NAME, ["x", *arrays], ["y"], domain="trt.plugins", name="moe", num_experts=E,
                            top_k=2, activation="swiglu", quantization=quant, plugin_version="1",
                            plugin_namespace="mixtral")  # fmt: skip
    graph = helper.make_graph(
        [node], "moe", [helper.make_tensor_value_info("x", onnx_act, ["T", H])],
        [helper.make_tensor_value_info("y", onnx_act, ["T", H])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid("trt.plugins", 1)])


def _parse_alone(trt, model):
    T = trt.module
    P.register(T)
    trt_compat.ensure_rtx_unversioned_library(trt)
    builder = T.Builder(trt.logger())
    network = builder.create_network(trt.network_flags())
    parser = T.OnnxParser(network, trt.logger())
    ok = parser.parse(model.SerializeToString())
    return builder, network, parser, ok


@pytest.mark.parametrize(
    "act, quant, scale",
    [("float32", "none", None), ("float16", "none", None), ("bfloat16", "none", None),
     ("float16", "int8", "float16"), ("bfloat16", "int8", "float32")],
)  # fmt: skip
def test_plugin_builds_for_each_dtype(trt, act, quant, scale):
    if not trt.is_rtx and not _has_gpu():
        pytest.skip("needs a GPU")
    builder, network, parser, ok = _parse_alone(trt, _moe_model(act, quant, scale or "float16"))
    assert ok and parser.num_errors == 0
    assert engine.inspect_network(network)["PLUGIN_V3"] == 1
    out = network.get_output(0)
    assert engine.dtype_name(out.dtype) == act and list(out.shape) == [-1, H]  # output = hidden's dtype and dims
    config = builder.create_builder_config()
    if trt.is_rtx:
        trt.set_target_sms(config, ["89"])
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, H), (8, H), (64, H))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None, P.take_errors()


def test_plugin_refuses_weights_that_do_not_match(trt):
    P.take_errors()
    _, _, parser, ok = _parse_alone(trt, _moe_model("float32", "none", w2_cols=I + 1))
    assert not ok and parser.num_errors == 1
    assert "Invalid Node - moe" in parser.get_error(0).desc()
    assert P.take_errors() == [
        "get_output_shapes: MixtralMoETop2: w2 has shape [4, 32, 65]; expected [E, H, I] = [4, 32, 64] from "
        "hidden [-1, 32], w13 [4, 128, 32] and num_experts=4"
    ]


def test_plugin_serialization_round_trip_through_the_creator(trt):
    T = trt.module
    creator = P.register(T)
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == ("MixtralMoETop2", "1", "mixtral")
    assert [f.name for f in creator.field_names] == list(P.FIELD_TYPES)
    fc = T.PluginFieldCollection([
        T.PluginField("num_experts", np.array([8], np.int32), T.PluginFieldType.INT32),
        T.PluginField("quantization", np.frombuffer(b"int8\0", np.int8), T.PluginFieldType.CHAR),
    ])  # fmt: skip
    plugin = creator.create_plugin("moe", fc, T.TensorRTPhase.BUILD)
    assert plugin.fields == P.MoEFields(8, 2, "swiglu", "int8")
    assert (plugin.plugin_name, plugin.plugin_version, plugin.plugin_namespace) == ("MixtralMoETop2", "1", "mixtral")
    serialized = plugin.get_fields_to_serialize()
    assert [f.name for f in serialized] == list(P.FIELD_TYPES)
    again = creator.create_plugin("moe", serialized, T.TensorRTPhase.RUNTIME)
    assert again.fields == plugin.fields and again.phase == T.TensorRTPhase.RUNTIME
    plugin.set_tactic(0)
    clone = plugin.clone()
    assert clone is not plugin and clone.fields == plugin.fields
    attached = again.attach_to_context(None)
    assert attached is not again and attached.fields == again.fields
    for kind in ("CORE", "BUILD", "RUNTIME"):
        assert plugin.get_capability_interface(getattr(T.PluginCapabilityType, kind)) is plugin
    bad = T.PluginFieldCollection([T.PluginField("num_experts", np.array([0], np.int32), T.PluginFieldType.INT32)])
    with pytest.raises(P.PluginFieldError, match="num_experts=0"):
        creator.create_plugin("moe", bad, T.TensorRTPhase.BUILD)
    P.take_errors()


def test_inspect_prints_an_engine_manifest(trt, built):
    """`mixtral-build inspect`: the engine's target, version, SMs, profiles, plugin and I/O, readably."""
    from click.testing import CliRunner

    from mixtral_trt.cli import main

    result = CliRunner().invoke(main, ["inspect", str(built("int8"))])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.startswith("engine artifact (format mixtral-trt v1)")
    assert f"engine     {trt.manifest_target} {trt.version}, precision int8, cache float16" in text
    assert "profile    " in text and "prefill" in text and "decode" in text
    assert "plugin     mixtral::MixtralMoETop2 v1 from Python creator (mixtral_trt.plugins)" in text
    assert "input      input_ids" in text and "(x2 layers, key and value)" in text
    assert "output     logits" in text
    assert "int8 weights: experts, attention projections (fp16: LM head, router)" in text
