"""Triton model repository: configs parse as Triton's ModelConfig and match the build's I/O table; the
decoupled text model, run against a stand-in ``triton_python_backend_utils`` whose BLS requests execute
the repository's ONNX model in process (checked against its config as Triton would), generates what
``runtime.load(...).generate`` does; other models in the repository are left alone; bad builds write
nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixtral_trt import runtime
from mixtral_trt.manifest import ManifestError, read_manifest, sha256_file, write_manifest
from mixtral_trt.triton import TritonRepositoryError, triton_command, write_repository
from tests.conftest import load_module, make_checkpoint
from tests.runtime.fake_triton import (
    TRITON_TYPES,
    FakeTriton,
    Request,
    Response,
    Tensor,
    fake_pb_utils,
    parse_config,
    type_name,
)

MAX_BATCH, MAX_SEQ = 2, 48
PROMPT = "The capital of France is"



@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """An export and its ONNX Runtime lowering (fp32, tiny, real Mixtral tokenizer)."""
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.optimize.lowering import lower_export_dir

    root = tmp_path_factory.mktemp("triton")
    ckpt = make_checkpoint(root / "ckpt", seed=5, num_hidden_layers=2, hidden_size=64, intermediate_size=96)
    exported = export(ckpt, root / "export", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)
    return exported, lower_export_dir(exported, root / "ort", data="copy")


@pytest.fixture(scope="module")
def ort_build(builds):
    return builds[1]


@pytest.fixture(scope="module")
def pb2():
    return pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'tritonclient[grpc]'")


def engine_dir(root: Path, source: Path, io: dict | None = None, tokenizer: Path | None = None, **engine) -> Path:
    """A fake engine build: the manifest of stage 'engine' (config generation reads only that) and a dummy plan."""
    src = read_manifest(source, verify=False)
    root.mkdir(parents=True)
    (root / "model.plan").write_bytes(b"not a real plan")
    shutil.copy(tokenizer or source / "tokenizer.model", root)
    body = {"config": src["config"], "export": src["export"], "io": io or src["io"],
            "source": {"directory": str(source.resolve()), "stage": src["stage"]},
            "engine": {"plan_file": "model.plan", "target": "tensorrt", "trt_version": "11.0.0",
                       "cache_update": "copy", **engine}}  # fmt: skip
    write_manifest(root, "engine", body)
    return root


def with_cache_dtype(io: dict, dtype: str) -> dict:
    def conv(e):
        return {**e, "dtype": dtype} if e["name"].startswith(("past_key_values.", "present.")) else e

    return {k: [conv(e) for e in v] for k, v in io.items()}


def expected_shape(entry: dict, max_seq: int) -> list[int]:
    """The model-side shape a config must give a manifest tensor: Triton's batch dim is -1, a symbolic
    dim -1, the cache length the build's max_seq_len, a fixed dim itself."""
    return [-1 if d == "batch" else max_seq if d == "max_cache_len" else -1 if isinstance(d, str) else d
            for d in entry["shape"]]  # fmt: skip


def assert_config_matches(config, manifest: dict) -> None:
    max_seq = manifest["export"]["max_seq_len"]
    assert config.max_batch_size == manifest["export"]["max_batch"]
    for key, tensors in (("inputs", config.input), ("outputs", config.output)):
        want = {e["name"]: e for e in manifest["io"][key]}
        assert [t.name for t in tensors] == list(want)
        for t in tensors:
            assert list(t.dims), f"{t.name}: Triton refuses empty dims"
            model_dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            assert TRITON_TYPES[type_name(config, t.data_type)] == want[t.name]["dtype"], t.name
            assert [-1, *model_dims] == expected_shape(want[t.name], max_seq), t.name


# ---------------------------------------------------------------------------------------------
# Configs


