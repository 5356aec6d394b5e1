"""The default Triton layout: one decoupled Python-backend model that loads the build and feeds every
concurrent request into one executor. Driven by the stand-in ``triton_python_backend_utils``
(tests/runtime/fake_triton.py), whose response senders collect what the model's threads send; every
request's tokens are checked against the same prompt run alone through ``runtime.load(...).generate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mixtral_trt import runtime
from mixtral_trt.manifest import sha256_file
from mixtral_trt.triton import write_repository
from tests.conftest import load_module, make_checkpoint
from tests.runtime.fake_triton import FakeTriton, Request, fake_pb_utils, parse_config
from tests.runtime.test_triton import engine_dir

MAX_BATCH, MAX_SEQ = 8, 64
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,", "Hello",
           "The quick brown fox jumps over the lazy dog and then", "In 1492", "Water boils at",
           "def f(x):"]  # fmt: skip


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """An export with eight cache rows (tiny model, real Mixtral tokenizer)."""
    from mixtral_trt.export.onnx_export import export

    root = tmp_path_factory.mktemp("triton_executor")
    ckpt = make_checkpoint(root / "ckpt", seed=9, num_hidden_layers=2, hidden_size=64, intermediate_size=96)
    return export(ckpt, root / "export", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)


@pytest.fixture(scope="module")
def reference(build):
    return runtime.load(build)


@pytest.fixture(scope="module")
def pb2():
    return pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'tritonclient[grpc]'")


@pytest.fixture(scope="module")
def repo(build, tmp_path_factory):
    return write_repository(build, tmp_path_factory.mktemp("repo") / "repo")


@pytest.fixture
def steps(monkeypatch):
    """Rows of every decode step (seq 1) any ONNX Runtime backend created from now on runs."""
    from mixtral_trt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    seen, real = [], OnnxRuntimeBackend.step_rows

    def recording(self, r0, input_ids, *args):
        if input_ids.shape[1] == 1:
            seen.append(input_ids.shape[0])
        return real(self, r0, input_ids, *args)

    monkeypatch.setattr(OnnxRuntimeBackend, "step_rows", recording)
    return seen


@pytest.fixture
def text_model(repo, monkeypatch, pb2):
    model = load_text_model(repo, pb2, monkeypatch)
    yield model
    model.finalize()


def load_text_model(repo: Path, pb2, monkeypatch, device_id: str = "0"):
    from google.protobuf import json_format

    server = FakeTriton(repo, pb2)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils(server))
    module = load_module(repo / "mixtral" / "1" / "model.py", "mixtral_text_model_executor")
    model = module.TritonPythonModel()
    config = json_format.MessageToDict(server.configs["mixtral"], preserving_proto_field_name=True)
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / "mixtral"),
                      "model_version": "1", "model_instance_kind": "GPU",
                      "model_instance_device_id": device_id})  # fmt: skip
    return model


def request(prompt: str, max_tokens: int, stream: bool = True, **sampling) -> Request:
    inputs = {"text_input": np.array([prompt.encode()], dtype=object), "max_tokens": np.array([max_tokens], np.int32),
              "stream": np.array([stream])}  # fmt: skip
    for name, value in sampling.items():
        inputs[name] = np.array([value], np.int64 if name == "seed" else np.float32)
    return Request(**inputs)


def answer(sent) -> tuple[str, list[int]]:
    responses = [r for r, _ in sent if r is not None]
    assert all(not r.has_error() for r in responses), [r.error().message() for r in responses]
    assert [flags for _, flags in sent][-1] == 1 and all(flags == 0 for _, flags in sent[:-1])
    text = "".join(r.output_tensors()[0].as_numpy()[0].decode() for r in responses)
    return text, [int(i) for r in responses for i in r.output_tensors()[1].as_numpy()]


def alone(reference, prompt: str, max_tokens: int, **sampling):
    options = {"temperature": sampling["temperature"], "seed": sampling["seed"]} if sampling else {"greedy": True}
    [result] = reference.generate([prompt], max_new_tokens=max_tokens, **options)
    return result


def test_config_is_one_decoupled_model_with_the_build(repo, build, pb2):
    assert sorted(p.name for p in repo.iterdir()) == ["mixtral"]
    config = parse_config(pb2, repo / "mixtral" / "config.pbtxt")
    assert (config.backend, config.max_batch_size, config.model_transaction_policy.decoupled) == ("python", 0, True)
    assert [g.kind for g in config.instance_group] == [pb2.ModelInstanceGroup.KIND_CPU]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"build_dir": str(build.resolve()), "build_id": sha256_file(build / "manifest.json"),
                      "verify": "true", "backend": "onnxruntime"}  # fmt: skip
    assert "one executor" in (repo / "mixtral" / "README.md").read_text()


def test_eight_concurrent_requests_run_in_one_executor(steps, text_model, reference):  # steps first: it patches
    """One execute() call with eight requests (greedy and seeded, streamed and not): decode steps run over
    several slots at once, and every request's tokens are those it gets alone."""
    specs = [(p, 14, n % 2 == 0, {} if n % 3 else {"temperature": 1.2, "seed": 100 + n}) for n, p in enumerate(PROMPTS)]
    requests = [request(p, m, stream, **s) for p, m, stream, s in specs]
    assert text_model.execute(requests) is None
    for r, (prompt, max_tokens, stream, sampling) in zip(requests, specs):
        sent = r.sender.wait()
        expected = alone(reference, prompt, max_tokens, **sampling)
        assert answer(sent) == (expected.text, expected.output_ids), prompt
        assert len(sent) == (len(expected.output_ids) + 1 if stream else 1)
    assert max(steps) >= 4, steps  # several requests in each decode step, not one after the other
    executor = text_model.server.executor
    assert executor.stats()["running"] == 0 and executor.free_slots() == MAX_BATCH


