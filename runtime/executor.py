"""In-flight batching over a backend's static KV cache: every front end's one code path.

The cache holds ``max_batch`` rows; a request owns one row (its *slot*) from admission to its
end. Each iteration of :meth:`Executor.step`:

1. frees the slots of cancelled requests, and admits waiting requests (FIFO) into free slots
   (lowest row first, which keeps running rows contiguous);
2. prefills: each admitted request's prompt is written in chunks of ``prefill_chunk`` tokens,
   each chunk a batch-1 step on that request's row alone (``backend.step_rows(row, ...)``); the
   chunks of one iteration total at most ``prefill_chunk`` tokens (at least one chunk), oldest
   request first, so a long prompt never stalls running requests for more than one chunk;
3. decodes: one step per contiguous run of rows over all requests past their prompt, each row at
   its own position and write index. A free or still-prefilling row inside a run (decoding rows
   closer than ``max_gap`` rows) gets a placeholder token written at its own next write index:
   0 for a free row, the next prompt slot for a prefilling one. Both are overwritten by that
   row's next real write before any query reads them (a query at position p reads slots <= p,
   and the step that writes slot p is the one whose query sits there), so no owner ever sees it.

A request that ends (EOS, a stop string, max_new_tokens, cancel) frees its slot at once.

Exactness: a request's chunks depend only on its own prompt and ``prefill_chunk``, and its row's
logits only on its row; so its greedy tokens, and with a seed its sampled tokens (each request
has its own random generator), are those it gets alone. (ONNX Runtime's CPU MoE kernel takes
another GEMM path when an expert receives a single token, so batched decode logits can differ
from batch-1 ones in the last float32 bits, ~1e-6; tokens flip only at such a near-tie.)

Threads: ``submit``/``cancel`` from any thread. Either a background thread runs the loop
(``start()``/``stop()``, or ``with executor:``; ``close()`` also cancels what is left and
refuses new requests), or callers drive it: iterating
a handle, ``result()``, ``generate`` and :meth:`run_until_idle` step it in the calling thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from .generator import GenerationError, Result, encode_prompt
from .requests import Handle, Request
from .sampling import SamplingParams

log = logging.getLogger(__name__)

# Tokens per prefill chunk when not given. A chunk of c tokens costs about c tokens of compute; a
# decode step reads the weights once. On a CPU (~50 GB/s against ~0.1-1 TFLOP/s) 32 tokens cost a
# few decode steps; on a GPU the ratio of compute to bandwidth is ~100x higher, hence 256 there.
DEFAULT_PREFILL_CHUNK = {"cpu": 32, "cuda": 256}


class QueueFullError(GenerationError):
    """The executor's queue already holds ``max_queue`` waiting requests."""