def test_ort_repository_is_one_in_process_model_without_onnx_files(tmp_path, ort_build, pb2):
    repo = write_repository(ort_build, tmp_path / "repo")
    assert sorted(p.name for p in repo.iterdir()) == ["mixtral"]  # no engine model: the build is loaded in process
    assert not [p for p in repo.rglob("*") if ".onnx" in p.name]  # no graph or weights copied or linked
    text = parse_config(pb2, repo / "mixtral" / "config.pbtxt")
    assert (text.name, text.backend, text.max_batch_size) == ("mixtral", "python", 0)
    assert text.model_transaction_policy.decoupled
    assert {t.name: t.optional for t in text.input} == {
        "text_input": False, "max_tokens": True, "temperature": True, "top_p": True, "top_k": True,
        "seed": True, "stream": True}  # fmt: skip
    assert [t.name for t in text.output] == ["text_output", "output_ids"]
    assert text.parameters["build_dir"].string_value == str(ort_build.resolve())
    assert text.parameters["build_id"].string_value == sha256_file(ort_build / "manifest.json")
    assert sorted(p.name for p in (repo / "mixtral" / "1").iterdir()) == ["mixtral_build.json", "model.py"]
    readme = (repo / "mixtral" / "README.md").read_text()
    assert f"tritonserver --model-repository={repo}" in readme and "keep it at that path" in readme
    assert "pip install mixtral-trt" not in readme and "pip install /path/to/mixtral-trt" in readme


def test_engine_repository_configs_parse_and_match_the_io_table(tmp_path, ort_build, pb2):
    build = engine_dir(tmp_path / "engine", ort_build)
    repo = write_repository(build, tmp_path / "repo", layout="bls")
    manifest = read_manifest(build)
    engine = parse_config(pb2, repo / "mixtral_engine" / "config.pbtxt")
    assert (engine.name, engine.platform) == ("mixtral_engine", "tensorrt_plan")
    assert_config_matches(engine, manifest)
    write = next(t for t in engine.input if t.name == "write_indices")
    assert list(write.dims) == [1] and write.HasField("reshape") and list(write.reshape.shape) == []
    assert next(t for t in engine.input if t.name == "past_key_values.0.key").dims[1] == MAX_SEQ
    version = repo / "mixtral_engine" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["mixtral_build.json", "model.plan"]
    text = parse_config(pb2, repo / "mixtral" / "config.pbtxt")
    assert text.parameters["engine_model"].string_value == "mixtral_engine"
    assert sorted(p.name for p in (repo / "mixtral" / "1").iterdir()) == [
        "build_manifest.json", "mixtral_build.json", "model.py", "tokenizer.model"]  # fmt: skip
    assert "The KV cache is explicit" in (repo / "mixtral" / "README.md").read_text()


