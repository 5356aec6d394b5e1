"""The TensorRT backend.

Three tiers:
- CPU (always run): the module imports without tensorrt/torch-CUDA, errors name what to install
  or fix, the I/O-table comparison and profile choice, plugin checks (with a stand-in nvinfer
  module, since they run before any GPU use).
- ``gpu``: the backend's CUDA side — buffers, aliasing, staging, CUDA-graph capture and replay —
  against a stand-in engine whose "kernels" are torch ops reading the bound addresses; logits and
  cache contents are checked against a numpy oracle of the same toy model.
- ``tensorrt`` + ``gpu``: a real engine built here from the tiny export (MoE decomposed into
  standard ops, the TensorRT ONNX parser, two profiles), compared with the ONNX Runtime backend.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixtral_trt.manifest import ManifestError, sha256_file, write_manifest
from mixtral_trt.runtime.backends import tensorrt as trt_backend
from mixtral_trt.runtime.backends.tensorrt import TensorRTBackend, TensorRTError, choose_profile, compare_io
from tests.conftest import make_checkpoint

from tests.runtime.fake_tensorrt import MAX_BATCH, MAX_SEQ, ToyOracle, fake_trt  # noqa: F401  (fake_trt: fixture)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU visible to torch")


def _gpu_or_no_gpu_error():
    """Where there is no GPU, construction must stop at the GPU check with its message."""
    if _has_cuda():
        return contextlib.nullcontext()
    return pytest.raises(TensorRTError, match=r"^TensorRT backend needs an NVIDIA GPU; use --backend onnxruntime")


def _config():
    from mixtral_trt.export.tiny import tiny_config

    return tiny_config(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=48, num_hidden_layers=2, num_local_experts=4)  # fmt: skip


def _engine_dir(root: Path, **engine) -> tuple[Path, dict]:
    """A build directory of stage 'engine' whose plan is the stand-in engine's JSON description."""
    from mixtral_trt.export.stitch import io_table

    cfg = _config()
    root.mkdir(parents=True, exist_ok=True)
    profiles = [[[1, 1], [MAX_BATCH, 8], [MAX_BATCH, MAX_SEQ]], [[1, 1], [MAX_BATCH, 1], [MAX_BATCH, 1]]]
    (root / "model.plan").write_text(json.dumps({"io": io_table(cfg), "profiles": profiles}))
    body = {
        "config": cfg.to_dict(),
        "export": {"max_batch": MAX_BATCH, "max_seq_len": MAX_SEQ},
        "io": io_table(cfg),
        "engine": {"plan_file": "model.plan", "trt_version": "11.0.0", "cache_dtype": "float32", **engine},
    }
    return root, write_manifest(root, "engine", body)


# ---------------------------------------------------------------------------------------------
# CPU: imports, errors, pure helpers


