"""The C++ executor (runtime/cpp) makes the Python executor's decisions: on the same arrival trace,
over the same deterministic backend, both call the backend with the same rows, chunks, runs,
placeholder positions, tokens and write indices, reject the same submissions, and give the same
results.

The backend (the C++ one is runtime/cpp/tools/trace_backend.h) reads a real static cache: the
logits at position p are 10 at a hash of the row's slots 0..p, 0 elsewhere; so each request's
greedy tokens are a function of its prompt alone (``continuation``), the oracle for the results.
Greedy only: the C++ sampler draws from std::mt19937_64, Python's from numpy's generator, so seeded
sampled tokens differ by design (their reproducibility is tested on each side separately).

Each iteration i of a trace: submit the requests arriving at i (file order), cancel those whose
cancel is i, one ``step()``; until the last event has passed and the executor is idle.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mixtral_trt.runtime.executor import Executor, QueueFullError
from tests.runtime.test_cpp_runtime import _MISSING, SOURCE

TRACE = Path(__file__).with_name("executor_trace.json")

pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason="C++ runtime build needs " + ", ".join(_MISSING) + ": apt-get install -y cmake g++ nlohmann-json3-dev "
    "libsentencepiece-dev libssl-dev libgtest-dev",
)


def next_token(tokens, vocab: int) -> int:
    h = 0
    for t in tokens:
        h = (h * 31 + int(t) + 1) % 1000003
    return h % vocab


def continuation(prompt: list[int], n: int, vocab: int, eos: int | None) -> list[int]:
    seq, out = list(prompt), []
    while len(out) < n:
        out.append(next_token(seq, vocab))
        seq.append(out[-1])
        if out[-1] == eos:
            break
    return out


class TraceBackend:
    """The model of trace_backend.h over a numpy cache [rows, slots], recording every step."""

    def __init__(self, slots: int, max_seq_len: int, vocab: int) -> None:
        self.max_batch, self.max_seq_len, self.vocab_size = slots, max_seq_len, vocab
        self.cache = np.zeros((slots, max_seq_len), np.int64)
        self.calls: list[dict] = []

    def step(self, input_ids, position_ids, write_indices):
        return self.step_rows(0, input_ids, position_ids, write_indices)

    def step_rows(self, r0: int, input_ids, position_ids, write_indices):
        B, S = input_ids.shape
        self.calls.append({"r0": r0, "n": B, "seq": S, "ids": input_ids.reshape(-1).tolist(),
                           "positions": position_ids.reshape(-1).tolist(),
                           "write_indices": write_indices.tolist()})  # fmt: skip
        rows = self.cache[r0 : r0 + B]  # [B, slots], a view
        logits = np.zeros((B, S, self.vocab_size), np.float32)
        for b in range(B):
            rows[b, write_indices[b] : write_indices[b] + S] = input_ids[b]
        for b in range(B):
            for s in range(S):
                p = int(position_ids[b, s])  # the query at p reads slots 0..p
                logits[b, s, next_token(rows[b, : p + 1], self.vocab_size)] = 10.0
        return logits


def run_python(trace: dict) -> list[dict]:
    backend = TraceBackend(trace["slots"], trace["max_seq_len"], trace["vocab_size"])
    ex = Executor(backend, None, trace["eos_id"], max_queue=trace["max_queue"], prefill_chunk=trace["prefill_chunk"],
                  max_gap=trace["max_gap"])  # fmt: skip
    requests, handles, events = trace["requests"], {}, []
    last_event = max(max(r["arrival"], r["cancel"] or 0) for r in requests)
    it = 0
    while True:
        for k, r in enumerate(requests):
            if r["arrival"] == it:
                try:
                    handles[k] = ex.submit(r["ids"], max_new_tokens=r["max_new_tokens"], greedy=True)
                except QueueFullError:
                    events.append({"event": "rejected", "iteration": it, "request": k})
        for k, r in enumerate(requests):
            if k in handles and r["cancel"] == it:
                handles[k].cancel()
        seen = len(backend.calls)
        busy = ex.step()
        events += [{"event": "step", "iteration": it, **c} for c in backend.calls[seen:]]
        if it >= last_event and not busy:
            break
        it += 1
    for k in sorted(handles):
        res = handles[k].result()
        events.append({"event": "result", "request": k, "output_ids": res.output_ids,
                       "finish_reason": res.finish_reason})  # fmt: skip
    return events


def run_cpp(tool: Path, trace: dict, tmp_path: Path) -> list[dict]:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    out = subprocess.run([str(tool), str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def random_trace(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(int(rng.integers(10, 25))):
        arrival = int(rng.integers(0, 40))
        cancel = arrival + int(rng.integers(0, 8)) if rng.random() < 0.25 else None
        requests.append({"arrival": arrival, "ids": [1, *rng.integers(3, 23, int(rng.integers(0, 30))).tolist()],
                         "max_new_tokens": int(rng.integers(1, 14)), "cancel": cancel})  # fmt: skip
    return {"slots": int(rng.integers(1, 7)), "max_seq_len": 48, "vocab_size": 23, "eos_id": 2,
            "prefill_chunk": int(rng.integers(1, 10)), "max_gap": [None, 0, 1][seed % 3],
            "max_queue": int(rng.integers(3, 9)), "requests": requests}  # fmt: skip


@pytest.fixture(scope="module")
def tool(tmp_path_factory) -> Path:
    """runtime/cpp's executor_trace, built alone (no tests: the TensorRT-free library and the tool)."""
    build = tmp_path_factory.mktemp("cpp-trace-build")
    configure = ["cmake", "-S", str(SOURCE), "-B", str(build), "-DMIXTRAL_BUILD_TESTS=OFF",
                 "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS_DEBUG=-O0"]  # fmt: skip
    for cmd in (configure, ["cmake", "--build", str(build), "--target", "executor_trace", "-j", "2"]):
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=os.environ)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-6000:]}{out.stderr[-3000:]}"
    return build / "executor_trace"