@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
def test_engine_repository_config_for_each_cache_dtype(tmp_path, ort_build, pb2, cache_dtype):
    io = with_cache_dtype(read_manifest(ort_build)["io"], cache_dtype)
    build = engine_dir(tmp_path / "engine", ort_build, io, cache_dtype=cache_dtype)
    repo = write_repository(build, tmp_path / "repo", layout="bls")
    config = parse_config(pb2, repo / "mixtral_engine" / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert [g.kind for g in config.instance_group] == [pb2.ModelInstanceGroup.KIND_GPU]
    assert_config_matches(config, read_manifest(build))
    assert (repo / "mixtral_engine" / "1" / "model.plan").read_bytes() == b"not a real plan"
    text = parse_config(pb2, repo / "mixtral" / "config.pbtxt")
    assert text.parameters["cache_memory"].string_value == "gpu"
    assert "without in-place cache aliasing" in (repo / "mixtral" / "README.md").read_text()


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_repository_from_converted_precision(tmp_path, builds, pb2, precision):
    precision_module = pytest.importorskip("mixtral_trt.optimize.precision", reason="optimize/precision.py not there")
    if not hasattr(precision_module, "convert"):
        pytest.skip("mixtral_trt.optimize.precision.convert is not there yet (another developer is writing it)")
    converted = precision_module.convert(builds[0], tmp_path / precision, precision, progress=False)
    io = read_manifest(converted, verify=False)["io"]
    build = engine_dir(tmp_path / "engine", converted, io, tokenizer=builds[0] / "tokenizer.model")
    repo = write_repository(build, tmp_path / "repo", layout="bls")
    assert_config_matches(parse_config(pb2, repo / "mixtral_engine" / "config.pbtxt"), read_manifest(build))


# ---------------------------------------------------------------------------------------------
# Plugins


def test_plugin_library_ships_beside_the_engine(tmp_path, ort_build):
    lib = tmp_path / "libmixtral_trt_plugins.so"
    lib.write_bytes(b"\x7fELF stand-in")
    plugin = {"name": "MixtralMoETop2", "version": "1", "namespace": "mixtral", "library": str(lib),
              "sha256": sha256_file(lib)}  # fmt: skip
    build = engine_dir(tmp_path / "engine", ort_build, plugins=[plugin])
    lines = []
    repo = write_repository(build, tmp_path / "repo", say=lines.append, layout="bls")
    shipped = repo / "mixtral_engine" / "1" / lib.name
    assert shipped.read_bytes() == lib.read_bytes()
    flag = f'--backend-config=tensorrt,plugins="{shipped}"'
    assert lines[-1] == f"start it:  tritonserver --model-repository={repo} {flag}"
    assert flag in (repo / "mixtral" / "README.md").read_text()


def test_plugin_without_library_asks_for_the_cpp_library(tmp_path, ort_build):
    plugin = {"name": "MixtralMoETop2", "version": "1", "namespace": "mixtral"}  # the Python creator case
    build = engine_dir(tmp_path / "engine", ort_build, plugins=[plugin])
    repo = write_repository(build, tmp_path / "repo", layout="bls")
    readme = (repo / "mixtral" / "README.md").read_text()
    assert "libmixtral_trt_plugins.so" in readme and "plugins/moe_top2" in readme and "CMake" in readme
    assert "--backend-config=tensorrt,plugins=/abs/path/libmixtral_trt_plugins.so" in readme
    assert "--plugin-library" in readme


def test_plugin_library_given_for_a_python_creator_engine(tmp_path, ort_build):
    lib = tmp_path / "build" / "libmixtral_trt_plugins.so"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF stand-in")
    build = engine_dir(tmp_path / "engine", ort_build, plugins=[{"name": "MixtralMoETop2", "library": None}])
    result = CliRunner().invoke(triton_command(), [str(build), "--out", str(tmp_path / "repo"),
                                                   "--plugin-library", str(lib), "--layout", "bls"])  # fmt: skip
    assert result.exit_code == 0, result.output
    shipped = tmp_path / "repo" / "mixtral_engine" / "1" / lib.name
    assert shipped.read_bytes() == lib.read_bytes()
    assert f'--backend-config=tensorrt,plugins="{shipped}"' in result.output
    assert "cannot run Python plugin creators" not in (tmp_path / "repo" / "mixtral" / "README.md").read_text()
    with pytest.raises(TritonRepositoryError, match="runs on ONNX Runtime"):
        write_repository(ort_build, tmp_path / "r2", plugin_libraries=[lib])
    with pytest.raises(TritonRepositoryError, match="does not exist"):
        write_repository(build, tmp_path / "r2", plugin_libraries=[tmp_path / "nope.so"])
    assert not (tmp_path / "r2").exists()


@pytest.mark.tensorrt
def test_real_engine_manifest(tmp_path, builds, pb2):
    """A TensorRT-RTX engine built here: refused (Triton runs datacenter TensorRT); the same manifest
    marked datacenter gives a config equal to the engine's own I/O table (its cache length is fixed)."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    from mixtral_trt.optimize import engine

    built = engine.build(builds[0], tmp_path / "rtx", target="tensorrt-rtx", max_seq_len=32, cache_update="copy",
                         progress=False)  # fmt: skip
    with pytest.raises(TritonRepositoryError, match="TensorRT-RTX engine"):
        write_repository(built, tmp_path / "repo", layout="bls")
    manifest = read_manifest(built)
    assert manifest["engine"]["cache_update"] == "copy"
    assert not manifest["engine"]["layers"].get("KV_CACHE_UPDATE")  # present.* is a new tensor, not an alias
    assert manifest["io"]["inputs"][3]["shape"][2] == 32  # an integer: the engine pins the cache length
    shutil.copytree(built, tmp_path / "trt")
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "stage", "files")}
    write_manifest(tmp_path / "trt", "engine", {**body, "engine": {**manifest["engine"], "target": "tensorrt"}})
    repo = write_repository(tmp_path / "trt", tmp_path / "repo", layout="bls")
    config = parse_config(pb2, repo / "mixtral_engine" / "config.pbtxt")
    assert_config_matches(config, manifest)
    assert next(t for t in config.input if t.name == "past_key_values.0.key").dims[1] == 32
    assert "cannot run Python plugin creators" in (repo / "mixtral" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# Bad builds and other people's models: nothing written, nothing touched


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}  # fmt: skip


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("plan", r"engine plan .*model\.plan is missing"),
        ("rtx", r"TensorRT-RTX engine; Triton's tensorrt_plan platform \(layout 'bls'\) runs datacenter TensorRT"),
        ("sha", r"has sha256 .*, the engine was built against"),
        ("onnx", "has no ONNX model: model.onnx.data missing"),
        ("empty", "has no manifest.json"),
    ],
)  # fmt: skip
def test_unservable_build_writes_nothing(tmp_path, builds, breakage, message):
    exported, ort = builds
    if breakage in ("plan", "rtx", "sha"):
        lib = tmp_path / "lib.so"
        lib.write_bytes(b"x")
        plugins = [{"name": "P", "library": str(lib), "sha256": "0" * 64}] if breakage == "sha" else []
        build = engine_dir(tmp_path / "b", ort, plugins=plugins, target="tensorrt_rtx" if breakage == "rtx" else "tensorrt")
        if breakage == "plan":
            (build / "model.plan").unlink()
    elif breakage == "onnx":
        build = tmp_path / "b"
        shutil.copytree(ort, build)
        (build / "model.onnx.data").unlink()
    else:
        build = tmp_path / "b"
        build.mkdir(exist_ok=True)
    with pytest.raises((TritonRepositoryError, ManifestError), match=message):
        write_repository(build, tmp_path / "repo", verify=False, layout="bls" if breakage == "rtx" else "executor")
    assert not (tmp_path / "repo").exists()


def test_other_models_are_untouched_and_reruns_replace_ours(tmp_path, ort_build, pb2):
    repo = tmp_path / "repo"
    (repo / "resnet" / "1").mkdir(parents=True)
    (repo / "resnet" / "config.pbtxt").write_text('name: "resnet"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 4\n')
    (repo / "resnet" / "1" / "model.onnx").write_bytes(b"their model")
    (repo / "README.md").write_text("their notes\n")
    before = _snapshot(repo)
    write_repository(ort_build, repo)
    after = _snapshot(repo)
    assert {k: v for k, v in after.items() if k in before} == before
    config = (repo / "mixtral" / "config.pbtxt").stat().st_mtime_ns
    write_repository(ort_build, repo, instances=1)  # same build again: versions swapped, configs kept
    assert (repo / "mixtral" / "config.pbtxt").stat().st_mtime_ns == config
    assert {k: v for k, v in _snapshot(repo).items() if k in before} == before
    leftovers = [p for p in repo.rglob(".*") if p.name.startswith((".partial-", ".old-"))]
    assert leftovers == []
    write_repository(ort_build, repo, instances=3)
    assert parse_config(pb2, repo / "mixtral" / "config.pbtxt").instance_group[0].count == 3


def test_version_swap_without_an_atomic_exchange(tmp_path, ort_build, monkeypatch):
    from mixtral_trt import triton

    repo = write_repository(ort_build, tmp_path / "repo")
    (repo / "mixtral" / "1" / "stale").write_text("from the previous version")
    monkeypatch.setattr(triton.triton_swap, "_exchange", lambda a, b: False)  # no renameat2: two renames
    write_repository(ort_build, repo)
    assert sorted(p.name for p in (repo / "mixtral").iterdir()) == ["1", "README.md", "config.pbtxt"]
    assert sorted(p.name for p in (repo / "mixtral" / "1").iterdir()) == ["mixtral_build.json", "model.py"]


def test_failed_copy_leaves_nothing(tmp_path, ort_build, monkeypatch):
    from mixtral_trt import triton

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton, "_copy", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_repository(ort_build, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_refuses_to_replace_a_model_that_is_not_ours(tmp_path, ort_build):
    repo = tmp_path / "repo"
    (repo / "mixtral" / "1").mkdir(parents=True)
    (repo / "mixtral" / "config.pbtxt").write_text('name: "mixtral"\nbackend: "vllm"\n')
    before = _snapshot(repo)
    with pytest.raises(TritonRepositoryError, match="was not written by mixtral-trt"):
        write_repository(ort_build, repo)
    assert _snapshot(repo) == before


def test_bad_name_and_instances(tmp_path, ort_build):
    with pytest.raises(TritonRepositoryError, match="model name 'a/b'"):
        write_repository(ort_build, tmp_path / "r", name="a/b")
    with pytest.raises(TritonRepositoryError, match="instances=0"):
        write_repository(ort_build, tmp_path / "r", instances=0)
    assert not (tmp_path / "r").exists()


def test_cli_command(tmp_path, ort_build):
    result = CliRunner().invoke(triton_command(), [str(ort_build), "--out", str(tmp_path / "repo"), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert f"start it:  tritonserver --model-repository={tmp_path / 'repo'}" in result.output
    bad = CliRunner().invoke(triton_command(), [str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 1 and "Error: " in bad.output and "nothing does not exist" in bad.output


def test_modules_import_without_heavy_packages():
    code = ("import sys, mixtral_trt.triton, mixtral_trt.runtime.backends.triton_bls; "
            "heavy = [n for n in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'tritonclient') if n in sys.modules]; "
            "assert not heavy, heavy")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).parents[2])  # fmt: skip
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def served(ort_build, tmp_path_factory, pb2):
    """An engine-layout repository (a stand-in plan built from ort_build) and the runtime's reference."""
    root = tmp_path_factory.mktemp("served")
    repo = write_repository(engine_dir(root / "engine", ort_build), root / "repo", layout="bls")
    return repo, runtime.load(ort_build)


def load_text_model(repo: Path, server: FakeTriton, monkeypatch, pb2):
    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils(server))
    module = load_module(repo / "mixtral" / "1" / "model.py", "mixtral_text_model")
    model = module.TritonPythonModel()
    config = json_format.MessageToDict(server.configs["mixtral"], preserving_proto_field_name=True)
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / "mixtral"),
                      "model_version": "1", "model_instance_kind": "CPU", "model_instance_device_id": "0"})  # fmt: skip
    return model


