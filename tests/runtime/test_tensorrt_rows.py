"""The TensorRT backend's row runs (the executor's steps over rows r0 .. r0+n-1).

CPU: the bindings it makes with the nvinfer stand-in, its cache in host tensors (no CUDA here):
each context's cache addresses are torch's own address of row r0, its shapes [n, K, L, D], one
decode context and CUDA graph per (r0, n), the prefill context re-pointed when the row changes.
``gpu``: the stand-in engine's toy kernels run a row run against the numpy oracle.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from mixtral_trt.runtime.backends.tensorrt import TensorRTBackend
from mixtral_trt.runtime.generator import GenerationError
from tests.runtime.fake_tensorrt import MAX_BATCH, MAX_SEQ, FakeEngine, ToyOracle, fake_trt  # noqa: F401
from tests.runtime.test_tensorrt_backend import _engine_dir, needs_cuda

torch = pytest.importorskip("torch")


class _Graph:
    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1


def _host_backend(tmp_path, fake_trt) -> TensorRTBackend:
    """The backend's binding state on host tensors, as _allocate lays it out on the GPU."""
    build, manifest = _engine_dir(tmp_path / "engine")
    cfg = manifest["config"]
    b = TensorRTBackend.__new__(TensorRTBackend)
    b.max_batch, b.max_seq_len, b.vocab_size = MAX_BATCH, MAX_SEQ, cfg["vocab_size"]
    b.layers, b.cuda_graphs, b._graph_error = cfg["num_hidden_layers"], True, None
    b._trt, b._logger = fake_trt, types.SimpleNamespace(errors=[])
    b.engine = FakeEngine(json.loads((build / "model.plan").read_text()))
    b._profiles = b.engine.profiles
    b.stream = types.SimpleNamespace(cuda_stream=7)
    b._scratch = torch.empty(256, dtype=torch.uint8)
    shape = (MAX_BATCH, cfg["num_key_value_heads"], MAX_SEQ, cfg["head_dim"])
    b.cache = {(i, k): torch.zeros(shape) for i in range(b.layers) for k in ("key", "value")}
    b._inputs = {n: torch.zeros(64, dtype=torch.int64) for n in ("input_ids", "position_ids", "write_indices")}
    b._addresses = {n: t.data_ptr() for n, t in b._inputs.items()} | {"logits": 12345}
    for (i, kind), buf in b.cache.items():
        b._addresses[f"past_key_values.{i}.{kind}"] = b._addresses[f"present.{i}.{kind}"] = buf.data_ptr()
    b._prefill, b._prefill_rows, b._decoders = {}, {}, {}
    b.enqueued = []
    b._enqueue = b.enqueued.append
    b._capture = lambda ctx, run: _Graph(run)
    return b


def _check_rows(b, ctx, r0, n=None):
    for (i, kind), buf in b.cache.items():
        past, present = ctx.addresses[f"past_key_values.{i}.{kind}"], ctx.addresses[f"present.{i}.{kind}"]
        assert past == present == buf[r0].data_ptr()
        if n is not None:
            assert ctx.shapes[f"past_key_values.{i}.{kind}"] == (n, *buf.shape[1:])
    for name, t in b._inputs.items():  # the staging buffers are shared by every context
        assert ctx.addresses[name] == t.data_ptr()


def test_decode_contexts_per_row_run(tmp_path, fake_trt):
    b = _host_backend(tmp_path, fake_trt)
    assert b.row_bytes == b.cache[(0, "key")].stride(0) * 4
    b._decode((1, 2), 1)
    b._decode((0, 3), 1)
    b._decode((1, 2), 1)
    assert set(b._decoders) == {(1, 2), (0, 3)}
    _check_rows(b, b._decoders[(1, 2)].context, 1, 2)
    _check_rows(b, b._decoders[(0, 3)].context, 0, 3)
    assert b._decoders[(1, 2)].context.shapes["input_ids"] == (2, 1)
    # one CUDA graph per (r0, n), captured after its first plain run, replayed afterwards
    assert b._decoders[(1, 2)].graph.run == (1, 2) and b._decoders[(1, 2)].graph.replays == 1
    assert b._decoders[(0, 3)].graph.replays == 0 and len(b.enqueued) == 2
    assert all(ctx.memory == (b._scratch.data_ptr(), 256) for ctx in b.engine.contexts)


def test_prefill_context_moves_to_the_row(tmp_path, fake_trt):
    b = _host_backend(tmp_path, fake_trt)
    ctx = b._prefill_context(0, 2)
    _check_rows(b, ctx, 2)
    assert b._prefill_context(0, 0) is ctx  # one context per profile, re-pointed
    _check_rows(b, ctx, 0)
    assert len(b.engine.contexts) == 1


def test_row_run_bounds(tmp_path, fake_trt):
    b = _host_backend(tmp_path, fake_trt)
    ids = np.ones((2, 1), np.int64)
    b._check_step(ids, ids, np.ones(2, np.int64), 1)
    with pytest.raises(GenerationError, match=r"rows 2\.\.3 are outside the cache's rows 0\.\.2"):
        b._check_step(ids, ids, np.ones(2, np.int64), 2)


@pytest.mark.gpu
@needs_cuda
def test_toy_engine_row_run_matches_oracle(tmp_path, fake_trt):
    build, manifest = _engine_dir(tmp_path / "engine")
    backend = TensorRTBackend(build, manifest)
    oracle = ToyOracle(backend.vocab_size)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 96, (1, 5))
    prefill = backend.step_rows(2, ids, np.arange(5)[None], np.zeros(1, np.int64))
    expected = _at(oracle, 2).step(ids, np.arange(5)[None], np.zeros(1, np.int64))
    np.testing.assert_allclose(prefill, expected, rtol=1e-5, atol=1e-3)
    ids = rng.integers(0, 96, (2, 1))
    where = np.array([0, 5])
    got = backend.step_rows(1, ids, where[:, None], where)
    np.testing.assert_allclose(got, _at(oracle, 1).step(ids, where[:, None], where), rtol=1e-5, atol=1e-3)
    assert not backend.cache[(0, "key")][0].any()  # row 0 never touched
    assert (1, 2) in backend._decoders


def _at(oracle: ToyOracle, r0: int) -> ToyOracle:
    view = ToyOracle(oracle.vocab)
    view.key0 = oracle.key0[r0:]
    return view
