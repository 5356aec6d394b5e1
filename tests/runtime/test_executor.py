"""The executor: requests arriving and leaving while others run give what they give alone.

Oracles: each request run alone (``generate`` of a batch of one, nothing else in the cache), a
plain loop over ``backend.step`` (whole prompt in one step, argmax; no executor code), and numpy
comparisons of the cache bytes a row run touches.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from mixtral_trt import runtime
from mixtral_trt.runtime.executor import Executor, QueueFullError, row_runs
from tests.conftest import make_checkpoint

SLOTS, MAX_SEQ, CHUNK = 4, 64, 8
SHAPES = {
    "tiny": dict(),
    "mqa-1layer": dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                       intermediate_size=96, num_local_experts=4),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SHAPES))
def model(request, tmp_path_factory):
    from mixtral_trt.export.onnx_export import export

    root = tmp_path_factory.mktemp(f"exec-{request.param}")
    ckpt = make_checkpoint(root / "ckpt", seed=11, **SHAPES[request.param])
    export(ckpt, root / "export", max_batch=SLOTS, max_seq_len=MAX_SEQ, progress=False)
    return runtime.load(root / "export", executor={"prefill_chunk": CHUNK})


class Recorder:
    """Wraps a backend's step_rows: every (r0, n, seq) it is called with, in order."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self.max_batch, self.max_seq_len, self.vocab_size = backend.max_batch, backend.max_seq_len, backend.vocab_size

    def step_rows(self, r0, ids, pos, where):
        self.calls.append((r0, *ids.shape, where.tolist()))
        return self.backend.step_rows(r0, ids, pos, where)


def _executor(model, **options) -> tuple[Executor, Recorder]:
    rec = Recorder(model.backend)
    return Executor(rec, model.tokenizer, **({"prefill_chunk": CHUNK} | options)), rec


def _requests(seed: int, n: int = 16):
    """n (prompt ids, sampling) of different lengths, half greedy, half seeded sampling."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ids = [1, *rng.integers(3, 32000, int(rng.integers(1, 40))).tolist()]
        new = int(rng.integers(2, 12))
        if k % 2:
            sampling = dict(max_new_tokens=new, seed=int(rng.integers(0, 1000)), temperature=float(rng.uniform(0.7, 3)),
                            top_k=int(rng.choice([0, 40])), top_p=float(rng.choice([1.0, 0.9])))  # fmt: skip
        else:
            sampling = dict(max_new_tokens=new, greedy=True)
        out.append((ids, sampling))
    return out


def _alone(model, requests):
    return [model.generate([ids], **sampling)[0].output_ids for ids, sampling in requests]


def _plain_greedy(backend, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with the backend alone: the whole prompt in one step at row 0, then argmax."""
    out = []
    logits = backend.step(np.array([ids]), np.arange(len(ids))[None], np.zeros(1, np.int64))[0, -1]
    for t in range(n):
        out.append(int(np.argmax(logits)))
        p = len(ids) + t
        logits = backend.step(np.array([[out[-1]]]), np.array([[p]]), np.array([p]))[0, -1]
    return out


def test_row_runs():
    assert row_runs([]) == []
    assert row_runs([3, 0, 1]) == [(0, 4)]
    assert row_runs([0, 1, 3, 7], max_gap=0) == [(0, 2), (3, 1), (7, 1)]
    assert row_runs([0, 2, 3, 6], max_gap=1) == [(0, 4), (6, 1)]


def test_concurrent_requests_equal_their_lone_results(model):
    """16 requests arriving over time (the loop on its thread): each gets its lone tokens."""
    requests = _requests(5)
    alone = _alone(model, requests)
    for (ids, sampling), tokens in zip(requests, alone):
        if sampling.get("greedy"):
            assert tokens[: len(_plain_greedy(model.backend, ids, 3))] == _plain_greedy(model.backend, ids, 3)
    executor, rec = _executor(model)
    handles = [None] * len(requests)
    delays = np.random.default_rng(1).uniform(0, 0.02, len(requests))
    with executor:
        for k, ((ids, sampling), delay) in enumerate(zip(requests, delays)):
            time.sleep(delay)
            handles[k] = executor.submit(ids, **sampling)
        got = [h.result(timeout=120).output_ids for h in handles]
    assert got == alone
    assert executor.free_slots() == SLOTS and not executor.busy
    decode_batches = [n for _, n, s, _ in rec.calls if s == 1]
    assert max(decode_batches) >= 3  # steps really ran with several slots


def test_deterministic_arrivals_with_split_runs(model):
    """Arrivals between iterations (no thread), decode runs split around non-decoding rows."""
    requests = _requests(9)
    alone = _alone(model, requests)
    executor, rec = _executor(model, max_gap=0)
    handles = []
    for k, (ids, sampling) in enumerate(requests):
        handles.append(executor.submit(ids, **sampling))
        for _ in range(k % 3):
            executor.step()
    executor.run_until_idle()
    assert [h.result().output_ids for h in handles] == alone
    assert executor.free_slots() == SLOTS
    for r0, n, s, where in rec.calls:  # split mode: a decode run holds decoding rows only (no placeholder)
        assert s > 1 or 0 not in where or n == 1