def ask(model, **inputs):
    request = Request(**{k: np.asarray(v) for k, v in inputs.items()})
    assert model.execute([request]) is None  # decoupled
    return request.sender.wait()


def texts_and_ids(sent):
    responses = [r for r, _ in sent if r is not None]
    assert all(not r.has_error() for r in responses), [r.error().message() for r in responses]
    text = "".join(r.output_tensors()[0].as_numpy()[0].decode() for r in responses)
    ids = [int(i) for r in responses for i in r.output_tensors()[1].as_numpy()]
    return text, ids, responses


def test_streamed_generation_equals_runtime_greedy(served, monkeypatch, pb2):
    repo, reference = served
    server = FakeTriton(repo, pb2)
    model = load_text_model(repo, server, monkeypatch, pb2)
    sent = ask(model, text_input=np.array([PROMPT.encode()], dtype=object), max_tokens=np.array([12], np.int32),
               stream=np.array([True]))  # fmt: skip
    [expected] = reference.generate([PROMPT], max_new_tokens=12, greedy=True)
    text, ids, responses = texts_and_ids(sent)
    assert ids == expected.output_ids and text == expected.text
    assert [len(r.output_tensors()[1].as_numpy()) for r in responses] == [1] * len(ids)  # one token each
    assert [flags for _, flags in sent] == [0] * len(responses) + [1]
    prompt_len = len(expected.prompt_ids)
    assert server.calls == [(1, prompt_len)] + [(1, 1)] * (len(ids) - 1)  # one prefill, then decode steps


