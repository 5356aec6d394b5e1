"""Our graphs open in the ecosystem's own tools: onnx's checker in a process that never saw our
schema, ``polygraphy inspect model`` and ``polygraphy run --onnxrt`` (no custom-op library), on
the export, the canonical precision outputs and the ONNX Runtime lowering. The canonical graphs
run through their ``mixtral.MoETop2`` model-local function; its numbers are checked against the
ONNX Runtime kernels (QMoE / MoE) the lowering uses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import pytest
from onnx import TensorProto

from tests.conftest import load_module, make_checkpoint
from tests.export.conftest import MAX_BATCH, MAX_SEQ, SMALL

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")

ROOT = Path(__file__).resolve().parents[2]
HEAD_DIM = SMALL["hidden_size"] // SMALL["num_attention_heads"]
CANONICAL = ("fp32", "fp16", "bf16", "int8")
DIRS = ("export", *CANONICAL, "onnxruntime")
FLOAT, FP16 = TensorProto.FLOAT, TensorProto.FLOAT16
ACT = {"fp32": FLOAT, "fp16": FP16, "bf16": TensorProto.BFLOAT16, "int8": FP16}
# Polygraphy's notes about the environment, not about a graph.
ENVIRONMENT = re.compile(r"'colored' module is not installed")
# What Polygraphy and ONNX Runtime print when a graph leaves a dim symbolic or unknown.
DIM_WARNING = re.compile(r"BoundedShape|Will generate data of shape|symbolic|unknown|dynamic|dim_param|"
                         r"merging shape|lenient", re.IGNORECASE)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every kind of output in its own directory, each data file linked once."""
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.optimize.lowering import lower_dir
    from mixtral_trt.optimize.precision import convert

    root = tmp_path_factory.mktemp("tools")
    dirs = {"export": export(make_checkpoint(root / "ckpt", seed=3, **SMALL), root / "export", max_batch=MAX_BATCH,
                             max_seq_len=MAX_SEQ, progress=False)}  # fmt: skip
    for precision in CANONICAL:
        dirs[precision] = convert(dirs["export"], root / precision, precision, progress=False)
    dirs["onnxruntime"] = lower_dir(dirs["fp32"], root / "onnxruntime", data="copy")
    data = dirs["onnxruntime"] / "model.onnx.data"
    if data.stat().st_nlink > 1:  # the lowering links its source's data; the layout is not what is tested here
        shutil.copyfile(data, root / "data.copy")
        os.replace(root / "data.copy", data)
    return dirs


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}  # a fresh interpreter: nothing of ours imported
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def _warnings(output: str) -> list[str]:
    lines = [ln for ln in output.splitlines() if re.search(r"\[W\]|\[E\]|\[W:onnxruntime|\[E:onnxruntime", ln)]
    return [ln for ln in lines if not ENVIRONMENT.search(ln)]


# In a fresh interpreter: onnx's checker (with strict shape inference), then the element type onnx
# infers for each MoETop2 output, which it can only know from the model's own function.
CHECK = """
import sys, onnx
onnx.checker.check_model(sys.argv[1], full_check=True)
model = onnx.load(sys.argv[1], load_external_data=False)
types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
moe = [types.get(n.output[0], 0) for n in model.graph.node if n.op_type == "MoETop2"]
print(onnx.defs.has("MoETop2", "mixtral"), moe, [f.name for f in model.functions])
"""


@pytest.mark.parametrize("name", DIRS)
def test_checker_and_type_inference_without_our_schema(built, name):
    result = _run(sys.executable, "-c", CHECK, str(built[name] / "model.onnx"))
    assert result.returncode == 0, result.stderr[-2000:]
    layers = SMALL["num_hidden_layers"]
    if name == "onnxruntime":  # every MoETop2 lowered, the function gone with them
        expected = "False [] []"
    else:
        expected = f"False {[ACT.get(name, TensorProto.FLOAT)] * layers} ['MoETop2']"
    assert result.stdout.strip() == expected  # False: the checker really ran without our schema