def test_long_prompt_prefills_in_chunks_between_decodes(model):
    """A long prompt at row 1 prefills chunk by chunk while rows 0 and 2 decode through it (their run
    bridges row 1 with a placeholder at its next write index): its tokens and theirs are unchanged."""
    short = [([1, 415, 2936, 9060], dict(max_new_tokens=20, greedy=True)),
             ([1, 22557], dict(max_new_tokens=20, seed=3, temperature=1.5)),
             ([1, 330, 2936], dict(max_new_tokens=20, greedy=True))]  # fmt: skip
    long_ids = [1, *np.random.default_rng(2).integers(3, 32000, 45).tolist()]
    alone = _alone(model, short) + _alone(model, [(long_ids, dict(max_new_tokens=6, greedy=True))])
    assert alone[3] == _plain_greedy(model.backend, long_ids, 6)  # chunked prefill = one-step prefill
    executor, rec = _executor(model)
    a, b, c = (executor.submit(ids, **s) for ids, s in short)
    executor.step()
    executor.step()
    b.cancel()  # frees row 1 at once
    assert executor.free_slots() == SLOTS - 2
    long, mark = executor.submit(long_ids, max_new_tokens=6, greedy=True), len(rec.calls)
    executor.run_until_idle()
    assert long.result().output_ids == alone[3]
    assert a.result().output_ids == alone[0] and c.result().output_ids == alone[2]
    cut = b.result().output_ids  # two iterations: the token of its prefill, one decode step each
    assert b.result().finish_reason == "cancelled" and cut == alone[1][:3]
    chunks = [(k, where[0]) for k, (r0, n, s, where) in enumerate(rec.calls) if k >= mark and r0 == 1 and s > 1]
    assert [w for _, w in chunks] == list(range(0, len(long_ids), CHUNK))  # 8-token chunks at row 1
    between = [call for call in rec.calls[chunks[0][0] : chunks[-1][0]] if call[2] == 1]
    assert between and all(r0 == 0 and n == 3 for r0, n, _, _ in between)  # decodes of rows 0..2 interleaved
    assert [w[1] for _, _, _, w in between] == [w for _, w in chunks[1:]]  # placeholder at the next chunk's slot
    assert executor.free_slots() == SLOTS


def test_row_run_touches_only_its_rows(model):
    """step_rows(r0, ...) writes rows r0.. only, exactly what a row-0 step writes there; batched decode
    logits per row equal batch-1 ones to float32 rounding (ONNX Runtime's MoE kernel: M=1 GEMV path)."""
    backend = model.backend
    rng = np.random.default_rng(4)
    ids = rng.integers(3, 32000, (1, 7))
    for buf in backend.cache.values():
        buf[:] = 0
    first = backend.step_rows(0, ids, np.arange(7)[None], np.zeros(1, np.int64))
    row0 = {k: v[0].copy() for k, v in backend.cache.items()}
    for buf in backend.cache.values():
        buf[:] = 0
    again = backend.step_rows(2, ids, np.arange(7)[None], np.zeros(1, np.int64))
    np.testing.assert_array_equal(again, first)
    for key, buf in backend.cache.items():
        np.testing.assert_array_equal(buf[2], row0[key])
        assert not buf[[0, 1, 3]].any(), key
    # decode rows 1..3 (row 1 and 3 from their own prompts) against each row alone at row 0
    prompts = [rng.integers(3, 32000, (1, L)) for L in (3, 7, 5)]
    for r, p in zip((1, 2, 3), prompts):
        backend.step_rows(r, p, np.arange(p.shape[1])[None], np.zeros(1, np.int64))
    snapshot = {k: v.copy() for k, v in backend.cache.items()}
    tokens, where = rng.integers(3, 32000, (3, 1)), np.array([3, 7, 5])
    batched = backend.step_rows(1, tokens, where[:, None], where)
    for k in range(3):
        for key, buf in backend.cache.items():
            buf[0] = snapshot[key][1 + k]
        alone = backend.step_rows(0, tokens[k : k + 1], where[k : k + 1, None], where[k : k + 1])
        np.testing.assert_allclose(batched[k], alone[0], rtol=0, atol=1e-5)