def test_cancelled_request_frees_its_slot_and_the_others_finish(text_model, reference):
    handles = []
    real_submit = text_model.server.executor.submit
    text_model.server.executor.submit = lambda *a, **k: handles.append(real_submit(*a, **k)) or handles[-1]
    requests = [request(p, 12) for p in PROMPTS[:5]]
    requests[0] = request(PROMPTS[0], 40)
    requests[0].sender.cancel_after = 3
    text_model.execute(requests)
    cancelled = requests[0].sender.wait()
    assert [flags for _, flags in cancelled] == [0, 0, 0, 1]  # three tokens, then only the final flag
    result = handles[0].result(timeout=30)
    assert result.finish_reason == "cancelled" and len(result.output_ids) < 40
    for r, prompt in zip(requests[1:], PROMPTS[1:5]):
        expected = alone(reference, prompt, 12)
        assert answer(r.sender.wait()) == (expected.text, expected.output_ids)
    assert text_model.server.executor.free_slots() == MAX_BATCH


def test_bad_requests_get_their_own_errors_while_the_rest_succeed(text_model, reference):
    good = [request(p, 10) for p in PROMPTS[:3]]
    too_long, bad_top_p, no_text = request(PROMPTS[0], MAX_SEQ), request(PROMPTS[1], 4, top_p=2.0), Request()
    text_model.execute([good[0], too_long, good[1], bad_top_p, no_text, good[2]])
    for bad, message in ((too_long, f"exceeds the build's max_seq_len={MAX_SEQ}"), (bad_top_p, "top_p"),
                         (no_text, "input 'text_input' is required")):  # fmt: skip
        [(response, flags)] = bad.sender.wait()
        assert flags == 1 and response.has_error() and message in response.error().message()
    for r, prompt in zip(good, PROMPTS):
        expected = alone(reference, prompt, 10)
        assert answer(r.sender.wait()) == (expected.text, expected.output_ids)