@pytest.mark.parametrize("name", DIRS)
def test_polygraphy_inspect_model(built, name):
    result = _run("polygraphy", "inspect", "model", str(built[name] / "model.onnx"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not _warnings(result.stdout + result.stderr)


def test_onnxruntime_graph_has_a_static_cache_length(built):
    """The cache the runtimes bind is always max_seq_len long: the lowered graph says so."""
    result = _run("polygraphy", "inspect", "model", str(built["onnxruntime"] / "model.onnx"))
    cache = re.findall(r"(?:past_key_values|present)\.\d\.(?:key|value) \[dtype=float32, shape=(\(.*?\))\]",
                       result.stdout)  # fmt: skip
    assert len(cache) == 4 * SMALL["num_hidden_layers"], result.stdout
    assert set(cache) == {f"('batch', {SMALL['num_key_value_heads']}, {MAX_SEQ}, {HEAD_DIM})"}


@pytest.mark.parametrize("name", [d for d in DIRS if d != "bf16"])  # ORT's CPU provider has no bf16 MatMul
def test_polygraphy_run_onnxrt(built, name):
    script = load_module(ROOT / "scripts" / "polygraphy_inputs.py", "polygraphy_inputs")
    args = script.polygraphy_args(built[name], batch=2, seq=3)
    result = _run("polygraphy", "run", "--onnxrt", str(built[name] / "model.onnx"), *args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "PASSED" in output
    assert not [ln for ln in _warnings(output) if DIM_WARNING.search(ln)]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_function_routes_in_fp32_and_answers_in_the_activation_dtype(built, precision):
    """onnx's own inliner and type inference over the function body: Softmax/TopK on fp32,
    each MoE output in the activation dtype."""
    model = onnx.load(str(built[precision] / "model.onnx"), load_external_data=False)
    moe_outputs = [n.output[0] for n in model.graph.node if n.op_type == "MoETop2"]
    inlined = onnx.inliner.inline_local_functions(model)
    inferred = onnx.shape_inference.infer_shapes(inlined, check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    routing = [n for n in inferred.graph.node if n.op_type in ("Softmax", "TopK")]
    assert len(routing) == 2 * SMALL["num_hidden_layers"]
    assert {types[n.output[0]] for n in routing} == {TensorProto.FLOAT}
    assert {types[o] for o in moe_outputs} == {ACT[precision]}


def _session(path: Path):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # as the runtime
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prefill(session, dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    B, S = 2, 6
    feeds = {"input_ids": rng.integers(0, SMALL["vocab_size"], (B, S)), "position_ids": np.tile(np.arange(S), (B, 1)),
             "write_indices": np.zeros(B, np.int64)}  # fmt: skip
    cache = np.zeros((B, SMALL["num_key_value_heads"], MAX_SEQ, HEAD_DIM), dtype)
    feeds.update({i.name: cache for i in session.get_inputs() if i.name.startswith("past_key_values.")})
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_function_matches_the_onnxruntime_kernels(built, tmp_path, precision):
    """The canonical graph through its function against the same weights through QMoE / MoE: equal
    up to fp16 rounding (measured: 1.6e-3 on logits of std 1, one fp16 ulp on the caches)."""
    atol = 5e-3
    from mixtral_trt.optimize.lowering import lower_dir

    lowered = lower_dir(built[precision], tmp_path / "ort", data="copy")
    function, kernel = (_prefill(_session(d / "model.onnx"), np.float16) for d in (built[precision], lowered))
    assert function["logits"].std() > 0.1  # not a degenerate output
    np.testing.assert_allclose(function["logits"], kernel["logits"], atol=atol, rtol=0)
    for name in function:
        np.testing.assert_allclose(function[name].astype(np.float32), kernel[name].astype(np.float32), atol=atol,
                                   rtol=0, err_msg=name)  # fmt: skip


def test_readme_polygraphy_command_is_what_the_script_prints(tmp_path):
    """The README's literal command for the built-in tiny model equals the script's arguments
    from that export's manifest (the script itself is run against polygraphy above)."""
    import json

    from mixtral_trt.export.stitch import io_table
    from mixtral_trt.export.tiny import TINY_CONFIG

    readme = (ROOT / "README.md").read_text()
    [command] = re.findall(r"(polygraphy run --onnxrt /tmp/tiny-export/model\.onnx.*?)\n```", readme, flags=re.S)
    manifest = {"export": {"max_seq_len": 64}, "config": TINY_CONFIG.to_dict(), "io": io_table(TINY_CONFIG)}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    script = load_module(ROOT / "scripts" / "polygraphy_inputs.py", "polygraphy_inputs")
    assert command.replace("\\\n", " ").split()[4:] == script.polygraphy_args(tmp_path, batch=2, seq=4)
