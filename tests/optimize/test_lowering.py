"""The ONNX Runtime lowerings of MoETop2: contrib MoE and the standard-op decomposition agree."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mixtral_trt.export import moe_op

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.export.tiny import default_tiny

    return export(default_tiny(), tmp_path_factory.mktemp("lower") / "export", max_seq_len=16, progress=False)


def _prefill(model_path, cfg_layers=2, kv=2, head_dim=32):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    B, S, L = 2, 6, 16
    feeds = {
        "input_ids": np.arange(1, 1 + B * S, dtype=np.int64).reshape(B, S) * 97,
        "position_ids": np.tile(np.arange(S), (B, 1)),
        "write_indices": np.zeros(B, np.int64),
    }
    for i in range(cfg_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((B, kv, L, head_dim), np.float32)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("moe", ["contrib", "decomposed"])
def test_lowered_graph_has_no_custom_op_and_its_own_weights(export_dir, tmp_path, moe):
    from mixtral_trt.manifest import read_manifest
    from mixtral_trt.optimize.lowering import lower_export_dir

    out = lower_export_dir(export_dir, tmp_path / moe, moe=moe, data="copy")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.domain == moe_op.MOE_DOMAIN]
    assert {o.domain for o in model.opset_import} == ({"", "com.microsoft"} if moe == "contrib" else {""})
    assert (out / "model.onnx.data").stat().st_nlink == 1 == (export_dir / "model.onnx.data").stat().st_nlink
    manifest = read_manifest(out, "optimize")  # verifies every file's sha256
    assert manifest["optimize"]["moe"] == moe
    onnx.checker.check_model(str(out / "model.onnx"))  # onnx refuses a multiply-linked data file


def test_lower_dir_moves_or_copies_the_data_only_when_asked(export_dir, tmp_path):
    import shutil

    from mixtral_trt.manifest import read_manifest
    from mixtral_trt.optimize.lowering import lower_dir

    with pytest.raises(ValueError, match="data='copy'.*data='move'.*in memory when it loads it"):
        lower_dir(export_dir, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    staging = tmp_path / "staging"
    shutil.copytree(export_dir, staging)
    inode = (staging / "model.onnx.data").stat().st_ino
    out = lower_dir(staging, tmp_path / "moved", data="move")
    assert (out / "model.onnx.data").stat().st_ino == inode and not (staging / "model.onnx.data").exists()
    assert (out / "model.onnx.data").stat().st_nlink == 1
    read_manifest(out, "optimize")  # every sha256 still matches


def test_contrib_and_decomposed_agree_with_the_eager_op(export_dir, tmp_path):
    from mixtral_trt.optimize.lowering import lower_export_dir

    contrib = _prefill(lower_export_dir(export_dir, tmp_path / "c", "contrib", "copy") / "model.onnx")
    dense = _prefill(lower_export_dir(export_dir, tmp_path / "d", "decomposed", "copy") / "model.onnx")
    np.testing.assert_allclose(contrib, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_lowerings_match_numpy_reference(tmp_path, k):
    """One MoETop2 node on random data, lowered both ways and through its model-local function,
    against a numpy implementation."""
    from onnx import TensorProto, helper

    from mixtral_trt.export.moe_schema import set_function
    from mixtral_trt.optimize.lowering import lower_for_onnxruntime

    T, H, I, E = 9, 24, 40, 5
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, H)).astype(np.float32)
    router = rng.standard_normal((E, H)).astype(np.float32)
    w13 = (rng.standard_normal((E, 2 * I, H)) / H**0.5).astype(np.float32)
    w2 = (rng.standard_normal((E, H, I)) / I**0.5).astype(np.float32)

    logits = x @ router.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.zeros((T, H), np.float64)
    for t in range(T):
        top = np.argsort(-probs[t])[:k]
        weights = probs[t, top] / probs[t, top].sum()
        for e, wgt in zip(top, weights):
            g, u = w13[e, :I] @ x[t], w13[e, I:] @ x[t]
            expected[t] += wgt * (w2[e] @ (g / (1 + np.exp(-g)) * u))

    node = helper.make_node("MoETop2", ["x", "router", "w13", "w2"], ["y"], domain="mixtral", name="moe",
                            num_experts=E, top_k=k, activation="swiglu", quantization="none")  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])],
        [onnx.numpy_helper.from_array(a, n) for a, n in ((router, "router"), (w13, "w13"), (w2, "w2"))],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid("mixtral", 1)])
    onnx.checker.check_model(model)
    eager = moe_op.moe_top2(*(torch.from_numpy(a) for a in (x, router, w13, w2)), E, k).numpy()
    np.testing.assert_allclose(eager, expected, atol=1e-5)
    for moe in ("contrib", "decomposed"):
        session = ort.InferenceSession(lower_for_onnxruntime(model, moe).SerializeToString())
        np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, atol=1e-5, err_msg=moe)
    set_function(model, "none")
    session = ort.InferenceSession(model.SerializeToString())  # ONNX Runtime inlines the function
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, atol=1e-5, err_msg="function")