def test_module_imports_without_tensorrt_or_torch():
    code = ("import sys, mixtral_trt.runtime.backends.tensorrt as m; "
            "heavy = [n for n in ('tensorrt', 'tensorrt_rtx_bindings', 'torch') if n in sys.modules]; "
            "assert not heavy, heavy; print(m.TensorRTBackend.name)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tensorrt"


def test_missing_tensorrt_names_the_package(tmp_path, monkeypatch):
    build, manifest = _engine_dir(tmp_path / "engine")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(ImportError, match=r"pip install tensorrt\b") as info:
        TensorRTBackend(build, manifest)
    assert "tensorrt-rtx" in str(info.value)  # engine.target unset: either flavour would do


def test_rtx_engine_asks_for_tensorrt_rtx(tmp_path, monkeypatch):
    build, manifest = _engine_dir(tmp_path / "engine", target="tensorrt_rtx")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(ImportError, match="pip install tensorrt-rtx-cu13-bindings") as info:
        TensorRTBackend(build, manifest)
    assert "pip install tensorrt " not in str(info.value)


def test_not_an_engine_build(tmp_path):
    build, manifest = _engine_dir(tmp_path / "engine")
    with pytest.raises(ManifestError, match="'export' artifact, not a TensorRT engine build"):
        TensorRTBackend(build, {**manifest, "stage": "export"})
    with pytest.raises(ManifestError, match="no 'engine' section"):
        TensorRTBackend(build, {k: v for k, v in manifest.items() if k != "engine"})
    with pytest.raises(ManifestError, match="engine.cache_dtype='int4'"):
        TensorRTBackend(build, {**manifest, "engine": {**manifest["engine"], "cache_dtype": "int4"}})


def test_missing_plan_file(tmp_path):
    build, manifest = _engine_dir(tmp_path / "engine")
    (build / "model.plan").unlink()
    with pytest.raises(ManifestError, match=r"engine plan .*model\.plan is missing"):
        TensorRTBackend(build, manifest)


def test_load_routes_engine_builds_to_this_backend(tmp_path, fake_trt):
    from mixtral_trt import runtime

    build, _ = _engine_dir(tmp_path / "engine")
    with _gpu_or_no_gpu_error():
        assert isinstance(runtime.load(build, backend="tensorrt").backend, TensorRTBackend)


def _io(*rows):
    return [{"name": n, "mode": m, "dtype": d, "shape": s} for n, m, d, s in rows]


def test_compare_io_identical_and_symbolic_dims():
    manifest = _io(("ids", "input", "int64", ["batch", "seq"]), ("logits", "output", "float32", ["batch", "seq", 96]))
    dynamic = _io(("ids", "input", "int64", [-1, -1]), ("logits", "output", "float32", [-1, -1, 96]))
    static = _io(("ids", "input", "int64", [2, 5]), ("logits", "output", "float32", [2, 5, 96]))
    assert compare_io(manifest, dynamic) == [] and compare_io(manifest, static) == []


def test_compare_io_reports_each_difference():
    manifest = _io(
        ("input_ids", "input", "int64", ["batch", "seq"]),
        ("past_key_values.0.key", "input", "float32", ["batch", 2, "max_cache_len", 8]),
        ("logits", "output", "float32", ["batch", "seq", 96]),
        ("present.0.key", "output", "float32", ["batch", 2, "max_cache_len", 8]),
    )
    engine = _io(
        ("input_ids", "output", "int32", [-1, -1]),
        ("past_key_values.0.key", "input", "float16", [-1, 4, -1, 8]),
        ("logits", "output", "float32", [-1, 96]),
        ("present.0.value", "output", "float32", [-1, 2, -1, 8]),
    )
    problems = compare_io(manifest, engine)
    assert problems == [
        "output 'present.0.key': in the manifest, missing from the engine",
        "output 'present.0.value': in the engine, not in the manifest",
        "'input_ids': an input in the manifest, an output in the engine",
        "'input_ids': dtype int32 in the engine, int64 in the manifest",
        "'past_key_values.0.key': dtype float16 in the engine, float32 in the manifest",
        "'past_key_values.0.key': shape [-1, 4, -1, 8] in the engine, ['batch', 2, 'max_cache_len', 8] in the manifest",
        "'logits': shape [-1, 96] in the engine, ['batch', 'seq', 96] in the manifest",
    ]


def test_choose_profile_prefers_the_tightest():
    prefill, decode = ((1, 1), (4, 8), (4, 64)), ((1, 1), (4, 1), (4, 1))
    assert choose_profile([prefill, decode], 3, 1) == 1
    assert choose_profile([prefill, decode], 3, 2) == 0
    assert choose_profile([prefill], 4, 1) == 0
    assert choose_profile([prefill, decode], 5, 1) is None


@pytest.mark.gpu
@needs_cuda
def test_engine_io_mismatch_is_a_clear_error(tmp_path, fake_trt):
    build, manifest = _engine_dir(tmp_path / "engine")
    plan = json.loads((build / "model.plan").read_text())
    plan["io"]["outputs"] = [e for e in plan["io"]["outputs"] if e["name"] != "present.1.value"]
    (build / "model.plan").write_text(json.dumps(plan))
    with pytest.raises(ManifestError, match=r"the I/O table of its manifest:\n  output 'present.1.value': in the man"):
        TensorRTBackend(build, manifest)


def _plugin(lib: Path, **over) -> dict:
    return {"name": "MoETop2", "version": "1", "namespace": "mixtral", "library": lib.name,
            "sha256": sha256_file(lib), **over}  # fmt: skip


def test_plugin_library_is_hashed_and_loaded(tmp_path, fake_trt):
    lib = tmp_path / "libmixtral_plugins.so"
    lib.write_bytes(b"\x7fELF plugin build 1")
    fake_trt.registry.provides[lib.name] = [("MoETop2", "1", "mixtral")]
    build, manifest = _engine_dir(tmp_path / "engine", plugins=[_plugin(lib)])
    shutil.copy(lib, build / lib.name)
    with _gpu_or_no_gpu_error():
        TensorRTBackend(build, manifest)
    assert fake_trt.registry.loaded == [lib.name]  # loaded before the GPU check / deserialization


def test_plugin_library_with_other_sha256_is_refused(tmp_path, fake_trt):
    lib = tmp_path / "libmixtral_plugins.so"
    lib.write_bytes(b"\x7fELF plugin build 1")
    build, manifest = _engine_dir(tmp_path / "engine", plugins=[_plugin(lib)])
    (build / lib.name).write_bytes(b"\x7fELF plugin build 2")
    with pytest.raises(TensorRTError, match="MoETop2: .*libmixtral_plugins.so has sha256 .*another build of the"):
        TensorRTBackend(build, manifest)
    assert fake_trt.registry.loaded == []


def test_plugin_library_missing_or_not_providing_the_creator(tmp_path, fake_trt):
    lib = tmp_path / "libmixtral_plugins.so"
    lib.write_bytes(b"\x7fELF")
    build, manifest = _engine_dir(tmp_path / "engine", plugins=[_plugin(lib)])
    with pytest.raises(TensorRTError, match=r"libmixtral_plugins.so not found; pass plugin_libraries="):
        TensorRTBackend(build, manifest)
    # Passed explicitly, but it registers nothing under that name/version/namespace.
    with pytest.raises(TensorRTError, match="'MoETop2' version 1 namespace 'mixtral' is not registered after loading"):
        TensorRTBackend(build, manifest, plugin_libraries=[str(lib)])


# ---------------------------------------------------------------------------------------------
# GPU, stand-in engine: the backend's CUDA side


def _steps(rng):
    """Prefill of 2 right-padded rows, 4 decode steps, then batch 1, then a batch-3 prefill."""
    lengths = np.array([5, 3])
    ids = rng.integers(0, 96, (2, 5))
    yield ids, np.tile(np.arange(5), (2, 1)), np.zeros(2, np.int64)
    for t in range(4):
        yield rng.integers(0, 96, (2, 1)), (lengths + t)[:, None], lengths + t
    yield rng.integers(0, 96, (1, 1)), np.array([[9]]), np.array([9])
    yield rng.integers(0, 96, (3, 4)), np.tile(np.arange(4), (3, 1)), np.zeros(3, np.int64)
    yield rng.integers(0, 96, (3, 1)), np.full((3, 1), 4), np.full(3, 4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_toy_engine_matches_oracle(tmp_path, fake_trt, graphs):
    build, manifest = _engine_dir(tmp_path / "engine")
    backend = TensorRTBackend(build, manifest, cuda_graphs=graphs)
    oracle = ToyOracle(backend.vocab_size)
    for ids, pos, where in _steps(np.random.default_rng(0)):
        got = backend.step(ids, pos, where)
        assert got.dtype == np.float32 and got.shape == (*ids.shape, backend.vocab_size)
        np.testing.assert_allclose(got, oracle.step(ids, pos, where), rtol=1e-5, atol=1e-3)
    # value cache of layer 1 holds -(2·id + pos/8) at the slots written last
    ids, pos = np.array([[7], [8], [9]]), np.full((3, 1), 4)
    backend.step(ids, pos, np.full(3, 4))
    value1 = backend.cache[(1, "value")][:3, :, 4, :].cpu().numpy()  # [3, K, D]
    np.testing.assert_allclose(value1, np.broadcast_to(-(2.0 * ids + 0.5)[:, :, None], value1.shape))


@pytest.mark.gpu
@needs_cuda
def test_graph_replay_skips_enqueue_and_keeps_addresses(tmp_path, fake_trt):
    build, manifest = _engine_dir(tmp_path / "engine")
    backend = TensorRTBackend(build, manifest)
    engine = fake_trt.engines[-1]
    before = {key: backend.cache_address(*key) for key in backend.cache}
    steps = list(_steps(np.random.default_rng(1)))
    for ids, pos, where in steps[:5]:  # prefill + 4 decode steps at batch 2
        backend.step(ids, pos, where)
    # prefill: 1 enqueue; first decode: warm-up + capture = 2; three replays: no Python enqueue at all
    assert engine.enqueues == 3
    assert backend._graph_error is None and backend._decoders[(0, 2)].graph is not None
    assert backend._decoders[(0, 2)].context.profile == 1  # the decode profile, seq 1..1
    assert {key: backend.cache_address(*key) for key in backend.cache} == before
    for ctx in engine.contexts:  # one scratch for all contexts; the cache bound as past and present
        assert ctx.memory == engine.contexts[0].memory
        assert ctx.addresses["past_key_values.1.value"] == ctx.addresses["present.1.value"] == before[(1, "value")]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")  # the refused capture recorded nothing
def test_capture_failure_falls_back_to_enqueue(tmp_path, fake_trt, caplog):
    build, manifest = _engine_dir(tmp_path / "engine")
    reference = TensorRTBackend(build, manifest, cuda_graphs=False)
    steps = list(_steps(np.random.default_rng(2)))
    expected = [reference.step(*s) for s in steps]
    backend = TensorRTBackend(build, manifest)
    fake_trt.engines[-1].fail_capture = True
    with caplog.at_level("WARNING"):
        got = [backend.step(*s) for s in steps]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert backend._graph_error is not None and "execute_async_v3 returned False" in backend._graph_error
    assert sum("without CUDA graphs" in r.message for r in caplog.records) == 1  # said once


@pytest.mark.gpu
@needs_cuda
def test_step_input_errors(tmp_path, fake_trt):
    from mixtral_trt.runtime import GenerationError

    build, manifest = _engine_dir(tmp_path / "engine")
    backend = TensorRTBackend(build, manifest)
    one = np.zeros((1, 1), np.int64)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        backend.step(one + 96, one, np.zeros(1, np.int64))
    with pytest.raises(GenerationError, match=r"row 0 would write cache slots 15..16; slots are 0..15"):
        backend.step(np.zeros((1, 2), np.int64), one.repeat(2, 1), np.array([15]))
    with pytest.raises(GenerationError, match="batch 4 x seq 1 is outside"):
        backend.step(np.zeros((4, 1), np.int64), np.zeros((4, 1), np.int64), np.zeros(4, np.int64))


@pytest.mark.gpu
@needs_cuda
def test_deserialization_failure_names_both_versions(tmp_path, fake_trt):
    build, manifest = _engine_dir(tmp_path / "engine", target_sms=["sm_90"])
    (build / "model.plan").write_bytes(b"not an engine")
    with pytest.raises(TensorRTError) as info:
        TensorRTBackend(build, manifest)
    message = str(info.value)
    assert "TensorRT 11.0.0.fake could not deserialize" in message and "built with TensorRT 11.0.0 for sm_90" in message
    assert "run only with the TensorRT version that built them" in message and "magicTag" in message


# ---------------------------------------------------------------------------------------------
# TensorRT + GPU: a real engine from the tiny export


def _shape(entry: dict, batch: int, seq: int, cache: int) -> tuple[int, ...]:
    return tuple({"batch": batch, "seq": seq, "max_cache_len": cache}.get(d, d) for d in entry["shape"])


def build_engine(trt, export_dir: Path, out_dir: Path) -> Path:
    """Engine build of an export for this GPU: MoE decomposed into standard ops (no plugin needed),
    profiles prefill (batch 1..B, seq 1..S) and decode (batch 1..B, seq 1), stage-'engine' manifest."""
    import onnx

    from mixtral_trt.manifest import read_manifest
    from mixtral_trt.optimize.lowering import lower_for_onnxruntime

    src = read_manifest(export_dir, "export")
    info = src["export"]
    B, S = info["max_batch"], info["max_seq_len"]
    work = out_dir.with_name(out_dir.name + "-onnx")
    work.mkdir(parents=True)
    model = onnx.load(str(export_dir / info["model_file"]), load_external_data=False)
    model = lower_for_onnxruntime(model, moe="decomposed")
    for value in [*model.graph.input, *model.graph.output]:  # TensorRT's KV-cache update needs a static length
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "max_cache_len":
                dim.dim_value = S
    onnx.save(model, str(work / "model.onnx"))
    (work / info["data_file"]).symlink_to((export_dir / info["data_file"]).resolve())

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # always on (and deprecated) in 11
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(work / "model.onnx")):
        pytest.fail("ONNX parser: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    for i in range(network.num_layers):  # fp32 with the tiny head size has no fused attention kernel
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer  # the bindings' documented downcast
            layer.attention.decomposable = True
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):  # TensorRT-RTX: needed for stream capture
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    for max_seq in (S, 1):
        profile = builder.create_optimization_profile()
        for entry in src["io"]["inputs"]:
            lo, opt, hi = (_shape(entry, b, s, S) for b, s in ((1, 1), (B, min(max_seq, 8)), (B, max_seq)))
            profile.set_shape(entry["name"], lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT could not build the engine (see its log above)"

    out_dir.mkdir()
    (out_dir / "model.plan").write_bytes(bytes(plan))
    for f in export_dir.iterdir():  # tokenizer files
        if f.is_file() and f.name not in (info["model_file"], info["data_file"], "manifest.json"):
            shutil.copy(f, out_dir / f.name)
    import torch

    sm = "sm_%d%d" % torch.cuda.get_device_capability()
    engine = {"plan_file": "model.plan", "target": "tensorrt_rtx" if "rtx" in trt.__name__ else "tensorrt",
              "trt_version": trt.__version__, "cache_dtype": "float32", "target_sms": [sm], "plugins": []}  # fmt: skip
    body = {k: v for k, v in src.items() if k not in ("format", "format_version", "stage", "files", "tools")}
    write_manifest(out_dir, "engine", {**body, "engine": engine})
    return out_dir


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    try:
        trt = trt_backend.import_tensorrt(None)  # tensorrt, else tensorrt_rtx_bindings
    except ImportError as exc:
        pytest.skip(str(exc))
    if not _has_cuda():
        pytest.skip("needs a CUDA GPU visible to torch")
    import torch

    if "rtx" in trt.__name__ and torch.cuda.get_device_capability()[0] in (9, 10):
        pytest.skip("only TensorRT-RTX is installed, and it has no SM90/SM100 target; pip install tensorrt")
    from mixtral_trt import runtime
    from mixtral_trt.export.onnx_export import export

    root = tmp_path_factory.mktemp("trt")
    ckpt = make_checkpoint(root / "ckpt", seed=5)
    export(ckpt, root / "export", max_batch=MAX_BATCH, max_seq_len=64, progress=False)
    engine_dir = build_engine(trt, root / "export", root / "engine")
    return runtime.load(engine_dir, backend="tensorrt"), runtime.load(root / "export"), engine_dir


PROMPTS = ["The quick brown fox jumps over the lazy dog because", "Paris is", "In 1905, Albert Einstein"]


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_logits_match_onnxruntime(real):
    trt_model, ort_model, _ = real
    ids = [ort_model.tokenizer.encode(p) for p in PROMPTS]
    for got, want in zip(trt_model.logits(ids), ort_model.logits(ids)):
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_decode_matches_onnxruntime_and_keeps_cache_in_place(real):
    trt_model, ort_model, _ = real
    trt, ort = trt_model.backend, ort_model.backend
    before = {key: trt.cache_address(*key) for key in trt.cache}
    for ids, pos, where in _steps(np.random.default_rng(3)):
        np.testing.assert_allclose(trt.step(ids, pos, where), ort.step(ids, pos, where), atol=1e-3, rtol=0)
    assert {key: trt.cache_address(*key) for key in trt.cache} == before
    np.testing.assert_allclose(trt.cache[(1, "value")][:3].cpu().numpy(), ort.cache[(1, "value")][:3], atol=1e-4)
    assert trt._graph_error is None and trt._decoders[(0, 2)].graph is not None  # decode really replayed graphs


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_graph_replay_equals_plain_enqueue(real):
    from mixtral_trt import runtime

    trt_model, _, engine_dir = real
    plain = runtime.load(engine_dir, backend="tensorrt", cuda_graphs=False).backend
    graphs = trt_model.backend
    for ids, pos, where in _steps(np.random.default_rng(4)):
        np.testing.assert_allclose(graphs.step(ids, pos, where), plain.step(ids, pos, where), atol=1e-5, rtol=0)
    assert plain._decoders[(0, 2)].graph is None


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_greedy_generation_matches_onnxruntime(real):
    trt_model, ort_model, _ = real
    got = trt_model.generate(PROMPTS, max_new_tokens=16, greedy=True)
    want = ort_model.generate(PROMPTS, max_new_tokens=16, greedy=True)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
