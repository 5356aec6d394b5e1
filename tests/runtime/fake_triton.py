"""A stand-in ``triton_python_backend_utils`` for tests: BLS requests run the repository's engine
model in process with onnxruntime, checked against its config.pbtxt as Triton would. An engine
model (``tensorrt_plan``) runs as the ONNX graph its plan was built from (the engine manifest's
``source.directory``, lowered for ONNX Runtime as the runtime does), a stand-in for TensorRT."""

from __future__ import annotations

import threading
import types
from pathlib import Path

import numpy as np

TRITON_TYPES = {"TYPE_INT64": "int64", "TYPE_INT32": "int32", "TYPE_FP32": "float32", "TYPE_FP16": "float16",
                "TYPE_BF16": "bfloat16", "TYPE_BOOL": "bool", "TYPE_STRING": "bytes"}  # fmt: skip


def parse_config(pb2, path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb2.ModelConfig())


def type_name(config, number: int) -> str:
    """The TYPE_* name of a data_type number, from the config's own protobuf descriptor."""
    field = type(config).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"]
    return field.enum_type.values_by_number[number].name




class Tensor:
    """pb_utils.Tensor: numpy-backed; a 'device' tensor (GPU in Triton) only converts through DLPack."""

    def __init__(self, name, array, device=False):
        self._name, self._data, self._device = name, array, device

    def name(self):
        return self._name

    def is_cpu(self):
        return not self._device

    def as_numpy(self):
        if self._device:
            raise RuntimeError("as_numpy() of a GPU tensor")
        return np.asarray(self._data)

    def __dlpack__(self, stream=None):
        return self._data.__dlpack__()

    def __dlpack_device__(self):
        return self._data.__dlpack_device__()

    @staticmethod
    def from_dlpack(name, obj):
        if isinstance(obj, Tensor):
            return Tensor(name, obj._data, obj._device)  # a rename: same memory
        import torch

        return Tensor(name, torch.from_dlpack(obj), device=False)


class FakeTriton:
    """Runs BLS requests against the repository's engine model as Triton would: inputs checked
    against its config.pbtxt (names, types, dims, max_batch_size, reshape), outputs as requested."""

    def __init__(self, repo: Path, pb2, present_written: bool = True):
        import onnxruntime as ort

        self.repo, self.calls, self.present_written = repo, [], present_written
        self.configs, self.sessions = {}, {}
        for config_path in repo.glob("*/config.pbtxt"):
            config = parse_config(pb2, config_path)
            self.configs[config.name] = config
            if config.platform == "onnxruntime_onnx":
                self.sessions[config.name] = ort.InferenceSession(str(config_path.parent / "1" / "model.onnx"))
            elif config.platform == "tensorrt_plan":
                self.sessions[config.name] = _plan_session(ort, config_path.parent / "1")

    def run(self, request) -> object:
        config, inputs = self.configs.get(request.model_name), {}
        if config is None or request.model_name not in self.sessions:
            return Response([], f"Request for unknown model: '{request.model_name}' is not found")
        spec = {t.name: t for t in config.input}
        for t in request.inputs:
            a = t.as_numpy() if t.is_cpu() else __import__("torch").from_dlpack(t).numpy()
            s = spec[t.name()]
            want = TRITON_TYPES[type_name(config, s.data_type)]
            assert a.dtype == np.dtype(want), f"{s.name}: {a.dtype}, config says {want}"
            assert 1 <= a.shape[0] <= config.max_batch_size, f"{s.name}: batch {a.shape[0]}"
            assert len(a.shape) == 1 + len(s.dims) and all(d in (-1, n) for d, n in zip(s.dims, a.shape[1:])), (
                f"{s.name}: shape {list(a.shape)} against dims {list(s.dims)}")  # fmt: skip
            inputs[s.name] = a.reshape(a.shape[0], *s.reshape.shape) if s.HasField("reshape") else a
        assert set(inputs) == {n for n, s in spec.items() if not s.optional}, "missing inputs"
        assert len({a.shape[0] for a in inputs.values()}) == 1, "inputs of different batch sizes"
        assert set(request.requested_output_names) <= {t.name for t in config.output}
        self.calls.append(inputs["input_ids"].shape)
        names = list(request.requested_output_names)
        values = self.sessions[request.model_name].run(names, inputs)
        device = request.preferred_memory is not None and request.preferred_memory.kind == "gpu"
        outputs = []
        for name, value in zip(names, values):
            if name.startswith("present.") and not self.present_written:
                value = np.zeros_like(value)  # as if the backend left a separately bound output alone
            data = __import__("torch").from_numpy(value) if device else value
            outputs.append(Tensor(name, data, device=device))
        return Response(outputs)


def _plan_session(ort, version_dir: Path):
    """An ONNX Runtime session of the graph an engine model's plan was built from."""
    import json

    from mixtral_trt.manifest import read_manifest
    from mixtral_trt.runtime.backends.onnxruntime import _model_bytes

    build = Path(json.loads((version_dir / "mixtral_build.json").read_text())["build_dir"])
    source = Path(read_manifest(build, verify=False)["source"]["directory"])
    options = ort.SessionOptions()
    return ort.InferenceSession(_model_bytes(source, read_manifest(source, verify=False), options), options)


class Response:
    def __init__(self, output_tensors=(), error=None):
        self._outputs, self._error = list(output_tensors), error

    def output_tensors(self):
        return self._outputs

    def has_error(self):
        return self._error is not None

    def error(self):
        return types.SimpleNamespace(message=lambda: str(self._error))


class Sender:
    """A response sender that any thread may call (a decoupled model answers from threads of its own);
    ``wait()`` blocks until the final flag. ``cancel_after``: is_cancelled() once that many were sent."""

    def __init__(self):
        self.sent, self.cancel_after, self.errors = [], None, []
        self._final = threading.Event()
        self._lock = threading.Lock()

    def send(self, response=None, flags=0):
        with self._lock:
            if self.sent and self.sent[-1][1]:
                self.errors.append("a response after the final flag")  # Triton refuses it; the test fails
                raise RuntimeError("a response after the final flag")
            self.sent.append((response, flags))
        if flags & 1:
            self._final.set()

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after

    def wait(self, timeout: float = 60.0):
        assert self._final.wait(timeout), f"no final response within {timeout} s (sent: {len(self.sent)})"
        assert not self.errors, self.errors
        return self.sent


class Request:
    def __init__(self, **inputs):
        self.inputs, self.sender = inputs, Sender()

    def get_response_sender(self):
        return self.sender


def fake_pb_utils(server: FakeTriton) -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.TRITONSERVER_MEMORY_GPU, pb.TRITONSERVER_MEMORY_CPU = "gpu", "cpu"
    pb.Tensor = Tensor
    pb.PreferredMemory = lambda kind, device: types.SimpleNamespace(kind=kind, device=device)
    pb.TritonError = lambda message: message
    pb.InferenceResponse = lambda output_tensors=(), error=None: Response(output_tensors, error)

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names, preferred_memory=None, **_):
            self.model_name, self.inputs = model_name, inputs
            self.requested_output_names, self.preferred_memory = requested_output_names, preferred_memory

        def exec(self):
            return server.run(self)

    pb.InferenceRequest = InferenceRequest

    def get_input_tensor_by_name(request, name):
        value = request.inputs.get(name)
        return None if value is None else Tensor(name, np.asarray(value))

    pb.get_input_tensor_by_name = get_input_tensor_by_name
    pb.get_output_tensor_by_name = lambda response, name: next(
        (t for t in response.output_tensors() if t.name() == name), None)  # fmt: skip
    return pb