def test_unstreamed_and_seeded_generation(served, monkeypatch, pb2):
    repo, reference = served
    model = load_text_model(repo, FakeTriton(repo, pb2), monkeypatch, pb2)
    sent = ask(model, text_input=np.array([PROMPT.encode()], dtype=object), max_tokens=np.array([9], np.int32),
               temperature=np.array([1.3], np.float32), top_p=np.array([0.9], np.float32),
               seed=np.array([11], np.int64))  # fmt: skip
    [expected] = reference.generate([PROMPT], max_new_tokens=9, temperature=1.3, top_p=0.9, seed=11)
    text, ids, responses = texts_and_ids(sent)
    assert len(responses) == 1 and sent[0][1] == 1  # one response, final
    assert ids == expected.output_ids and text == expected.text
    [greedy] = reference.generate([PROMPT], max_new_tokens=9, greedy=True)
    assert ids != greedy.output_ids  # really sampled


def test_bad_request_gets_an_error_and_the_model_stays_usable(served, monkeypatch, pb2):
    repo, reference = served
    model = load_text_model(repo, FakeTriton(repo, pb2), monkeypatch, pb2)
    sent = ask(model, text_input=np.array([PROMPT.encode()], dtype=object), max_tokens=np.array([MAX_SEQ], np.int32))
    [(response, flags)] = sent
    assert flags == 1 and response.has_error()
    assert f"exceeds the build's max_seq_len={MAX_SEQ}" in response.error().message()
    _, ids, _ = texts_and_ids(ask(model, text_input=np.array([PROMPT.encode()], dtype=object)))
    [expected] = reference.generate([PROMPT], max_new_tokens=32, greedy=True)  # the default max_tokens
    assert ids == expected.output_ids