def _check_results(trace: dict, events: list[dict]) -> None:
    """The independent oracle: a request that was not cancelled has its prompt's continuation."""
    for e in events:
        if e["event"] == "result" and e["finish_reason"] != "cancelled":
            r = trace["requests"][e["request"]]
            want = continuation(r["ids"], r["max_new_tokens"], trace["vocab_size"], trace["eos_id"])
            assert e["output_ids"] == want, e
            assert e["finish_reason"] == ("eos" if want[-1] == trace["eos_id"] else "length")


def test_the_committed_trace_gives_the_same_steps(tool, tmp_path):
    trace = json.loads(TRACE.read_text())
    py, cpp = run_python(trace), run_cpp(tool, trace, tmp_path)
    assert cpp == py
    _check_results(trace, py)
    steps = [e for e in py if e["event"] == "step"]
    # what the trace is there to exercise: chunked prompts, wide runs, placeholders, a full queue, cancels
    assert any(e["seq"] == trace["prefill_chunk"] for e in steps)
    assert max(e["n"] for e in steps) == trace["slots"]
    assert any(e["n"] > 1 and 0 in e["ids"] for e in steps)
    assert any(e["event"] == "rejected" for e in py)
    assert sum(e.get("finish_reason") == "cancelled" for e in py) >= 2


@pytest.mark.parametrize("seed", range(6))
def test_random_traces_give_the_same_steps(tool, tmp_path, seed):
    trace = random_trace(seed)
    py, cpp = run_python(trace), run_cpp(tool, trace, tmp_path)
    assert len(cpp) == len(py)
    for n, (a, b) in enumerate(zip(cpp, py)):
        assert a == b, f"event {n} differs (C++ first, then Python)"
    _check_results(trace, py)