class Executor:
    def __init__(self, backend, tokenizer=None, eos_id: int | None = 2, *, max_queue: int = 256,
                 prefill_chunk: int | None = None, max_gap: int | None = None) -> None:  # fmt: skip
        for name, value in (("max_queue", max_queue), ("prefill_chunk", 1 if prefill_chunk is None else prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationError(f"{name}={value!r} must be an integer >= 1")
        if max_gap is not None and (not isinstance(max_gap, int) or max_gap < 0):
            raise GenerationError(f"max_gap={max_gap!r} must be None or an integer >= 0")
        self.backend, self.tokenizer = backend, tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else eos_id
        # A backend without row runs (step_rows) has one usable row: row 0 through its step().
        self._step_rows = getattr(backend, "step_rows", None) or (lambda r0, *a: backend.step(*a))
        self.slots = int(backend.max_batch) if hasattr(backend, "step_rows") else 1
        self.max_queue, self.max_gap = max_queue, max_gap
        device = "cuda" if str(getattr(backend, "device", "cpu")).startswith("cuda") else "cpu"
        self.prefill_chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK[device]
        self._rows: list[Request | None] = [None] * self.slots
        self._queue: deque[Request] = deque()
        self._qlock = threading.Condition()  # queue, cancellations, the loop thread's sleep
        self._step_lock = threading.Lock()  # the backend, the rows
        self._thread: threading.Thread | None = None
        self._stopping = self._closed = False
        self._progress = threading.Condition()  # notified after every iteration
        self.iterations = self.generated_tokens = 0

    # -- requests ------------------------------------------------------------------------------

    def submit(self, prompt, params: SamplingParams | None = None, **sampling) -> Handle:
        """Queue one request (text, or a list of token ids); returns its :class:`Handle` at once.
        ``sampling``: fields of :class:`SamplingParams`, when ``params`` is not given."""
        if params is None:
            try:
                params = SamplingParams(**sampling)
            except (TypeError, ValueError) as exc:
                raise GenerationError(str(exc)) from None
        elif sampling:
            raise GenerationError("give sampling options as params=SamplingParams(...) or as keywords, not both")
        ids = encode_prompt(prompt, self.tokenizer, self.backend.vocab_size)
        check_fits(ids, params, self.tokenizer, self.backend.max_seq_len)
        request = Request(self, ids, params)
        with self._qlock:
            if self._closed:
                raise GenerationError("the executor is closed; create a new one")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting, max_queue="
                                     f"{self.max_queue}); retry later or raise max_queue")  # fmt: skip
            self._queue.append(request)
            self._qlock.notify_all()
        return request.handle

    def generate(self, prompts: Sequence, params: SamplingParams,
                 on_token: Callable[[int, int, str], None] | None = None) -> list[Result]:  # fmt: skip
        """Submit every prompt, wait for all, results in order; ``on_token(n, token, text)`` as they come.
        If anything fails (or on_token raises), the batch's other requests are cancelled."""
        handles: list[Handle] = []
        try:
            for prompt in prompts:
                handles.append(self.submit(prompt, params))
            self._collect(handles, on_token)
            return [h.result() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise

    def _collect(self, handles: list[Handle], on_token) -> None:
        seen = [0] * len(handles)
        while True:
            iteration = self.iterations
            for n, h in enumerate(handles):
                with h._cond:
                    new = h._deltas[seen[n]:]
                seen[n] += len(new)
                for d in new if on_token is not None else ():
                    on_token(n, d.token_id, d.text)
            if all(h.done and seen[n] == len(h._deltas) for n, h in enumerate(handles)):
                return
            if self.running:
                with self._progress:
                    if self.iterations == iteration:
                        self._progress.wait(0.5)
            else:
                self._drive()

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> bool:
        """One iteration (admit, prefill chunks, one decode step); True while work remains."""
        with self._step_lock:
            self._reap()
            self._admit()
            self._prefill()
            self._decode()
            self._reap()
            busy = self.busy
        with self._progress:
            self.iterations += 1
            self._progress.notify_all()
        return busy

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def _drive(self) -> None:
        """A caller waiting on a request runs one iteration itself (no loop thread is running)."""
        self.step()

    @property
    def busy(self) -> bool:
        return bool(self._queue) or any(r is not None for r in self._rows)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        return {"queue_depth": len(self._queue), "running": sum(r is not None for r in self._rows), "slots": self.slots,
                "iterations": self.iterations, "generated_tokens": self.generated_tokens}  # fmt: skip

    def free_slots(self) -> int:
        return sum(r is None for r in self._rows)

    @contextlib.contextmanager
    def exclusive(self):
        """The backend for a caller's own steps (they write cache rows from 0): only while no request
        holds a slot, and no iteration runs meanwhile."""
        with self._step_lock:
            if any(r is not None for r in self._rows):
                raise GenerationError("the executor is serving requests, whose cache rows this would overwrite; "
                                      "call it when they are done (executor.busy is False)")  # fmt: skip
            yield self.backend

    def start(self) -> Executor:
        """Run the loop on a background thread (idempotent)."""
        with self._qlock:
            if self._closed:
                raise GenerationError("the executor is closed; create a new one")
            if self.running:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mixtral-executor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread after its current iteration; requests stay queued/admitted."""
        with self._qlock:
            self._stopping = True
            self._qlock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        """Stop, and cancel every request still waiting or running."""
        self.stop()
        with self._qlock:
            self._closed = True
            waiting, self._queue = list(self._queue), deque()
        for request in waiting:
            request.handle.cancelled = True
            request.handle._finish(request.result("cancelled"))
        with self._step_lock:
            for request in filter(None, self._rows):
                request.handle.cancelled = True
            self._reap()

    def __enter__(self) -> Executor:
        return self.start()

    def __exit__(self, *exc) -> None:
        # stop, not close: the executor stays usable (Model.generate shares it); requests still in it
        # are stepped by whoever waits on them
        self.stop()

    def _loop(self) -> None:
        while True:
            with self._qlock:
                while not self._stopping and not self.busy:
                    self._qlock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001  a bug here must not leave callers waiting forever
                log.exception("executor iteration failed")
                self._fail_all(exc)

    # -- one iteration's parts -------------------------------------------------------------------

    def _cancel(self, handle: Handle) -> None:
        with self._qlock:
            queued = next((r for r in self._queue if r.handle is handle), None)
            if queued is not None:
                self._queue.remove(queued)
                handle._finish(queued.result("cancelled"))
            self._qlock.notify_all()
        if queued is None and self._step_lock.acquire(blocking=False):  # else: freed after the running step
            try:
                self._reap()
            finally:
                self._step_lock.release()

    def _reap(self) -> None:
        for request in self._rows:
            if request is not None and request.handle.cancelled:
                self._end(request, "cancelled")

    def _end(self, request: Request, reason: str | None = None, error: BaseException | None = None) -> None:
        """Free the request's slot and give its handle the result (or error)."""
        if request.row is not None and self._rows[request.row] is request:
            self._rows[request.row] = None
        request.handle._finish(None if error else request.result(reason), error)

    def _admit(self) -> None:
        with self._qlock:
            for row in range(self.slots):
                if self._rows[row] is None and self._queue:
                    request = self._queue.popleft()
                    request.row, request.admitted = row, time.perf_counter()
                    self._rows[row] = request

    def _prefill(self) -> None:
        used = 0
        waiting = sorted((r for r in self._rows if r is not None and r.fed < len(r.ids)), key=lambda r: r.admitted)
        for request in waiting:
            while request.fed < len(request.ids):
                chunk = request.ids[request.fed : request.fed + self.prefill_chunk]
                if used and used + len(chunk) > self.prefill_chunk:
                    return
                used += len(chunk)
                start = request.fed
                try:
                    logits = self._step_rows(request.row, np.array([chunk], np.int64),
                                             np.arange(start, start + len(chunk), dtype=np.int64)[None],
                                             np.array([start], np.int64))  # fmt: skip
                except Exception as exc:  # noqa: BLE001  the request ends with the backend's error
                    self._end(request, error=exc)
                    break
                request.fed += len(chunk)
                if request.fed == len(request.ids):
                    self._choose(request, logits[0, -1:])

    def _decode(self) -> None:
        rows = [n for n, r in enumerate(self._rows) if r is not None and r.decoding]
        for r0, n in row_runs(rows, self.max_gap):
            run = self._rows[r0 : r0 + n]
            ids = np.zeros((n, 1), np.int64)
            where = np.zeros(n, np.int64)
            for k, request in enumerate(run):
                if request is not None and request.decoding:
                    ids[k, 0], where[k] = request.outputs[-1], request.position
                elif request is not None:  # prefilling: its next chunk overwrites this slot before reading it
                    where[k] = request.fed
            try:
                logits = self._step_rows(r0, ids, where[:, None].copy(), where)
            except Exception as exc:  # noqa: BLE001  every request of the run ends with the backend's error
                for request in run:
                    if request is not None and request.decoding:
                        self._end(request, error=exc)
                continue
            for k, request in enumerate(run):
                if request is not None and request.decoding:
                    self._choose(request, logits[k, -1:])

    def _choose(self, request: Request, logits: np.ndarray) -> None:
        """Sample the request's next token from its logits [1, V] and deliver it."""
        if request.handle.cancelled:
            return self._end(request, "cancelled")
        token = int(request.sampler(logits, [request.ids + request.outputs])[0])
        delta = request.accept(token, self.eos_id)
        self.generated_tokens += 1
        request.handle._push(delta)
        if request.reason is not None:
            self._end(request)

    def _fail_all(self, exc: Exception) -> None:
        with self._qlock:
            waiting, self._queue = list(self._queue), deque()
        for request in waiting:
            request.handle._finish(None, exc)
        with self._step_lock:
            for request in filter(None, self._rows):
                self._end(request, error=exc)


def row_runs(rows: list[int], max_gap: int | None = None) -> list[tuple[int, int]]:
    """Contiguous runs (r0, n) covering ``rows``; two rows with at most ``max_gap`` other rows between
    them share a run (None: one run from the first row to the last)."""
    runs: list[tuple[int, int]] = []
    for r in sorted(rows):
        if runs and (max_gap is None or r - sum(runs[-1]) <= max_gap):
            runs[-1] = (runs[-1][0], r - runs[-1][0] + 1)
        else:
            runs.append((r, 1))
    return runs


def check_fits(ids: list[int], params: SamplingParams, tokenizer, max_seq_len: int) -> None:
    if params.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer in the build directory")
    if len(ids) + params.max_new_tokens > max_seq_len:
        raise GenerationError(
            f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} = "
            f"{len(ids) + params.max_new_tokens} exceeds the build's max_seq_len={max_seq_len}"
        )