def test_cancelled_request_ends_with_the_final_flag(served, monkeypatch, pb2):
    repo, _ = served
    model = load_text_model(repo, FakeTriton(repo, pb2), monkeypatch, pb2)
    request = Request(text_input=np.array([PROMPT.encode()], dtype=object), max_tokens=np.array([20], np.int32),
                      stream=np.array([True]))  # fmt: skip
    request.sender.cancel_after = 3
    model.execute([request])
    assert [flags for _, flags in request.sender.sent] == [0, 0, 0, 1]


def test_batched_rows_and_gpu_resident_cache(served, pb2):
    """The backend under the generator directly: a batch of two prompts, outputs kept in 'GPU' memory
    (DLPack only), equal to the ONNX Runtime backend. The BLS backend has no row runs (step_rows), so
    the executor gives it one slot: the prompts run one after the other, each step one row."""
    pytest.importorskip("torch")
    from mixtral_trt.runtime.backends.triton_bls import TritonBlsBackend
    from mixtral_trt.runtime.generator import Generator
    from mixtral_trt.runtime.sampling import SamplingParams

    repo, reference = served
    server = FakeTriton(repo, pb2)
    manifest = json.loads((repo / "mixtral" / "1" / "build_manifest.json").read_text())
    backend = TritonBlsBackend(fake_pb_utils(server), "mixtral_engine", manifest, cache_memory="gpu")
    generator = Generator(backend, reference.tokenizer)
    prompts = [PROMPT, "Once upon a time, in a land far away,"]
    got = generator.generate(prompts, SamplingParams(max_new_tokens=8, greedy=True))
    expected = reference.generate(prompts, max_new_tokens=8, greedy=True)
    assert [r.output_ids for r in got] == [r.output_ids for r in expected]
    assert generator.executor.slots == 1 and server.calls[0] == (1, len(expected[0].prompt_ids))
    assert {batch for batch, _ in server.calls} == {1}
    assert all(not t.is_cpu() for t in backend._cache)  # the cache never came back to host memory


def test_unwritten_present_cache_is_caught(served, monkeypatch, pb2):
    repo, _ = served
    model = load_text_model(repo, FakeTriton(repo, pb2, present_written=False), monkeypatch, pb2)
    [(response, flags)] = ask(model, text_input=np.array([PROMPT.encode()], dtype=object))
    assert flags == 1 and response.has_error()
    assert "does not return the updated cache" in response.error().message()


def test_unknown_engine_model_is_an_error_response(served, monkeypatch, pb2):
    repo, _ = served
    server = FakeTriton(repo, pb2)
    model = load_text_model(repo, server, monkeypatch, pb2)
    model.generator.backend.engine_model = "missing_engine"
    [(response, flags)] = ask(model, text_input=np.array([PROMPT.encode()], dtype=object))
    n = len(model.generator.tokenizer.encode(PROMPT))
    assert flags == 1 and f"engine model 'missing_engine' failed a [1, {n}] step" in response.error().message()
    assert "not found" in response.error().message()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