def test_finalize_ends_every_open_request_with_the_final_flag(repo, pb2, monkeypatch):
    model = load_text_model(repo, pb2, monkeypatch)
    requests = [request(p, 50) for p in PROMPTS[:3]]
    model.execute(requests)
    model.finalize()
    for r in requests:
        assert r.sender.wait(10)[-1][1] == 1


# ---------------------------------------------------------------------------------------------
# Engine builds: the same one model, loading the engine through the runtime's TensorRT backend


def engine_repository(engine: Path, root: Path, pb2):
    lib = root / "libmixtral_trt_plugins.so"
    lib.write_bytes(b"\x7fELF stand-in")
    repo = write_repository(engine, root / "repo", plugin_libraries=[lib], instances=2)
    assert sorted(p.name for p in repo.iterdir()) == ["mixtral"]  # no tensorrt_plan model, no BLS
    assert sorted(p.name for p in (repo / "mixtral" / "1").iterdir()) == [lib.name, "mixtral_build.json", "model.py"]
    assert not (repo / "mixtral" / "1" / "model.plan").exists()  # the plan stays in the build
    config = parse_config(pb2, repo / "mixtral" / "config.pbtxt")
    assert (config.backend, config.max_batch_size, config.model_transaction_policy.decoupled) == ("python", 0, True)
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb2.ModelInstanceGroup.KIND_GPU, 2)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"build_dir": str(engine.resolve()), "build_id": sha256_file(engine / "manifest.json"),
                      "verify": "true", "backend": "tensorrt", "plugin_libraries": lib.name}  # fmt: skip
    return repo


def serves_through_tensorrt_load(repo: Path, engine: Path, source: Path, reference, pb2, monkeypatch):
    """The model calls runtime.load(build, backend="tensorrt", device=<instance's GPU>, plugin_libraries=
    [the shipped copy]); here an ONNX Runtime load of the engine's source stands in for the engine."""
    calls, real_load = [], runtime.load

    def load(build_dir, backend="onnxruntime", verify=True, **options):
        calls.append((Path(build_dir), backend, options))
        return real_load(source)

    monkeypatch.setattr(runtime, "load", load)
    model = load_text_model(repo, pb2, monkeypatch, device_id="1")
    try:
        assert calls == [(engine.resolve(), "tensorrt", {"device": 1, "plugin_libraries": [
            str(repo / "mixtral" / "1" / "libmixtral_trt_plugins.so")]})]  # fmt: skip
        requests = [request(p, 8) for p in PROMPTS[:3]]
        model.execute(requests)
        for r, prompt in zip(requests, PROMPTS):
            expected = alone(reference, prompt, 8)
            assert answer(r.sender.wait()) == (expected.text, expected.output_ids)
    finally:
        model.finalize()


def test_in_place_engine_repository_is_one_model(tmp_path, build, reference, pb2, monkeypatch):
    """A manifest-only engine (in-place cache update: refused by the bls layout, served here)."""
    engine = engine_dir(tmp_path / "engine", build, cache_update="inplace")
    repo = engine_repository(engine, tmp_path, pb2)
    assert "backend=\"tensorrt\"" in (repo / "mixtral" / "README.md").read_text()
    serves_through_tensorrt_load(repo, engine, build, reference, pb2, monkeypatch)


@pytest.mark.tensorrt
def test_tensorrt_rtx_engine_repository(tmp_path, build, reference, pb2, monkeypatch):
    """A real TensorRT-RTX engine built here (in-place cache): one model that loads it with the runtime's
    TensorRT backend (Triton's tensorrt_plan platform could not run it)."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    from mixtral_trt.optimize import engine as engine_build

    engine = engine_build.build(build, tmp_path / "rtx", target="tensorrt-rtx", max_seq_len=32, progress=False)
    repo = engine_repository(engine, tmp_path, pb2)
    assert "`tensorrt_rtx`" in (repo / "mixtral" / "README.md").read_text()
    serves_through_tensorrt_load(repo, engine, build, reference, pb2, monkeypatch)
