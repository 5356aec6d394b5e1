"""The MixtralMoETop2 plugin's TensorRT-free logic: fields, shapes, dtypes, workspace, enqueue guard.

No TensorRT needed: these are the plain functions the plugin class calls (the class itself is
exercised by tests/optimize/test_engine.py where TensorRT is installed).
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest

from mixtral_trt.plugins import moe_plugin as P

E, H, I, T = 8, 128, 256, 5  # experts, hidden, expert FFN, tokens


def _shapes(tokens=T, experts=E, hidden=H, inter=I, int8=False):
    shapes = [(tokens, hidden), (experts, hidden), (experts, 2 * inter, hidden), (experts, hidden, inter)]
    return shapes + [(experts, 2 * inter), (experts, hidden)] if int8 else shapes


# -- fields -----------------------------------------------------------------------------------


def test_identity_is_fixed():
    assert (P.PLUGIN_NAME, P.PLUGIN_VERSION, P.PLUGIN_NAMESPACE) == ("MixtralMoETop2", "1", "mixtral")
    assert P.FIELD_TYPES == {"num_experts": "INT32", "top_k": "INT32", "activation": "CHAR", "quantization": "CHAR"}


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_fields_round_trip_through_their_serialized_form(quantization):
    fields = P.MoEFields(num_experts=8, top_k=2, activation="swiglu", quantization=quantization)
    encoded = P.encode_fields(fields)
    assert [(n, k) for n, _, k in encoded] == list(P.FIELD_TYPES.items())
    by_name = {n: d for n, d, _ in encoded}
    assert by_name["num_experts"].dtype == np.int32 and by_name["num_experts"].tolist() == [8]
    assert by_name["activation"].tobytes() == b"swiglu\0"  # NUL-terminated, as the ONNX parser passes strings
    assert by_name["quantization"].tobytes() == quantization.encode() + b"\0"
    assert P.parse_fields(by_name) == fields
    # TensorRT may hand CHAR data back as uint8 arrays without the NUL
    assert P.parse_fields({"num_experts": np.array([8], np.int32), "activation": np.frombuffer(b"swiglu", np.uint8),
                           "quantization": quantization.encode()}) == fields  # fmt: skip


def test_missing_optional_fields_take_the_schema_defaults():
    assert P.parse_fields({"num_experts": 4}) == P.MoEFields(4, 2, "swiglu", "none")
    assert P.MoEFields(4).num_inputs == 4 and P.MoEFields(4, quantization="int8").num_inputs == 6


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"num_experts": 8, "top_k": 3}, ["top_k=3", "top-2"]),
        ({"num_experts": 8, "top_k": 1}, ["top_k=1"]),
        ({"num_experts": 0}, ["num_experts=0", "> 0"]),
        ({"num_experts": -4}, ["num_experts=-4"]),
        ({"num_experts": 1}, ["top_k=2 exceeds num_experts=1"]),
        ({"num_experts": 8, "activation": "gelu"}, ["activation='gelu'", "swiglu"]),
        ({"num_experts": 8, "quantization": "int4"}, ["quantization='int4'", "int8"]),
        ({"top_k": 2}, ["num_experts is missing"]),
        ({"num_experts": 8, "experts": 8}, ["unknown field", "experts"]),
        ({"num_experts": np.array([8, 8], np.int32)}, ["one INT32"]),
        ({"num_experts": 8, "activation": b"\xff\0"}, ["not an ASCII string"]),
    ],
)
def test_bad_fields_are_refused_naming_the_value(raw, words):
    with pytest.raises(P.PluginFieldError) as info:
        P.parse_fields(raw)
    for word in words:
        assert word in str(info.value)


# -- shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("int8", [False, True])
def test_matching_shapes_give_the_dims(int8):
    fields = P.MoEFields(E, quantization="int8" if int8 else "none")
    assert P.check_shapes(fields, _shapes(int8=int8)) == P.MoEDims(T, H, I, E)
    assert P.check_shapes(fields, _shapes(tokens=-1, int8=int8)) == P.MoEDims(-1, H, I, E)  # build time: T dynamic


def test_int8_without_scale_inputs_is_refused():
    with pytest.raises(P.PluginShapeError, match=r"4 inputs; expected 6 .*w13_scale and w2_scale"):
        P.check_shapes(P.MoEFields(E, quantization="int8"), _shapes())


def test_scales_without_int8_are_refused():
    with pytest.raises(P.PluginShapeError, match="6 inputs; expected 4"):
        P.check_shapes(P.MoEFields(E), _shapes(int8=True))


@pytest.mark.parametrize(
    "index, shape, words",
    [
        (1, (E, H + 1), ["router", "[8, 129]", "[E, H]"]),
        (1, (E - 1, H), ["router", "[7, 128]"]),
        (2, (E - 1, 2 * I, H), ["w13", "num_experts=8"]),
        (2, (E, 2 * I + 1, H), ["w13", "2*I"]),
        (2, (E, 2 * I, H + 2), ["w13", "[E, 2I, H]"]),
        (3, (E, H, I + 1), ["w2", "[E, H, I]", "[8, 128, 256]"]),
        (3, (E, H), ["w2", "rank 3"]),
        (0, (T, H, 1), ["hidden", "rank 2"]),
    ],
)
def test_dims_that_do_not_match_the_weights_are_refused(index, shape, words):
    shapes = _shapes()
    shapes[index] = shape
    with pytest.raises(P.PluginShapeError) as info:
        P.check_shapes(P.MoEFields(E), shapes)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("index, shape", [(4, (E, I)), (5, (E, H + 1)), (4, (E, 2 * I, 1))])
def test_bad_scale_shapes_are_refused(index, shape):
    shapes = _shapes(int8=True)
    shapes[index] = shape
    with pytest.raises(P.PluginShapeError, match="scale"):
        P.check_shapes(P.MoEFields(E, quantization="int8"), shapes)


# -- dtypes -----------------------------------------------------------------------------------


def test_supported_dtypes():
    plain, int8 = P.MoEFields(E), P.MoEFields(E, quantization="int8")
    ok = P.supports_dtypes
    for act in ("float32", "float16", "bfloat16"):
        assert ok(plain, 0, [act], 4)
        assert ok(plain, 1, [act, act], 4) and ok(plain, 1, [act, "float32"], 4)  # router: A or fp32
        assert ok(plain, 2, [act, act, act], 4) and ok(plain, 3, [act, act, act, act], 4)
        assert ok(plain, 4, [act, act, act, act, act], 4)  # output = A
        assert not ok(plain, 2, [act, act, "int8"], 4)  # int8 weights need quantization='int8'
        assert ok(int8, 2, [act, act, "int8"], 6) and not ok(int8, 2, [act, act, act], 6)
        assert ok(int8, 4, [act, act, "int8", "int8", "float16"], 6)
        assert ok(int8, 5, [act, act, "int8", "int8", "float16", "float32"], 6)
        assert not ok(int8, 5, [act, act, "int8", "int8", "float16", "bfloat16"], 6)
        assert ok(int8, 6, [act, act, "int8", "int8", "float16", "float16", act], 6)
    assert not ok(plain, 0, ["int8"], 4) and not ok(plain, 0, ["int64"], 4)
    assert not ok(plain, 1, ["float16", "bfloat16"], 4)
    assert not ok(plain, 4, ["float16", "float16", "float16", "float16", "float32"], 4)  # output must be A


# -- workspace --------------------------------------------------------------------------------


def test_workspace_equals_a_hand_computation():
    # T=100, H=64, I=96, E=8, k=2, fp16: A = 200 assignments, MT = ceil(200/128) + 8 = 10 tiles;
    # each region rounded up to 256 bytes (the layout of plugins/moe_top2/moe_top2.h)
    expected = (
        1024  # topk_ids int32 [200] = 800
        + 1024  # topk_weights fp32 [200] = 800
        + 256  # offsets int32 [9] = 36
        + 256  # counters int32 [4] = 16
        + 256  # active int32 [8] = 32
        + 1024  # permutation int32 [200] = 800
        + 256  # tiles int4 [10] = 160
        + 38400  # intermediate fp16 [200, 96]
        + 25600  # expert_out fp16 [200, 64]
    )
    assert P.workspace_bytes(100, 64, 96, 8, 2, 2) == expected == 68096
    assert P.workspace_bytes(0, 64, 96, 8, 2, 2) == 4 * 256  # no tokens: offsets, counters, active, tiles


def test_workspace_at_mixtral_dims():
    # Mixtral-8x7B in bf16. Decode of one token: A = 2, 9 tiles; 7 small regions of 256 bytes.
    T, H, I, E = 1, 4096, 14336, 8  # noqa: N806, E741
    assert P.workspace_bytes(T, H, I, E, 2, 2) == 7 * 256 + 2 * I * 2 + 2 * H * 2 == 75520
    # A 4096-token prefill: A = 8192, 72 tiles (1152 -> 1280 bytes); the activations dominate (~294 MB).
    rows = 4096 * 2
    assert P.workspace_bytes(4096, H, I, E, 2, 2) == 3 * 4 * rows + 3 * 256 + 1280 + rows * I * 2 + rows * H * 2
    # fp16/bf16 weights also reserve the sm_90a prefill's regions: row_of, up, GEMM arguments
    # (64 * (3E + 4) = 1792 bytes), CUTLASS's TMA descriptors; ~235 MB more at T=4096.
    grown = P.workspace_bytes(4096, H, I, E, 2, 2, sm90=True) - P.workspace_bytes(4096, H, I, E, 2, 2)
    assert grown == 4 * rows + rows * I * 2 + 1792 + 131072
    assert P.workspace_bytes(1, H, I, E, 2, 2, sm90=True) == 75520 + 256 + 2 * I * 2 + 1792 + 131072


def test_workspace_is_a_pure_monotone_function_of_shapes():
    base = dict(tokens=7, hidden=32, inter=48, experts=4, top_k=2, act_dtype_size=2)
    assert P.workspace_bytes(**base) == P.workspace_bytes(**base)
    for name, value in base.items():
        sizes = [P.workspace_bytes(**{**base, name: value * m}) for m in (1, 2, 3, 5)]
        assert sizes == sorted(sizes), name
    assert P.workspace_bytes(**{**base, "tokens": 64}) > P.workspace_bytes(**base)  # 7 -> 8 may stay in the padding
    for combo in itertools.product((1, 64), (8, 4096), (8, 14336), (2, 8)):
        size = P.workspace_bytes(*combo, 2, 2)
        assert size % P.WORKSPACE_ALIGN == 0
        assert size >= sum(n for _, n in P.workspace_regions(*combo, 2, 2))


@pytest.mark.parametrize("bad", [-1, 1.5, None, True])
def test_workspace_refuses_bad_sizes(bad):
    with pytest.raises(ValueError, match="workspace_bytes: tokens"):
        P.workspace_bytes(bad, 8, 8, 2, 2, 2)


# -- enqueue ----------------------------------------------------------------------------------


def test_enqueue_without_the_kernel_library_raises_and_computes_nothing(monkeypatch):
    import mixtral_trt.plugins

    monkeypatch.setitem(sys.modules, "mixtral_trt.plugins.kernels", None)  # as if not built
    monkeypatch.delattr(mixtral_trt.plugins, "kernels", raising=False)
    with pytest.raises(P.KernelLibraryMissing, match="kernel library is not built"):
        P.enqueue_kernels(P.MoEFields(E), _shapes(), ["float16"] * 4, [1, 2, 3, 4], 5, 6, 0)


@pytest.mark.parametrize("int8", [False, True])
def test_enqueue_passes_auto_within_the_reserved_workspace(monkeypatch, int8):
    """enqueue_kernels hands the kernels MOE_FLAG_AUTO with the shapes and dtype codes, and what
    get_workspace_size reserves for those weights is what the kernels ask for with that flag
    (int8 weights never take the sm_90a path: the flags-0 layout)."""
    import types

    import mixtral_trt.plugins
    from mixtral_trt.plugins import kernels as real

    seen = {}
    fake = types.SimpleNamespace(FLAG_AUTO=real.FLAG_AUTO, load_library=lambda: None,
                                 moe_top2_enqueue=lambda **kw: seen.update(kw))  # fmt: skip
    monkeypatch.setitem(sys.modules, "mixtral_trt.plugins.kernels", fake)
    monkeypatch.setattr(mixtral_trt.plugins, "kernels", fake, raising=False)
    dtypes = ["float16", "float16"] + (["int8", "int8", "float32", "float32"] if int8 else ["float16"] * 2)
    fields = P.MoEFields(E, quantization="int8" if int8 else "none")
    P.enqueue_kernels(fields, _shapes(int8=int8), dtypes, list(range(1, 7 if int8 else 5)), 9, 10, 11)
    assert seen["flags"] == real.FLAG_AUTO == 64
    assert (seen["tokens"], seen["hidden_size"], seen["inter_size"], seen["num_experts"]) == (T, H, I, E)
    assert seen["weight_dtype"] == P.KERNEL_DTYPES["int8" if int8 else "float16"]
    assert (seen["workspace"], seen["stream"], seen["out"]) == (10, 11, 9)


@pytest.mark.slow
def test_workspace_formula_is_the_kernel_librarys():
    """The plugin reserves what the CUDA kernels use: compare with their C ABI (built with nvcc, ~1 min)."""
    import ctypes

    build = pytest.importorskip("mixtral_trt.plugins.build")
    try:
        library = build.build_library(archs=("80",), verbose=False)
    except build.BuildError as exc:
        pytest.skip(f"the kernel library cannot be built here: {exc}")
    size = ctypes.CDLL(str(library)).mixtral_moe_top2_workspace_size_flags
    size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_int] * 7
    shapes = itertools.product((0, 1, 7, 64, 129, 4096), (64, 4096), (64, 14336), (2, 8, 256))
    for T, H, I, E in shapes:  # noqa: N806, E741
        for code in (P.KERNEL_DTYPES["float16"], P.KERNEL_DTYPES["bfloat16"]):
            assert size(T, H, I, E, 2, code, 0) == P.workspace_bytes(T, H, I, E, 2, 2), (T, H, I, E, code)
            auto = size(T, H, I, E, 2, code, 64)  # MOE_FLAG_AUTO, what the plugin enqueues with
            assert auto == P.workspace_bytes(T, H, I, E, 2, 2, sm90=True), (T, H, I, E, code)
