"""A stand-in for the nvinfer Python module (TensorRT's names, toy kernels as torch ops),
used by the TensorRT backend's tests where no real TensorRT engine can run."""

from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mixtral_trt.runtime.backends import tensorrt as trt_backend

MAX_BATCH, MAX_SEQ = 3, 16

# ---------------------------------------------------------------------------------------------
# A stand-in for the nvinfer Python module: the calls the backend makes, with TensorRT's names.


class DataType(enum.Enum):
    FLOAT, HALF, BF16, INT32, INT64 = range(5)


TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
TensorLocation = enum.Enum("TensorLocation", "DEVICE HOST")
TensorFormat = enum.Enum("TensorFormat", "LINEAR CHW2")
ExecutionContextAllocationStrategy = enum.Enum("Strategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")
_DTYPES = {"float32": DataType.FLOAT, "float16": DataType.HALF, "int64": DataType.INT64}


class FakeRegistry:
    def __init__(self, provides: dict[str, list[tuple[str, str, str]]]):
        self.provides, self.creators, self.loaded = provides, set(), []

    def load_library(self, path):
        self.loaded.append(Path(path).name)
        self.creators.update(self.provides.get(Path(path).name, []))
        return object()

    def get_creator(self, name, version, namespace=""):
        return object() if (name, version, namespace) in self.creators else None


class FakeEngine:
    def __init__(self, plan: dict):
        self.io = {e["name"]: dict(e, mode=mode) for mode, key in (("input", "inputs"), ("output", "outputs"))
                   for e in plan["io"][key]}  # fmt: skip
        self.names = list(self.io)
        self.profiles = [tuple(tuple(d) for d in p) for p in plan["profiles"]]
        self.num_optimization_profiles = len(self.profiles)
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = 4096
        self.contexts, self.enqueues, self.fail_capture = [], 0, False

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if self.io[name]["mode"] == "input" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return _DTYPES[self.io[name]["dtype"]]

    def get_tensor_shape(self, name):
        return [d if isinstance(d, int) else -1 for d in self.io[name]["shape"]]

    def get_tensor_location(self, name):
        return TensorLocation.DEVICE

    def get_tensor_format(self, name):
        return TensorFormat.LINEAR

    def get_tensor_profile_shape(self, name, p):
        assert name == "input_ids"
        return [list(d) for d in self.profiles[p]]

    def get_aliased_input_tensor(self, name):
        return name.replace("present.", "past_key_values.") if name.startswith("present.") else None

    def create_execution_context(self, strategy):
        assert strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.addresses, self.shapes, self.profile, self.memory = engine, {}, {}, 0, None

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, p, stream):
        self.profile = p
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return name in self.engine.io

    def set_input_shape(self, name, shape):
        if name == "input_ids":
            lo, _, hi = self.engine.profiles[self.profile]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        self.shapes[name] = tuple(shape)
        return True

    def execute_async_v3(self, stream):
        import torch

        self.engine.enqueues += 1
        if self.engine.fail_capture and torch.cuda.is_current_stream_capturing():
            return False
        assert torch.cuda.current_stream().cuda_stream == stream != 0  # the backend's own, non-default stream
        _toy_forward(self)
        return True


def _at(ptr: int, shape, dtype):
    """A torch view of device memory at ``ptr`` (zero-copy, through __cuda_array_interface__)."""
    import torch

    typestr = {torch.float32: "<f4", torch.int64: "<i8"}[dtype]
    holder = types.SimpleNamespace(__cuda_array_interface__={"shape": tuple(shape), "typestr": typestr,
                                                             "data": (ptr, False), "version": 2})  # fmt: skip
    return torch.as_tensor(holder, device="cuda")


def _toy_forward(ctx: FakeContext) -> None:
    """Toy model: layer i writes key = (i+1)·id + pos/8 (value = its negation) at each row's slots;
    logits[b, s, v] = (sum of layer-0 keys in slots <= pos[b, s]) · (v+1)/V."""
    import torch

    b, s = ctx.shapes["input_ids"]
    _, K, L, D = ctx.shapes["past_key_values.0.key"]
    V = ctx.engine.io["logits"]["shape"][-1]
    ids, pos = (_at(ctx.addresses[n], (b, s), torch.int64) for n in ("input_ids", "position_ids"))
    where = _at(ctx.addresses["write_indices"], (b,), torch.int64)
    slots = (where[:, None] + torch.arange(s, device="cuda"))[:, None, :, None].expand(b, K, s, D)
    for name, ptr in ctx.addresses.items():
        if name.startswith("present."):
            assert ptr == ctx.addresses[name.replace("present.", "past_key_values.")], name  # in place
            i, kind = int(name.split(".")[1]), name.split(".")[2]
            new = (ids.float() * (i + 1) + pos.float() / 8) * (1 if kind == "key" else -1)
            _at(ptr, (b, K, L, D), torch.float32).scatter_(2, slots, new[:, None, :, None].expand(b, K, s, D))
    key0 = _at(ctx.addresses["past_key_values.0.key"], (b, K, L, D), torch.float32)[:, 0, :, 0]  # [b, L]
    visible = torch.arange(L, device="cuda")[None, None, :] <= pos[:, :, None]  # [b, s, L]
    total = (visible * key0[:, None, :]).sum(-1)  # [b, s]
    scale = torch.arange(1, V + 1, device="cuda", dtype=torch.float32) / V
    _at(ctx.addresses["logits"], (b, s, V), torch.float32).copy_(total[..., None] * scale)


class ToyOracle:
    """The toy model in numpy: the layer-0 key cache and the logits it implies."""

    def __init__(self, vocab: int):
        self.key0, self.vocab = np.zeros((MAX_BATCH, MAX_SEQ)), vocab

    def step(self, ids, pos, where):
        b, s = ids.shape
        for t in range(s):
            self.key0[np.arange(b), where + t] = ids[:, t] + pos[:, t] / 8
        visible = np.arange(MAX_SEQ)[None, None, :] <= pos[:, :, None]
        total = (visible * self.key0[:b, None, :]).sum(-1)
        return total[..., None] * np.arange(1, self.vocab + 1) / self.vocab


@pytest.fixture
def fake_trt(monkeypatch):
    """Install the stand-in as ``tensorrt``; returns it (its registry and last engine inspectable)."""
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "11.0.0.fake"
    for enum_type in (DataType, TensorIOMode, TensorLocation, TensorFormat):
        setattr(mod, enum_type.__name__, enum_type)
    mod.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    mod.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    mod.registry = FakeRegistry({})
    mod.get_plugin_registry = lambda: mod.registry
    mod.engines = []

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                mod.engines.append(FakeEngine(json.loads(data)))
            except ValueError:
                self.logger.log(1, "Serialization assertion header.magicTag == kEXPECTED_MAGIC_TAG failed")
                return None
            return mod.engines[-1]

    mod.Runtime = Runtime
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    monkeypatch.setattr(trt_backend, "_LOADED_LIBRARIES", {})
    from mixtral_trt.optimize import trt_compat

    monkeypatch.setattr(trt_compat, "_LOGGERS", {})
    return mod
