"""Soak: 300 requests with random arrivals, lengths and sampling, 10% cancelled mid-stream, through
the executor's loop thread and async iterators. Nothing lost or duplicated, every slot free at the
end, memory flat after warm-up, and the greedy ones equal to their lone results."""

from __future__ import annotations

import asyncio

import numpy as np
import psutil
import pytest

from mixtral_trt import runtime
from mixtral_trt.runtime.executor import Executor
from tests.conftest import make_checkpoint

SLOTS, MAX_SEQ, N, WARM_UP = 4, 48, 300, 60


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mixtral_trt.export.onnx_export import export

    root = tmp_path_factory.mktemp("soak")
    ckpt = make_checkpoint(root / "ckpt", seed=2, num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                           num_key_value_heads=1, intermediate_size=64, num_local_experts=4)  # fmt: skip
    export(ckpt, root / "export", max_batch=SLOTS, max_seq_len=MAX_SEQ, progress=False)
    return runtime.load(root / "export", executor={"prefill_chunk": 8})


def _plan(rng):
    plans = []
    for k in range(N):
        ids = [1, *rng.integers(3, 32000, int(rng.integers(0, 30))).tolist()]
        sampling = dict(max_new_tokens=int(rng.integers(1, 9)))
        if rng.random() < 0.5:
            sampling["greedy"] = True
        else:
            sampling.update(seed=int(rng.integers(0, 10**6)), temperature=float(rng.uniform(0.5, 2)),
                            top_k=int(rng.choice([0, 20])))  # fmt: skip
        if rng.random() < 0.1:
            sampling["stop"] = ["e"]
        cancel_after = int(rng.integers(0, 3)) if rng.random() < 0.1 else None
        plans.append((ids, sampling, cancel_after, float(rng.uniform(0, 0.004))))
    return plans


async def _consume(handle, cancel_after):
    deltas = []
    async for delta in handle:
        deltas.append(delta)
        if cancel_after is not None and len(deltas) > cancel_after:
            handle.cancel()
    return deltas


async def _run(executor, plans, rss):
    tasks = []
    for k, (ids, sampling, cancel_after, pause) in enumerate(plans):
        await asyncio.sleep(pause)
        handle = executor.submit(ids, **sampling)
        rss.peak = max(getattr(rss, "peak", 0), executor.stats()["running"])
        tasks.append(asyncio.ensure_future(_consume(handle, cancel_after)))
        tasks[-1].handle = handle
        if k == WARM_UP:
            await asyncio.gather(*tasks)
            rss.append(psutil.Process().memory_info().rss)
    streams = await asyncio.gather(*tasks)
    return [t.handle for t in tasks], streams


class _Samples(list):
    peak = 0


def test_soak(model):
    plans = _plan(np.random.default_rng(7))
    executor = Executor(model.backend, model.tokenizer, max_queue=N, prefill_chunk=8)
    rss = _Samples()
    with executor:
        handles, streams = asyncio.run(_run(executor, plans, rss))
    rss.append(psutil.Process().memory_info().rss)
    assert len({h.request_id for h in handles}) == N
    cancelled = 0
    for (ids, sampling, cancel_after, _), handle, deltas in zip(plans, handles, streams):
        result = handle.result()
        assert [d.token_id for d in deltas] == result.output_ids  # every token once, in order
        assert [d.index for d in deltas] == list(range(len(deltas)))
        assert result.prompt_ids == ids and len(result.output_ids) <= sampling["max_new_tokens"]
        if result.finish_reason == "cancelled":
            cancelled += 1
            # cancelled on seeing token cancel_after; the loop thread may have chosen a few more by then
            assert cancel_after is not None and cancel_after + 1 <= len(result.output_ids) < sampling["max_new_tokens"]
        else:
            assert result.finish_reason in ("eos", "stop", "length")
            assert "".join(d.text for d in deltas) == result.text
    assert cancelled >= 15 and rss.peak == SLOTS  # every slot was in use at some point
    assert executor.free_slots() == SLOTS and not executor.busy
    assert executor.generated_tokens == sum(len(h.result().output_ids) for h in handles)
    assert rss[-1] - rss[0] < 64 * 2**20, f"RSS grew by {(rss[-1] - rss[0]) / 2**20:.1f} MiB after warm-up"
    # greedy requests that ran to their end: the tokens they get alone
    greedy = [(p, h) for p, h in zip(plans, handles) if p[1].get("greedy") and h.result().finish_reason != "cancelled"]
    for (ids, sampling, _, _), handle in greedy[::8]:
        assert model.generate([ids], **sampling)[0].output_ids == handle.result().output_ids