def test_device_resident_cache_through_dlpack(device, cache_dtype):
    """Outputs in 'GPU' memory (torch tensors behind DLPack, as Triton's GPU tensors): logits reach numpy,
    the cache is passed on without leaving the device, and an unwritten present.* is caught there."""
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch")
    from mixtral_trt.runtime.backends.triton_bls import TritonBlsBackend, TritonBlsError

    cache = ["batch", 1, "max_cache_len", 8]
    io = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                     {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                     {"name": "write_indices", "dtype": "int64", "shape": ["batch"]},
                     {"name": "past_key_values.0.key", "dtype": cache_dtype, "shape": cache}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 40]},
                      {"name": "present.0.key", "dtype": cache_dtype, "shape": cache}]}  # fmt: skip
    manifest = {"config": {"vocab_size": 40, "num_key_value_heads": 1, "head_dim": 8},
                "export": {"max_batch": 2, "max_seq_len": 16}, "io": io}  # fmt: skip
    seen, write = [], {"value": 1.0}

    def engine(request):  # a toy step: logits = position ids, new cache slots = `write`
        inputs = {t.name(): t for t in request.inputs}
        seen.append({n: (t.is_cpu(), torch.from_dlpack(t).device.type) for n, t in inputs.items() if "past" in n})
        pos = torch.from_dlpack(inputs["position_ids"]).to(device)
        where = int(torch.from_dlpack(inputs["write_indices"])[0, 0])
        outputs = [Tensor("logits", pos[..., None].float().expand(*pos.shape, 40).contiguous(), device=True)]
        for name in request.requested_output_names[1:]:
            past = torch.from_dlpack(inputs["past_key_values." + name.removeprefix("present.")]).to(device)
            past[:, :, where : where + pos.shape[1]] = write["value"]
            outputs.append(Tensor(name, past, device=True))
        return Response(outputs)

    server = types.SimpleNamespace(run=engine)
    backend = TritonBlsBackend(fake_pb_utils(server), "engine", manifest, cache_memory="gpu")
    logits = backend.step(np.array([[1, 2, 3]]), np.array([[0, 1, 2]]), np.array([0]))
    assert logits.dtype == np.float32 and logits[0, :, 0].tolist() == [0, 1, 2]
    backend.step(np.array([[4]]), np.array([[3]]), np.array([3]))
    assert seen[0]["past_key_values.0.key"] == (True, "cpu")  # the first step sends host zeros
    assert seen[1]["past_key_values.0.key"] == (False, device)  # then the cache stays where the engine put it
    cache = torch.from_dlpack(backend._cache[0])
    assert cache.dtype == getattr(torch, cache_dtype) and cache[0, 0, :4].float().eq(1).all()
    write["value"] = 0.0
    fresh = TritonBlsBackend(fake_pb_utils(server), "engine", manifest, cache_memory="gpu")
    with pytest.raises(TritonBlsError, match="does not return the updated cache"):
        fresh.step(np.array([[1, 2]]), np.array([[0, 1]]), np.array([0]))


def test_engine_with_in_place_cache_is_refused(tmp_path, ort_build):
    build = engine_dir(tmp_path / "engine", ort_build, cache_update="inplace")
    with pytest.raises(TritonRepositoryError, match="--cache-update copy"):
        write_repository(build, tmp_path / "repo", layout="bls")
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------------------------------------
# ONNX Runtime builds: one text model loading the build in its own process


@pytest.fixture(scope="module")
def in_process(ort_build, tmp_path_factory, pb2):
    return write_repository(ort_build, tmp_path_factory.mktemp("in_process") / "repo")


def test_in_process_generation_equals_runtime(in_process, served, monkeypatch, pb2):
    _, reference = served
    server = FakeTriton(in_process, pb2)
    model = load_text_model(in_process, server, monkeypatch, pb2)
    sent = ask(model, text_input=np.array([PROMPT.encode()], dtype=object), max_tokens=np.array([10], np.int32),
               stream=np.array([True]))  # fmt: skip
    [expected] = reference.generate([PROMPT], max_new_tokens=10, greedy=True)
    text, ids, _ = texts_and_ids(sent)
    assert ids == expected.output_ids and text == expected.text
    assert server.calls == []  # no BLS: the model ran the build itself
    seeded = ask(model, text_input=np.array([PROMPT.encode()], dtype=object), max_tokens=np.array([6], np.int32),
                 temperature=np.array([1.3], np.float32), seed=np.array([3], np.int64))  # fmt: skip
    [expected] = reference.generate([PROMPT], max_new_tokens=6, temperature=1.3, seed=3)
    assert texts_and_ids(seeded)[1] == expected.output_ids


def test_in_process_model_refuses_a_changed_or_moved_build(tmp_path, ort_build, monkeypatch, pb2):
    from mixtral_trt.runtime.backends.triton_bls import TritonModelMismatch

    build = tmp_path / "build"
    shutil.copytree(ort_build, build)
    repo = write_repository(build, tmp_path / "repo")
    manifest = read_manifest(build, verify=False)
    write_manifest(build, manifest["stage"], {**{k: v for k, v in manifest.items() if k not in (
        "format", "format_version", "stage", "files")}, "note": "rebuilt"})  # fmt: skip
    with pytest.raises(TritonModelMismatch, match="not build .* that this repository was written for"):
        load_text_model(repo, FakeTriton(repo, pb2), monkeypatch, pb2)
    shutil.rmtree(build)
    with pytest.raises(TritonModelMismatch, match="cannot be read .*put it back"):
        load_text_model(repo, FakeTriton(repo, pb2), monkeypatch, pb2)