def test_cancel_frees_the_slot(model):
    executor, _ = _executor(model)
    handle = executor.submit([1, 415, 2936], max_new_tokens=30, greedy=True)
    stream = iter(handle)  # no loop thread: iterating drives the executor
    seen = [next(stream).token_id, next(stream).token_id]
    assert executor.free_slots() == SLOTS - 1
    handle.cancel()
    assert executor.free_slots() == SLOTS and not executor.busy
    result = handle.result()
    assert result.finish_reason == "cancelled" and result.output_ids == seen
    assert [d.token_id for d in stream] == []
    # cancelled while waiting in the queue: never admitted
    queued = executor.submit([1, 415], max_new_tokens=3)
    queued.cancel()
    assert queued.result().output_ids == [] and not executor.busy
    # with the loop on its thread: the slot is free within a step
    with executor:
        handle = executor.submit([1, 415, 2936], max_new_tokens=40, greedy=True)
        for n, _ in enumerate(handle):
            if n == 2:
                handle.cancel()
        assert handle.result().finish_reason == "cancelled"
        deadline = time.monotonic() + 10
        while executor.free_slots() < SLOTS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert executor.free_slots() == SLOTS


def test_queue_full_is_a_clear_error(model):
    executor, _ = _executor(model, max_queue=2)
    first = [executor.submit([1, 415], max_new_tokens=2) for _ in range(2)]
    with pytest.raises(QueueFullError, match=r"queue is full \(2 waiting, max_queue=2\); retry later"):
        executor.submit([1, 415], max_new_tokens=2)
    assert issubclass(QueueFullError, runtime.GenerationError)
    executor.run_until_idle()
    assert all(len(h.result().output_ids) == 2 for h in first)
    assert len(executor.submit([1, 415], max_new_tokens=2).result().output_ids) == 2


def test_submit_checks_each_request(model):
    executor, _ = _executor(model)
    with pytest.raises(runtime.GenerationError, match="prompt has token id 32000 outside the vocabulary"):
        executor.submit([1, 32000])
    with pytest.raises(runtime.GenerationError, match=r"prompt of 60 tokens \+ max_new_tokens=5 = 65 exceeds"):
        executor.submit([1] * 60, max_new_tokens=5)
    with pytest.raises(runtime.GenerationError, match="top_p=2.0"):
        executor.submit([1], top_p=2.0)
    executor.close()
    with pytest.raises(runtime.GenerationError, match="executor is closed"):
        executor.submit([1])


def test_async_iteration_streams_text(model):
    prompts = ["The quick brown fox", "Paris is", "Once upon a time, in a small village"]
    stop = model.generate([prompts[1]], max_new_tokens=10, greedy=True)[0].text[3:6]
    expected = [model.generate([p], max_new_tokens=10, greedy=True, stop=[stop])[0] for p in prompts]
    executor, _ = _executor(model)

    async def consume(handle):
        return [d async for d in handle]

    async def main():
        handles = [executor.submit(p, max_new_tokens=10, greedy=True, stop=[stop]) for p in prompts]
        return handles, await asyncio.gather(*(consume(h) for h in handles))

    for threaded in (True, False):  # the loop thread, or the iterators stepping it off the event loop
        if threaded:
            executor.start()
        handles, streams = asyncio.run(main())
        executor.stop()
        for handle, deltas, want in zip(handles, streams, expected):
            result = handle.result()
            assert [d.token_id for d in deltas] == result.output_ids == want.output_ids
            assert "".join(d.text for d in deltas) == result.text == want.text  # held back, never taken back
    assert expected[1].finish_reason == "stop"
    assert executor.free_slots() == SLOTS


def test_generate_from_threads_while_the_loop_runs(model):
    """Model.generate goes through the same executor: batches from 3 threads share its steps."""
    batches = [[[1, 415, 2936]], [[1, 22557, 349], [1, 330]], [[1, 9060]]]
    alone = [[model.generate([p], max_new_tokens=8, greedy=True)[0].output_ids for p in b] for b in batches]
    results, before = [None] * 3, model.executor.iterations
    with model.executor:
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(
            k, [r.output_ids for r in model.generate(batches[k], max_new_tokens=8, greedy=True)])) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == alone and model.executor.iterations > before
    assert model.executor.free_slots() == SLOTS and not model.executor.running


def test_result_timings(model):
    [r] = model.generate([[1, 415, 2936]], max_new_tokens=5, greedy=True)
    assert r.queue_ms >= 0 and r.ttft_ms >= r.prefill_ms > 0
    assert len(r.token_ms) == 4 and all(t > 0 for t in r.token_ms)
    assert r.decode_tokens_per_s == pytest.approx(4 / (sum(r.token_ms) / 1e3))


def test_logits_wait_for_an_idle_executor(model):
    """Model.logits steps rows from 0 itself: refused while a request holds a slot, not corrupting it."""
    [alone] = model.generate([[1, 415, 2936]], max_new_tokens=6, greedy=True)
    handle = model.executor.submit([1, 415, 2936], max_new_tokens=6, greedy=True)
    model.executor.step()
    with pytest.raises(runtime.GenerationError, match="executor is serving requests"):
        model.logits([[1, 9060, 349, 264]])
    assert handle.result().output_ids == alone.output_ids
    [logits] = model.logits([[1, 415, 2936]])
    assert int(np.argmax(logits[-1])) == alone.output_ids[0]
